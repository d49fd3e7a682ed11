"""yes_head_bce against the float64 reference: loss, logits, dh and dW, torch path and Triton path.

Without CUDA the Triton path runs under the interpreter (tests/conftest.py). The kernel has no tl.dot,
so bf16 is checked there too.
"""

import pytest
import torch
import torch.nn.functional as F

from thinkrec_kernels import reference, yes_head_bce
from thinkrec_kernels._dispatch import use_triton
from thinkrec_kernels.compile_check import spec_from_case
from thinkrec_kernels.yes_head import compile_cases
from tests.utils import CUDA, assert_close

pytestmark = pytest.mark.smoke  # .ci/newest runs this module on the newest dependency versions

SHAPES = [(1, 72, 50), (37, 136, 257), (37, 72, 1000)]  # (M, D, V), odd on purpose
TOKEN_ID = 17
# Inputs live on the GPU when there is one: THINKREC_KERNELS=triton with CPU tensors needs the interpreter,
# which a CUDA machine does not run.
DEV = "cuda" if CUDA else "cpu"


def _inputs(M, D, V, dtype, device=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(M, D, generator=g)
    w = torch.randn(V, D, generator=g) / D**0.5  # logits ~ N(0, 1): both sigmoid tails and the middle
    labels = torch.randint(0, 2, (M,), generator=g)
    device = device or DEV
    return h.to(device, dtype), w.to(device, dtype), labels.to(device)


def _upstream(M, reduction, seed=1):
    """One shared upstream gradient: for the loss (scalar or [M]) and for the returned logits [M]."""
    g = torch.Generator().manual_seed(seed)
    g_loss = torch.randn(M, generator=g) if reduction == "none" else torch.tensor(0.7)
    return g_loss, torch.randn(M, generator=g)


def _run(fn, h, w, labels, reduction, g_loss, g_logits, weight_grad=True):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_(weight_grad)
    loss, logits = fn(h, w, TOKEN_ID, labels, reduction=reduction)
    torch.autograd.backward([loss, logits], [g_loss.to(loss), g_logits.to(logits)])
    return loss, logits, h.grad, w.grad


def _check(h, w, labels, reduction, weight_grad=True):
    g_loss, g_logits = _upstream(h.shape[0], reduction)
    got = _run(yes_head_bce, h, w, labels, reduction, g_loss, g_logits, weight_grad)
    want = _run(reference.yes_head_bce, h.double().cpu(), w.double().cpu(), labels.cpu(), reduction,
                g_loss.double(), g_logits.double(), weight_grad)
    for name, a, e in zip(("loss", "logits", "dh", "dW"), got, want):
        if e is None:
            assert a is None, f"{name}: expected no gradient"
            continue
        assert_close(a, e, dtype=h.dtype, name=name)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("M,D,V", SHAPES)
def test_torch_path_matches_reference(monkeypatch, M, D, V, reduction):
    monkeypatch.setenv("THINKREC_KERNELS", "torch")
    _check(*_inputs(M, D, V, torch.float32), reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("M,D,V", SHAPES)
def test_cpu_bf16_torch_path_matches_reference(monkeypatch, M, D, V, reduction):
    """bf16 h and LM head on a CPU (--precision bf16 without a GPU): THINKREC_KERNELS=auto takes the PyTorch
    path, whose dot and BCE run in fp32: logits and gradients in bf16, the loss in fp32 (as computed), within
    TOL[bf16]."""
    monkeypatch.setenv("THINKREC_KERNELS", "auto")
    h, w, labels = _inputs(M, D, V, torch.bfloat16, device="cpu")
    assert not use_triton(h, w)
    loss, logits = yes_head_bce(h, w, TOKEN_ID, labels, reduction=reduction)
    assert loss.dtype == torch.float32 and logits.dtype == torch.bfloat16
    _check(h, w, labels, reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("M,D,V", SHAPES)
def test_triton_path_matches_reference(monkeypatch, M, D, V, reduction, dtype):
    monkeypatch.setenv("THINKREC_KERNELS", "triton")
    _check(*_inputs(M, D, V, dtype), reduction)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_half_matches_reference(monkeypatch, dtype):
    monkeypatch.setenv("THINKREC_KERNELS", "auto")
    _check(*_inputs(61, 576, 4099, dtype, device="cuda"), "mean")


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_equals_bce_on_full_logits_column_and_grad_is_one_row(monkeypatch, mode):
    """The op equals BCE on column `id` of the full logits, and dW is zero outside row `id`."""
    monkeypatch.setenv("THINKREC_KERNELS", mode)
    h, w, labels = _inputs(37, 136, 257, torch.float32)
    h.requires_grad_()
    w.requires_grad_()
    loss, logits = yes_head_bce(h, w, TOKEN_ID, labels)
    full = (h @ w.T)[:, TOKEN_ID]
    assert_close(logits, full, name="logits vs full column")
    assert_close(loss, F.binary_cross_entropy_with_logits(full, labels.float()), name="loss vs F.bce")
    loss.backward()
    others = torch.ones(w.shape[0], dtype=torch.bool)
    others[TOKEN_ID] = False
    assert w.grad[others].abs().max().item() == 0.0, "dW has non-zero entries outside the Yes row"
    assert w.grad[TOKEN_ID].abs().max().item() > 0.0, "dW row of the Yes token is zero"


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_frozen_lm_head_gets_no_grad(monkeypatch, mode):
    """A frozen LM head (the usual case) gets no gradient at all, and dh is still right."""
    monkeypatch.setenv("THINKREC_KERNELS", mode)
    _check(*_inputs(37, 72, 257, torch.float32), "mean", weight_grad=False)


def test_saturated_logits_stay_finite(monkeypatch):
    """|z| ~ 1e3: the stable BCE form gives finite loss and gradients (a naive log(sigmoid) gives inf)."""
    monkeypatch.setenv("THINKREC_KERNELS", "triton")
    h = (torch.tensor([100.0, -100.0, 100.0])[:, None] * torch.ones(3, 16)).to(DEV).requires_grad_()
    w = torch.zeros(20, 16, device=DEV)
    w[TOKEN_ID] = 0.625  # z = +-1000
    labels = torch.tensor([0, 1, 1], device=DEV)
    loss, logits = yes_head_bce(h, w, TOKEN_ID, labels, reduction="none")
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(h.grad).all()
    assert_close(loss, F.binary_cross_entropy_with_logits(logits.double(), labels.double(), reduction="none"),
                 name="saturated loss")


def test_bad_arguments_name_the_problem():
    h, w, labels = _inputs(4, 16, 20, torch.float32)
    with pytest.raises(ValueError, match="token_id"):
        yes_head_bce(h, w, 20, labels)
    with pytest.raises(ValueError, match="reduction"):
        yes_head_bce(h, w, 0, labels, reduction="avg")
    with pytest.raises(ValueError, match="labels"):
        yes_head_bce(h, w, 0, labels[:3])


def test_compile_specs_follow_the_launcher():
    specs = [spec_from_case(c) for c in compile_cases()]
    assert {s["signature"]["h_ptr"] for s in specs} == {"*bf16", "*fp16"}
    assert {s["signature"]["labels_ptr"] for s in specs} == {"*fp32"} and specs[0]["signature"]["M"] == "i32"
    for s in specs:
        assert all(v >= 16 for v in s["constexprs"].values()), f"{s['name']}: block below 16"
        assert set(s["constexprs"]) <= {k for k, v in s["signature"].items() if v == "constexpr"}


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_strided_h_and_weight(monkeypatch, mode):
    """h as a transposed view and the LM head as a column slice (the kernel reads both through strides)."""
    monkeypatch.setenv("THINKREC_KERNELS", mode)
    h, w, labels = _inputs(37, 72, 257, torch.float32)
    h_t = h.T.contiguous().T
    w_s = torch.cat([w, torch.zeros_like(w)], 1)[:, :72]
    assert not h_t.is_contiguous() and not w_s.is_contiguous()
    _check(h_t, w_s, labels, "mean")


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_empty_batch_gives_zero_loss(monkeypatch, mode):
    """M = 0 (no rows in this shard): loss 0 for every reduction and empty gradients, no division by zero
    (on a GPU the launcher's grid is (0,), which Triton skips)."""
    monkeypatch.setenv("THINKREC_KERNELS", mode)
    h = torch.zeros(0, 72, device=DEV, requires_grad=True)
    w = torch.randn(257, 72, device=DEV, requires_grad=True)
    for reduction in ("mean", "sum", "none"):
        loss, logits = yes_head_bce(h, w, TOKEN_ID, torch.zeros(0), reduction=reduction)
        assert logits.shape == (0,) and loss.shape == ((0,) if reduction == "none" else ())
        assert (loss == 0).all(), f"{reduction}: loss {loss}"
        loss.sum().backward()
        assert h.grad.shape == (0, 72) and (w.grad == 0).all()
