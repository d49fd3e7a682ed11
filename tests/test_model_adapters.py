"""Adapter files: our save/load round trip and its errors; PEFT export loaded by peft gives our logits."""

import json

import pytest
import torch

from tests.test_model_lm import PH, make_lm
from tests.tiny_llama import VOCAB, tiny_llama
from thinkrec.model import ThinkRecLM, export_peft, load_adapters, save_adapters
from thinkrec.io import ArtifactError
from thinkrec.model.__main__ import main as model_cli
from thinkrec.model.adapters import AdapterFileError
from thinkrec.model.lora import LoRAConfig


def test_save_load_round_trip(tmp_path):
    lm = make_lm(n_experts=2, seed=3)
    save_adapters(lm, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapters.json").read_text())
    assert cfg["adapters"] == ["global", "expert_1", "expert_2"] and cfg["r"] == 8 and cfg["n_experts"] == 2
    fresh = make_lm(n_experts=2, nonzero_b=False, seed=3)  # same base weights, different LoRA and projector
    with torch.no_grad():
        for p in fresh.parameters():
            if p.requires_grad:
                p.normal_()
    load_adapters(fresh, tmp_path / "ad")
    for k, v in lm.state_dict().items():
        if "lora_" in k or k.startswith("projector."):
            assert torch.equal(v, fresh.state_dict()[k]), k
    ids = torch.randint(3, VOCAB, (2, 5))
    w = torch.tensor([0.2, 0.3, 0.5])
    assert torch.equal(lm(ids, expert_weights=w), fresh(ids, expert_weights=w))


def test_load_errors_are_clear(tmp_path):
    lm = make_lm(n_experts=2)
    save_adapters(lm, tmp_path)
    with pytest.raises(AdapterFileError, match="n_experts=2.*n_experts=3"):
        load_adapters(make_lm(n_experts=3), tmp_path)
    other_r = ThinkRecLM(tiny_llama(), n_experts=2, lora=LoRAConfig(r=4), cf_dim=12, projector_mid=20,
                         placeholder_token_ids=PH)
    with pytest.raises(AdapterFileError, match="saved r=8 but the model has r=4"):
        load_adapters(other_r, tmp_path)
    wider = make_lm(n_experts=2, cf_dim=13)
    with pytest.raises(AdapterFileError, match="shapes differ.*projector"):
        load_adapters(wider, tmp_path)
    (tmp_path / "adapters.safetensors").unlink()
    with pytest.raises(AdapterFileError, match="adapters.safetensors is missing"):
        load_adapters(lm, tmp_path)


@pytest.mark.parametrize("name", ["adapters.json", "adapters.safetensors"])
def test_damaged_adapter_file_is_one_line(tmp_path, name):
    lm = make_lm(n_experts=1)
    save_adapters(lm, tmp_path / "stage2")
    path = tmp_path / "stage2" / name
    path.write_bytes(path.read_bytes()[:-7])  # truncated
    with pytest.raises(ArtifactError) as e:
        load_adapters(lm, tmp_path / "stage2")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{path} is damaged (") and e.value.__suppress_context__
    assert msg.endswith(f"delete {tmp_path / 'stage2'}/ and rerun the stage that wrote it")


@pytest.mark.parametrize("adapter", [0, 2])
def test_peft_export_round_trip(tmp_path, adapter):
    peft = pytest.importorskip("peft", reason="peft is a test extra (pip install -e .[test])")
    lm = make_lm(n_experts=2, seed=5)
    save_adapters(lm, tmp_path / "ad")
    assert model_cli(["export", "--adapters", str(tmp_path / "ad"), "--peft", str(tmp_path / "peft")]) == 0
    name = lm.adapter_names[adapter]
    for n in lm.adapter_names:
        assert (tmp_path / "peft" / n / "adapter_model.safetensors").is_file()
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(5), str(tmp_path / "peft" / name)).eval()
    ids = torch.randint(3, VOCAB, (2, 7))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
        h = lm(ids, torch.ones_like(ids), expert_weights=torch.eye(3)[adapter])
        ours = h @ lm.lm_head_weight.T
    assert (expected - tiny_llama(5)(input_ids=ids).logits).abs().max() > 1e-3, "the adapter changes nothing"
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0), f"max |diff| {(ours - expected).abs().max():.2e}"


def test_peft_export_selects_and_checks_names(tmp_path):
    lm = make_lm(n_experts=1)
    save_adapters(lm, tmp_path / "ad")
    dirs = export_peft(tmp_path / "ad", tmp_path / "out", adapters=["expert_1"], base_model="my/base")
    assert [d.name for d in dirs] == ["expert_1"] and not (tmp_path / "out" / "global").exists()
    cfg = json.loads((dirs[0] / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "my/base" and cfg["lora_alpha"] == 16.0
    assert cfg["target_modules"] == ["q_proj", "v_proj"] and cfg["peft_type"] == "LORA"
    with pytest.raises(AdapterFileError, match="no adapter \\['expert_7'\\]"):
        export_peft(tmp_path / "ad", tmp_path / "out", adapters=["expert_7"])

