"""Philox dropout (thinkrec_kernels/dropout.py, cpu/dropout.cpp): the generator against Random123's known
answers, the C++ kernel bit for bit against the plain-torch stream, the drop rate, the backward's mask, and
the same bits on any thread count and from the same generator state."""

import pytest
import torch

from thinkrec_kernels import _cpu_ext
from thinkrec_kernels.dropout import philox4x32_10, philox_dropout, philox_keep, threshold

# Random123's tests/kat_vectors, the three `philox4x32 10` lines: counter (4 words), key (2), result (4)
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

ext = _cpu_ext.load()
needs_ext = pytest.mark.skipif(not ext, reason="the C++ CPU kernels do not build here")


def test_philox_known_answers():
    for ctr, key, want in KAT:
        assert tuple(philox4x32_10(torch.tensor([ctr]), key)[0].tolist()) == want
        if ext:
            assert tuple(ext.philox4x32_10(list(ctr), list(key))) == want


@needs_ext
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_kernel_is_the_reference_stream(dtype):
    """Sizes below one 64-element group, not a multiple of it, and a strided input; a 64-bit seed."""
    g = torch.Generator().manual_seed(1)
    for shape in [(5,), (64,), (1001, 999), (7, 129)]:
        x = torch.randn(shape, generator=g).to(dtype)
        for seed, p in [(0x0123456789ABCDEF, 0.05), (3, 0.5)]:
            cut, scale = threshold(p)
            assert torch.equal(ext.philox_dropout(x, seed, cut, scale), x * philox_keep(shape, seed, cut) * scale)
    xt = torch.randn(40, 70, generator=g).to(dtype).t()  # not contiguous
    cut, scale = threshold(0.1)
    assert torch.equal(ext.philox_dropout(xt, 9, cut, scale), xt * philox_keep(xt.shape, 9, cut) * scale)
    x = torch.tensor([float("nan"), float("inf"), -0.0, 1e30]).to(dtype)
    assert torch.equal(ext.philox_dropout(x, 1, 0, 2.0).isnan(), x.isnan())


def test_rate_and_independence():
    cut, scale = threshold(0.05)
    p = cut / 65536
    assert abs(scale - 1 / (1 - p)) < 1e-15 and abs(p - 0.05) < 1 / 65536
    a, b = philox_keep((1000, 1000), 11, cut), philox_keep((1000, 1000), 12, cut)
    sd = (p * (1 - p) / a.numel()) ** 0.5
    for keep in (a, b):
        assert abs(1 - keep.float().mean().item() - p) < 5 * sd  # drop rate p, within 5 standard errors
        assert abs(keep[:, :500].float().mean().item() - keep[:, 500:].float().mean().item()) < 0.005
        assert abs(keep[::2].float().mean().item() - keep[1::2].float().mean().item()) < 0.005
    both = (~a & ~b).float().mean().item()  # two seeds drop independently: P(both) = p^2
    assert abs(both - p * p) < 5 * (p * p / a.numel()) ** 0.5
    lane = (~a).flatten()[: 64 * 15000].view(-1, 64).float().mean(0)  # no element of a group favoured
    assert (lane - p).abs().max() < 6 * (p * (1 - p) / 15000) ** 0.5


@pytest.mark.parametrize("mode", ["auto", "torch"])
def test_autograd_same_mask_and_generator(monkeypatch, mode):
    """The backward multiplies by the forward's mask; a manual_seed replays it; the C++ path and
    THINKREC_KERNELS=torch give the same bits."""
    monkeypatch.setenv("THINKREC_KERNELS", mode)
    x = torch.randn(37, 130, dtype=torch.float32, requires_grad=True)
    torch.manual_seed(5)
    y = philox_dropout(x, 0.3)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64))
    cut, scale = threshold(0.3)
    keep = philox_keep(x.shape, seed, cut)
    assert torch.equal(y, x * keep * scale)
    g = torch.randn_like(y)
    y.backward(g)
    assert torch.equal(x.grad, g * keep * scale)
    assert not torch.equal(philox_dropout(x, 0.3), y)  # the next call draws a new seed
    assert philox_dropout(x, 0.0) is x and not philox_dropout(x, 1.0).any()


@needs_ext
def test_same_bits_on_any_thread_count():
    x = torch.randn(3000, 576, dtype=torch.bfloat16)
    cut, scale = threshold(0.05)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ext.philox_dropout(x, 77, cut, scale)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(ext.philox_dropout(x, 77, cut, scale), one)


def test_first_build_says_so(monkeypatch, tmp_path, capsys):
    """~30 s of compiling at a run's first step is announced on stderr once; a cached build says nothing."""
    import torch.utils.cpp_extension

    monkeypatch.setattr(torch.utils.cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path))
    _cpu_ext._say_if_building()
    assert "compiling the C++ CPU kernels" in capsys.readouterr().err
    (tmp_path / "thinkrec_cpu.so").write_bytes(b"")
    _cpu_ext._say_if_building()
    assert capsys.readouterr().err == ""
