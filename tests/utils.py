"""Shared test helpers: one tolerance table and an assert that says what differs."""

import torch

# {dtype: (atol, rtol)} for a kernel result against the float64 reference.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (5e-2, 5e-2),  # 8-bit mantissa
}

CUDA = torch.cuda.is_available()


def assert_close(actual, expected, dtype=None, name="tensor", atol=None, rtol=None):
    """Compare `actual` with a (float64) `expected`; on failure report max/mean |diff| and where."""
    dtype = dtype or actual.dtype
    d_atol, d_rtol = TOL[dtype]
    atol = d_atol if atol is None else atol
    rtol = d_rtol if rtol is None else rtol
    a = actual.detach().double().cpu()
    e = expected.detach().double().cpu()
    assert a.shape == e.shape, f"{name}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    diff = (a - e).abs()
    bad = diff > atol + rtol * e.abs()
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        raise AssertionError(
            f"{name} ({dtype}): {int(bad.sum())}/{bad.numel()} elements off; max |diff| {diff.max():.3e}, "
            f"mean |diff| {diff.mean():.3e}, atol {atol:g} rtol {rtol:g}; first at {idx}: "
            f"got {[a[tuple(i)].item() for i in idx]}, expected {[e[tuple(i)].item() for i in idx]}"
        )
