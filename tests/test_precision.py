"""The precision policy (thinkrec/precision.py): auto's choice from the probe, the bf16 model (frozen
weights bf16, adapters fp32), int8 scoring against fp32, and a run keeping the precision it started with."""

import copy
import json

import numpy as np
import pytest
import torch

from tests.train_fixtures import tiny_lm
from thinkrec import hardware
from thinkrec.model import lowp
from thinkrec.model.lowp import Int8Linear
from thinkrec.precision import Precision, PrecisionError, resolve

FAST_BF16 = {"fp32_gflops": 216.0, "bf16_gflops": 956.0, "n": 1024, "threads": 2, "seconds": 0.1}
SLOW_BF16 = {"fp32_gflops": 216.0, "bf16_gflops": 45.0, "n": 1024, "threads": 2, "seconds": 0.1}
INT8_REL_TOL = 5e-2  # int8 weights (per channel) and 7-bit dynamic activations: ~2% relative error per GEMM


NATIVE = {"model": "Test CPU", "flags": ["avx2", "avx512f", "avx512_bf16", "fma"]}
AVX2_ONLY = {"model": "Test CPU", "flags": ["avx2", "fma"]}


@pytest.fixture
def probes(monkeypatch):
    """Count confirm_probe calls and return `rates` from them (FAST_BF16 until changed)."""
    calls = {"n": 0, "rates": FAST_BF16}

    def fake():
        calls["n"] += 1
        return dict(calls["rates"])

    monkeypatch.setattr(hardware, "confirm_probe", fake)
    monkeypatch.delenv(hardware.REPROBE_ENV, raising=False)
    return calls


@pytest.mark.parametrize("rates,want", [(FAST_BF16, "bf16"), (SLOW_BF16, "fp32")])
def test_auto_on_a_native_bf16_cpu_follows_the_confirming_probe(monkeypatch, tmp_path, probes, rates, want):
    probes["rates"] = rates
    m = hardware.bf16_decision(NATIVE, tmp_path)
    assert (m.native, m.decision, probes["n"]) == (("avx512_bf16",), want, 1)
    monkeypatch.setattr(hardware, "machine_bf16", lambda: hardware.bf16_decision(NATIVE, tmp_path))
    p = resolve("auto", "cpu", training=True)
    assert (p.name, p.requested, p.probe["bf16_gflops"], probes["n"]) == (want, "auto", rates["bf16_gflops"], 1)
    assert f"bf16 {rates['bf16_gflops']:g}" in p.describe() and "GFLOP/s" not in p.reason  # artifacts hold no timings


def test_no_native_bf16_is_fp32_without_any_timing(tmp_path, probes):
    m = hardware.bf16_decision(AVX2_ONLY, tmp_path)
    assert (m.native, m.decision, m.rates, probes["n"]) == ((), "fp32", None, 0)
    assert not any(tmp_path.iterdir())  # nothing to cache: the flags decide


def test_the_decision_is_cached_per_cpu_threads_and_torch_version(monkeypatch, tmp_path, probes):
    first = hardware.bf16_decision(NATIVE, tmp_path)
    probes["rates"] = SLOW_BF16  # a later probe would say otherwise: the cache must answer instead
    assert hardware.bf16_decision(NATIVE, tmp_path).decision == first.decision == "bf16" and probes["n"] == 1
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(threads + 1)
        assert hardware.bf16_decision(NATIVE, tmp_path).decision == "fp32" and probes["n"] == 2
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(torch, "__version__", torch.__version__ + ".other")
    hardware.bf16_decision(NATIVE, tmp_path)
    assert probes["n"] == 3
    monkeypatch.undo()
    monkeypatch.setattr(hardware, "confirm_probe", lambda: (probes.__setitem__("n", probes["n"] + 1), dict(FAST_BF16))[1])
    other_cpu = {**NATIVE, "model": "Another CPU"}
    hardware.bf16_decision(other_cpu, tmp_path)
    assert probes["n"] == 4
    assert hardware.bf16_decision(NATIVE, tmp_path).decision == "bf16" and probes["n"] == 4  # still cached
    monkeypatch.setenv(hardware.REPROBE_ENV, "1")
    hardware.bf16_decision(NATIVE, tmp_path)
    assert probes["n"] == 5  # asked to probe again


def _real_decision(cache, info=None):
    """The real confirming probe on this CPU, with native-bf16 flags where it has them."""
    info = info or hardware.cpu_info()
    return hardware.bf16_decision({**info, "flags": info["flags"] or NATIVE["flags"]}, cache).decision


def test_decision_does_not_move_with_a_slow_or_noisy_timer(monkeypatch, tmp_path):
    """The real probe on this CPU, decided three times from an empty cache: with the real clock, a clock 10x
    slow (every rate /10), and a clock with random stalls of up to 5 ms per reading (preemption)."""
    import random
    import time

    monkeypatch.delenv(hardware.REPROBE_ENV, raising=False)
    want = _real_decision(tmp_path / "real")
    monkeypatch.setattr(hardware, "_clock", lambda: time.perf_counter() * 10)
    assert _real_decision(tmp_path / "slow") == want
    rng, stalled = random.Random(0), [0.0]

    def noisy():
        stalled[0] += rng.uniform(0, 5e-3)
        return time.perf_counter() + stalled[0]

    monkeypatch.setattr(hardware, "_clock", noisy)
    assert _real_decision(tmp_path / "noisy") == want


HOG = "import time\nt = time.time()\nwhile time.time() - t < 60: pass\n"


def test_decision_does_not_move_beside_a_cpu_hog(monkeypatch, tmp_path):
    """A probe from an empty cache while two busy processes hold both cores decides as one on an idle machine;
    a run under load afterwards reads the cached decision and times nothing."""
    import subprocess
    import sys

    monkeypatch.delenv(hardware.REPROBE_ENV, raising=False)
    want = _real_decision(tmp_path / "idle")
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(2)]
    try:
        assert _real_decision(tmp_path / "loaded") == want
        monkeypatch.setattr(hardware, "confirm_probe", lambda: pytest.fail("the cached decision must answer"))
        assert _real_decision(tmp_path / "idle") == want
    finally:
        for h in hogs:
            h.kill()


def test_explicit_choices_and_refusals():
    assert resolve("fp32", "cpu").name == "fp32"
    slow = resolve("bf16", "cpu", rates=SLOW_BF16)
    assert slow.name == "bf16" and "SLOWER" in slow.reason  # asked for: honoured, with a warning
    no_native = resolve("bf16", "cpu")  # the suite's machine_bf16: no native bf16 (tests/conftest.py)
    assert no_native.name == "bf16" and "SLOWER" in no_native.reason
    with pytest.raises(PrecisionError, match="forward-only"):
        resolve("int8", "cpu", training=True)
    with pytest.raises(PrecisionError, match="not one of"):
        resolve("fp16", "cpu")
    assert resolve("int8", "cpu").name == "int8"


def test_bf16_model_keeps_adapters_fp32_and_casts_tied_weights_once():
    lm = tiny_lm(cf_dim=8)
    n = lowp.cast_frozen(lm, torch.bfloat16)
    frozen = {name: p for name, p in lm.llm.named_parameters() if ".lora_" not in name}
    assert n == sum(p.numel() for p in frozen.values()) and all(p.dtype == torch.bfloat16 for p in frozen.values())
    assert all(p.dtype == torch.float32 for name, p in lm.named_parameters() if ".lora_" in name or "projector" in name)
    assert lm.llm.model.rotary_emb.inv_freq.dtype == torch.float32  # buffers untouched
    lm2 = tiny_lm(cf_dim=8)
    lowp.apply(lm2, Precision("int8", "int8", "cpu", "test"))
    with pytest.raises(PrecisionError, match="already in int8"):
        lowp.apply(lm2, Precision("bf16", "bf16", "cpu", "test"))


def test_int8_linear_matches_fp32_and_refuses_backward():
    g = torch.Generator().manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(2, 7, 64, generator=g)
    q = Int8Linear(lin.weight, lin.bias)
    ref = lin(x).detach()
    out = q(x)
    assert out.shape == ref.shape
    assert float((out - ref).norm() / ref.norm()) < INT8_REL_TOL
    with pytest.raises(PrecisionError, match="no backward"):
        q(x.requires_grad_())


def test_int8_linear_is_batch_independent():
    """Per-token activation scales: a token quantises the same alone as beside others, and an outlier token
    (x50) changes no other token's output (one per-call scale would coarsen every row's grid)."""
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Linear(64, 48)
    q = Int8Linear(lin.weight, lin.bias)
    x = torch.randn(9, 64, generator=g)
    with torch.no_grad():
        together = q(x)
        assert torch.equal(torch.cat([q(x[i:i + 1]) for i in range(len(x))]), together)
        loud = x.clone()
        loud[4] *= 50
        assert torch.equal(q(loud)[torch.arange(9) != 4], together[torch.arange(9) != 4])


def test_smoothing_moves_an_outlier_channel_into_the_weights():
    """SmoothQuant: x / s and W * s give the same product in exact arithmetic; with one input channel 60x
    louder than the rest (LLM activations' outlier channels), the smoothed int8 layer errs less."""
    g = torch.Generator().manual_seed(4)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(40, 64, generator=g)
    x[:, 5] *= 60
    act_max = x.abs().amax(0)
    s = lowp.smoothing(act_max, lin.weight, 0.5)
    wmax = lin.weight.detach().abs().amax(0)
    assert torch.allclose(s, (act_max.sqrt() / wmax.sqrt()).clamp(min=1e-5))
    assert torch.allclose((x / s) @ (lin.weight.detach() * s).T, x @ lin.weight.detach().T, rtol=1e-4, atol=1e-4)
    ref = lin(x).detach()
    with torch.no_grad():
        plain = float((Int8Linear(lin.weight, lin.bias)(x) - ref).norm())
        smooth = Int8Linear(lin.weight, lin.bias, act_max)
        smoothed = float((smooth(x) - ref).norm())
        assert smoothed < 0.5 * plain, (smoothed, plain)
        assert torch.equal(torch.cat([smooth(x[i:i + 1]) for i in range(len(x))]), smooth(x))  # still per token
    assert torch.all(lowp.smoothing(torch.zeros(64), lin.weight) > 0)  # a channel never active: a floor, not 0
    with pytest.raises(ValueError, match="64 inputs"):
        lowp.smoothing(torch.ones(63), lin.weight)


def test_calibrated_int8_model_smooths_every_layer_and_tracks_fp32():
    g = torch.Generator().manual_seed(5)
    lm = tiny_lm(layers=3).eval()
    ids = torch.randint(3, 60, (16, 14), generator=g)
    mask = torch.ones_like(ids)
    w = torch.softmax(torch.randn(16, lm.n_adapters, generator=g), -1)
    ref = _scores(lm, ids, mask, w)
    m = copy.deepcopy(lm)
    with pytest.raises(ValueError, match="never called"):
        lowp.activation_ranges(m, lambda: None)
    lowp.apply(m, Precision("int8", "int8", "cpu", "test"), calibrate=lambda: _scores(m, ids[:8], mask[:8], w[:8]))
    layers = [mod for mod in m.modules() if isinstance(mod, Int8Linear)]
    assert len(layers) == 3 * 7 and all(q.inv_smooth is not None for q in layers)
    s = _scores(m, ids, mask, w)
    assert float((s - ref).norm() / ref.norm()) < INT8_REL_TOL


def test_int8_linear_uses_8_bits_where_the_cpu_has_vnni(monkeypatch):
    """8-bit activations where the CPU's int8 dot products accumulate in int32 (VNNI / AMX), 7 bits elsewhere
    (AVX2's int16 pair sums could saturate); with 8 bits the error against fp32 shrinks."""
    lin = torch.nn.Linear(64, 48)
    want = not hardware.int8_full_range()
    assert Int8Linear(lin.weight, lin.bias).reduce_range == want
    if want:
        pytest.skip("this CPU has no VNNI / AMX: 8-bit activations are not used here")
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    ref = lin(x).detach()
    err = {}
    for bits7 in (True, False):
        monkeypatch.setattr(lowp, "REDUCE_RANGE", bits7)
        with torch.no_grad():
            err[bits7] = float((Int8Linear(lin.weight, lin.bias)(x) - ref).norm())
    assert err[False] < 0.8 * err[True]


def _scores(lm, ids, mask, w):
    from thinkrec.batches import yes_logits

    with torch.no_grad():
        h = lm(ids, mask, expert_weights=w, select=(torch.arange(len(ids)), torch.full((len(ids),), ids.shape[1] - 1)))
    return yes_logits(h, lm.lm_head_weight, lm.yes_token_id, None).double()


def test_int8_and_bf16_scores_track_fp32():
    """Yes logits of one batch (mixed routes) at int8 and bf16 against fp32: within the stated relative
    tolerance, and the same ranking of rows."""
    g = torch.Generator().manual_seed(3)
    lm = tiny_lm(layers=3).eval()
    ids = torch.randint(3, 60, (16, 14), generator=g)
    mask = torch.ones_like(ids)
    mask[:5, :3] = 0  # left padding
    w = torch.softmax(torch.randn(16, lm.n_adapters, generator=g), -1)
    ref = _scores(lm, ids, mask, w)
    for name, tol in (("int8", INT8_REL_TOL), ("bf16", 2e-2)):
        m = copy.deepcopy(lm)
        lowp.apply(m, Precision(name, name, "cpu", "test"))
        s = _scores(m, ids, mask, w)
        rel = float((s - ref).norm() / ref.norm())
        assert rel < tol, (name, rel)
        rank = np.corrcoef(np.argsort(np.argsort(s.numpy())), np.argsort(np.argsort(ref.numpy())))[0, 1]
        assert rank > 0.9, (name, rank)


def test_run_keeps_its_precision(tmp_path, capsys):
    """train.py records the precision; rerun without --precision (resumed) it keeps bf16; infer.py scores
    in the run's precision unless told otherwise."""
    import infer
    import train
    from tests.test_train_cli import train_tiny_run

    run = train_tiny_run(tmp_path, "--precision", "bf16")
    assert json.loads((run / "precision.json").read_text())["name"] == "bf16"
    assert json.loads((run / "metrics.json").read_text())["precision"]["name"] == "bf16"
    argv = json.loads((run / "metrics.json").read_text())["args"]
    (run / "metrics.json").unlink()
    capsys.readouterr()
    again = ["--dataset", "csv", "--data-dir", argv["data_dir"], "--model", argv["model"], "--run-dir", str(run),
             "--experts", "2", "--max-train-samples", "12", "--max-eval-samples", "8", "--max-test-samples", "0",
             "--batch-size", "5", "--cf-dim", "8", "--expert-layers", "1", "--max-len", "400", "--no-progress",
             "--threads", "1", "--resume"]
    m = train.main(again)
    assert m["precision"]["name"] == "bf16"
    assert "precision: bf16 (the run's precision" in capsys.readouterr().out
    m_run = infer.main(["--run-dir", str(run), "--no-progress", "--out", str(tmp_path / "a")])
    m_int8 = infer.main(["--run-dir", str(run), "--no-progress", "--out", str(tmp_path / "b"), "--precision", "int8"])
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["precision"] == "bf16"
    assert json.loads((tmp_path / "b" / "metrics.json").read_text())["precision"] == "int8"
    a = [json.loads(x)["score"] for x in (tmp_path / "a" / "scores.jsonl").read_text().splitlines()]
    b = [json.loads(x)["score"] for x in (tmp_path / "b" / "scores.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == m_run["rows"] == m_int8["rows"]
    assert float(np.linalg.norm(np.subtract(a, b)) / np.linalg.norm(a)) < INT8_REL_TOL + 2e-2
