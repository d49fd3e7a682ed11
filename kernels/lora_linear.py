"""Base linear plus the per-row weighted multi-expert LoRA delta: `lora_linear`.

    y[m] = x[m] @ weight.T + bias + scale * sum_e w[m, e] * B_e @ (A_e @ x[m])
    x: [..., K], weight: [N, K], bias: [N] or None, A: [E, r, K], B: [E, N, r], w: [..., E] -> y: [..., N]

Fusion choice (the Punica/vLLM one): the base GEMM runs in cuBLAS (`torch.addmm`), then the shrink kernel
makes xa [M, E*r] and the expand kernel adds scale * (xa * w_rep) @ B_cat.T into y in place. Fusing the
expand into the base GEMM's epilogue would save one read+write of y (2*M*N*2 bytes: 4 MB at M=4096,
N=576 against 2*M*K*2 + N*K*2 = 10 MB the base GEMM moves anyway), but it means writing a GEMM that matches
cuBLAS on the large K x N product, which is where nearly all the FLOPs are (2*M*N*K against 2*M*E*r*(K+N)).
The backward does the same: dx = g @ weight (cuBLAS), then the LoRA expand accumulates into dx in place.
"""

import torch

from kernels._amp import compute_dtype, no_autocast
from kernels._dispatch import use_triton
from kernels.lora_mix import KERNEL_DTYPES, _TorchOps, _TritonOps, check_args, mix_backward, mix_forward


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, A, B, w2, scale, mode, use_kernels):
        ops = _TritonOps if use_kernels else _TorchOps
        with no_autocast(x2):  # under autocast the addmm would run in bf16 and the kernels in x's dtype
            # y = bias + x @ weight.T (one cuBLAS/MKL GEMM), then y += LoRA delta in place
            y = torch.addmm(bias, x2, weight.T) if bias is not None else x2 @ weight.T
            y, xa = mix_forward(ops, x2, A, B, w2, scale, mode, out=y)
        ctx.save_for_backward(x2, weight, A, B, w2, xa)
        ctx.scale, ctx.mode, ctx.ops, ctx.has_bias = scale, mode, ops, bias is not None
        return y

    @staticmethod
    def backward(ctx, g):
        x2, weight, A, B, w2, xa = ctx.saved_tensors
        g = g.contiguous()
        need_x, need_wt, need_b, need_A, need_B, need_w = ctx.needs_input_grad[:6]
        with no_autocast(g):
            dx_base = g @ weight if need_x else None  # [M, K]; the LoRA part is accumulated into it
            dx, dA, dB, dw = mix_backward(ctx.ops, g, x2, A, B, w2, xa, ctx.scale, ctx.mode,
                                          (need_x, need_A, need_B, need_w), dx_out=dx_base)
            dweight = g.T @ x2 if need_wt else None
            dbias = g.sum(0) if (need_b and ctx.has_bias) else None
        return dx, dweight, dbias, dA, dB, dw, None, None, None


def lora_linear(x, weight, bias, A, B, w, scale, *, mode="delta"):
    """F.linear(x, weight, bias) + lora_mix(x, A, B, w, scale, mode=mode), with the delta added in place.

    x: [..., K], weight: [N, K], bias: [N] or None, A: [E, r, K], B: [E, N, r], w: [..., E] -> [..., N].
    Differentiable in every tensor argument. Computes in x's dtype, or autocast's when it is on.
    """
    E, r, K, N = check_args(x, A, B, w, mode, where="lora_linear")
    if tuple(weight.shape) != (N, K):
        raise ValueError(f"kernels/lora_linear.py lora_linear: weight must be [N, K] = [{N}, {K}], "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"kernels/lora_linear.py lora_linear: bias must be [{N}], got {tuple(bias.shape)}")
    lead = x.shape[:-1]
    # compute in x's dtype, or autocast's as F.linear would (fp32 adapters or base weights, fp32 x under
    # bf16 autocast); .to is a no-op otherwise
    dt = compute_dtype(x)
    x, weight, A, B = x.to(dt), weight.to(dt), A.to(dt), B.to(dt)
    bias = bias.to(dt) if bias is not None else None
    x2 = x.reshape(-1, K)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if x2.shape[0] == 0:
        return torch.nn.functional.linear(x, weight, bias) + 0.0 * (A.sum() + B.sum() + w.sum())
    tensors = [t for t in (x, weight, bias, A, B, w) if t is not None]
    use_kernels = use_triton(*tensors) and dt in KERNEL_DTYPES  # fp64: PyTorch path (see KERNEL_DTYPES)
    y = LoRALinearFunction.apply(x2, weight, bias, A, B, w.reshape(-1, E), float(scale), mode, use_kernels)
    return y.view(*lead, N)
