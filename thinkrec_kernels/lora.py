"""Per-row weighted multi-expert LoRA: `lora_mix` (the delta) and `lora_linear` (base linear + delta).

    delta[m] = scale * sum_e w[m, e] * B_e @ (A_e @ x[m])        x: [..., K], A: [E, r, K], B: [E, N, r],
    y[m]     = x[m] @ weight.T + bias + delta[m]                 w: [..., E], weight: [N, K] -> [..., N]

Written with the experts concatenated (J = E * r, column j = e * r + i):

    A_cat [J, K] = A.reshape(J, K),   B_cat [N, J] with B_cat[n, e*r+i] = B[e, n, i]
    xa = x @ A_cat.T                   # shrink   [M, J]
    h  = scale * xa * w_rep            # w_rep[m, j] = w[m, j // r]
    delta = h @ B_cat.T                # expand   [M, N]

Backward with upstream g [M, N] (gb = g @ B_cat is the "shrink" of g against B):

    dB_cat = g.T @ h                   dx = (scale * gb * w_rep) @ A_cat
    dA_cat = (scale * gb * w_rep).T @ x        dw[m, e] = scale * sum_i xa[m, e, i] * gb[m, e, i]

mix="linear" is peft's "linear" adapter combination (cross terms B_i A_j included):
h[m, e, i] = scale * sqrt(w[m, e]) * sum_e' sqrt(w[m, e']) xa[m, e', i]; the same shrink/expand kernels
run around that mix, which is computed in PyTorch on the small [M, J] tensor and differentiated by autograd
(its gradient in w is infinite at w = 0, as for the reference).

Three Triton kernels (`_lora_shrink_kernel`, `_lora_expand_kernel`, `_lora_grad_weight_kernel`) serve the
forward and the backward; an expert's [r, C] slice is addressed as rows (j // r, j % r) of the 3-D tensor,
so A and B are never copied into concatenated form. Forward: shrink(x, A) -> xa, expand(xa, w, B) -> delta.
Backward: shrink(g, B) -> gb; expand(gb, w, A) -> dx (the forward's expand with A as the weight);
grad_weight(x, gb, w) -> dA and grad_weight(g, xa, w) -> dB (reductions over M, split over M for
parallelism); dw is an elementwise product and a sum over r on [M, J], done in PyTorch. Intermediates
(xa, gb) are stored in x's dtype, every product accumulates in fp32. On CPU the same math runs as dense
GEMMs in PyTorch (`_TorchOps`). xa is saved for the backward rather than recomputed: it is [M, E*r]
(24 columns at E=3, r=8) while recomputing it would re-read x [M, K] (576..4096 columns).

Layers: kernels -> `launch_config` -> `_TritonOps` / `_TorchOps` (same launcher names) -> `mix_forward` /
`mix_backward` -> `LoRAMixFunction`, `LoRALinearFunction` (autograd) -> `lora_mix`, `lora_linear` (public).
"""

import itertools

import torch
import triton
import triton.language as tl

from thinkrec_kernels._amp import compute_dtype, no_autocast
from thinkrec_kernels._dispatch import use_triton

MIXES = ("delta", "linear")


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _lora_shrink_kernel(
    x_ptr, v_ptr, out_ptr, M, K, J,
    stride_xm, stride_xk, stride_ve, stride_vi, stride_vk, stride_om, stride_oj,
    R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """out[m, j] = sum_k x[m, k] * V[j // R, j % R, k] (V addressed by strides; fp32 accumulation)."""
    # int64 rows: M * K passes 2**31 at M = 100k, K = 32k
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_k = tl.arange(0, BLOCK_K)
    v_row = (offs_j // R) * stride_ve + (offs_j % R) * stride_vi
    acc = tl.zeros((BLOCK_M, BLOCK_J), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + offs_k
        # acc += x[m_block, k_block] @ A_cat[j_block, k_block].T
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + ks[None, :] * stride_xk,
                     mask=(offs_m[:, None] < M) & (ks[None, :] < K), other=0.0)
        vt = tl.load(v_ptr + v_row[None, :] + ks[:, None] * stride_vk,
                     mask=(offs_j[None, :] < J) & (ks[:, None] < K), other=0.0)
        acc = tl.dot(xt, vt.to(xt.dtype), acc, input_precision=DOT_PRECISION)
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_j[None, :] * stride_oj,
             acc.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & (offs_j[None, :] < J))


@triton.jit
def _lora_expand_kernel(
    h_ptr, w_ptr, v_ptr, out_ptr, M, N, J, scale,
    stride_hm, stride_hj, stride_wm, stride_we, stride_ve, stride_vi, stride_vn, stride_om, stride_on,
    R: tl.constexpr, HAS_W: tl.constexpr, ACCUMULATE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[m, n] (+)= sum_j scale * w[m, j // R] * h[m, j] * V[j // R, j % R, n] (w = 1 without HAS_W)."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: M * N may pass 2**31
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_J)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, J, BLOCK_J):
        js = j0 + offs_j
        mask_mj = (offs_m[:, None] < M) & (js[None, :] < J)
        # hs = scale * h[m_block, j_block] * w[m_block, j_block // R]
        ht = tl.load(h_ptr + offs_m[:, None] * stride_hm + js[None, :] * stride_hj, mask=mask_mj, other=0.0)
        hs = ht.to(tl.float32) * scale
        if HAS_W:
            wt = tl.load(w_ptr + offs_m[:, None] * stride_wm + (js[None, :] // R) * stride_we,
                         mask=mask_mj, other=0.0)
            hs = hs * wt.to(tl.float32)
        # acc += hs @ B_cat[n_block, j_block].T
        vt = tl.load(v_ptr + (js[:, None] // R) * stride_ve + (js[:, None] % R) * stride_vi
                     + offs_n[None, :] * stride_vn,
                     mask=(js[:, None] < J) & (offs_n[None, :] < N), other=0.0)
        acc = tl.dot(hs.to(vt.dtype), vt, acc, input_precision=DOT_PRECISION)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    mask_mn = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if ACCUMULATE:
        # out += delta (the base GEMM's output, read once and written once)
        acc += tl.load(out_ptrs, mask=mask_mn, other=0.0).to(tl.float32)
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_mn)


@triton.jit
def _lora_grad_weight_kernel(
    l_ptr, r_ptr, w_ptr, out_ptr, M, P, J, scale, rows_per_split,
    stride_lm, stride_lp, stride_rm, stride_rj, stride_wm, stride_we, stride_os, stride_op, stride_oj,
    R: tl.constexpr, HAS_W: tl.constexpr,
    BLOCK_P: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """out[s, p, j] = sum_{m in split s} L[m, p] * scale * w[m, j // R] * Rt[m, j], fp32 partial sums."""
    offs_p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_j = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    pid_s = tl.program_id(2)
    m_start = pid_s * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)
    acc = tl.zeros((BLOCK_P, BLOCK_J), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        ms = m0 + tl.arange(0, BLOCK_M).to(tl.int64)  # int64: M * P may pass 2**31
        mask_mj = (ms[:, None] < m_end) & (offs_j[None, :] < J)
        # rs = scale * Rt[m_block, j_block] * w[m_block, j_block // R]
        rt = tl.load(r_ptr + ms[:, None] * stride_rm + offs_j[None, :] * stride_rj, mask=mask_mj, other=0.0)
        rs = rt.to(tl.float32) * scale
        if HAS_W:
            wt = tl.load(w_ptr + ms[:, None] * stride_wm + (offs_j[None, :] // R) * stride_we,
                         mask=mask_mj, other=0.0)
            rs = rs * wt.to(tl.float32)
        # acc += L[m_block, p_block].T @ rs
        lt = tl.load(l_ptr + offs_p[:, None] * stride_lp + ms[None, :] * stride_lm,
                     mask=(offs_p[:, None] < P) & (ms[None, :] < m_end), other=0.0)
        acc = tl.dot(lt, rs.to(lt.dtype), acc, input_precision=DOT_PRECISION)
    tl.store(out_ptr + pid_s * stride_os + offs_p[:, None] * stride_op + offs_j[None, :] * stride_oj, acc,
             mask=(offs_p[:, None] < P) & (offs_j[None, :] < J))


# ------------------------------------------------------------------------------------------- launchers
def launch_config(kernel: str, J: int, M: int = 1 << 20, dtype=torch.bfloat16) -> dict:
    """Constexprs (block sizes, DOT_PRECISION) and launch options of `kernel` ("shrink", "expand",
    "grad_weight") at J = E * r columns, M rows, operands in `dtype`; compile_cases() is built from this too.

    BLOCK_J covers J up to 64 (one pass over x), >= 16 for tl.dot. The shrink grid is only cdiv(M, BLOCK_M) x
    cdiv(J, BLOCK_J) (64 programs at M = 4096, J = 24) and streams all of x, so below ~2 programs per SM (H100:
    132 SMs) it halves BLOCK_M to put more SMs on the read (sm_90 then gets mma.sync rather than wgmma, which
    needs 64 rows a warp group; at ~J/2 FLOPs a byte the shrink is bandwidth-bound either way). fp32 operands
    multiply in full precision ("ieee", an FMA loop), as torch.mm does by default, not TF32.

    Registers, from `ptxas -v` (python -m thinkrec_kernels.compile_check, sm_80 / sm_90): expand and grad_weight
    scale a [64, BLOCK_J] operand in fp32 before the dot; at BLOCK_J = 64 and 4 warps both spilled (255
    registers and 32..396 B of spill stores), at 8 warps they take 179..246 and do not. The fp32 dot holds
    both operand tiles in registers: 64 deep and 4 warps, every kernel spilled (up to 8 KB on sm_80); 16 deep
    (BLOCK_K, BLOCK_J, BLOCK_M of the three kernels), 8 warps and 2 pipeline stages, 76..146 registers and no
    spills (at 3 stages the fp32 shrink spilled 8 B on sm_90).
    """
    bj = max(16, min(64, triton.next_power_of_2(J)))
    fp32 = dtype == torch.float32
    depth = 16 if fp32 else 64  # the reduction step of one tl.dot
    if kernel == "shrink":
        bm = 64 if triton.cdiv(M, 64) * triton.cdiv(J, bj) >= 264 else 32
        blocks = dict(BLOCK_M=bm, BLOCK_J=bj, BLOCK_K=depth)
    elif kernel == "expand":
        blocks = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_J=min(bj, depth))
    elif kernel == "grad_weight":
        blocks = dict(BLOCK_P=64, BLOCK_J=bj, BLOCK_M=depth)
    else:
        raise ValueError(f"thinkrec_kernels/lora.py: unknown kernel {kernel!r}")
    warps = 8 if fp32 or (kernel != "shrink" and bj == 64) else 4
    return dict(blocks, DOT_PRECISION="ieee" if fp32 else "tf32", num_warps=warps,
                num_stages=2 if fp32 else 3)


# A "J-view" of A [E, r, K] or B [E, N, r]: (tensor, stride of e, stride of i, stride of the other dim, C).
def _jview(W, layout):
    if layout == "A":  # A_cat[j, k] = A[j // r, j % r, k]
        return W, W.stride(0), W.stride(1), W.stride(2), W.shape[2]
    return W, W.stride(0), W.stride(2), W.stride(1), W.shape[1]  # B_cat.T[j, n] = B[j // r, n, j % r]


class _TritonOps:
    """The three products of the op as Triton launches; 2-D inputs, r and E from the weight tensors."""

    @staticmethod
    def shrink(x, W, layout, r):
        """[M, C] @ V_cat.T -> [M, J] where V_cat [J, C] is the J-view of W (A_cat, or B_cat.T)."""
        V, s_e, s_i, s_c, C = _jview(W, layout)
        M, J = x.shape[0], W.shape[0] * r
        out = torch.empty(M, J, device=x.device, dtype=x.dtype)
        cfg = launch_config("shrink", J, M, x.dtype)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(J, cfg["BLOCK_J"]))
        _lora_shrink_kernel[grid](
            x_ptr=x, v_ptr=V, out_ptr=out, M=M, K=C, J=J, stride_xm=x.stride(0), stride_xk=x.stride(1),
            stride_ve=s_e, stride_vi=s_i, stride_vk=s_c, stride_om=out.stride(0), stride_oj=out.stride(1),
            R=r, **cfg)
        return out

    @staticmethod
    def expand(h, w, scale, W, layout, r, out=None):
        """(out +)= (scale * h * w_rep) @ V_cat with V_cat [J, C] the J-view of W; w=None means w = 1."""
        V, s_e, s_i, s_c, C = _jview(W, layout)
        M, J = h.shape
        accumulate = out is not None
        if out is None:
            out = torch.empty(M, C, device=h.device, dtype=h.dtype)
        wt = w if w is not None else h  # dummy pointer when HAS_W is off
        cfg = launch_config("expand", J, M, V.dtype)
        grid = (triton.cdiv(M, cfg["BLOCK_M"]), triton.cdiv(C, cfg["BLOCK_N"]))
        _lora_expand_kernel[grid](
            h_ptr=h, w_ptr=wt, v_ptr=V, out_ptr=out, M=M, N=C, J=J, scale=float(scale),
            stride_hm=h.stride(0), stride_hj=h.stride(1), stride_wm=wt.stride(0), stride_we=wt.stride(1),
            stride_ve=s_e, stride_vi=s_i, stride_vn=s_c, stride_om=out.stride(0), stride_on=out.stride(1),
            R=r, HAS_W=w is not None, ACCUMULATE=accumulate, **cfg)
        return out

    @staticmethod
    def grad_weight(L, Rt, w, scale, r):
        """L.T @ (scale * Rt * w_rep) -> [P, J] in fp32 (split over M, partial sums added in PyTorch)."""
        M, P = L.shape
        J = Rt.shape[1]
        cfg = launch_config("grad_weight", J, M, L.dtype)
        tiles = triton.cdiv(P, cfg["BLOCK_P"]) * triton.cdiv(J, cfg["BLOCK_J"])
        # Split M so that ~2 programs run per SM (H100: 132 SMs); each split reduces >= 8 row blocks.
        n_split = max(1, min(triton.cdiv(264, tiles), triton.cdiv(M, 8 * cfg["BLOCK_M"])))
        rows = triton.cdiv(triton.cdiv(M, n_split), cfg["BLOCK_M"]) * cfg["BLOCK_M"]
        n_split = triton.cdiv(M, rows) if M else 1
        part = torch.zeros(n_split, P, J, device=L.device, dtype=torch.float32)
        wt = w if w is not None else Rt
        grid = (triton.cdiv(P, cfg["BLOCK_P"]), triton.cdiv(J, cfg["BLOCK_J"]), n_split)
        _lora_grad_weight_kernel[grid](
            l_ptr=L, r_ptr=Rt, w_ptr=wt, out_ptr=part, M=M, P=P, J=J, scale=float(scale), rows_per_split=rows,
            stride_lm=L.stride(0), stride_lp=L.stride(1), stride_rm=Rt.stride(0), stride_rj=Rt.stride(1),
            stride_wm=wt.stride(0), stride_we=wt.stride(1), stride_os=part.stride(0), stride_op=part.stride(1),
            stride_oj=part.stride(2), R=r, HAS_W=w is not None, **cfg)
        return part.sum(0) if n_split > 1 else part[0]


class _TorchOps:
    """The same three products as dense GEMMs (the CPU path)."""

    @staticmethod
    def _cat(W, layout):
        # A [E, r, K] -> A_cat [J, K] (a view); B [E, N, r] -> B_cat.T [J, N] (a small copy)
        return W.reshape(-1, W.shape[2]) if layout == "A" else W.transpose(1, 2).reshape(-1, W.shape[1])

    @staticmethod
    def _scaled(h, w, scale, r):
        # scale * h * w_rep, w_rep [M, J] = w repeated r times along the columns
        if w is None:
            return h * scale
        return h * (w.to(h.dtype) * scale).repeat_interleave(r, dim=1)

    @classmethod
    def shrink(cls, x, W, layout, r):
        return x @ cls._cat(W, layout).T  # [M, J]

    @classmethod
    def expand(cls, h, w, scale, W, layout, r, out=None):
        hs, V = cls._scaled(h, w, scale, r), cls._cat(W, layout)  # [M, J], [J, C]
        return torch.mm(hs, V) if out is None else out.addmm_(hs, V)

    @classmethod
    def grad_weight(cls, L, Rt, w, scale, r):
        return L.T @ cls._scaled(Rt, w, scale, r)  # [P, J]


# ----------------------------------------------------------------------------------- forward/backward
def _linear_mix(xa, w, scale, r):
    """peft "linear": h[m, e, i] = scale * sqrt(w[m, e]) * sum_e' sqrt(w[m, e']) * xa[m, e', i]. [M, J]"""
    M, E = w.shape
    sw = w.to(xa.dtype).sqrt()[..., None]  # [M, E, 1]
    xam = (sw * xa.view(M, E, r)).sum(1, keepdim=True)  # [M, 1, r]
    return (scale * sw * xam).reshape(M, E * r)


def mix_forward(ops, x2, A, B, w2, scale, mix, out=None):
    """delta (or out + delta) for 2-D x2 [M, K], w2 [M, E]; returns (result, xa) with xa [M, J] saved."""
    r = A.shape[1]
    xa = ops.shrink(x2, A, "A", r)  # [M, J]
    if mix == "delta":
        return ops.expand(xa, w2, scale, B, "B", r, out=out), xa
    return ops.expand(_linear_mix(xa, w2, scale, r), None, 1.0, B, "B", r, out=out), xa


def mix_backward(ops, g, x2, A, B, w2, xa, scale, mix, need, dx_out=None):
    """Gradients (dx [M, K], dA, dB, dw [M, E]) of mix_forward for upstream g [M, N]; None where not needed.

    need: (dx, dA, dB, dw) booleans. dx_out, when given, receives dx by accumulation (lora_linear).
    """
    E, r, K = A.shape
    N = B.shape[1]
    M = x2.shape[0]
    gb = ops.shrink(g, B, "B", r)  # [M, J] = g @ B_cat
    if mix == "delta":
        wh, s, h, dxa = w2, scale, xa, gb  # h = scale * w_rep * xa, dxa = scale * w_rep * gb
        dw = None
        if need[3]:
            acc = torch.promote_types(xa.dtype, torch.float32)  # fp32 accumulation, fp64 stays fp64
            dw = (scale * (xa.to(acc) * gb.to(acc)).view(M, E, r).sum(-1)).to(w2.dtype)
    else:
        with torch.enable_grad():
            xa_, w_ = xa.detach().requires_grad_(), w2.detach().requires_grad_(need[3])
            h_ = _linear_mix(xa_, w_, scale, r)
            grads = torch.autograd.grad(h_, [xa_, w_] if need[3] else [xa_], gb)
        wh, s, h, dxa = None, 1.0, h_.detach(), grads[0]
        dw = grads[1] if need[3] else None
    dx = ops.expand(dxa, wh, s, A, "A", r, out=dx_out) if need[0] else None
    dA = ops.grad_weight(x2, dxa, wh, s, r).T.reshape(E, r, K).to(A.dtype) if need[1] else None  # [J, K]
    dB = ops.grad_weight(g, h, wh, s, r).view(N, E, r).transpose(0, 1).to(B.dtype) if need[2] else None
    return dx, dA, dB, dw


class LoRAMixFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, A, B, w2, scale, mix, ops):
        with no_autocast(x2):
            delta, xa = mix_forward(ops, x2, A, B, w2, scale, mix)
        ctx.save_for_backward(x2, A, B, w2, xa)
        ctx.scale, ctx.mix, ctx.ops = scale, mix, ops
        return delta

    @staticmethod
    def backward(ctx, g):
        x2, A, B, w2, xa = ctx.saved_tensors
        need = ctx.needs_input_grad[:4]
        with no_autocast(g):  # a backward called inside autocast must not re-cast g or the saved tensors
            dx, dA, dB, dw = mix_backward(ctx.ops, g.contiguous(), x2, A, B, w2, xa, ctx.scale, ctx.mix, need)
        return dx, dA, dB, dw, None, None, None


class LoRALinearFunction(torch.autograd.Function):
    """y = x @ weight.T + bias + delta, fused as Punica/vLLM do: the base GEMM in cuBLAS (`torch.addmm`), then
    shrink and an expand that adds into y in place (backward: dx = g @ weight, then the expand into dx).
    Fusing the expand into the GEMM's epilogue would save one read+write of y (4 MB at M=4096, N=576 against
    the 10 MB the GEMM moves anyway) but means matching cuBLAS on the K x N product, nearly all the FLOPs."""

    @staticmethod
    def forward(ctx, x2, weight, bias, A, B, w2, scale, mix, ops):
        with no_autocast(x2):  # under autocast the addmm would run in bf16 and the kernels in x's dtype
            # y = bias + x @ weight.T (one cuBLAS/MKL GEMM), then y += LoRA delta in place
            y = torch.addmm(bias, x2, weight.T) if bias is not None else x2 @ weight.T
            y, xa = mix_forward(ops, x2, A, B, w2, scale, mix, out=y)
        ctx.save_for_backward(x2, weight, A, B, w2, xa)
        ctx.scale, ctx.mix, ctx.ops, ctx.has_bias = scale, mix, ops, bias is not None
        return y

    @staticmethod
    def backward(ctx, g):
        x2, weight, A, B, w2, xa = ctx.saved_tensors
        g = g.contiguous()
        need_x, need_wt, need_b, need_A, need_B, need_w = ctx.needs_input_grad[:6]
        with no_autocast(g):
            dx_base = g @ weight if need_x else None  # [M, K]; the LoRA part is accumulated into it
            dx, dA, dB, dw = mix_backward(ctx.ops, g, x2, A, B, w2, xa, ctx.scale, ctx.mix,
                                          (need_x, need_A, need_B, need_w), dx_out=dx_base)
            dweight = g.T @ x2 if need_wt else None
            dbias = g.sum(0) if (need_b and ctx.has_bias) else None
        return dx, dweight, dbias, dA, dB, dw, None, None, None


# ------------------------------------------------------------------------------------------------ public
def check_args(x, A, B, w, mix, where="lora_mix"):
    """Validate shapes; returns (E, r, K, N)."""
    if mix not in MIXES:
        raise ValueError(f"thinkrec_kernels/lora.py {where}: mix={mix!r} is not one of {MIXES}")
    if A.dim() != 3 or B.dim() != 3:
        raise ValueError(f"thinkrec_kernels/lora.py {where}: A must be [E, r, K] and B [E, N, r]; "
                         f"got A {tuple(A.shape)}, B {tuple(B.shape)}")
    E, r, K = A.shape
    N = B.shape[1]
    if B.shape[0] != E or B.shape[2] != r:
        raise ValueError(f"thinkrec_kernels/lora.py {where}: B {tuple(B.shape)} does not match A {tuple(A.shape)} "
                         f"(expected [{E}, N, {r}])")
    if x.shape[-1] != K:
        raise ValueError(f"thinkrec_kernels/lora.py {where}: x last dim {x.shape[-1]} != A's K={K}")
    if tuple(w.shape) != tuple(x.shape[:-1]) + (E,):
        raise ValueError(f"thinkrec_kernels/lora.py {where}: w must be x.shape[:-1] + (E,) = "
                         f"{tuple(x.shape[:-1]) + (E,)}, got {tuple(w.shape)}")
    return E, r, K, N


def _rows(x, K):
    """x [..., K] as 2-D rows [M, K] with unit stride along K (a view when it already has one)."""
    x2 = x.reshape(-1, K)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def lora_mix(x, A, B, w, scale, *, mix="delta"):
    """delta [..., N] = scale * sum_e w[..., e] * B_e @ A_e @ x (mix="delta", exact mixture), or peft's
    "linear" combination scale * (sum_e sqrt(w_e) B_e) @ (sum_e sqrt(w_e) A_e) @ x (mix="linear").

    x: [..., K], A: [E, r, K], B: [E, N, r], w: [..., E] (one-hot, dense or zero rows). Differentiable in
    x, A, B and w (linear mix: w > 0). Triton on CUDA tensors, dense PyTorch GEMMs on CPU and for fp64.
    Computes and returns in x's dtype, or in autocast's dtype when autocast is on (thinkrec_kernels/_amp.py).
    """
    E, r, K, N = check_args(x, A, B, w, mix)
    lead = x.shape[:-1]
    # compute in x's dtype, or autocast's (fp32 adapters, fp32 x under bf16 autocast); no-op if equal
    dt = compute_dtype(x)
    x, A, B = x.to(dt), A.to(dt), B.to(dt)
    x2 = _rows(x, K)
    if x2.shape[0] == 0:
        return x.new_zeros(*lead, N) + 0.0 * (A.sum() + B.sum() + w.sum())
    ops = _TritonOps if use_triton(x, A, B, w) else _TorchOps
    delta = LoRAMixFunction.apply(x2, A, B, w.reshape(-1, E), float(scale), mix, ops)
    return delta.view(*lead, N)


def lora_linear(x, weight, bias, A, B, w, scale, *, mix="delta"):
    """F.linear(x, weight, bias) + lora_mix(x, A, B, w, scale, mix=mix), with the delta added in place.

    x: [..., K], weight: [N, K], bias: [N] or None, A: [E, r, K], B: [E, N, r], w: [..., E] -> [..., N].
    Differentiable in every tensor argument. Computes in x's dtype, or autocast's when it is on.
    """
    E, r, K, N = check_args(x, A, B, w, mix, where="lora_linear")
    if tuple(weight.shape) != (N, K):
        raise ValueError(f"thinkrec_kernels/lora.py lora_linear: weight must be [N, K] = [{N}, {K}], "
                         f"got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"thinkrec_kernels/lora.py lora_linear: bias must be [{N}], got {tuple(bias.shape)}")
    lead = x.shape[:-1]
    # compute in x's dtype, or autocast's as F.linear would (fp32 adapters or base weights, fp32 x under
    # bf16 autocast); .to is a no-op otherwise
    dt = compute_dtype(x)
    x, weight, A, B = x.to(dt), weight.to(dt), A.to(dt), B.to(dt)
    bias = bias.to(dt) if bias is not None else None
    x2 = _rows(x, K)
    if x2.shape[0] == 0:
        return torch.nn.functional.linear(x, weight, bias) + 0.0 * (A.sum() + B.sum() + w.sum())
    ops = _TritonOps if use_triton(*[t for t in (x, weight, bias, A, B, w) if t is not None]) else _TorchOps
    y = LoRALinearFunction.apply(x2, weight, bias, A, B, w.reshape(-1, E), float(scale), mix, ops)
    return y.view(*lead, N)


# --------------------------------------------------------------------------------------- compile cases
def compile_cases() -> list:
    """What thinkrec_kernels/compile_check.py compiles: every kernel at the configurations launch_config gives (J
    buckets 16, 32, 64+; small and large M), bf16 and fp16 with w in fp32, and fp32 at its largest blocks only
    (fp32 compiles are slow; its "ieee" dot has no tensor-core form). Pointers not named in args are in the
    case's dtype."""
    kernels = {"shrink": (_lora_shrink_kernel, {}, dict(R=8)),
               "expand": (_lora_expand_kernel, {"w_ptr": "*fp32", "scale": "fp32"},
                          dict(R=8, HAS_W=True, ACCUMULATE=True)),
               "grad_weight": (_lora_grad_weight_kernel, {"w_ptr": "*fp32", "out_ptr": "*fp32", "scale": "fp32"},
                               dict(R=8, HAS_W=True))}
    cases = []
    half = [(dt, (16, 32, 64), (64, 1 << 20)) for dt in (torch.bfloat16, torch.float16)]
    for dtype, Js, Ms in half + [(torch.float32, (64,), (1 << 20,))]:
        for J, M, name in itertools.product(Js, Ms, kernels):
            fn, args, constexprs = kernels[name]
            cases.append(dict(kernel=fn, dtype=dtype, config=launch_config(name, J, M, dtype), args=args,
                              constexprs=constexprs))
    return cases
