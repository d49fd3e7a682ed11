"""Low precision for the model: what `--precision bf16` and `int8` do to a loaded ThinkRecLM (the policy that
picks one is thinkrec/precision.py; what the machine can run, thinkrec/hardware.py).

    bf16   frozen base weights stored in bfloat16 (cast once, not by autocast on every call); the forward runs
           under bf16 autocast (`autocast`), so each GEMM reads bf16 and accumulates in fp32. LoRA, the
           projector and the optimizer state stay fp32 master copies.
    int8   forward only: every frozen linear of the decoder as an int8 GEMM (Int8Linear) with one activation
           scale per token and per-channel weight scales, the LoRA deltas in fp32 on top of it; no batch-mate
           sets a token's grid (the fp32 parts' rounding, which differs with the batch's shape, could still
           flip a value across a grid step: infer.py scores int8 rows one by one after their prefix,
           thinkrec.scoring.run_job(alone=True)). Given activation ranges measured in
           fp32 on a few rows (`activation_ranges`), each layer is smoothed first (SmoothQuant, Xiao et al.
           2023): input channel j is divided by s_j = max|x_j|^a / max|W_j|^(1-a) and W's column j
           multiplied by it, which moves outlier channels' range from the activations into the weights.
"""

import contextlib
import functools
import warnings
from typing import Callable

import torch
import torch.nn as nn

from thinkrec.hardware import PrecisionError, check_int8_available, int8_full_range

from .lora import LoRALinear

SMOOTH_ALPHA = 0.5  # SmoothQuant's migration strength a (its paper's default for most models)
REDUCE_RANGE = None  # 7-bit activations (True), 8-bit (False), or None: 8-bit where the CPU has VNNI / AMX
_full_range = functools.cache(int8_full_range)  # read /proc/cpuinfo once, not per layer


def autocast(name: str, device) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device`'s type for "bf16", nothing otherwise."""
    dev = torch.device(device).type
    if name == "bf16":
        return torch.autocast(dev, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Int8Linear(nn.Module):
    """y = s_t * (int8(x / s_t) @ int8(W).T * scales) + b for fp32 x [..., K]: W [N, K] quantised per output
    channel (symmetric); each token t divided by its own max |x_t| = s_t, so its activations span [-1, 1] and
    quantise on the same grid whatever else is in the batch (an outlier token sets only its own step; a token's
    output is the same alone or in any batch); int32 accumulation (fbgemm / x86 engine). Forward only.

    The GEMM is torch's dynamic int8 linear, whose activation grid comes from the input's min and max: one
    extra row holding +1 and -1 (`_span`) pins that range to [-1, 1] for every call. Activations get 8 bits
    where the CPU has VNNI or AMX (int32 dot products), else 7 (`reduce_range`, as torch's dynamic
    quantization does by default), which rules out int16 saturation in the AVX2 kernels; REDUCE_RANGE
    overrides. 8 bits halve the step: on a trained run's 96 valid rows the largest Yes-logit change went
    1.38 -> 1.05 (docs/precision.md). act_max [K] (the layer's input channel maxima over calibration rows):
    SmoothQuant, x * (1 / s) against W * s (`smoothing`), alpha its migration strength."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, act_max: torch.Tensor | None = None,
                 alpha: float = SMOOTH_ALPHA):
        super().__init__()
        check_int8_available()
        w = weight.detach().float().cpu()
        self.inv_smooth = None  # 1 / s per input channel (act_max given: SmoothQuant), x * inv_smooth first
        if act_max is not None:
            s = smoothing(act_max, w, alpha)
            w = w * s
            self.inv_smooth = 1.0 / s
        scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).double()
        with warnings.catch_warnings():  # quantized-tensor creation warns that it will move to torchao
            warnings.simplefilter("ignore")
            qw = torch.quantize_per_channel(w, scales, torch.zeros(len(scales), dtype=torch.long), 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qw, None)
        self.bias = None if bias is None else bias.detach().float().cpu()
        self.in_features, self.out_features = w.shape[1], w.shape[0]
        self._span = torch.zeros(1, self.in_features)
        self._span[0, 0], self._span[0, -1] = 1.0, -1.0
        self.reduce_range = not _full_range() if REDUCE_RANGE is None else REDUCE_RANGE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            raise PrecisionError("Int8Linear has no backward; --precision int8 is for scoring only")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        if self.inv_smooth is not None:
            x2 = x2 * self.inv_smooth
        s = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)  # [T, 1] per-token scale
        y = torch.ops.quantized.linear_dynamic(torch.cat([x2 / s, self._span]), self._packed, self.reduce_range)
        y = y[:-1].mul_(s)
        if self.bias is not None:
            y += self.bias
        return y.view(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, int8, per-token activation scales, "
                f"{7 if self.reduce_range else 8}-bit activations{', smoothed' if self.inv_smooth is not None else ''}")


def smoothing(act_max: torch.Tensor, weight: torch.Tensor, alpha: float = SMOOTH_ALPHA) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors s [K] = max|x_j|^alpha / max_i |W_ij|^(1 - alpha) for
    activations whose channel maxima are act_max [K] and weight [N, K]; channels never seen active (or
    all-zero columns) get a floor instead of 0 or inf."""
    a = act_max.detach().float().cpu().clamp(min=1e-5)
    if a.shape != (weight.shape[1],):
        raise ValueError(f"act_max has shape {tuple(act_max.shape)}, the layer has {weight.shape[1]} inputs")
    wmax = weight.detach().float().cpu().abs().amax(dim=0).clamp(min=1e-5)
    return (a.pow(alpha) / wmax.pow(1 - alpha)).clamp(min=1e-5)


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


def _decoder_linears(lm):
    """(path, module) of every frozen linear of the decoder that int8 converts: LoRALinear and plain nn.Linear."""
    for path, mod in list(lm.llm.model.named_modules()):
        if isinstance(mod, LoRALinear) or type(mod) is nn.Linear:
            yield path, mod


@torch.no_grad()
def activation_ranges(lm, run: Callable[[], object]) -> dict:
    """{path: max |x| per input channel [K]} of every linear `quantize_frozen` converts, over the calls that
    run() makes through lm (scoring a few rows in fp32: the calibration SmoothQuant needs)."""
    amax, hooks = {}, []

    def hook(path):
        def record(mod, inp, out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float().abs().amax(dim=0)
            amax[path] = x if path not in amax else torch.maximum(amax[path], x)
        return record

    for path, mod in _decoder_linears(lm):
        hooks.append(mod.register_forward_hook(hook(path)))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    missing = [p for p, _ in _decoder_linears(lm) if p not in amax]
    if missing:
        raise ValueError(f"calibration never called {len(missing)} layers (e.g. {missing[0]})")
    return amax


def quantize_frozen(lm, ranges: dict | None = None) -> int:
    """int8 GEMMs for every frozen linear of the decoder (not the LM head, which scoring reads one row of):
    plain nn.Linear modules are replaced by Int8Linear; a LoRALinear keeps its adapters and gets an int8
    base (`mod.int8`). ranges ({path: act_max}, `activation_ranges`): smooth each layer first (SmoothQuant).
    One-way: for a model loaded to score. Returns the number of layers quantised."""
    n = 0
    for path, mod in _decoder_linears(lm):
        q = Int8Linear(mod.weight, mod.bias, None if ranges is None else ranges[path])
        if isinstance(mod, LoRALinear):
            mod.int8 = q
        else:
            parent, _, child = path.rpartition(".")
            setattr(lm.llm.model.get_submodule(parent) if parent else lm.llm.model, child, q)
        n += 1
    return n


def apply(lm, precision, calibrate: Callable[[], object] | None = None) -> None:
    """Put `lm` (a ThinkRecLM, fp32 as loaded) in `precision` (a thinkrec.precision.Precision: its .name and
    .device) and record it as `lm.precision`. int8 with `calibrate` (a function scoring a few rows through
    lm): the layers are smoothed with the activation ranges it measures (SmoothQuant); without, not."""
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
        quantize_frozen(lm, None if calibrate is None else activation_ranges(lm, calibrate))
    lm.precision = precision.name
