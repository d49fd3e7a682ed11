"""The element-wise parts of a decoder layer, fused by Inductor on a CPU: RMSNorm, SiLU(gate) * up, RoPE.

On a CPU the GEMMs of a step run near the machine's rate, but each RMSNorm is ~8 separate kernels (cast to
fp32, square, mean, rsqrt, two multiplies, casts back), the MLP's SiLU and product two more and RoPE five,
each a pass over [N, D] in memory; in bf16 every one of them converts on load and store. Measured on a
2-core Xeon with AMX (bf16, N = 4,400 tokens, D = 576): RMSNorm forward + backward 11.1 ms eager, 2.3 ms
fused; SiLU(gate) * up 19.6 ms and 14.7 ms. torch.compile with dynamic shapes compiles each function once
per dtype and mode (training / no grad), a few seconds each, whatever the batch's token count, so
it is not the per-shape recompiling of a compiled layer (docs/architecture.md, "Where a training step's time
goes").

    fused.enable()              # from now on rms_norm / silu_mul / rope run compiled (CPU tensors)
    fused.rms_norm(mod, x)      # an HF RMSNorm module's math (weight, eps) on x; other norms: mod(x)

The eager functions are the reference: the compiled ones agree within float rounding (tests/test_fused.py).
On a GPU the eager functions run (Inductor would emit Triton kernels; not measured there).
"""

import torch
import torch.nn.functional as F

from thinkrec.errors import UserError


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's Llama RMSNorm: statistics in fp32, the weight applied in x's dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def silu_mul_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The Llama MLP's act(gate) * up for act = SiLU."""
    return F.silu(gate) * up


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [n, H, d]; cos, sin [n, d] (HF's rotate-half convention)."""
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rot * sin[:, None]


_REF = {"rms_norm": rms_norm_ref, "silu_mul": silu_mul_ref, "rope": rope_ref}
_ops = dict(_REF)  # what runs on CPU tensors: the references, or their compiled versions after enable()


def enable(on: bool = True, check: bool = False) -> None:
    """Run the three functions compiled (torch.compile, Inductor, dynamic shapes) on CPU tensors from now on;
    on=False: the eager references again. Compiling happens at each function's first call; check=True
    compiles one at once, so a machine that cannot (Inductor's CPU backend needs a C++ compiler) fails here
    with a clear error, not hours into a run."""
    global _ops
    _ops = {k: torch.compile(f, dynamic=True) for k, f in _REF.items()} if on else dict(_REF)
    if on and check:
        try:
            _ops["silu_mul"](torch.randn(4, 8), torch.randn(4, 8))
        except Exception as e:  # Inductor raises its own types (BackendCompilerFailed, InductorError, ...)
            _ops = dict(_REF)
            raise UserError(f"--fused-ops: torch.compile could not build the fused CPU ops on this machine "
                            f"({type(e).__name__}: {str(e).strip().splitlines()[0][:300]}); Inductor's CPU backend "
                            f"needs a C++ compiler (g++ or clang++ on PATH). Run eager: leave --fused-ops out (infer.py) "
                            f"or pass --fused-ops off (train.py)") from e


def enabled() -> bool:
    return _ops["rms_norm"] is not _REF["rms_norm"]


def _pick(name: str, x: torch.Tensor):
    return _ops[name] if x.device.type == "cpu" else _REF[name]


def rms_norm(mod, x: torch.Tensor) -> torch.Tensor:
    """mod(x) for an RMSNorm module of Hugging Face's Llama family (a `weight` and `variance_epsilon`), else
    mod(x) as it is."""
    eps = getattr(mod, "variance_epsilon", None)
    if eps is None or not type(mod).__name__.endswith("RMSNorm"):
        return mod(x)
    return _pick("rms_norm", x)(x, mod.weight, float(eps))


def silu_mul(act, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up; fused where act is SiLU (Llama, Qwen, Mistral: HF's SiLUActivation), else as written."""
    if isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation":
        return _pick("silu_mul", gate)(gate, up)
    return act(gate) * up


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return _pick("rope", x)(x, cos, sin)
