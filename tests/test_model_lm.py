"""ThinkRecLM on a tiny random Llama: hidden states, placeholder replacement, padding, per-row experts."""

import pytest
import torch

from tests.tiny_llama import VOCAB, tiny_llama
from tests.utils import assert_close
from thinkrec.model import ThinkRecLM
from thinkrec.model.lora import LoRAConfig

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
    lm.set_expert_weights(torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.25, 0.25]]))
    short = torch.randint(3, VOCAB, (5,))
    long = torch.randint(3, VOCAB, (8,))
    ids = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long), short]), long])
    mask = (torch.arange(8) >= 3).long()[None].repeat(2, 1)
    mask[1] = 1
    h = lm(ids, mask)
    lm.set_expert_weights(torch.tensor([[0.0, 1.0, 0.0]]))
    h_short = lm(short[None], torch.ones(1, 5, dtype=torch.long))
    assert_close(h[0, 3:], h_short[0].double(), dtype=torch.float32, name="left-padded row")
    lm.set_expert_weights(torch.tensor([[0.5, 0.25, 0.25]]))
    h_long = lm(long[None], torch.ones(1, 8, dtype=torch.long))
    assert_close(h[1], h_long[0].double(), dtype=torch.float32, name="unpadded row in a mixed batch")


def test_per_row_expert_weights_select_adapters():
    lm = make_lm(n_experts=3)
    ids = torch.randint(3, VOCAB, (3, 6))
    mask = torch.ones_like(ids)
    w = torch.eye(4)[[2, 0, 3]]
    lm.set_expert_weights(w)
    h = lm(ids, mask)
    for b in range(3):
        lm.set_expert_weights(w[b])
        assert_close(h[b], lm(ids[b:b + 1], mask[b:b + 1])[0].double(), dtype=torch.float32, name=f"row {b}")
    lm.set_expert_weights(torch.eye(4)[[1, 0, 3]])
    assert not torch.allclose(h[0], lm(ids, mask)[0]), "changing row 0's expert changed nothing"


def test_gradient_checkpointing_keeps_lora_gradients():
    grads = []
    for on in (False, True):
        lm = make_lm(seed=4).train()
        lm.gradient_checkpointing(on)
        lm.set_expert_weights(torch.tensor([[0.3, 0.7, 0.0], [0.0, 0.0, 1.0]]))
        torch.manual_seed(0)
        ids = torch.randint(3, VOCAB, (2, 6))
        (lm(ids, torch.ones_like(ids)) * torch.randn(2, 6, 64)).sum().backward()
        grads.append([p.grad.clone() for p in lm.parameters() if p.requires_grad and p.grad is not None])
    assert len(grads[1]) == len(grads[0]) == 2 * 2 * 3 * 2  # layers x (q, v) x adapters x (A, B)
    for g0, g1 in zip(*grads):
        assert g0.abs().max() > 1e-2, "gradient too small for the comparison to mean anything"
        assert_close(g1, g0.double(), dtype=torch.float32, name="grad with checkpointing")


def test_cf_rows_picks_user_or_item_table():
    from thinkrec.model.projector import cf_rows

    users, items = torch.randn(3, 5), torch.randn(7, 5)
    kind, index = torch.tensor([0, 1, 1, 0]), torch.tensor([2, 6, 0, 0])
    out = cf_rows(users, items, kind, index)
    assert torch.equal(out, torch.stack([users[2], items[6], items[0], users[0]]))
    with pytest.raises(ValueError, match="user index 3 out of range"):
        cf_rows(users, items, torch.tensor([0]), torch.tensor([3]))


def test_bf16_base_keeps_fp32_lora_masters():
    lm32 = make_lm(seed=6)
    lm16 = make_lm(seed=6, dtype=torch.bfloat16)  # base in bf16, as on a GPU; LoRA and projector stay fp32
    ids = torch.randint(3, VOCAB, (2, 5))
    ids[1, 2] = PH["<ItemID>"]
    cf = torch.randn(1, 12)
    probe = torch.randn(2, 5, 64)  # a random linear loss: sum(h^2) after the RMSNorm nearly cancels in grad
    grads = []
    for lm in (lm32, lm16):
        lm.set_expert_weights(torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]))
        h = lm(ids, torch.ones_like(ids), cf)
        (h.float() * probe).sum().backward()
        grads.append(lm.lora_layers()["model.layers.1.self_attn.v_proj"].lora_B[1].grad)
    assert h.dtype == torch.bfloat16 and grads[1].dtype == torch.float32
    rel = (grads[1] - grads[0]).norm() / grads[0].norm()
    assert grads[0].norm() > 1e-2 and rel < 0.05, f"bf16 LoRA gradient is {rel:.3f} off the fp32 one (relative norm)"
