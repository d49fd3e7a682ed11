"""The precision policy: which arithmetic the frozen LLM runs in, for training and scoring alike.

    fp32   the reference: everything in float32.
    bf16   frozen base weights stored in bfloat16 (cast once, not by autocast on every call); the forward
           runs under bf16 autocast, so each GEMM reads bf16 and accumulates in fp32. LoRA, the projector
           and the optimizer state stay fp32 master copies; the losses are computed in fp32.
    int8   EXPERIMENTAL, forward-only, CPU only (scoring, ranking, explanations): every frozen linear of the
           decoder runs as an int8 GEMM with one dynamic activation scale per call and per-channel weight
           scales, the LoRA deltas in fp32 on top of it. Not for training (no backward through int8
           weights). Measured 1.4x fp32 scoring on a 2-core AVX2 CPU, but LLM activations have outlier
           channels that one scale per call cannot cover: on SmolLM2-135M the Yes logits moved by up to 7
           (AUC -0.19 on ML-1M rows), and SmoothQuant-style smoothing (alpha 0.5-0.85, calibrated on train
           prompts) with down_proj kept in fp32 still left the scores' correlation with fp32 at 0.66-0.89.
           So it is never chosen by auto, and says so when asked for.
    auto   bf16 on a CUDA GPU with bf16. On a CPU, decided by what the machine is, not by the moment: fp32
           where the CPU has no native bf16 (no avx512_bf16 / amx_bf16 flag; no timing at all), else bf16
           when a warmed-up probe confirms that bf16 GEMMs run at least BF16_MIN_SPEEDUP x fp32. That probe
           runs once per machine and its decision is cached (CACHE/precision/<key>.json, keyed by CPU model,
           flags, torch thread count and torch version); THINKREC_REPROBE=1 probes again. Never int8: int8
           moves scores more than bf16 does, so it is asked for by name.

Why flags first and a cached decision: see thinkrec/hardware.py, which makes it.

Why the int8 GEMM is `torch.ops.quantized.linear_dynamic` (fbgemm / x86 engine, weights prepacked once):
it is the C++ kernel torch's dynamic quantization has always called, measured 1.4-1.7x fp32 on a 2-core
AVX2 CPU; the Python front end `torch.ao.quantization.quantize_dynamic` that wraps it is deprecated in
favour of torchao, and torchao's `Int8DynamicActivationInt8WeightConfig` ran at 4.9 GOP/s in eager mode
on the same CPU (its speed comes from torch.compile). We call the op directly, so nothing deprecated is
imported; if a later torch drops the op, `--precision int8` fails with a message saying so.
"""

import contextlib
import functools
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from thinkrec import hardware
from thinkrec.hardware import BF16_MIN_SPEEDUP, MachineBf16
from thinkrec.io import read_json, write_json

PRECISIONS = ("auto", "fp32", "bf16", "int8")
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")  # int8 has no backward
REDUCE_RANGE = True  # 7-bit activations: no int16 saturation in fbgemm's AVX2 kernels (CPUs without VNNI)
INT8_CAVEAT = ("int8 GEMMs with one dynamic activation scale per call: on SmolLM2-135M they moved Yes logits by "
               "up to 7 against fp32 and AUC by -0.19 on ML-1M rows; measure with bench/infer_throughput.py "
               "--precisions int8 before trusting it on your model")


class PrecisionError(ValueError):
    """A precision this device or this job cannot run."""


# ----------------------------------------------------------------------------------------------- probe
_clock = time.perf_counter


def _rate(fn, flops: float, budget_s: float) -> float:
    """GFLOP/s (GOP/s) of fn(), which does `flops` operations: one untimed call, then calls until budget_s
    (at most 20)."""
    fn()
    reps, t0 = 0, _clock()
    while True:
        fn()
        reps += 1
        dt = _clock() - t0
        if dt >= budget_s or reps >= 20:
            return flops * reps / dt / 1e9


def gemm_rate(dtype, n: int, budget_s: float) -> float:
    """GFLOP/s of n x n x n matmuls in dtype on the CPU."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g).to(dtype), torch.randn(n, n, generator=g).to(dtype)
    return _rate(lambda: a @ b, 2 * n ** 3, budget_s)


def _int8_rate(n: int, budget_s: float) -> float:
    """GOP/s of the int8 dynamic linear (Int8Linear) on [n, n] x [n, n]."""
    g = torch.Generator().manual_seed(0)
    lin, x = Int8Linear(torch.randn(n, n, generator=g), None), torch.randn(n, n, generator=g)
    return _rate(lambda: lin(x), 2 * n ** 3, budget_s)


@functools.lru_cache(maxsize=None)
def probe(int8: bool = False, threads: int = 0) -> dict:
    """Quick measured rates {"fp32_gflops", "bf16_gflops", "int8_gops" (with int8), "n", "threads",
    "seconds"} for the benches' tables (threads: part of the cache key), once per process. Never used to
    decide a precision: thinkrec.hardware.machine_bf16() decides."""
    t0 = _clock()
    rates = {}
    for name, dtype in (("fp32_gflops", torch.float32), ("bf16_gflops", torch.bfloat16)):
        small = gemm_rate(dtype, 256, 0.02)
        rates[name] = gemm_rate(dtype, 1024, 0.1) if small >= 20 else small
    if int8:
        try:
            rates["int8_gops"] = _int8_rate(1024, 0.1)
        except PrecisionError:
            rates["int8_gops"] = None
    rates.update(n=1024, threads=torch.get_num_threads(), seconds=round(_clock() - t0, 3))
    return {k: (round(v, 1) if isinstance(v, float) and k != "seconds" else v) for k, v in rates.items()}


# --------------------------------------------------------------------------------------------- resolve
@dataclass(frozen=True)
class Precision:
    """A resolved precision: `name` is fp32 | bf16 | int8; `requested` what was asked (auto included);
    `reason` one line saying why; `probe` the measured rates (CPU) or None."""

    name: str
    requested: str
    device: str
    reason: str
    probe: dict | None = field(default=None, compare=False)

    def autocast(self):
        return autocast(self.name, self.device)

    def describe(self) -> str:
        """One log line: the choice, why, and the probe's rates."""
        text = f"{self.name} ({self.reason})"
        if self.probe:
            text += (f"; probe: fp32 {self.probe['fp32_gflops']:g} GFLOP/s, bf16 {self.probe['bf16_gflops']:g}"
                     + (f", int8 {self.probe['int8_gops']:g} GOP/s" if self.probe.get("int8_gops") else ""))
        return text

    def to_dict(self) -> dict:
        return asdict(self)


def autocast(name: str, device) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device`'s type for "bf16", nothing otherwise."""
    dev = torch.device(device).type
    if name == "bf16":
        return torch.autocast(dev, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve(requested: str, device="cpu", *, training: bool = False, rates: dict = None) -> Precision:
    """The precision to run for `requested` (one of PRECISIONS) on `device`. rates: probe() output to use
    instead of probing (tests, a stored run's probe)."""
    if requested not in PRECISIONS:
        raise PrecisionError(f"--precision {requested!r} is not one of {', '.join(PRECISIONS)}")
    dev = torch.device(device).type
    if requested == "int8":
        if training:
            raise PrecisionError("--precision int8 is forward-only (scoring, ranking, explanations); training "
                                 "needs fp32 or bf16 (or auto)")
        if dev != "cpu":
            raise PrecisionError(f"--precision int8 is a CPU path (fbgemm/x86 int8 GEMMs); on {dev} use bf16 or auto")
        check_int8_available()
        return Precision("int8", requested, dev, "asked for int8 (EXPERIMENTAL: " + INT8_CAVEAT + ")")
    if dev == "cuda":
        ok = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return Precision("bf16" if ok else "fp32", requested, dev,
                             "CUDA with bf16" if ok else "this GPU has no bf16: fp32")
        if requested == "bf16" and not ok:
            raise PrecisionError("--precision bf16: this GPU does not support bfloat16")
        return Precision(requested, requested, dev, f"asked for {requested}")
    if dev != "cpu":
        return Precision("fp32", requested, dev, f"{dev}: fp32 (no precision policy for this device type)")
    if requested == "fp32":
        return Precision("fp32", requested, dev, "asked for fp32")
    # the reason holds no measured numbers and nothing that differs between a probing run and a cached one
    # (a run's artifacts must not): the rates are in `probe`, and describe() prints them
    m = hardware.machine_bf16() if rates is None else _from_rates(rates)
    if requested == "auto":
        if not m.native:
            why = "auto: this CPU has no native bf16 (no avx512_bf16 / amx_bf16 flag): fp32"
        else:
            why = (f"auto: this CPU has native bf16 ({', '.join(m.native)}) and bf16 GEMMs measured "
                   f"{'at least' if m.decision == 'bf16' else 'under'} {BF16_MIN_SPEEDUP:g}x fp32 (this "
                   f"machine's decision, cached)")
        return Precision(m.decision, requested, dev, why, m.rates)
    warning = slow_warning(requested, m.rates, native=bool(m.native))
    return Precision(requested, requested, dev, f"asked for {requested}" + (f": {warning}" if warning else ""), m.rates)


def _from_rates(rates: dict) -> MachineBf16:
    """The decision for given rates (a stored run's, a bench's or a test's), as if this machine had native bf16
    exactly when bf16 measured at least half of fp32."""
    native = ("measured",) if rates["bf16_gflops"] >= 0.5 * rates["fp32_gflops"] else ()
    decision = "bf16" if native and rates["bf16_gflops"] >= BF16_MIN_SPEEDUP * rates["fp32_gflops"] else "fp32"
    return MachineBf16(native, decision, dict(rates), None)


def slow_warning(name: str, rates: dict | None, native: bool = True) -> str:
    """A warning when `name` is bf16 on a CPU without native bf16 or whose probe found bf16 GEMMs slower
    than fp32, else ''."""
    if name == "bf16" and (not native or (rates and rates["bf16_gflops"] < rates["fp32_gflops"])):
        return "bf16 is SLOWER than fp32 on this CPU (no native bf16); expect a much slower run"
    return ""


# ------------------------------------------------------------------------------------------------ int8
def check_int8_available() -> None:
    engines = torch.backends.quantized.supported_engines
    if not hasattr(torch.ops.quantized, "linear_dynamic") or not ({"x86", "fbgemm"} & set(engines)):
        raise PrecisionError(f"--precision int8 needs torch's fbgemm/x86 int8 kernels "
                             f"(torch.ops.quantized.linear_dynamic); this torch {torch.__version__} has engines "
                             f"{engines}")


class Int8Linear(nn.Module):
    """y = int8(x) @ int8(W).T * scales + b for fp32 x [..., K]: W [N, K] quantised per output channel
    (symmetric), x per call with a dynamic scale; int32 accumulation (fbgemm / x86 engine). Forward only.

    reduce_range (REDUCE_RANGE) keeps activations to 7 bits, which rules out int16 saturation in the AVX2
    kernels (CPUs without VNNI), as torch's dynamic quantization does by default; 8 bits was no better on
    SmolLM2."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        check_int8_available()
        w = weight.detach().float().cpu()
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
        with warnings.catch_warnings():  # quantized-tensor creation warns that it will move to torchao
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, scales, torch.zeros(len(scales), dtype=torch.long), 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.detach().float().cpu())
        self.in_features, self.out_features = w.shape[1], w.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise PrecisionError("Int8Linear has no backward; --precision int8 is for scoring only")
        lead = x.shape[:-1]
        y = torch.ops.quantized.linear_dynamic(x.reshape(-1, self.in_features).float().contiguous(), self._packed, REDUCE_RANGE)
        return y.view(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 dynamic"


# ------------------------------------------------------------------------------------------ the model
def _is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def cast_frozen(lm, dtype) -> int:
    """Store every base-model parameter of `lm` (a ThinkRecLM) in dtype, LoRA adapters and the projector
    excepted (they stay fp32 masters); buffers (RoPE's inv_freq) are left alone. Returns the count cast."""
    n = 0
    for name, p in lm.llm.named_parameters():  # tied weights (SmolLM2's head = embeddings) come once
        if _is_lora_param(name) or p.dtype == dtype or not p.is_floating_point():
            continue
        p.data = p.data.to(dtype)
        n += p.numel()
    return n


def quantize_frozen(lm) -> int:
    """int8 GEMMs for every frozen linear of the decoder (not the LM head, which scoring reads one row of):
    plain nn.Linear modules are replaced by Int8Linear; a LoRALinear keeps its adapters and gets an int8
    base (`mod.int8`). One-way: for a model loaded to score. Returns the number of layers quantised."""
    from thinkrec.model.lora import LoRALinear

    n = 0
    for path, mod in list(lm.llm.model.named_modules()):
        if isinstance(mod, LoRALinear):
            mod.int8 = Int8Linear(mod.weight, mod.bias)
            n += 1
        elif type(mod) is nn.Linear:
            parent, _, child = path.rpartition(".")
            setattr(lm.llm.model.get_submodule(parent) if parent else lm.llm.model, child,
                    Int8Linear(mod.weight, mod.bias))
            n += 1
    return n


def apply(lm, precision: Precision) -> None:
    """Put `lm` (a ThinkRecLM, fp32 as loaded) in `precision` and record it as `lm.precision`."""
    current = getattr(lm, "precision", "fp32")
    if current == precision.name:
        return
    if current != "fp32":
        raise PrecisionError(f"the model is already in {current}; load it again for {precision.name}")
    if precision.name == "bf16":
        cast_frozen(lm, torch.bfloat16)
    elif precision.name == "int8":
        if precision.device != "cpu":
            raise PrecisionError("int8 is a CPU path")
        quantize_frozen(lm)
    lm.precision = precision.name


# ------------------------------------------------------------------------------------------ a run's precision
RUN_FILE = "precision.json"


def stored(run_dir) -> dict | None:
    """RUN/precision.json ({"name", "requested", "device", "reason", "probe"}) or None for a run made before
    precisions existed (it trained in fp32)."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        return None
    obj = read_json(path, f"delete {path} (train.py writes it again; without it the run counts as fp32)")
    if not isinstance(obj, dict) or obj.get("name") not in PRECISIONS[1:]:
        raise PrecisionError(f"{path}: no precision name in it (want one of {PRECISIONS[1:]}); delete it")
    return obj


def for_run(run_dir, requested: str | None, device="cpu", *, training: bool) -> Precision:
    """The precision a job on RUN runs at: `requested` when given (train.py / infer.py --precision); without
    it, the one the run recorded (RUN/precision.json: a resumed run and infer.py keep the precision the run
    trained in), or auto for a new training run, fp32 for scoring a run that recorded none."""
    if requested is not None:
        return resolve(requested, device, training=training)
    st = stored(run_dir)
    if st is None:
        return resolve("auto" if training else "fp32", device, training=training)
    p = resolve(st["name"], device, training=training)
    warning = slow_warning(p.name, p.probe, native=p.device != "cpu" or bool(hardware.machine_bf16().native))
    return Precision(p.name, p.requested, p.device, f"the run's precision, {Path(run_dir) / RUN_FILE} (chosen as "
                     f"{st.get('requested', st['name'])})" + (f": {warning}" if warning else ""), p.probe)


def record(run_dir, precision: Precision) -> bool:
    """Write RUN/precision.json when it is missing or names another precision; True when written."""
    st = stored(run_dir)
    if st is not None and st.get("name") == precision.name:
        return False
    write_json(Path(run_dir) / RUN_FILE, precision.to_dict())
    return True
