"""Benchmark the per-row weighted multi-expert LoRA delta (thinkrec_kernels.lora_mix) against per-expert baselines.

    python bench/bench_lora_mix.py                       # CPU, fp32 (the PyTorch path), ~1-2 min idle
    python bench/bench_lora_mix.py --quick               # fewer repeats, smaller Llama M
    python bench/bench_lora_mix.py --device cuda --dtype bf16   # Triton kernels, with roofline fractions
    python bench/bench_lora_mix.py --device cuda --experts 8    # E * r = 64: the widest kernel blocks

Providers:
- ours:       thinkrec_kernels.lora_mix (one shrink GEMM against A_cat [E*r, K], weight columns, one expand GEMM)
- loop:       one LoRA pass per expert, weighted by w[:, e], added up (E passes over x)
- peft_style: peft's mixed-batch forward: per expert, index-select the rows that use it, run that expert's
              LoRA on them, index-add back (with dense weights every row visits every expert)
Modes: fwd (output only), bwd (backward of x, A, B given the graph), full (fwd + bwd).
Shapes: SmolLM2-135M q_proj (K = N = 576, M = 4096) and Llama-3-8B q_proj (K = N = 4096, M = 4096 on
CUDA, 2048 on CPU; half that with --quick), E = 3, r = 8 (--experts, --rank), dense (softmax) and one-hot
weights.
Prints a table, then one JSON line.
"""

import argparse
import os
import statistics

import torch
from _util import print_json, time_runs

from thinkrec_kernels import lora_mix
from thinkrec_kernels import reference as ref

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PEAK = {"bytes_per_s": 3.35e12, "flops_per_s": 990e12}  # H100 SXM: HBM3 bandwidth, dense bf16 tensor cores


def loop_delta(x, A, B, w, scale):
    """sum_e scale * w[:, e] * (x @ A_e.T) @ B_e.T, one pass over x per expert."""
    out = torch.zeros(x.shape[0], B.shape[1], device=x.device, dtype=x.dtype)
    for e in range(A.shape[0]):
        out = out + (scale * w[:, e:e + 1]) * ((x @ A[e].T) @ B[e].T)
    return out


def peft_style_delta(x, A, B, w, scale):
    """peft `_mixed_batch_forward` style: per expert, gather its rows, apply its LoRA, index-add back."""
    out = torch.zeros(x.shape[0], B.shape[1], device=x.device, dtype=x.dtype)
    for e in range(A.shape[0]):
        rows = (w[:, e] != 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        sub = x.index_select(0, rows)  # [M_e, K]
        y = (sub @ A[e].T) @ B[e].T * (scale * w.index_select(0, rows)[:, e:e + 1])
        out = out.index_add(0, rows, y)
    return out


PROVIDERS = {"ours": lora_mix, "loop": loop_delta, "peft_style": peft_style_delta}


def make_case(M, K, N, E, r, weights, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g)
    A = torch.randn(E, r, K, generator=g) / K ** 0.5
    B = torch.randn(E, N, r, generator=g) / r ** 0.5
    if weights == "dense":
        w = torch.softmax(torch.randn(M, E, generator=g), -1)
    else:
        w = torch.nn.functional.one_hot(torch.randint(0, E, (M,), generator=g), E).float()
    upstream = torch.randn(M, N, generator=g)
    x, A, B, upstream = (t.to(device, dtype) for t in (x, A, B, upstream))
    return x.requires_grad_(), A.requires_grad_(), B.requires_grad_(), w.to(device), upstream


def cost(M, K, N, E, r, mode, elt):
    """Analytic (bytes, FLOPs) of ours: fwd reads x, A, B, w, writes/reads xa [M, J], writes out;
    bwd: gb = g @ B_cat, dx = gb' @ A_cat, dA = gb'.T @ x, dB = g.T @ h (x, g read twice)."""
    J = E * r
    fwd = (elt * (M * K + J * K + N * J + 2 * M * J + M * N) + 4 * M * E, 2 * M * J * (K + N))
    bwd = (elt * (2 * M * N + 2 * M * K + 3 * M * J + M * K + 2 * J * K + 2 * N * J) + 4 * M * E,
           4 * M * J * (K + N))
    if mode == "fwd":
        return fwd
    if mode == "bwd":
        return bwd
    return fwd[0] + bwd[0], fwd[1] + bwd[1]


def time_it(fn, device, repeats):
    return statistics.median(time_runs(fn, repeats, device, warmup=1))


def run_mode(fn, mode, x, A, B, w, g, scale, device, repeats):
    params = (x, A, B)
    if mode == "fwd":
        with torch.no_grad():
            return time_it(lambda: fn(x, A, B, w, scale), device, repeats)
    if mode == "full":
        return time_it(lambda: torch.autograd.grad(fn(x, A, B, w, scale), params, g), device, repeats)
    out = fn(x, A, B, w, scale)  # bwd: the graph is built once, backward timed alone
    return time_it(lambda: torch.autograd.grad(out, params, g, retain_graph=True), device, repeats)


def check(fn, name, x, A, B, w, g, scale, dtype):
    """Output and gradients of x, A, B against the float64 reference before anything is timed."""
    out = fn(x, A, B, w, scale)
    grads = torch.autograd.grad(out, (x, A, B), g)
    x64, A64, B64 = (t.detach().double().requires_grad_() for t in (x, A, B))
    out64 = ref.lora_mix(x64, A64, B64, w.double(), scale)
    grads64 = torch.autograd.grad(out64, (x64, A64, B64), g.double())
    tol = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 2e-2}[dtype]
    for label, a, e in zip(("out", "dx", "dA", "dB"), (out, *grads), (out64, *grads64)):
        err = ((a.double() - e).abs().max() / e.abs().max().clamp_min(1e-12)).item()
        if err > tol:
            raise SystemExit(f"bench_lora_mix.py: {name} {label} is off by {err:.2e} (relative to max)")


def main():
    ap = argparse.ArgumentParser(description="lora_mix benchmark")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: fp32 on cpu, bf16 on cuda")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per cell (median reported)")
    ap.add_argument("--quick", action="store_true", help="3 repeats, Llama shape at half its M")
    ap.add_argument("--experts", type=int, default=3, help="E, experts per layer")
    ap.add_argument("--rank", type=int, default=8, help="r, LoRA rank (E * r > 32 takes the 64-column blocks)")
    args = ap.parse_args()
    dtype = DTYPES[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    repeats = args.repeats or (3 if args.quick else 5)
    torch.set_num_threads(os.cpu_count())
    # On CPU the Llama shape runs at M = 2048 (1024 with --quick): the loop and peft_style baselines take
    # ~1.5 s a call at M = 4096 on 2 cores, which would push a full run past 3 minutes.
    llama_m = 4096 if args.device == "cuda" else 2048
    llama_m = llama_m // 2 if args.quick else llama_m
    shapes = {"smollm2-135m": (4096, 576, 576), "llama3-8b": (llama_m, 4096, 4096)}
    E, r, scale = args.experts, args.rank, 2.0
    elt = torch.tensor([], dtype=dtype).element_size()
    rows, ratios = [], {}
    print(f"device={args.device} dtype={dtype} threads={torch.get_num_threads()} repeats={repeats} E={E} r={r}")
    print(f"{'shape':13s} {'weights':8s} {'mode':5s} {'provider':11s} {'ms':>9s} {'MB':>8s} {'GFLOP':>7s} "
          f"{'GB/s':>7s} {'roofline':>8s}")
    for shape_name, (M, K, N) in shapes.items():
        for weights in ("dense", "one-hot"):
            x, A, B, w, g = make_case(M, K, N, E, r, weights, args.device, dtype)
            for name, fn in PROVIDERS.items():
                check(fn, name, x, A, B, w, g, scale, dtype)
            for mode in ("fwd", "bwd", "full"):
                nbytes, flops = cost(M, K, N, E, r, mode, elt)
                t = {}
                for name, fn in PROVIDERS.items():
                    t[name] = run_mode(fn, mode, x, A, B, w, g, scale, args.device, repeats)
                    roof = max(nbytes / PEAK["bytes_per_s"], flops / PEAK["flops_per_s"]) / t[name]
                    roof_s = f"{roof:8.1%}" if args.device == "cuda" else f"{'-':>8s}"
                    print(f"{shape_name:13s} {weights:8s} {mode:5s} {name:11s} {t[name] * 1e3:9.3f} "
                          f"{nbytes / 1e6:8.1f} {flops / 1e9:7.2f} {nbytes / t[name] / 1e9:7.1f} {roof_s}")
                    rows.append(dict(shape=shape_name, M=M, K=K, N=N, weights=weights, mode=mode, provider=name,
                                     ms=round(t[name] * 1e3, 4), bytes=nbytes, flops=flops,
                                     roofline=round(roof, 4) if args.device == "cuda" else None))
                for peer in ("loop", "peft_style"):
                    ratios[f"{shape_name}/{weights}/{mode}/{peer}_over_ours"] = round(t[peer] / t["ours"], 3)
    print("\nspeedup of ours (peer time / our time; > 1 means ours is faster):")
    for key, val in ratios.items():
        print(f"  {key:45s} {val:6.2f}x")
    dense_vs_loop = min(v for k, v in ratios.items() if "/dense/" in k and k.endswith("loop_over_ours"))
    onehot_vs_peft = min(v for k, v in ratios.items() if "/one-hot/" in k and k.endswith("peft_style_over_ours"))
    print(f"min dense speedup vs loop: {dense_vs_loop:.2f}x (target >= 1.3x); "
          f"min one-hot speedup vs peft_style: {onehot_vs_peft:.2f}x (target >= 1.0x)")
    print_json(dict(bench="lora_mix", device=args.device, dtype=str(dtype), E=E, r=r, repeats=repeats,
                    min_dense_speedup_vs_loop=dense_vs_loop, min_onehot_speedup_vs_peft=onehot_vs_peft,
                    ratios=ratios, rows=rows))


if __name__ == "__main__":
    main()
