"""Token cross-entropy of `h @ W.T` in chunks, with the gradient formed during the forward.

Math (h: [T, D], W: [V, D], targets t: [T], valid_i = t_i != ignore_index, s_i the row's weight:
1/n_valid for "mean", 1 for "sum", 0 where the row is ignored):

    z_i     = W h_i                                    [V] logits of token i
    lse_i   = log sum_v exp(z_iv)                      (online max/sum over V)
    loss    = sum_i s_i (lse_i - z_{i, t_i})
    dz_i    = s_i (softmax(z_i) - onehot(t_i))         [V]
    dh_i    = dz_i @ W                                 [D]
    dW      = sum_i dz_i^T h_i                         [V, D]

This is Liger-Kernel's fused linear cross-entropy idea (our own code): per chunk of C tokens the
logits chunk [C, V] is computed by a GEMM, overwritten in place by dz (a Triton row kernel on GPU,
torch ops on CPU), then `dh[chunk] = dz @ W` and `dW += dz.T @ h[chunk]`. Only one [C, V] buffer exists
at a time; C is picked so that it holds at most `CHUNK_BYTES` (default 64 MiB), against [T, V] logits
plus their log-softmax and gradient (~3 x T*V*4 bytes, 2.4 GB at T=4096, V=49,152) for the plain path.

Because the gradients are formed in the forward, the backward only multiplies them by the scalar
grad_output. reduction="none" cannot do that (each row's grad_output scales its own dz before the
products), so it stores nothing in the forward and reruns the chunk loop in the backward (one extra
logits GEMM). An all-ignored batch gives loss 0 and zero gradients for "mean" (1/max(n_valid, 1)).

Precision: the chunk GEMMs run in the input dtype with fp32 accumulation (cuBLAS on GPU, oneDNN/MKL on
CPU; fp32, and bf16 under the bf16 precision), the row step works in fp32 and writes dz back in the input
dtype, dW accumulates in fp32 across chunks. fp16 on CPU has no fast path (never use it there).

Layers: `_ce_rows_kernel` (Triton) -> `launch_config` -> `_TritonOps.ce_rows` / `_TorchOps.ce_rows` (the row
step) -> `_chunked_ce` (the chunk loop) -> `_LinearCrossEntropy` (autograd) -> `linear_cross_entropy` (public).
"""

import torch
import triton
import triton.language as tl

from thinkrec_kernels._dispatch import use_triton

REDUCTIONS = ("mean", "sum", "none")
# Bound on one chunk of logits: 64 MiB is 341 tokens at V=49,152 (130 at V=128,256) in fp32. Each chunk
# streams W twice, so small chunks make the GEMMs memory-bound: on 2 busy CPU cores at T=4096, D=576,
# 32 MiB ran 1.18x / 0.81x the full-logits time at V=128,256 / 49,152, 64 MiB 0.95x / 0.59x.
CHUNK_BYTES = 64 * 2**20


@triton.jit
def _ce_rows_kernel(
    logits_ptr, stride_lr, targets_ptr, row_scale_ptr, loss_ptr, V, ignore_index,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_lr
    target = tl.load(targets_ptr + row)
    scale = tl.load(row_scale_ptr + row)
    valid = target != ignore_index
    # m, d = z.max(), exp(z - m).sum()   (online over V blocks, fp32); z_target = z[target] from the same
    # loads. (Not a separate tl.load(row_ptr + target) after this loop: the row is overwritten in place
    # below with no barrier in between, so on a GPU a warp still to load z[target] could read the dz that
    # another warp of the program already stored there. It also never reads out of the row when a target
    # is out of range.)
    m = float("-inf")
    d = 0.0
    z_target = 0.0
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), axis=0)
        m = m_new
        z_target += tl.sum(tl.where(cols == target, z, 0.0), axis=0)
    lse = m + tl.log(d)
    # loss_i = lse - z[target]   (0 for an ignored row)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_target, 0.0))
    # z[:] = scale * (softmax(z) - onehot(target))   in place; scale is 0 for ignored rows
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z = tl.load(row_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        dz = tl.exp(z - lse) * scale
        dz = tl.where(cols == target, dz - scale, dz)
        tl.store(row_ptr + cols, dz.to(logits_ptr.dtype.element_ty), mask=col_mask)


def launch_config(V: int) -> dict:
    """Row-kernel constexprs and launch options for vocabulary size V: up to 4096 columns per step.

    Each program streams its row twice (stats, then dz), so the block only needs to be wide enough to
    keep loads in flight; 4096 fp32 at 8 warps is 16 values per thread. Never below 16 (GPU compile).
    """
    block_v = max(16, min(4096, triton.next_power_of_2(V)))
    return dict(BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4, num_stages=2)


class _TritonOps:
    @staticmethod
    def ce_rows(logits, targets, row_scale, ignore_index, loss_rows):
        """Launch one program per row: writes loss_rows [n] (fp32) and overwrites logits [n, V] with dz."""
        n, V = logits.shape
        _ce_rows_kernel[(n,)](
            logits_ptr=logits, stride_lr=logits.stride(0), targets_ptr=targets, row_scale_ptr=row_scale,
            loss_ptr=loss_rows, V=V, ignore_index=ignore_index, **launch_config(V))


class _TorchOps:
    @staticmethod
    def ce_rows(logits, targets, row_scale, ignore_index, loss_rows):
        """The same row step with in-place torch ops, so no second [n, V] buffer is made."""
        z = logits if logits.dtype == torch.float32 else logits.float()
        valid = targets != ignore_index
        safe_t = torch.where(valid, targets, 0)[:, None]  # [n, 1]
        z_target = z.gather(1, safe_t).squeeze(1)
        m = z.amax(dim=1, keepdim=True)
        p = z.sub_(m).exp_()  # exp(z - m), in place
        d = p.sum(dim=1, keepdim=True)
        loss_rows.copy_(torch.where(valid, (m + d.log()).squeeze(1) - z_target, 0.0))
        p.mul_(row_scale[:, None] / d)  # scale * softmax(z)
        p.scatter_add_(1, safe_t, -row_scale[:, None])  # - scale * onehot(target); scale is 0 when ignored
        if p is not logits:
            logits.copy_(p)


def _chunk_rows(T: int, V: int, element_size: int, chunk_bytes: int) -> int:
    """Tokens per chunk so that one [C, V] logits chunk stays under chunk_bytes (at least 1 token)."""
    return max(1, min(T, chunk_bytes // max(1, V * element_size)))


_MIXED_ADDMM = {"ok": True}  # set False once if this torch lacks addmm(out_dtype=...): don't retry every chunk


def _accumulate_mm(acc, a, b):
    """acc += a @ b with acc in fp32; on CUDA half inputs use cuBLAS's fp32 output (no bf16 [V, D] temp)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda and _MIXED_ADDMM["ok"]:
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, NotImplementedError, TypeError):
            _MIXED_ADDMM["ok"] = False  # older torch / cuBLAS without the mixed-dtype GEMM: fall back from now on
    acc.add_(torch.mm(a, b))


def _chunked_ce(h, weight, targets, row_scale, ignore_index, need_dh, need_dw, chunk_rows, ops):
    """Loss rows [T] fp32 and (if asked) dh [T, D] in h.dtype and dW [V, D] fp32, chunk by chunk."""
    T, D = h.shape
    V = weight.shape[0]
    loss_rows = torch.empty(T, device=h.device, dtype=torch.float32)
    dh = torch.empty(T, D, device=h.device, dtype=h.dtype) if need_dh else None  # contiguous for mm(out=)
    dw = torch.zeros(V, D, device=h.device, dtype=torch.float32) if need_dw else None
    buf = torch.empty(min(chunk_rows, T), V, device=h.device, dtype=h.dtype)  # reused by every chunk
    for start in range(0, T, chunk_rows):
        end = min(start + chunk_rows, T)
        h_c, logits = h[start:end], buf[: end - start]
        torch.mm(h_c, weight.T, out=logits)  # [C, V]
        ops.ce_rows(logits, targets[start:end], row_scale[start:end], ignore_index, loss_rows[start:end])
        if need_dh:
            torch.mm(logits, weight, out=dh[start:end])  # dh chunk = dz @ W   [C, D]
        if need_dw:
            _accumulate_mm(dw, logits.T, h_c)  # dW += dz.T @ h_chunk   [V, D]
    return loss_rows, dh, dw


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, targets, ignore_index, reduction, chunk_rows, ops):
        valid = (targets != ignore_index).float()
        # 1/max(n_valid, 1) stays on device (no sync); an all-ignored batch gets scale 0, not NaN
        row_scale = valid / valid.sum().clamp(min=1.0) if reduction == "mean" else valid
        ctx.args = (ignore_index, chunk_rows, ops)
        ctx.reduction = reduction
        # needs_input_grad is False for inputs that need no grad and everywhere under torch.no_grad()
        need_dh = reduction != "none" and ctx.needs_input_grad[0]
        need_dw = reduction != "none" and ctx.needs_input_grad[1]
        loss_rows, dh, dw = _chunked_ce(h, weight, targets, row_scale, ignore_index, need_dh, need_dw,
                                        chunk_rows, ops)
        if reduction == "none":
            ctx.save_for_backward(h, weight, targets)
            return loss_rows  # fp32, as computed: a bf16 loss would round the value by up to 0.4%
        ctx.save_for_backward(dh, dw)
        ctx.weight_dtype = weight.dtype
        return (loss_rows * row_scale).sum()  # ignored rows: loss 0 and scale 0; fp32

    @staticmethod
    def backward(ctx, grad_out):
        ignore_index, chunk_rows, ops = ctx.args
        if ctx.reduction == "none":
            h, weight, targets = ctx.saved_tensors
            row_scale = (targets != ignore_index).float() * grad_out.float()  # per-row upstream grad
            _, dh, dw = _chunked_ce(h, weight, targets, row_scale, ignore_index, ctx.needs_input_grad[0],
                                    ctx.needs_input_grad[1], chunk_rows, ops)
            return dh, None if dw is None else dw.to(weight.dtype), None, None, None, None, None
        dh, dw = ctx.saved_tensors
        g = grad_out.float()
        dh = None if dh is None else (dh * g).to(dh.dtype)
        dw = None if dw is None else (dw * g).to(ctx.weight_dtype)
        return dh, dw, None, None, None, None, None


def linear_cross_entropy(h, weight, targets, *, ignore_index=-100, reduction="mean", chunk_rows=None):
    """`F.cross_entropy(h @ weight.T, targets)` without ever holding more than one chunk of logits.

    h: [T, D], weight: [V, D] (same dtype: fp32 or bf16; fp16 on GPU), targets: [T] int64.
    reduction: "mean" (over non-ignored tokens), "sum" or "none" ([T], ignored rows 0). The loss is fp32
    whatever h's dtype (the row statistics are fp32); dh and dW come in h's and weight's dtypes.
    chunk_rows: tokens per chunk; default keeps one [C, V] chunk under CHUNK_BYTES.
    weight may be frozen (requires_grad False): dW is then never computed.
    """
    if h.dim() != 2 or weight.dim() != 2 or h.shape[1] != weight.shape[1]:
        raise ValueError(
            f"thinkrec_kernels/linear_ce.py: h must be [T, D] and weight [V, D], got h {tuple(h.shape)}, "
            f"weight {tuple(weight.shape)}"
        )
    if targets.shape != (h.shape[0],):
        raise ValueError(
            f"thinkrec_kernels/linear_ce.py: targets must be [T={h.shape[0]}], got {tuple(targets.shape)}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"thinkrec_kernels/linear_ce.py: reduction {reduction!r} is not one of {REDUCTIONS}")
    if h.dtype != weight.dtype:
        raise ValueError(f"thinkrec_kernels/linear_ce.py: h is {h.dtype} but weight is {weight.dtype}")
    if chunk_rows is None:
        chunk_rows = _chunk_rows(h.shape[0], weight.shape[0], h.element_size(), CHUNK_BYTES)
    if chunk_rows < 1:
        raise ValueError(f"thinkrec_kernels/linear_ce.py: chunk_rows must be >= 1, got {chunk_rows}")
    targets = targets.to(device=h.device, dtype=torch.int64).contiguous()
    # A target outside [0, V) (other than ignore_index) is an IndexError on the PyTorch path but would be
    # silently wrong in the row kernel: check on device, without a host sync (raises at once on CPU).
    V = weight.shape[0]
    bad = ((targets < 0) | (targets >= V)) & (targets != ignore_index)
    torch._assert_async(~bad.any(), f"thinkrec_kernels/linear_ce.py: targets must be in [0, V={V}) or "
                                    f"ignore_index={ignore_index}")
    ops = _TritonOps if use_triton(h, weight) else _TorchOps
    return _LinearCrossEntropy.apply(h, weight, targets, int(ignore_index), reduction, int(chunk_rows), ops)


def compile_cases() -> list[dict]:
    """What thinkrec_kernels/compile_check.py compiles: the row kernel at the configurations launch_config gives for a
    small vocabulary (1000), SmolLM2 (49,152) and Llama-3 (128,256), bf16 and fp16 logits."""
    args = {"targets_ptr": "*i64", "row_scale_ptr": "*fp32", "loss_ptr": "*fp32"}
    return [dict(kernel=_ce_rows_kernel, dtype=dtype, config=launch_config(V), args=args)
            for dtype in (torch.bfloat16, torch.float16) for V in (1000, 49152, 128256)]
