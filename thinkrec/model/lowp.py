"""Low precision for the model: what `--precision bf16` and `int8` do to a loaded ThinkRecLM (the policy that
picks one is thinkrec/precision.py; what the machine can run, thinkrec/hardware.py).

    bf16   frozen base weights stored in bfloat16 (cast once, not by autocast on every call); the forward runs
           under bf16 autocast (`autocast`), so each GEMM reads bf16 and accumulates in fp32. LoRA, the
           projector and the optimizer state stay fp32 master copies.
    int8   forward only: every frozen linear of the decoder as an int8 GEMM (Int8Linear) with one activation
           scale per token and per-channel weight scales, the LoRA deltas in fp32 on top of it; no batch-mate
           sets a token's grid (though the fp32 parts' rounding, which differs with the batch's shape, can
           still flip a value across a grid step: docs/precision.md).
"""

import contextlib
import functools
import warnings

import torch
import torch.nn as nn

from thinkrec.hardware import PrecisionError, check_int8_available, int8_full_range

from .lora import LoRALinear

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
    1.38 -> 1.05 (docs/precision.md)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        check_int8_available()
        w = weight.detach().float().cpu()
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
        s = x2.abs().amax(dim=1, keepdim=True).clamp(min=1e-12)  # [T, 1] per-token scale
        y = torch.ops.quantized.linear_dynamic(torch.cat([x2 / s, self._span]), self._packed, self.reduce_range)
        y = y[:-1].mul_(s)
        if self.bias is not None:
            y += self.bias
        return y.view(*lead, self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, int8, per-token activation scales, "
                f"{7 if self.reduce_range else 8}-bit activations")


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


def apply(lm, precision) -> None:
    """Put `lm` (a ThinkRecLM, fp32 as loaded) in `precision` (a thinkrec.precision.Precision: its .name and
    .device) and record it as `lm.precision`."""
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
