"""LoRALinear: forward/gradients against the float64 reference, merge exactness, per-adapter freezing."""

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from thinkrec_kernels import reference as ref
from tests.utils import assert_close
from thinkrec.model.lora import (LoRAConfig, LoRALinear, init_experts_from_global, inject_lora, last_layers,
                                 lora_modules, merge_lora, set_trainable)
from thinkrec.model.lora import LoRADropout, dropout_keep, expert_weights


def make_layer(K, N, E, r=4, bias=True, dropout=0.0, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(K, N, bias=bias, dtype=dtype)
    layer = LoRALinear(base, E, r=r, alpha=2.0 * r + 1, dropout=dropout, dtype=dtype)
    with torch.no_grad():
        for B in layer.lora_B:  # non-zero B so the delta is visible
            B.normal_()
    return layer


@pytest.mark.parametrize("K,N,E,r,bias", [(16, 24, 3, 4, True), (37, 13, 5, 3, False), (8, 8, 1, 1, True)])
def test_forward_and_grads_match_reference(K, N, E, r, bias):
    layer = make_layer(K, N, E, r, bias)
    x = torch.randn(3, 5, K, dtype=torch.float64, requires_grad=True)
    w = torch.softmax(torch.randn(3, E, dtype=torch.float64), -1)
    y = layer(x, w)
    g = torch.randn_like(y)
    y.backward(g)

    x_r = x.detach().clone().requires_grad_(True)
    A_r, B_r = (t.detach().clone().requires_grad_(True) for t in layer.stacked())
    y_r = ref.lora_linear(x_r, layer.weight, layer.bias, A_r, B_r, w[:, None, :].expand(3, 5, E), layer.scale)
    y_r.backward(g)
    assert_close(y, y_r, name="y")
    assert_close(x.grad, x_r.grad, name="dx")
    for e in range(E):
        assert_close(layer.lora_A[e].grad, A_r.grad[e], name=f"dA[{e}]")
        assert_close(layer.lora_B[e].grad, B_r.grad[e], name=f"dB[{e}]")
    assert layer.weight.grad is None and (layer.bias is None or layer.bias.grad is None)


def test_expert_weight_shapes():
    layer = make_layer(10, 6, 3)
    x = torch.randn(2, 4, 10, dtype=torch.float64)
    y_none = layer(x)  # no weights = global adapter alone
    assert torch.equal(y_none, layer(x, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)))
    w_row = torch.tensor([[0.0, 1.0, 0.0], [0.2, 0.3, 0.5]], dtype=torch.float64)
    y_row = layer(x, w_row)
    assert_close(y_row, layer(x, w_row[:, None, :].expand(2, 4, 3).contiguous()), name="[B,E] vs [B,T,E]")
    with expert_weights(w_row):  # a block's weights reach calls without their own; the call's win
        assert torch.equal(layer(x), y_row)
        assert torch.equal(layer(x, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)), y_none)
    assert torch.equal(layer(x), y_none), "the block's weights outlived the block"
    with pytest.raises(ValueError, match="2 columns"):
        layer(x, torch.ones(2))
    with pytest.raises(ValueError, match="do not fit"):
        layer(x, torch.ones(5, 3))


def test_dropout_only_on_lora_input():
    p = 0.3
    layer = make_layer(12, 7, 2, dropout=p).train()
    x = torch.randn(4, 12, dtype=torch.float64)
    w = torch.tensor([0.4, 0.6], dtype=torch.float64)
    torch.manual_seed(7)
    y = layer(x, w)
    torch.manual_seed(7)
    keep, scale = dropout_keep(x.shape, p)
    xd = x * keep * scale
    A, B = layer.stacked()
    expected = F.linear(x, layer.weight, layer.bias) + ref.lora_mix(xd, A, B, w.expand(4, 2), layer.scale)
    assert_close(y, expected, name="y with dropout")
    assert not torch.allclose(y, layer.eval()(x)), "dropout had no effect in train mode"


def test_one_weight_vector_computes_only_its_adapters():
    layer = make_layer(10, 6, 3, r=2)
    with torch.no_grad():
        for B in layer.lora_B:
            B.normal_()
    x = torch.randn(5, 10, dtype=torch.float64)
    A, B = layer.stacked()
    for w in ([0.0, 1.0, 0.0], [0.3, 0.0, 0.7], None):
        wt = torch.tensor([1.0, 0.0, 0.0] if w is None else w, dtype=torch.float64)
        expected = F.linear(x, layer.weight, layer.bias) + ref.lora_mix(x, A, B, wt.expand(5, 3), layer.scale)
        assert_close(layer(x, None if w is None else wt), expected, name=f"y, weights {w}")
    for e in range(3):  # only adapter 2 trains; rows on the frozen global adapter still reach it (grad 0)
        layer.lora_A[e].requires_grad_(e == 2)
        layer.lora_B[e].requires_grad_(e == 2)
    layer(x).sum().backward()
    assert layer.lora_B[2].grad is not None and not layer.lora_B[2].grad.any()
    with torch.no_grad():
        assert torch.equal(layer(x, torch.zeros(3, dtype=torch.float64)), F.linear(x, layer.weight, layer.bias))


def test_dropout_keep_rate_scale_and_gradient():
    torch.manual_seed(0)
    keep, scale = dropout_keep((1001, 999), 0.05)  # odd count: the last 16-bit word is half used
    p_eff = round(0.05 * 65536) / 65536
    assert keep.shape == (1001, 999) and keep.dtype == torch.bool
    assert abs(scale - 1 / (1 - p_eff)) < 1e-15
    sd = (p_eff * (1 - p_eff) / keep.numel()) ** 0.5
    assert abs(1 - keep.float().mean().item() - p_eff) < 5 * sd  # drop rate p, within 5 standard errors
    assert abs(keep[:, 0].float().mean().item() - keep[:, -1].float().mean().item()) < 0.05  # no position bias
    drop = LoRADropout(0.3).train()
    x = torch.randn(37, 11, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(3)
    y = drop(x)
    torch.manual_seed(3)
    k, sc = dropout_keep(x.shape, 0.3)
    assert torch.equal(y, x * k * sc)  # the same mask from the same generator state
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g * k * sc)
    assert torch.equal(drop.eval()(x), x)
    assert not LoRADropout(1.0).train()(x).any()
    z, sc0 = dropout_keep((5,), 1e-7)  # rounds to 0: keep everything, scale 1
    assert z.all() and sc0 == 1.0


def test_merge_is_exact_and_leaves_base_untouched():
    layer = make_layer(19, 11, 4, r=3, dtype=torch.float32)
    W0 = layer.weight.detach().clone()
    for e in range(4):
        onehot = [0.0] * 4
        onehot[e] = 1.0
        merged = layer.merged_weight(onehot)
        expected = W0 + layer.scale * (layer.lora_B[e] @ layer.lora_A[e])
        assert torch.equal(merged, expected), f"merge of adapter {e} is not exactly W + scale * B @ A"
    w = torch.tensor([0.1, 0.2, 0.3, 0.4])
    expected64 = W0.double() + layer.scale * sum(
        w[e].double() * layer.lora_B[e].double() @ layer.lora_A[e].double() for e in range(4))
    assert_close(layer.merged_weight(w), expected64, dtype=torch.float32, name="weighted merge")
    lin = layer.merge(w)
    assert torch.equal(layer.weight, W0), "merge changed the frozen base weight"
    assert not lin.weight.requires_grad and lin.weight.data_ptr() != layer.weight.data_ptr()
    x = torch.randn(5, 19)
    assert_close(lin(x), layer(x, w).double(), dtype=torch.float32, name="merged linear vs LoRA forward")


class TwoBlocks(nn.Module):
    """Mimics the HF path layout model.layers.<i>.self_attn.{q,k,v}_proj."""

    def __init__(self, n_layers=3, d=9):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList()
        for _ in range(n_layers):
            blk = nn.Module()
            blk.self_attn = nn.Module()
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(blk.self_attn, name, nn.Linear(d, d))
            self.model.layers.append(blk)

    def forward(self, x):
        for blk in self.model.layers:
            a = blk.self_attn
            x = torch.tanh(a.q_proj(x) + a.k_proj(x) * a.v_proj(x))
        return x


def test_inject_replaces_only_targets():
    torch.manual_seed(0)
    net = TwoBlocks()
    k_before = net.model.layers[1].self_attn.k_proj
    paths = inject_lora(net, LoRAConfig(r=2, alpha=4, dropout=0.0), n_experts=2)
    assert paths == [f"model.layers.{i}.self_attn.{n}" for i in range(3) for n in ("q_proj", "v_proj")]
    assert net.model.layers[1].self_attn.k_proj is k_before and isinstance(k_before, nn.Linear)
    assert all(m.n_adapters == 3 for m in lora_modules(net).values())
    assert not any(p.requires_grad for n, p in net.named_parameters() if "lora_" not in n)
    with pytest.raises(ValueError, match="no nn.Linear named"):
        inject_lora(TwoBlocks(), LoRAConfig(target_modules=["c_attn"]), n_experts=0)


def test_frozen_adapters_get_zero_update_under_adamw():
    torch.manual_seed(1)
    net = TwoBlocks(n_layers=3)
    inject_lora(net, LoRAConfig(r=2, alpha=4, dropout=0.0), n_experts=3)
    for m in lora_modules(net).values():
        with torch.no_grad():
            for B in m.lora_B:
                B.normal_()
    init_experts_from_global(net)
    m0 = net.model.layers[0].self_attn.q_proj
    assert torch.equal(m0.lora_A[2], m0.lora_A[0]) and torch.equal(m0.lora_B[3], m0.lora_B[0])
    assert last_layers(net, 2) == [1, 2]
    n = set_trainable(net, layers=last_layers(net, 2), adapters=[1, 2, 3])  # stage 3: experts, last layers
    assert n == 2 * 2 * 3 * (2 * 9 + 9 * 2)
    before = {k: v.detach().clone() for k, v in net.state_dict().items()}
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)  # decay would move any slice it was handed
    x = torch.randn(4, 9)
    for _ in range(2):
        opt.zero_grad()
        with expert_weights(torch.eye(4)[[1, 2, 3, 1]]):  # rows routed one-hot to experts 1..3
            net(x).square().sum().backward()
        opt.step()
    after = net.state_dict()
    for k, v in before.items():
        trainable = any(f"layers.{i}." in k for i in (1, 2)) and any(f"lora_{ab}.{e}" in k
                                                                   for ab in "AB" for e in (1, 2, 3))
        changed = not torch.equal(v, after[k])
        assert changed == trainable, f"{k}: changed={changed}, expected trainable={trainable}"


def test_merge_lora_model_matches_lora_forward():
    torch.manual_seed(2)
    net = TwoBlocks(n_layers=2, d=7)
    inject_lora(net, LoRAConfig(r=3, alpha=5, dropout=0.0), n_experts=2)
    for m in lora_modules(net).values():
        with torch.no_grad():
            for B in m.lora_B:
                B.normal_()
    w = torch.tensor([0.2, 0.0, 0.8])
    x = torch.randn(3, 7)
    with expert_weights(w):
        y = net(x)
    merged = merge_lora(copy.deepcopy(net), w)
    assert not lora_modules(merged)
    assert_close(merged(x), y.double(), dtype=torch.float32, name="merged model")


def test_merge_linear_combination_matches_its_forward():
    layer = make_layer(11, 6, 3, r=2)
    layer.mix = "linear"  # peft's cross-term mix, the official code's behaviour
    w = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    x = torch.randn(4, 11, dtype=torch.float64)
    A, B = layer.stacked()
    expected = F.linear(x, layer.weight, layer.bias) + ref.lora_mix_linear(x, A, B, w.expand(4, 3), layer.scale)
    assert_close(layer(x, w), expected, name="linear-mode forward")
    assert_close(layer.merge(w)(x), expected, name="linear-mode merge")
