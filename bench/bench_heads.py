"""Benchmark the two loss heads against full materialised logits: peak memory and time of fwd+bwd.

    python bench/bench_heads.py                 # CPU, T=4096 tokens, V = 49,152 and 128,256, D=576
    python bench/bench_heads.py --quick         # T=1024, V=49,152 only (~30 s)
    python bench/bench_heads.py --device cuda   # adds D=4096 at V=128,256 (Llama-3-8B), bf16

Providers: `reference` (thinkrec_kernels/reference.py: `h @ W.T` then BCE on one column / F.cross_entropy)
and `ours` (thinkrec_kernels.yes_head_bce / thinkrec_kernels.linear_cross_entropy, dispatching as usual: the chunked
torch path on CPU, Triton on CUDA). h requires grad, the LM head is frozen (ThinkRec trains LoRA only);
`--train-head` makes it trainable (adds the [V, D] dW to both providers).

Each (op, provider, shape) runs in a fresh subprocess, so one provider's allocator state cannot
hide another's peak. Peak memory (CPU) is VmHWM after the runs minus VmRSS once the inputs exist, a
tiny warm-up ran and the peak mark was reset (/proc/self/clear_refs); on CUDA it is
torch.cuda.max_memory_allocated minus the inputs. Time is the median over repeats (at least 2, more
while under --budget-s seconds). Results are checked against the reference at a small token count
before timing. Prints a table, then one JSON line.
"""

import argparse
import json
import os
import statistics

from _util import peak_memory, print_json, reset_peak_memory, run_worker, time_runs

YES_TOKEN = 9583  # any row; the position of the Yes token in the vocabulary does not change the cost


def _make(op, V, D, N, device, dtype, train_head, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(device, dtype).requires_grad_()
    # in place: a temporary [V, D] here would raise ru_maxrss above the baseline and hide part of a peak
    w = torch.randn(V, D, generator=g).div_(D**0.5).to(device, dtype).requires_grad_(train_head)
    if op == "yes":
        y = torch.randint(0, 2, (N,), generator=g).to(device)
    else:
        y = torch.randint(0, V, (N,), generator=g)
        y[::7] = -100  # some ignored tokens (prompt positions)
        y = y.to(device)
    return h, w, y


def _step(op, provider):
    """fwd+bwd closure for one provider; returns a function of (h, w, y) -> loss."""
    import torch.nn.functional as F

    import thinkrec_kernels
    from thinkrec_kernels import reference

    if op == "yes":
        if provider == "ours":
            return lambda h, w, y: thinkrec_kernels.yes_head_bce(h, w, YES_TOKEN, y)[0]
        # what a plain LM head does: full logits [N, V], then BCE on the Yes column
        return lambda h, w, y: F.binary_cross_entropy_with_logits((h @ w.T)[:, YES_TOKEN], y.to(h.dtype))
    fn = thinkrec_kernels.linear_cross_entropy if provider == "ours" else reference.linear_cross_entropy
    return lambda h, w, y: fn(h, w, y)


def _worker(spec):
    """Runs in the subprocess: baseline memory, fwd+bwd repeats, peak memory and times (JSON on stdout)."""
    import torch

    dtype = getattr(torch, spec["dtype"])
    dev = spec["device"]
    step = _step(spec["op"], spec["provider"])

    def run(h, w, y):
        h.grad = w.grad = None
        step(h, w, y).backward()
        if dev == "cuda":
            torch.cuda.synchronize()

    run(*_make(spec["op"], YES_TOKEN + 1, spec["D"], 8, dev, dtype, spec["train_head"]))  # load libraries, thread pools
    h, w, y = _make(spec["op"], spec["V"], spec["D"], spec["N"], dev, dtype, spec["train_head"])
    if dev == "cuda":
        # the Triton row kernel's block size depends on V, so the small warm-up above compiled another
        # config: one run at the real shapes, or the first timed repeat (of as few as 2) includes a compile
        run(h, w, y)
    base = reset_peak_memory(dev)
    times = time_runs(lambda: run(h, w, y), spec["max_repeats"], dev, budget_s=spec["budget_s"])
    print_json({"peak_bytes": peak_memory(dev) - base, "times_s": times})


def _measure(spec):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())))
    return run_worker(__file__, ["--worker", json.dumps(spec)], env=env)


def _check(op, V, D, device, dtype, train_head):
    """Ours vs reference (loss, dh) at a small token count, so a wrong kernel is never timed."""
    import torch

    h, w, y = _make(op, V, D, 64, device, dtype, train_head)
    got, want = [], []
    for provider, out in (("ours", got), ("reference", want)):
        h.grad = None
        loss = _step(op, provider)(h, w, y)
        loss.backward()
        out += [loss.detach().float(), h.grad.float().clone()]
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    for name, a, e in zip(("loss", "dh"), got, want):
        err = ((a - e).abs().max() / e.abs().max().clamp(min=1e-12)).item()
        if err > tol:
            raise AssertionError(f"bench/bench_heads.py: {op} V={V} D={D}: {name} off by {err:.2e} (rel)")


def _analytic(op, provider, V, D, N, elt, n_chunks, train_head):
    """(FLOPs, bytes) a provider must do/move for fwd+bwd; logits traffic counted as fp32 on CPU."""
    dw = 1 if train_head else 0
    if op == "yes":
        if provider == "ours":  # GEMV z = h @ w, dh = dz w^T, (dW row = dz h)
            return (2 + 1 + 2 * dw) * N * D, (2 * N * D + D + 4 * N) * elt
        # full GEMM, grad of full logits, dh = dlogits @ W (+ dW)
        return (4 + 2 * dw) * N * V * D, (V * D * 2 + 4 * N * V + 2 * N * D) * elt
    flops = (4 + 2 * dw) * N * V * D  # logits GEMM, dh GEMM (+ dW GEMM)
    if provider == "ours":  # W read twice per chunk, logits chunk written and read ~4x in place
        return flops, ((2 + dw) * n_chunks * V * D + 4 * N * V + 3 * N * D) * elt
    return flops, ((2 + dw) * V * D + 8 * N * V + 3 * N * D) * elt  # logits, log-softmax, grad, softmax


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where to run")
    ap.add_argument("--quick", action="store_true", help="T=1024 tokens and V=49,152 only")
    ap.add_argument("--train-head", action="store_true", help="LM head requires grad (adds dW [V, D])")
    ap.add_argument("--budget-s", type=float, default=15.0, help="seconds of repeats per case (min 2 runs)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return _worker(json.loads(args.worker))

    import torch

    from thinkrec_kernels.linear_ce import CHUNK_BYTES, _chunk_rows

    dtype = "float32" if args.device == "cpu" else "bfloat16"
    elt = 4 if dtype == "float32" else 2
    T = 1024 if args.quick else 4096
    shapes = [(49152, 576)] if args.quick else [(49152, 576), (128256, 576)]
    if args.device == "cuda" and not args.quick:
        shapes.append((128256, 4096))  # Llama-3-8B head; on CPU one run is ~9 TFLOP, minutes on 2 cores
    rows, results = [], []
    for op, N in (("yes", 64), ("ce", T)):
        for V, D in shapes:
            _check(op, V, D, args.device, getattr(torch, dtype), args.train_head)
            n_chunks = -(-N // _chunk_rows(N, V, elt, CHUNK_BYTES))
            case = {}
            for provider in ("reference", "ours"):
                spec = {"op": op, "provider": provider, "V": V, "D": D, "N": N, "device": args.device,
                        "dtype": dtype, "train_head": args.train_head, "budget_s": args.budget_s,
                        "max_repeats": 10 if op == "yes" else 5}
                m = _measure(spec)
                flops, nbytes = _analytic(op, provider, V, D, N, elt, n_chunks, args.train_head)
                med = statistics.median(m["times_s"])
                case[provider] = {"peak_mb": m["peak_bytes"] / 2**20, "ms": med * 1e3, "runs": len(m["times_s"]),
                                  "gflop": flops / 1e9, "gb": nbytes / 1e9, "gflops_s": flops / med / 1e9}
                rows.append((op, V, D, N, provider, case[provider]))
            ref, ours = case["reference"], case["ours"]
            results.append({"op": op, "V": V, "D": D, "N": N, "chunks": n_chunks if op == "ce" else None,
                            "mem_ratio": ours["peak_mb"] / max(ref["peak_mb"], 1e-9),
                            "time_ratio": ours["ms"] / ref["ms"], **{p: case[p] for p in case}})

    print(f"device={args.device} dtype={dtype} train_head={args.train_head} torch threads={torch.get_num_threads()}")
    print(f"{'op':4} {'V':>7} {'D':>5} {'N':>5} {'provider':10} {'peak MB':>9} {'ms':>9} {'runs':>4} "
          f"{'GFLOP':>8} {'GB':>7} {'GFLOP/s':>8}")
    for op, V, D, N, provider, r in rows:
        print(f"{op:4} {V:7d} {D:5d} {N:5d} {provider:10} {r['peak_mb']:9.1f} {r['ms']:9.2f} {r['runs']:4d} "
              f"{r['gflop']:8.3g} {r['gb']:7.3g} {r['gflops_s']:8.3g}")
    targets = {"yes_mem_ratio_lt_0.01": all(r["mem_ratio"] < 0.01 for r in results if r["op"] == "yes"),
               "ce_mem_ratio_lt_0.125": all(r["mem_ratio"] < 0.125 for r in results if r["op"] == "ce")}
    if args.device == "cpu":
        targets["ce_time_ratio_le_1.2"] = all(r["time_ratio"] <= 1.2 for r in results if r["op"] == "ce")
    for r in results:
        print(f"{r['op']:4} V={r['V']} D={r['D']} N={r['N']}: ours/reference memory {r['mem_ratio']:.4f}, "
              f"time {r['time_ratio']:.2f}x" + (f" ({r['chunks']} chunks)" if r["chunks"] else ""))
    print("targets: " + ", ".join(f"{k}={'PASS' if v else 'FAIL'}" for k, v in targets.items()))
    print_json({"bench": "heads", "device": args.device, "dtype": dtype, "quick": args.quick,
                "train_head": args.train_head, "results": results, "targets": targets})


if __name__ == "__main__":
    main()
