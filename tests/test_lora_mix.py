"""lora_mix / lora_linear against the float64 reference: output and every gradient, one shared upstream
gradient, on the PyTorch path and on the Triton path (interpreter on CPU, compiled on CUDA)."""

import pytest
import torch
import torch.nn.functional as F

from thinkrec_kernels import lora_linear, lora_mix
from thinkrec_kernels import reference as ref
from thinkrec_kernels._dispatch import use_triton
from thinkrec_kernels.lora import _TritonOps, launch_config
from tests.utils import CUDA, TOL, assert_close

pytestmark = pytest.mark.smoke  # .ci/newest runs this module on the newest dependency versions

DEV = "cuda" if CUDA else "cpu"
# (path, dtype): the Triton interpreter gets fp32 and fp16 (its tl.dot is wrong on bf16); bf16 needs a GPU.
PATHS = [("torch", torch.float32), ("triton", torch.float32), ("triton", torch.float16),
         pytest.param("triton", torch.bfloat16, marks=pytest.mark.skipif(not CUDA, reason="bf16 needs CUDA"))]
# (leading dims of x, K, N, E, r); odd sizes everywhere, 3-D inputs, E = 1 / 3 / 16, r = 4 .. 64.
SHAPES = [((1,), 16, 16, 1, 4), ((37,), 72, 136, 3, 8), ((2, 5), 40, 24, 16, 4), ((9,), 33, 65, 2, 64),
          ((3, 7), 64, 48, 5, 16), ((3,), 20, 18, 16, 64),  # E * r = 1024 columns
          ((3,), 4100, 20, 2, 8),     # K = 4100: a long, ragged K loop
          ((1100,), 24, 20, 3, 4)]    # M > 1024: dA/dB reductions split over M (partial sums added)


def _make(lead, K, N, E, r, dtype, seed=0, weights="dense", device=DEV):
    """Inputs scaled so the delta is O(1): x ~ N(0, 1), A ~ N(0, 1/K), B ~ N(0, 1/r)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, K, generator=g)
    A = torch.randn(E, r, K, generator=g) / K ** 0.5
    B = torch.randn(E, N, r, generator=g) / r ** 0.5
    if weights == "dense":
        w = torch.softmax(torch.randn(*lead, E, generator=g) * 2, -1)
    else:  # one-hot
        w = F.one_hot(torch.randint(0, E, lead, generator=g), E).double()
    return [t.to(device, dtype).requires_grad_() for t in (x, A, B, w)]


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g, allow_unused=True)


def _check_against_reference(fn, ref_fn, inputs, dtype, name, scale=0.75, relative_atol=False, **kw):
    """Output and all gradients of fn(*inputs) vs ref_fn on float64 copies, one shared upstream gradient.

    relative_atol: atol is TOL's times the largest |expected| (for sums over ~1e5 rows, where rounding
    the stored 16-bit intermediates adds ~sqrt(M) * 2**-8 * |term| to elements that may be near zero);
    True for every result, or a tuple of labels ("dA", "dB") for those results only."""
    out = fn(*inputs, scale, **kw)
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    out64 = ref_fn(*inputs64, scale)
    g = torch.randn(out64.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(out64.device)
    pairs = [("out", out, out64)]
    pairs += zip("dx dA dB dw dW db".split(), _grads(out, inputs, g.to(dtype)), _grads(out64, inputs64, g))
    for label, got, exp in pairs:
        rel = relative_atol is True or label in (relative_atol or ())
        atol = TOL[dtype][0] * max(1.0, exp.abs().max().item()) if rel else None
        assert_close(got, exp, dtype, name=f"{name} {label}", atol=atol)


@pytest.fixture
def path(request, monkeypatch):
    monkeypatch.setenv("THINKREC_KERNELS", request.param)
    return request.param


@pytest.mark.parametrize("path,dtype", PATHS, indirect=["path"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_lora_mix_matches_reference(path, dtype, shape):
    inputs = _make(*shape, dtype=dtype)
    _check_against_reference(lora_mix, ref.lora_mix, inputs, dtype, f"{path} {shape}")


@pytest.mark.parametrize("path,dtype", PATHS[:3], indirect=["path"])
def test_lora_linear_matches_linear_plus_delta(path, dtype):
    x, A, B, w = _make((4, 9), 40, 72, 3, 8, dtype, seed=2)
    W = (torch.randn(72, 40) / 40 ** 0.5).to(DEV, dtype).requires_grad_()
    b = torch.randn(72).to(DEV, dtype).requires_grad_()

    def ref_fn(x, A, B, w, W, b, scale):
        return F.linear(x, W, b) + ref.lora_mix(x, A, B, w, scale)

    def ours(x, A, B, w, W, b, scale):
        return lora_linear(x, W, b, A, B, w, scale)

    _check_against_reference(ours, ref_fn, [x, A, B, w, W, b], dtype, f"{path} lora_linear")


@pytest.mark.parametrize("path,dtype", PATHS[:2], indirect=["path"])
@pytest.mark.parametrize("shape", [SHAPES[1], SHAPES[3]], ids=str)
def test_linear_mode_matches_peft_formula(path, dtype, shape):
    x, A, B, w = _make(*shape, dtype=dtype, seed=3)
    with torch.no_grad():
        w.clamp_(min=0.05)  # d sqrt(w)/dw is infinite at 0, for the reference as for us
    _check_against_reference(lora_mix, ref.lora_mix_linear, [x, A, B, w], dtype, f"{path} linear", mix="linear")


@pytest.mark.parametrize("path", ["torch", "triton"], indirect=True)
def test_single_expert_is_plain_lora(path):
    x, A, B, _ = _make((37,), 72, 40, 1, 8, torch.float32, seed=4)
    w = torch.ones(37, 1, device=DEV)
    plain = 0.5 * (x @ A[0].T) @ B[0].T
    assert_close(lora_mix(x, A, B, w, 0.5), plain.double(), name="E=1 vs plain LoRA")


@pytest.mark.parametrize("path", ["torch", "triton"], indirect=True)
def test_one_hot_rows_equal_their_expert_and_zero_rows_vanish(path):
    x, A, B, w = _make((37,), 48, 24, 4, 8, torch.float32, seed=5, weights="one-hot")
    w = w.detach().clone()
    w[::5] = 0.0  # every fifth row has no adapter at all
    out = lora_mix(x, A, B, w, 2.0)
    for m in range(37):
        e = int(w[m].argmax())
        expected = 2.0 * w[m, e] * (B[e] @ (A[e] @ x[m]))
        assert_close(out[m], expected.double(), name=f"row {m} (expert {e})")
    assert (out[::5] == 0).all(), "rows with w = 0 must give an exact zero delta"
    (dx,) = torch.autograd.grad(out, [x], torch.randn_like(out))
    assert (dx[::5] == 0).all(), "rows with w = 0 must get no gradient through the LoRA"
    assert dx[1].abs().sum() > 0


@pytest.mark.parametrize("path", ["torch", "triton"], indirect=True)
def test_mixed_dtypes_and_w_without_grad(path):
    """fp64 adapters and weights with an fp32 x (fp32 master weights under autocast, in miniature): the op
    computes in x's dtype and returns gradients in each input's own dtype; w needs no grad."""
    x, A, B, w = _make((2, 7), 24, 20, 3, 4, torch.float32, seed=6)
    A, B = (t.detach().double().requires_grad_() for t in (A, B))
    w = w.detach().double()
    out = lora_mix(x, A, B, w, 1.0)
    assert out.dtype == torch.float32
    dx, dA, dB = torch.autograd.grad(out.sum(), [x, A, B])
    assert (dx.dtype, dA.dtype, dB.dtype) == (torch.float32, torch.float64, torch.float64)
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    exp = ref.lora_mix(x64, A64, B64, w, 1.0)
    assert_close(out, exp, name="out (mixed dtypes)")
    for name, got, e in zip(("dx", "dA", "dB"), (dx, dA, dB), torch.autograd.grad(exp.sum(), [x64, A64, B64])):
        assert_close(got, e, torch.float32, name=f"{name} (mixed dtypes)")


@pytest.mark.parametrize("path", ["torch", "triton"], indirect=True)
def test_dispatch_picks_the_requested_path(path):
    """THINKREC_KERNELS picks the path for every kernel dtype; fp64 (no kernel) always takes PyTorch."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert use_triton(torch.zeros(2, 2, device=DEV, dtype=dtype)) is (path == "triton")
    assert use_triton(torch.zeros(2, 2, device=DEV, dtype=torch.float64), torch.zeros(2, device=DEV)) is False


def test_bad_shapes_are_named():
    x, A, B, w = _make((5,), 16, 8, 2, 4, torch.float32)
    with pytest.raises(ValueError, match="w must be"):
        lora_mix(x, A, B, w[:, :1], 1.0)
    with pytest.raises(ValueError, match="does not match A"):
        lora_mix(x, A, B[:, :, :2], w, 1.0)
    with pytest.raises(ValueError, match="mix="):
        lora_mix(x, A, B, w, 1.0, mix="cat")
    with pytest.raises(ValueError, match="weight must be"):
        lora_linear(x, torch.zeros(8, 15, device=DEV), None, A, B, w, 1.0)


def test_empty_batch():
    x, A, B, w = _make((0,), 16, 8, 2, 4, torch.float32)
    assert lora_mix(x, A, B, w, 1.0).shape == (0, 8)


@pytest.mark.skipif(not CUDA, reason="large-M check runs on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_large_shapes(dtype, monkeypatch):
    monkeypatch.setenv("THINKREC_KERNELS", "auto")
    x, A, B, w = _make((100_003,), 576, 576, 3, 8, dtype, seed=7)
    _check_against_reference(lora_mix, ref.lora_mix, [x, A, B, w], dtype, "gpu M=100003", relative_atol=True)


@pytest.mark.parametrize("path", ["torch", "triton"], indirect=True)
@pytest.mark.parametrize("op", ["lora_mix", "lora_linear"])
def test_autocast_computes_in_the_autocast_dtype(path, op):
    """fp32 x and weights under autocast: the op computes and returns in autocast's dtype (as F.linear does)
    and the backward runs outside autocast with gradients in each input's own dtype. Before the fix the
    base addmm ran in the autocast dtype and the rest in fp32, and the backward failed on mixed dtypes.
    (fp16 autocast: the interpreter's bf16 tl.dot is wrong; on CUDA the same code runs with bf16.)"""
    dt = torch.float16
    x, A, B, w = _make((3, 5), 40, 24, 3, 8, torch.float32, seed=8)
    W = (torch.randn(24, 40) / 40 ** 0.5).to(DEV).requires_grad_()
    fn = (lambda *t: lora_mix(*t[:4], 0.5)) if op == "lora_mix" else (lambda *t: lora_linear(t[0], t[4], None,
                                                                                              *t[1:4], 0.5))
    with torch.autocast(DEV, dtype=dt):
        out = fn(x, A, B, w, W)
    assert out.dtype == dt
    grads = torch.autograd.grad(out.float().sum(), [x, A, B, w, W], allow_unused=True)
    assert [g.dtype for g in grads if g is not None] == [torch.float32] * (5 if op == "lora_linear" else 4)
    inputs64 = [t.detach().double().requires_grad_() for t in (x, A, B, w, W)]
    exp = ref.lora_mix(*inputs64[:4], 0.5) + (F.linear(inputs64[0], inputs64[4]) if op == "lora_linear" else 0)
    assert_close(out, exp, dt, name=f"{path} {op} autocast out")
    for name, got, e in zip(("dx", "dA", "dB", "dw", "dW"), grads,
                            torch.autograd.grad(exp.sum(), inputs64, allow_unused=True)):
        if e is not None:
            assert_close(got, e, dt, name=f"{path} {op} autocast {name}")


# --precision bf16 on a CPU: the PyTorch path in bf16 (THINKREC_KERNELS=auto takes it for CPU tensors). xa and gb
# are stored in bf16 there as on a GPU, so in lora_mix over SHAPES dA and dB, sums over M rows of products of them,
# get TOL's atol times their largest |element| (SHAPES[1]: |dA| up to 32 from terms up to 7, off by up to 0.15
# where it is near 0; the Triton kernels' roundings, emulated in float64, miss plain TOL there too). Everything
# else gets TOL as it is.
BF16_SUMS = ("dA", "dB")


@pytest.mark.parametrize("path", ["auto"], indirect=True)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_cpu_bf16_lora_mix_matches_reference(path, shape):
    """x, A, B, w in bf16 on a CPU: the PyTorch path computes in bf16; output and every gradient in bf16,
    within TOL[bf16] of the float64 reference."""
    bf = torch.bfloat16
    inputs = _make(*shape, dtype=bf, device="cpu")
    assert not use_triton(*inputs)
    assert lora_mix(*inputs, 0.75).dtype == bf
    _check_against_reference(lora_mix, ref.lora_mix, inputs, bf, f"cpu bf16 {shape}", relative_atol=BF16_SUMS)


@pytest.mark.parametrize("path", ["torch", "auto"], indirect=True)
@pytest.mark.parametrize("adapters", [torch.bfloat16, torch.float32], ids=["bf16-adapters", "fp32-adapters"])
def test_cpu_bf16_lora_linear_matches_reference(path, adapters):
    """bf16 x, weight and bias on a CPU with bf16 adapters and w, or fp32 ones (LoRA masters, which lora_linear
    casts to x's dtype, differentiably): the output in bf16, it and every gradient within TOL[bf16] of the
    float64 reference."""
    bf = torch.bfloat16
    g = torch.Generator().manual_seed(12)
    x, A, B, w = _make((4, 9), 40, 72, 3, 8, torch.float32, seed=2, device="cpu")
    x = x.detach().to(bf).requires_grad_()
    A, B, w = (t.detach().to(adapters).requires_grad_() for t in (A, B, w))
    W = (torch.randn(72, 40, generator=g) / 40 ** 0.5).to(bf).requires_grad_()
    b = torch.randn(72, generator=g).to(bf).requires_grad_()
    inputs = [x, A, B, w, W, b]
    assert not use_triton(*inputs)

    def ref_fn(x, A, B, w, W, b, scale):
        return F.linear(x, W, b) + ref.lora_mix(x, A, B, w, scale)

    def ours(x, A, B, w, W, b, scale):
        return lora_linear(x, W, b, A, B, w, scale)

    assert ours(*inputs, 0.75).dtype == bf
    _check_against_reference(ours, ref_fn, inputs, bf, f"{path} cpu bf16 lora_linear")


@pytest.mark.parametrize("path", ["auto"], indirect=True)
@pytest.mark.parametrize("base", [torch.float32, torch.bfloat16], ids=["fp32-base", "bf16-base"])
def test_cpu_bf16_autocast_gives_fp32_adapter_grads(path, base):
    """--precision bf16 on a CPU in miniature: fp32 x, adapters and w, the base weight and bias in fp32 or
    stored in bf16 (thinkrec.precision.cast_frozen; frozen then), under CPU bf16 autocast: lora_linear returns
    bf16 and the gradients reach the fp32 inputs in fp32, all within TOL[bf16] of the float64 reference."""
    bf = torch.bfloat16
    g = torch.Generator().manual_seed(13)
    x, A, B, w = _make((3, 5), 40, 24, 3, 8, torch.float32, seed=8, device="cpu")
    W = (torch.randn(24, 40, generator=g) / 40 ** 0.5).to(base).requires_grad_(base == torch.float32)
    b = torch.randn(24, generator=g).to(base).requires_grad_(base == torch.float32)
    inputs = [x, A, B, w, W, b]
    with torch.autocast("cpu", dtype=bf):
        assert not use_triton(x.to(bf), W, b, A, B, w)
        out = lora_linear(x, W, b, A, B, w, 0.5)
    assert out.dtype == bf
    names = [n for n, t in zip(("dx", "dA", "dB", "dw", "dW", "db"), inputs) if t.requires_grad]
    up = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, [t for t in inputs if t.requires_grad], up.to(bf))
    assert [t.dtype for t in grads] == [torch.float32] * len(names), "gradients must reach fp32 inputs in fp32"
    inputs64 = [t.detach().double().requires_grad_(t.requires_grad) for t in inputs]
    exp = F.linear(inputs64[0], inputs64[4], inputs64[5]) + ref.lora_mix(*inputs64[:4], 0.5)
    assert_close(out, exp, bf, name=f"autocast bf16 {base} out")
    for name, got, e in zip(names, grads, torch.autograd.grad(exp, [t for t in inputs64 if t.requires_grad], up)):
        assert_close(got, e, bf, name=f"autocast bf16 {base} {name}")


@pytest.mark.parametrize("path", ["torch", "triton"], indirect=True)
def test_strided_views_and_frozen_inputs(path):
    """3-D x as a permuted view, A and B as transposed views, w broadcast over the sequence with stride 0
    (how LoRALinear passes per-sample weights), A frozen: the kernels read through the strides."""
    g = torch.Generator().manual_seed(9)
    E, r, K, N = 3, 8, 40, 24
    x = torch.randn(K, 5, 2, generator=g).permute(2, 1, 0).to(DEV).requires_grad_()  # [2, 5, K], strided
    A = (torch.randn(E, K, r, generator=g) / K ** 0.5).to(DEV).transpose(1, 2)  # [E, r, K] view, frozen
    B = (torch.randn(E, r, N, generator=g) / r ** 0.5).to(DEV).transpose(1, 2).requires_grad_()
    w = torch.softmax(torch.randn(2, E, generator=g), -1).to(DEV)[:, None, :].expand(2, 5, E)
    out = lora_mix(x, A, B, w, 0.5)
    up = torch.randn(out.shape, generator=g).to(DEV)
    dx, dB = torch.autograd.grad(out, [x, B], up)
    x64, B64 = x.detach().double().requires_grad_(), B.detach().double().requires_grad_()
    exp = ref.lora_mix(x64, A.double(), B64, w.double(), 0.5)
    assert_close(out, exp, name=f"{path} strided out")
    for name, got, e in zip(("dx", "dB"), (dx, dB), torch.autograd.grad(exp, [x64, B64], up.double())):
        assert_close(got, e, torch.float32, name=f"{path} strided {name}")


def test_float64_takes_the_pytorch_path(monkeypatch):
    """tl.dot of fp64 does not compile for a GPU (fp64 result into the fp32 accumulator), so fp64 inputs
    must never reach the kernels, even with THINKREC_KERNELS=triton."""
    def boom(*a, **k):
        raise AssertionError("fp64 reached a Triton kernel")

    monkeypatch.setenv("THINKREC_KERNELS", "triton")
    for name in ("shrink", "expand", "grad_weight"):
        monkeypatch.setattr(_TritonOps, name, staticmethod(boom))
    x, A, B, w = _make((6,), 16, 12, 2, 4, torch.float64, seed=10)
    W = torch.randn(12, 16, dtype=torch.float64, device=DEV, requires_grad=True)
    for out in (lora_mix(x, A, B, w, 1.0), lora_linear(x, W, None, A, B, w, 1.0)):
        out.sum().backward()
    assert_close(lora_mix(x, A, B, w, 1.0), ref.lora_mix(x, A, B, w, 1.0), name="fp64 out")


@pytest.mark.parametrize("path", ["triton"], indirect=True)
def test_shrink_at_the_large_grid_block(path, monkeypatch):
    """At >= 264 shrink tiles (M = 1100, E * r = 1024 here) the launcher switches to BLOCK_M = 64, the block
    large batches get on a GPU; the other tests' shapes stay below that, so run the kernel at that block
    here (forced on a small M: the interpreter takes ~25 ms a program)."""
    import thinkrec_kernels.lora as lora

    assert launch_config("shrink", 16 * 64, 1100)["BLOCK_M"] == 64
    monkeypatch.setattr(lora, "launch_config",
                        lambda kernel, J, M=1 << 20, dtype=torch.bfloat16: launch_config(kernel, J, 1 << 20, dtype))
    M, K, E, r = 70, 24, 3, 8
    assert lora.launch_config("shrink", E * r, M)["BLOCK_M"] == 64
    g = torch.Generator().manual_seed(11)
    x, A = torch.randn(M, K, generator=g).to(DEV), torch.randn(E, r, K, generator=g).to(DEV)
    got = _TritonOps.shrink(x, A, "A", r)
    assert_close(got, x.double() @ A.double().reshape(E * r, K).T, name="shrink BLOCK_M=64")
