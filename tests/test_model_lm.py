"""ThinkRecLM on a tiny random Llama: hidden states, placeholder replacement, padding, per-row experts."""

import pytest
import torch

from tests.tiny_llama import VOCAB, tiny_llama
from tests.utils import assert_close
from thinkrec.model import ThinkRecLM
from thinkrec.model.lora import LoRAConfig

pytestmark = pytest.mark.smoke  # .ci/newest runs this module on the newest dependency versions

PH = {"<UserID>": VOCAB, "<ItemID>": VOCAB + 1}  # past the embedding table on purpose (see tokens.py)


def make_lm(n_experts=2, cf_dim=12, nonzero_b=True, seed=0, dtype=torch.float32):
    lm = ThinkRecLM(tiny_llama(seed, dtype=dtype), n_experts=n_experts, lora=LoRAConfig(dropout=0.0), cf_dim=cf_dim,
                    projector_mid=20, placeholder_token_ids=PH, yes_token_id=5)
    if nonzero_b:
        torch.manual_seed(seed + 1)
        with torch.no_grad():
            for mod in lm.lora_layers().values():
                for B in mod.lora_B:
                    B.normal_(std=0.2)
    return lm.eval()


def test_fresh_lora_gives_base_hidden_states():
    lm = make_lm(nonzero_b=False)
    base = tiny_llama(0)
    ids = torch.randint(3, VOCAB, (2, 9))
    h = lm(ids, torch.ones_like(ids))
    h0 = base.model(ids).last_hidden_state
    assert h.shape == (2, 9, 64)
    assert_close(h, h0.double(), dtype=torch.float32, name="hidden states with B = 0")
    # the frozen head the trainer uses is the base model's
    assert torch.equal(lm.lm_head_weight, base.lm_head.weight) and not lm.lm_head_weight.requires_grad


def test_placeholders_replaced_in_order_and_differentiable():
    lm = make_lm()
    lm.set_trainable(adapters=[], projector=True)
    ids = torch.randint(3, VOCAB, (2, 7))
    ids[0, 1], ids[1, 0], ids[1, 4] = PH["<UserID>"], PH["<UserID>"], PH["<ItemID>"]
    cf = torch.randn(3, 12)
    emb = lm.embed(ids, cf)
    proj = lm.projector(cf)
    for k, (b, t) in enumerate([(0, 1), (1, 0), (1, 4)]):
        assert torch.equal(emb[b, t], proj[k]), f"slot {k} at {(b, t)} is not the projection of cf[{k}]"
    plain = lm.llm.get_input_embeddings()(ids.masked_fill(lm.placeholder_mask(ids), 0))
    keep = ~lm.placeholder_mask(ids)
    assert torch.equal(emb[keep], plain[keep])
    h = lm(ids, torch.ones_like(ids), cf)
    h[:, -1].sum().backward()
    grads = [p.grad for p in lm.projector.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in lm.llm.parameters())
    with pytest.raises(ValueError, match="3 placeholder tokens but 2"):
        lm(ids, torch.ones_like(ids), cf[:2])
    with pytest.raises(ValueError, match="no cf_embeds"):
        lm(ids, torch.ones_like(ids))


def test_left_padding_does_not_change_a_row():
    lm = make_lm()
    w = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.25, 0.25]])
    short = torch.randint(3, VOCAB, (5,))
    long = torch.randint(3, VOCAB, (8,))
    ids = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long), short]), long])
    mask = (torch.arange(8) >= 3).long()[None].repeat(2, 1)
    mask[1] = 1
    h = lm(ids, mask, expert_weights=w)
    h_short = lm(short[None], torch.ones(1, 5, dtype=torch.long), expert_weights=w[:1])
    assert_close(h[0, 3:], h_short[0].double(), dtype=torch.float32, name="left-padded row")
    h_long = lm(long[None], torch.ones(1, 8, dtype=torch.long), expert_weights=w[1:])
    assert_close(h[1], h_long[0].double(), dtype=torch.float32, name="unpadded row in a mixed batch")


def test_per_row_expert_weights_select_adapters():
    lm = make_lm(n_experts=3)
    ids = torch.randint(3, VOCAB, (3, 6))
    mask = torch.ones_like(ids)
    w = torch.eye(4)[[2, 0, 3]]
    h = lm(ids, mask, expert_weights=w)
    for b in range(3):
        assert_close(h[b], lm(ids[b:b + 1], mask[b:b + 1], expert_weights=w[b])[0].double(), dtype=torch.float32,
                     name=f"row {b}")
    assert not torch.allclose(h[0], lm(ids, mask, expert_weights=torch.eye(4)[[1, 0, 3]])[0]), \
        "changing row 0's expert changed nothing"
    assert torch.equal(lm(ids, mask), lm(ids, mask, expert_weights=torch.eye(4)[0])), "no weights = global"


@pytest.mark.parametrize("path", ["packed", "hf"])
def test_gradient_checkpointing_keeps_lora_gradients(path):
    """Also through Hugging Face's padded forward, whose recompute runs outside the forward's
    `expert_weights` block and must still see the rows' weights."""
    grads = []
    for on in (False, True):
        lm = make_lm(seed=4).train()
        if path == "hf":
            lm.unpacked_reason = "forced for the test"  # what a model without the padding-free path gets
        lm.gradient_checkpointing(on)
        torch.manual_seed(0)
        ids = torch.randint(3, VOCAB, (2, 6))
        w = torch.tensor([[0.3, 0.7, 0.0], [0.0, 0.0, 1.0]])
        (lm(ids, torch.ones_like(ids), expert_weights=w) * torch.randn(2, 6, 64)).sum().backward()
        grads.append([p.grad.clone() for p in lm.parameters() if p.requires_grad and p.grad is not None])
    assert len(grads[1]) == len(grads[0]) == 2 * 2 * 3 * 2  # layers x (q, v) x adapters x (A, B)
    for g0, g1 in zip(*grads):
        assert g0.abs().max() > 1e-2, "gradient too small for the comparison to mean anything"
        assert_close(g1, g0.double(), dtype=torch.float32, name="grad with checkpointing")


def test_bf16_base_keeps_fp32_lora_masters():
    lm32 = make_lm(seed=6)
    lm16 = make_lm(seed=6, dtype=torch.bfloat16)  # base in bf16, as on a GPU; LoRA and projector stay fp32
    ids = torch.randint(3, VOCAB, (2, 5))
    ids[1, 2] = PH["<ItemID>"]
    cf = torch.randn(1, 12)
    probe = torch.randn(2, 5, 64)  # a random linear loss: sum(h^2) after the RMSNorm nearly cancels in grad
    grads = []
    for lm in (lm32, lm16):
        h = lm(ids, torch.ones_like(ids), cf, expert_weights=torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]))
        (h.float() * probe).sum().backward()
        grads.append(lm.lora_layers()["model.layers.1.self_attn.v_proj"].lora_B[1].grad)
    assert h.dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    rel = (grads[1] - grads[0]).norm() / grads[0].norm()
    assert grads[0].norm() > 1e-2 and rel < 0.05, f"bf16 LoRA gradient is {rel:.3f} off the fp32 one (relative norm)"
