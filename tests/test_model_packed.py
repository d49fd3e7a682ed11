"""The padding-free forward (thinkrec/model/packed.py) against Hugging Face's own padded forward of the same
model: hidden states, the pruned last layer behind `select`, and LoRA / projector gradients, for the
Llama, Qwen2 (biases) and Qwen3 (q/k norms) layouts, with per-row expert mixtures and CF slots."""

import copy

import pytest
import torch

from tests.tiny_llama import VOCAB
from tests.train_fixtures import NO, PAD, YES, USER_PH, ITEM_PH, sample_set, tiny_lm
from tests.utils import TOL
from thinkrec.model import LoRAConfig, ThinkRecLM
from thinkrec.model.packed import Packing, packed_supported
from thinkrec.batches import cf_inputs, collate
from thinkrec.train.losses import batch_loss, loss_positions

pytestmark = pytest.mark.smoke  # .ci/newest runs this module on the newest dependency versions


def _tiny(kind: str) -> ThinkRecLM:
    if kind == "llama":
        return tiny_lm(layers=3, n_experts=2, cf_dim=5)
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0)
    if kind == "qwen2":  # q/k/v biases
        cfg = transformers.Qwen2Config(**common)
        llm = transformers.Qwen2ForCausalLM(cfg)
    else:  # qwen3: per-head q/k RMSNorm, head_dim not hidden / heads
        cfg = transformers.Qwen3Config(**common, head_dim=24)
        llm = transformers.Qwen3ForCausalLM(cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in llm.parameters():  # HF zero-inits biases and ones-inits norms: make every term visible
            p.add_(0.05 * torch.randn_like(p))
    lm = ThinkRecLM(llm.eval(), n_experts=2, lora=LoRAConfig(r=4, alpha=8.0, dropout=0.0), cf_dim=5,
                    projector_mid=24, yes_token_id=YES, no_token_id=NO,
                    placeholder_token_ids={"<UserID>": USER_PH, "<ItemID>": ITEM_PH})
    with torch.no_grad():
        for mod in lm.lora_layers().values():
            for B in mod.lora_B:
                B.copy_(0.1 * torch.randn(B.shape))
    return lm


def _batch(seed=3, idx=(0, 1, 2, 3, 4, 5)):
    sset = sample_set(16, ids=True, seed=seed)
    b = collate([sset.sample(i) for i in idx], sset.users[list(idx)], PAD)
    g = torch.Generator().manual_seed(seed)
    return b, cf_inputs(b, torch.randn(6, 5, generator=g), torch.randn(11, 5, generator=g))


def _loss_and_grads(lm, b, cf, w, packed: bool):
    lm.zero_grad(set_to_none=True)
    if packed:
        h = lm(b.input_ids, b.attention_mask, cf_embeds=cf, placeholder_mask=b.ph_mask, select=loss_positions(b),
               expert_weights=w)
    else:
        h = lm._forward_hf(b.input_ids, b.attention_mask, cf, b.ph_mask, None, w)
    loss = batch_loss(h, lm.lm_head_weight, YES, b)[0]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in lm.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3"])
def test_packed_forward_matches_hf_padded_forward(kind):
    lm = _tiny(kind)
    assert lm.packed, lm.unpacked_reason
    b, cf = _batch()
    assert int(b.attention_mask.sum()) < b.attention_mask.numel()  # the batch really is padded
    w = torch.softmax(torch.randn(len(b.labels), lm.n_adapters, generator=torch.Generator().manual_seed(1)), -1)
    with torch.no_grad():
        ref = lm._forward_hf(b.input_ids, b.attention_mask, cf, b.ph_mask, None, w)
        full = lm(b.input_ids, b.attention_mask, cf_embeds=cf, placeholder_mask=b.ph_mask, expert_weights=w)
        m = b.attention_mask.bool()
        torch.testing.assert_close(full[m], ref[m], atol=2e-5, rtol=1e-4)
        assert torch.count_nonzero(full[~m]) == 0  # padding comes back as zeros
        # the pruned last layer: only the selected states, repeats and any order
        rows, cols = loss_positions(b)
        perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(2))
        sel = lm(b.input_ids, b.attention_mask, cf_embeds=cf, placeholder_mask=b.ph_mask, select=(rows[perm], cols[perm]),
                 expert_weights=w)
        torch.testing.assert_close(sel, ref[rows[perm], cols[perm]], atol=2e-5, rtol=1e-4)


def trainable_case(kind: str):
    """(lm with every LoRA and the projector trainable, batch, CF vectors, per-row expert mixtures)."""
    lm = _tiny(kind)
    lm.set_trainable(layers=None, adapters=None, projector=True)
    b, cf = _batch(seed=4)
    w = torch.softmax(torch.randn(len(b.labels), lm.n_adapters, generator=torch.Generator().manual_seed(5)), -1)
    return lm, b, cf, w


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_packed_gradients_match_hf(kind):
    lm, b, cf, w = trainable_case(kind)
    loss_p, g_p = _loss_and_grads(lm, b, cf, w, packed=True)
    loss_h, g_h = _loss_and_grads(lm, b, cf, w, packed=False)
    torch.testing.assert_close(loss_p, loss_h, atol=1e-5, rtol=1e-5)
    assert g_p.keys() == g_h.keys() and any("projector" in n for n in g_p) and any("lora_A.2" in n for n in g_p)
    for n in g_h:
        torch.testing.assert_close(g_p[n], g_h[n], atol=1e-5, rtol=1e-4, msg=n)


def test_packing_layout_and_padding_error():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1], [1, 1, 0, 0, 0]])  # left, none, left, right
    pk = Packing.from_mask(mask)
    assert pk.L == 5 and pk.lengths.tolist() == [3, 5, 1, 2]
    assert pk.pos.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 0, 1]
    x = torch.arange(20.0).view(4, 5)
    torch.testing.assert_close(pk.unpack(pk.pack(x)), x * mask)
    assert pk.index(torch.tensor([0, 3]), torch.tensor([4, 1])).tolist() == [2, 10]
    with pytest.raises(ValueError, match="padding"):
        pk.index(torch.tensor([0]), torch.tensor([0]))


def test_right_padded_row_equals_left_padded():
    lm = tiny_lm(layers=2, n_experts=1)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, VOCAB, (1, 7), generator=g)
    left = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    right = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    ml = torch.tensor([[0, 0, 0] + [1] * 7])
    mr = torch.tensor([[1] * 7 + [0, 0, 0]])
    with torch.no_grad():
        hl, hr = lm(left, ml), lm(right, mr)
    torch.testing.assert_close(hl[:, 3:], hr[:, :7], atol=1e-5, rtol=1e-5)


def test_unsupported_architectures_fall_back():
    class Cfg:
        model_type = "gemma2"
    assert "gemma2" in packed_supported(Cfg())

    class Slide:
        model_type, sliding_window, use_sliding_window = "qwen2", 64, True
    assert "sliding" in packed_supported(Slide())


def test_gradient_checkpointing_recomputes_each_layer(monkeypatch):
    import thinkrec.model.packed as packed

    calls = []
    real = packed.layer_forward
    monkeypatch.setattr(packed, "layer_forward", lambda *a: calls.append(1) or real(*a))
    lm = tiny_lm(layers=3, n_experts=1).train()
    lm.gradient_checkpointing(True)
    ids = torch.randint(10, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[0, 0, 0] + [1] * 6, [1] * 9])
    lm(ids, mask).sum().backward()
    assert len(calls) == 2 * 3  # forward + recompute in the backward, per layer
    calls.clear()
    lm.gradient_checkpointing(False)
    lm(ids, mask).sum().backward()
    assert len(calls) == 3


def test_packed_forward_under_bf16_autocast():
    """The GPU trainer runs under bf16 autocast: mixed dtypes (bf16 projections, fp32 residual stream and
    RoPE tables) must flow through the grid copies and the pruned layer, forward and backward, and agree
    with HF's forward under the same autocast to bf16 precision."""
    lm = tiny_lm(layers=3, n_experts=2, cf_dim=5)
    lm.set_trainable(layers=None, adapters=None, projector=True)
    b, cf = _batch(seed=6)
    w = torch.softmax(torch.randn(len(b.labels), lm.n_adapters), -1)
    rows, cols = loss_positions(b)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sel = lm(b.input_ids, b.attention_mask, cf_embeds=cf, placeholder_mask=b.ph_mask, select=(rows, cols),
                 expert_weights=w)
        ref = lm._forward_hf(b.input_ids, b.attention_mask, cf, b.ph_mask, (rows, cols), w)
    torch.testing.assert_close(sel.float(), ref.float(), atol=0.05, rtol=0.05)
    batch_loss(sel, lm.lm_head_weight, YES, b)[0].backward()
    grads = [p.grad for n, p in lm.named_parameters() if "lora_B.1" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_bf16_model_matches_fp32():
    """--precision bf16 on a CPU: frozen weights stored in bf16 (thinkrec.model.lowp.cast_frozen) and the forward
    under bf16 autocast (ThinkRecLM.forward enters it for precision "bf16"). Hidden states of a left-padded batch
    with per-row expert mixtures and CF slots, and the LoRA / projector gradients, agree with the fp32 model to
    a relative norm under TOL[bf16]'s rtol; LoRA and projector stay fp32, with fp32 gradients."""
    from thinkrec.model.lowp import cast_frozen

    lm = tiny_lm(layers=3, n_experts=2, cf_dim=5)
    lm.set_trainable(layers=None, adapters=None, projector=True)
    lm16 = copy.deepcopy(lm)
    assert cast_frozen(lm16, torch.bfloat16) > 0
    lm16.precision = "bf16"
    for n, p in lm16.named_parameters():
        trainable = ".lora_" in n or n.startswith("projector.")
        assert p.dtype == (torch.float32 if trainable else torch.bfloat16), f"{n}: {p.dtype}"
    b, cf = _batch(seed=6)
    m = b.attention_mask.bool()
    assert (~m[:, 0]).any() and m[:, -1].all()  # left-padded
    g = torch.Generator().manual_seed(7)
    w = torch.softmax(torch.randn(len(b.labels), lm.n_adapters, generator=g), -1)
    # (h * R).sum() with a fixed random R: h.pow(2).sum() is nearly constant after the final RMSNorm
    R = torch.randn(*b.input_ids.shape, lm.llm.config.hidden_size, generator=g)

    def run(model):
        model.zero_grad(set_to_none=True)
        h = model(b.input_ids, b.attention_mask, cf_embeds=cf, placeholder_mask=b.ph_mask, expert_weights=w)
        (h.float() * R).sum().backward()
        return h.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    def rel(a, e):
        return ((a.double() - e.double()).norm() / e.double().norm()).item()

    tol = TOL[torch.bfloat16][1]  # rtol 5e-2; measured ~7e-3 for h, <= 1.6e-2 for the gradients
    h32, g32 = run(lm)
    h16, g16 = run(lm16)
    assert h32.dtype == torch.float32 and h16.dtype == torch.bfloat16
    assert torch.count_nonzero(h16[~m]) == 0  # padding comes back as zeros
    assert rel(h16[m], h32[m]) < tol, f"hidden states: relative error {rel(h16[m], h32[m]):.3e}"
    assert g16.keys() == g32.keys() and any("lora_A.2" in n for n in g16) and any("projector" in n for n in g16)
    for n in g32:
        assert g16[n].dtype == torch.float32, f"{n}: gradient in {g16[n].dtype}"
        assert rel(g16[n], g32[n]) < tol, f"{n}: relative error {rel(g16[n], g32[n]):.3e}"
