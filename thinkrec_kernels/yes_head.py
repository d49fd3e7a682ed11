"""BCE on the "Yes" logit without touching the rest of the vocabulary.

Math (h: [M, D] hidden states at the first answer position, W: [V, D] LM head, y: [M] in {0, 1}):

    z_m    = h_m . W[id]                                    logits, [M]
    l_m    = max(z_m, 0) - z_m y_m + log(1 + exp(-|z_m|))   BCE-with-logits, stable form
    dl/dz  = sigmoid(z_m) - y_m                              (times 1/M for reduction="mean")
    dh_m   = g_m dz_m W[id]                                  [M, D], an outer product
    dW[id] = sum_m g_m dz_m h_m                              [D]; every other row of dW is zero

A full LM head computes `h @ W.T` ([M, V], V = 49,152 for SmolLM2, 128,256 for Llama-3) and its gradient
of the same size, only to read one column. Here the forward is one GEMV pass (dot, sigmoid, loss and
dz in one Triton kernel on GPU) and the backward is two tiny products done with torch.

Gradient for `lm_weight`: when it does not require grad (the usual case: the LM head is frozen and
only LoRA trains) nothing vocabulary-sized is allocated. When it does, autograd needs a dense [V, D]
gradient for a leaf, so the backward returns zeros with only row `id` filled: one weight-sized buffer
(what `.grad` holds anyway), no vocabulary-sized compute.

Layers: `_yes_head_bce_fwd_kernel` (Triton) -> `launch_config` -> `_TritonOps.forward` /
`_TorchOps.forward` (launcher / PyTorch path) -> `_YesHeadBCE` (autograd) -> `yes_head_bce` (public).
"""

import torch
import triton
import triton.language as tl

from thinkrec_kernels._amp import no_autocast
from thinkrec_kernels._dispatch import use_triton

REDUCTIONS = ("mean", "sum", "none")


@triton.jit
def _yes_head_bce_fwd_kernel(
    h_ptr, w_ptr, labels_ptr, logits_ptr, loss_ptr, dlogit_ptr,
    M, D, stride_hm, stride_hd, stride_wd, grad_scale,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_hm
    # z = h @ w   (fp32 accumulation over D in blocks)
    z = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_mask = cols < D
        h = tl.load(h_rows + cols[None, :] * stride_hd, mask=row_mask[:, None] & col_mask[None, :], other=0.0)
        w = tl.load(w_ptr + cols * stride_wd, mask=col_mask, other=0.0)
        z += tl.sum(h.to(tl.float32) * w.to(tl.float32)[None, :], axis=1)
    y = tl.load(labels_ptr + rows, mask=row_mask, other=0.0)
    # loss = F.binary_cross_entropy_with_logits(z, y, reduction="none")
    e = tl.exp(-tl.abs(z))  # in (0, 1]: never overflows, shared by the loss and the sigmoid
    loss = tl.maximum(z, 0.0) - z * y + tl.log(1.0 + e)
    # dz = (torch.sigmoid(z) - y) * grad_scale
    p = tl.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    dz = (p - y) * grad_scale
    tl.store(logits_ptr + rows, z.to(logits_ptr.dtype.element_ty), mask=row_mask)
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    tl.store(dlogit_ptr + rows, dz, mask=row_mask)


def launch_config(D: int) -> dict:
    """Constexprs and launch options for hidden size D: 16 rows per program, up to 128 columns per step.

    The op is a GEMV (memory-bound, ~M*D*2 bytes), so the blocks only need to keep loads coalesced
    and registers small (16 x 128 fp32 = 16 values per thread at 4 warps). Blocks stay >= 16:
    smaller ones pass in the interpreter but fail to compile for a GPU.
    """
    return dict(BLOCK_M=16, BLOCK_D=max(16, min(128, triton.next_power_of_2(D))), num_warps=4, num_stages=2)


class _TritonOps:
    @staticmethod
    def forward(h, w_row, labels, grad_scale):
        """Launch the fused kernel. Returns (logits [M] in h.dtype, loss rows [M] fp32, dz [M] fp32)."""
        M, D = h.shape
        logits = torch.empty(M, device=h.device, dtype=h.dtype)
        loss_rows = torch.empty(M, device=h.device, dtype=torch.float32)
        dlogit = torch.empty(M, device=h.device, dtype=torch.float32)
        cfg = launch_config(D)
        _yes_head_bce_fwd_kernel[(triton.cdiv(M, cfg["BLOCK_M"]),)](
            h_ptr=h, w_ptr=w_row, labels_ptr=labels, logits_ptr=logits, loss_ptr=loss_rows, dlogit_ptr=dlogit,
            M=M, D=D, stride_hm=h.stride(0), stride_hd=h.stride(1), stride_wd=w_row.stride(0),
            grad_scale=grad_scale, **cfg)
        return logits, loss_rows, dlogit


class _TorchOps:
    @staticmethod
    def forward(h, w_row, labels, grad_scale):
        """The same three outputs with torch ops (fp32 math): the CPU path."""
        with no_autocast(h):  # CUDA autocast would run this mv in bf16 (THINKREC_KERNELS=torch on a GPU)
            z = torch.mv(h.float(), w_row.float())  # [M]
        loss_rows = z.clamp(min=0) - z * labels + torch.log1p(torch.exp(-z.abs()))
        dlogit = (torch.sigmoid(z) - labels) * grad_scale
        return z.to(h.dtype), loss_rows, dlogit


class _YesHeadBCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, lm_weight, token_id, labels, reduction, ops):
        M = h.shape[0]
        w_row = lm_weight[token_id]  # [D], a view: the rest of the vocabulary is never read
        y = labels.to(device=h.device, dtype=torch.float32).contiguous()  # the kernel reads labels[m] at m
        # "mean" folds 1/M into dz so the backward only multiplies by grad_output.
        # An empty batch (M = 0) gives loss 0 for "mean" too, as linear_cross_entropy does (not a
        # ZeroDivisionError here, nor F.binary_cross_entropy_with_logits' NaN).
        grad_scale = 1.0 / max(M, 1) if reduction == "mean" else 1.0
        logits, loss_rows, dlogit = ops.forward(h, w_row, y, grad_scale)
        # the loss stays fp32 as computed (in bf16 a loss of ~4 would be off by up to 0.016); logits in h.dtype
        loss = loss_rows if reduction == "none" else loss_rows.sum() * grad_scale
        ctx.save_for_backward(h, w_row, dlogit)
        ctx.token_id, ctx.weight_shape = token_id, lm_weight.shape
        return loss, logits

    @staticmethod
    def backward(ctx, grad_loss, grad_logits):
        h, w_row, dlogit = ctx.saved_tensors
        dz = torch.zeros_like(dlogit)  # [M] fp32: total d(objective)/dz
        if grad_loss is not None:
            dz += dlogit * grad_loss.float()  # scalar for mean/sum, [M] for none
        if grad_logits is not None:
            dz += grad_logits.float()  # the logits are also an output (scores), so they may carry a grad
        dh = dw = None
        if ctx.needs_input_grad[0]:
            # dh = dz[:, None] * W[id][None, :]   [M, D]
            dh = torch.outer(dz, w_row.float()).to(h.dtype)
        if ctx.needs_input_grad[1]:
            # dW[id] = dz @ h; other rows zero (dense because autograd wants a [V, D] grad for a leaf)
            dw = torch.zeros(ctx.weight_shape, device=w_row.device, dtype=w_row.dtype)
            dw[ctx.token_id] = torch.mv(h.float().T, dz).to(w_row.dtype)
        return dh, dw, None, None, None, None


def yes_head_bce(h, lm_weight, token_id, labels, reduction="mean"):
    """BCE-with-logits on the Yes logit `h @ lm_weight[token_id]`; returns (loss, logits [M]).

    h: [M, D] (fp32/bf16; fp16 on GPU), lm_weight: [V, D] same dtype, token_id: int,
    labels: [M] in {0, 1} (any dtype). reduction: "mean" | "sum" | "none" (loss [M]). The loss is fp32
    whatever h's dtype; logits and gradients come in h's and lm_weight's dtypes.
    Gradients flow to h and, if it requires grad, lm_weight (zero outside row token_id).
    """
    if h.dim() != 2 or lm_weight.dim() != 2 or h.shape[1] != lm_weight.shape[1]:
        raise ValueError(
            f"thinkrec_kernels/yes_head.py: h must be [M, D] and lm_weight [V, D], got h {tuple(h.shape)}, "
            f"lm_weight {tuple(lm_weight.shape)}"
        )
    if labels.shape != (h.shape[0],):
        raise ValueError(f"thinkrec_kernels/yes_head.py: labels must be [M={h.shape[0]}], got {tuple(labels.shape)}")
    token_id = int(token_id)
    if not 0 <= token_id < lm_weight.shape[0]:
        raise ValueError(f"thinkrec_kernels/yes_head.py: token_id {token_id} outside [0, V={lm_weight.shape[0]})")
    if reduction not in REDUCTIONS:
        raise ValueError(f"thinkrec_kernels/yes_head.py: reduction {reduction!r} is not one of {REDUCTIONS}")
    if h.dtype != lm_weight.dtype:
        raise ValueError(f"thinkrec_kernels/yes_head.py: h is {h.dtype} but lm_weight is {lm_weight.dtype}")
    ops = _TritonOps if use_triton(h, lm_weight) else _TorchOps
    return _YesHeadBCE.apply(h, lm_weight, token_id, labels, reduction, ops)


def compile_cases() -> list[dict]:
    """What thinkrec_kernels/compile_check.py compiles: the kernel at the configurations launch_config gives for
    SmolLM2-135M (D = 576) and Llama-3-8B (D = 4096), bf16 and fp16; pointers not named in args are in the
    case's dtype."""
    args = {"labels_ptr": "*fp32", "loss_ptr": "*fp32", "dlogit_ptr": "*fp32", "grad_scale": "fp32"}
    return [dict(kernel=_yes_head_bce_fwd_kernel, dtype=dtype, config=launch_config(D), args=args)
            for dtype in (torch.bfloat16, torch.float16) for D in (576, 4096)]
