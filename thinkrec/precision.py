"""The precision policy: which arithmetic the frozen LLM runs in, for training and scoring alike.

    fp32   the reference: everything in float32.
    bf16   frozen base weights stored in bfloat16 (cast once, not by autocast on every call); the forward
           runs under bf16 autocast, so each GEMM reads bf16 and accumulates in fp32. LoRA, the projector
           and the optimizer state stay fp32 master copies; the losses are computed in fp32.
    int8   EXPERIMENTAL, forward-only, CPU only (scoring, ranking, explanations): every frozen linear of the
           decoder runs as an int8 GEMM with one activation scale per token and per-channel weight scales,
           smoothed first (SmoothQuant, calibrated on 16 training rows at load), the LoRA deltas in fp32 on
           top of it, each row scored by itself after its prefix (batch-invariant). Not for training (no
           backward through int8 weights). On a trained run's 256 ML-1M valid rows (docs/precision.md) it
           moved the Yes logits by at most 0.42 (mean 0.11; AUC -0.007, within those rows' noise) where one
           scale per call had moved them by up to 13 (AUC -0.12). Never chosen by auto, and says so when
           asked for.
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

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from thinkrec import hardware
from thinkrec.hardware import BF16_MIN_SPEEDUP, MachineBf16, PrecisionError, check_int8_available
from thinkrec.io import read_json, write_json

PRECISIONS = ("auto", "fp32", "bf16", "int8")
TRAIN_PRECISIONS = ("auto", "fp32", "bf16")  # int8 has no backward
INT8_CAVEAT = ("int8 GEMMs with per-token activation scales and SmoothQuant smoothing: on a trained SmolLM2-135M "
               "run they moved Yes logits by up to 0.42 against fp32 (mean 0.11) and AUC by -0.007 on 256 ML-1M "
               "valid rows; measure with bench/infer_throughput.py --precisions int8 before trusting it on your "
               "model")


# --------------------------------------------------------------------------------------------- resolve
@dataclass(frozen=True)
class Precision:
    """A resolved precision: `name` is fp32 | bf16 | int8; `requested` what was asked (auto included);
    `reason` one line saying why; `probe` the measured rates (CPU) or None. thinkrec.model.lowp.apply puts a
    model in it."""

    name: str
    requested: str
    device: str
    reason: str
    probe: dict | None = field(default=None, compare=False)

    def describe(self) -> str:
        """One log line: the choice, why, and the probe's rates."""
        text = f"{self.name} ({self.reason})"
        if self.probe:
            text += (f"; probe: fp32 {self.probe['fp32_gflops']:g} GFLOP/s, bf16 {self.probe['bf16_gflops']:g}"
                     + (f", int8 {self.probe['int8_gops']:g} GOP/s" if self.probe.get("int8_gops") else ""))
        return text

    def to_dict(self) -> dict:
        return asdict(self)


def resolve(requested: str, device="cpu", *, training: bool = False, rates: dict = None) -> Precision:
    """The precision to run for `requested` (one of PRECISIONS) on `device`. rates: hardware.probe() output to use
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
