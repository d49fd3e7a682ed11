"""linear_cross_entropy against the float64 reference: loss, dh and dW, torch path and Triton path.

Chunk sizes force several chunks with a ragged last one (37 tokens in chunks of 8 or 16). Without
CUDA the Triton row kernel runs under the interpreter; bf16 on the Triton path is GPU-only (the chunk GEMMs
are torch, but the interpreter's bf16 is not what runs on a GPU, so it is left to the CUDA test). bf16 on the
PyTorch path (a CPU under --precision bf16) is checked on CPU tensors.
"""

import pytest
import torch
import torch.nn.functional as F

from thinkrec_kernels import linear_cross_entropy, reference
from thinkrec_kernels._dispatch import use_triton
from thinkrec_kernels.compile_check import spec_from_case
from thinkrec_kernels.linear_ce import CHUNK_BYTES, _chunk_rows, compile_cases
from tests.utils import CUDA, assert_close

pytestmark = pytest.mark.smoke  # .ci/newest runs this module on the newest dependency versions

IGNORE = -100
# (T, D, V, chunk_rows): odd sizes; 37/8 and 37/16 leave a ragged last chunk; None = default budget
# Inputs live on the GPU when there is one: THINKREC_KERNELS=triton with CPU tensors needs the interpreter,
# which a CUDA machine does not run.
DEV = "cuda" if CUDA else "cpu"
CASES = [(1, 72, 50, None), (37, 136, 257, 8), (37, 72, 1000, 16)]


def _inputs(T, D, V, dtype, device=None, seed=0, ignore_every=5):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, D, generator=g)
    w = torch.randn(V, D, generator=g) * (2.0 / D**0.5)  # logits ~ N(0, 4): a peaked softmax
    targets = torch.randint(0, V, (T,), generator=g)
    targets[1::ignore_every] = IGNORE  # some ignored rows (none when T == 1)
    device = device or DEV
    return h.to(device, dtype), w.to(device, dtype), targets.to(device)


def _upstream(T, reduction, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, generator=g) if reduction == "none" else torch.tensor(0.7)


def _run(fn, h, w, targets, reduction, g_out, weight_grad=True, **kw):
    h = h.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_(weight_grad)
    loss = fn(h, w, targets, ignore_index=IGNORE, reduction=reduction, **kw)
    loss.backward(g_out.to(loss))
    return loss, h.grad, w.grad


def _check(h, w, targets, reduction, chunk_rows, weight_grad=True):
    g_out = _upstream(h.shape[0], reduction)
    got = _run(linear_cross_entropy, h, w, targets, reduction, g_out, weight_grad, chunk_rows=chunk_rows)
    want = _run(reference.linear_cross_entropy, h.double().cpu(), w.double().cpu(), targets.cpu(), reduction,
                g_out.double(), weight_grad)
    for name, a, e in zip(("loss", "dh", "dW"), got, want):
        if e is None:
            assert a is None, f"{name}: expected no gradient"
            continue
        assert_close(a, e, dtype=h.dtype, name=name)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("T,D,V,chunk_rows", CASES)
def test_torch_path_matches_reference(monkeypatch, T, D, V, chunk_rows, reduction):
    monkeypatch.setenv("THINKREC_KERNELS", "torch")
    _check(*_inputs(T, D, V, torch.float32), reduction, chunk_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("T,D,V,chunk_rows", CASES)
def test_triton_path_matches_reference(monkeypatch, T, D, V, chunk_rows, reduction, dtype):
    monkeypatch.setenv("THINKREC_KERNELS", "triton")
    _check(*_inputs(T, D, V, dtype), reduction, chunk_rows)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("T,D,V,chunk_rows", CASES)
def test_cpu_bf16_torch_path_matches_reference(monkeypatch, T, D, V, chunk_rows, reduction):
    """bf16 h and weight on a CPU (--precision bf16 without a GPU): THINKREC_KERNELS=auto takes the PyTorch
    path (bf16 chunk GEMMs and dz, fp32 row statistics and dW accumulator); dh and dW in bf16, the loss in
    fp32 (as computed: not rounded to bf16), within TOL[bf16] of the float64 reference."""
    monkeypatch.setenv("THINKREC_KERNELS", "auto")
    h, w, targets = _inputs(T, D, V, torch.bfloat16, device="cpu")
    assert not use_triton(h, w)
    loss = linear_cross_entropy(h, w, targets, ignore_index=IGNORE, reduction=reduction, chunk_rows=chunk_rows)
    assert loss.dtype == torch.float32
    _check(h, w, targets, reduction, chunk_rows)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_half_matches_reference(monkeypatch, dtype, reduction):
    monkeypatch.setenv("THINKREC_KERNELS", "auto")
    _check(*_inputs(301, 576, 5003, dtype, device="cuda"), reduction, 64)


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_equals_f_cross_entropy_with_ignored_rows(monkeypatch, mode):
    monkeypatch.setenv("THINKREC_KERNELS", mode)
    h, w, targets = _inputs(37, 72, 257, torch.float32, ignore_every=3)
    want = F.cross_entropy(h @ w.T, targets, ignore_index=IGNORE)
    assert_close(linear_cross_entropy(h, w, targets, ignore_index=IGNORE, chunk_rows=8), want, name="loss")
    rows = linear_cross_entropy(h, w, targets, ignore_index=IGNORE, reduction="none", chunk_rows=8)
    assert (rows[targets == IGNORE] == 0).all(), "ignored rows must have loss 0"
    assert_close(rows, F.cross_entropy(h @ w.T, targets, ignore_index=IGNORE, reduction="none"), name="rows")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_all_ignored_batch_gives_zero_and_zero_grads(monkeypatch, mode, reduction):
    monkeypatch.setenv("THINKREC_KERNELS", mode)
    h, w, _ = _inputs(13, 72, 50, torch.float32)
    h.requires_grad_()
    w.requires_grad_()
    loss = linear_cross_entropy(h, w, torch.full((13,), IGNORE), ignore_index=IGNORE, reduction=reduction,
                                chunk_rows=4)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and (loss == 0).all(), f"loss {loss}"
    assert (h.grad == 0).all() and (w.grad == 0).all(), "gradients of an all-ignored batch must be zero"


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_frozen_weight_gets_no_grad(monkeypatch, mode):
    monkeypatch.setenv("THINKREC_KERNELS", mode)
    _check(*_inputs(37, 72, 257, torch.float32), "mean", chunk_rows=16, weight_grad=False)


def test_no_grad_forward_matches():
    h, w, targets = _inputs(37, 72, 257, torch.float32)
    with torch.no_grad():
        loss = linear_cross_entropy(h, w, targets, ignore_index=IGNORE, chunk_rows=8)
    assert_close(loss, F.cross_entropy(h @ w.T, targets, ignore_index=IGNORE), name="no_grad loss")


@pytest.mark.parametrize("T,V,elt", [(4096, 49152, 4), (4096, 128256, 2), (37, 50, 4), (8, 2**40, 4)])
def test_default_chunk_stays_under_budget(T, V, elt):
    rows = _chunk_rows(T, V, elt, CHUNK_BYTES)
    assert 1 <= rows <= T
    assert rows == 1 or rows * V * elt <= CHUNK_BYTES, f"{rows} rows x {V} x {elt} B exceeds {CHUNK_BYTES} B"
    assert rows == T or (rows + 1) * V * elt > CHUNK_BYTES, "chunk is smaller than the budget allows"


def test_bad_arguments_name_the_problem():
    h, w, targets = _inputs(4, 16, 20, torch.float32)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(h, w, targets, reduction="avg")
    with pytest.raises(ValueError, match="targets"):
        linear_cross_entropy(h, w, targets[:3])
    with pytest.raises(ValueError, match="chunk_rows"):
        linear_cross_entropy(h, w, targets, chunk_rows=0)


def test_compile_specs_follow_the_launcher():
    specs = [spec_from_case(c) for c in compile_cases()]
    assert {s["signature"]["logits_ptr"] for s in specs} == {"*bf16", "*fp16"}
    assert {s["signature"]["targets_ptr"] for s in specs} == {"*i64"}
    for s in specs:
        assert all(v >= 16 for v in s["constexprs"].values()), f"{s['name']}: block below 16"


@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_strided_h_and_out_of_range_targets(monkeypatch, mode):
    """h as a transposed view (the chunk GEMMs read strides) gives the reference's loss and gradient; a
    target outside [0, V) is an error on both paths (the row kernel never reads outside its row: the
    target logit comes from the stats loop, not from a separate load at row + target)."""
    monkeypatch.setenv("THINKREC_KERNELS", mode)
    h, w, targets = _inputs(37, 72, 257, torch.float32)
    _check(h.T.contiguous().T, w, targets, "mean", chunk_rows=16)
    assert not h.T.contiguous().T.is_contiguous()
    if h.is_cuda:
        return  # on a GPU the check is a device-side assert, which would poison the CUDA context for later tests
    for bad in (257, -1):
        t = targets.clone()
        t[4] = bad
        with pytest.raises(RuntimeError, match=r"targets must be in \[0, V=257\)"):
            linear_cross_entropy(h, w, t, ignore_index=IGNORE, chunk_rows=16)
