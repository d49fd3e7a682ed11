"""Rows/s of scoring with per-user expert mixtures: ours against the official code's way and peft's mixed
batches, plus ranking with a shared prefix.

    python bench/infer_throughput.py                   # SmolLM2-135M, CPU, 240 real ML-1M test prompts
    python bench/infer_throughput.py --rows 60 --candidates 40
    python bench/infer_throughput.py --precisions auto,int8,bf16     # ours at other precisions too

Setup: the shared ML-1M split (`../shared/data/ml1m-collm`) prepared through the data layer; an MF model
(dim 256, a fixed short schedule) and the 2-group gate built on it, so users are routed as in a real run:
the rows are drawn equally from users routed to the global adapter, to one expert, and to a mixture.
SmolLM2-135M with 2 experts; LoRA B and the projector random (seeded): values do not change the cost.
Prompts are the paper's C.3 recommendation prompt (what the official evaluation scores).

Rows: whole users (all test rows of users drawn per route), as scoring a test split does; rows of one user
rated in the same second have the same history, so their prompts agree up to the target item.

Providers (same rows, same adapters):
- `official`: peft; per user `add_weighted_adapter(..., combination_type="linear")` + `set_adapter`, then
  `generate` up to 16 new tokens on batches of 2, the Yes logit of the first step (bench/_peft_providers.py).
- `peft-mixed`: peft's mixed-batch forward (`adapter_names`, one adapter per row; one weighted adapter per
  distinct mixture, made before timing), full [B, T, V] logits, batches of 16.
- `ours`: thinkrec.infer's scorer, fp32: rows sharing a prompt prefix run it once into a KV cache and
  their suffixes batched against it; the other rows in length-bucketed batches under a token budget mixing
  routes; the padding-free forward with per-row weights, the Yes logit only (`ours-unshared`: without the
  prefix sharing). Its "linear" mixture mode (peft's mix) is what the score check against
  `official` uses; it costs the same.
Before timing, scores are checked: official vs ours-linear, peft-mixed vs ours on one-route rows, ours
shared vs ours unshared. Ranking: 100 candidates for one user, shared prefix (thinkrec.infer.rank) vs
scoring each candidate as an ordinary row. peak_fraction = the unshared scorer's linear-layer + attention
FLOP/s over this machine's fp32 matmul rate measured in the same run (effective_peak_fraction: the same
FLOPs over the shared scorer's time).

Precisions (`--precisions`, thinkrec/precision.py): `ours-<p>` scores the same rows with the model put in
precision p (auto = what `--precision auto` resolves to on this machine, reported with the probe's rates):
rows/s, the speedup over ours in fp32, the largest score change and the AUC drift against fp32 on the same
rows, the peak fraction against the GEMM rate of that precision measured here, and whether a row's score
depends on its batch-mates (the first rows each scored as a job of one row against in the full job, as
infer.py would score them, beside fp32's own rounding difference: `batch_independent`; int8 scores with
scoring.run_job's batch-invariant plan, as infer.py does). The process runs with
thinkrec.runtime.tune_malloc (as infer.py does), for every provider alike; THINKREC_DEFAULT_MALLOC=1 turns
it off. bf16 on a CPU the probe
finds without fast bf16 is skipped (it would take hours) unless --force-slow. Prints a table, then one
JSON line.
"""

import argparse
import statistics
import time

from _util import ML1M, ml1m_prepared, print_json

ROUTES = ("global", "single", "mixture")


def _setup_run(prep, threads):
    """RUN = the prepared ML-1M temp dir, with an MF model and the 2-group gate (built once, reused)."""
    import tempfile
    from pathlib import Path

    from thinkrec.cf import CFConfig, train_cf
    from thinkrec.experts import GroupConfig, build_groups, load_groups

    run = Path(tempfile.gettempdir()) / "thinkrec-bench-ml1m"
    if not (run / "cf" / "mf.safetensors").exists():
        train_cf(run, CFConfig(model="mf", lr=1e-3, dim=256, weight_decay=1e-6, max_epochs=30, patience=3,
                               threads=threads))
    if not (run / "experts" / "groups.safetensors").exists():
        build_groups(run, GroupConfig(model="mf", groups=2))
    return run, load_groups(run)


def _rows(prep, groups, n, seed=0):
    """About n test rows, a third from users of each route: whole users (every test row of a drawn user, as
    scoring the test split does), users drawn in a seeded order until the route's third is filled; the rows
    in a shuffled order."""
    import numpy as np

    rng = np.random.default_rng(seed)
    test = np.flatnonzero(prep.inter.split == 2)
    users = prep.inter.user[test]
    picked = []
    for r in range(3):
        pool = rng.permutation(np.unique(users[groups["route"][users] == r]))
        counts = np.array([(users == u).sum() for u in pool])
        k = int(np.searchsorted(np.cumsum(counts), n // 3)) + 1  # users until the third is reached
        picked.append(test[np.isin(users, pool[:k])][: n // 3])
    rows = np.concatenate(picked)
    rng.shuffle(rows)
    return rows


def _gemm_rate(threads_note=""):
    """fp32 GFLOP/s of this machine's matmul on a decoder-sized product (median of 5)."""
    import torch

    a, b = torch.randn(2048, 576), torch.randn(576, 1536)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(5):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * 2048 * 576 * 1536 / statistics.median(times) / 1e9


def _precision_rate(name):
    """GFLOP/s (GOP/s for int8) of the decoder-sized product [2048, 576] x [576, 1536] at a precision."""
    import torch

    from thinkrec.model.lowp import Int8Linear

    g = torch.Generator().manual_seed(0)
    a, w = torch.randn(2048, 576, generator=g), torch.randn(1536, 576, generator=g)
    if name == "fp32":
        fn = lambda: a @ w.T  # noqa: E731
    elif name == "bf16":
        ab, wb = a.bfloat16(), w.bfloat16()
        fn = lambda: ab @ wb.T  # noqa: E731
    else:
        lin = Int8Linear(w, None)
        fn = lambda: lin(a)  # noqa: E731
    fn()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 2 * 2048 * 576 * 1536 / statistics.median(times) / 1e9


def _flops(lm, samples):
    """Linear-layer and attention FLOPs of a padding-free forward over `samples` (prompt only)."""
    import torch

    cfg = lm.llm.config
    linear = sum(m.weight.numel() for layer in lm.llm.model.layers for m in layer.modules()
                 if isinstance(m, torch.nn.Linear) or hasattr(m, "lora_A"))
    lens = [len(s.input_ids) for s in samples]
    attn = sum(2 * 2 * cfg.num_hidden_layers * cfg.hidden_size * n * n / 2 for n in lens)
    return 2 * linear * sum(lens) + attn


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=240, help="test rows scored by every provider")
    ap.add_argument("--candidates", type=int, default=100, help="candidates ranked for one user")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--skip-official", action="store_true", help="leave the slowest peer out")
    ap.add_argument("--precisions", default="auto,int8", help="ours at these precisions besides fp32 "
                    "(auto, bf16, int8; comma-separated, '' for none)")
    ap.add_argument("--fused-ops", action="store_true", help="also time ours with the element-wise ops compiled "
                    "(infer.py --fused-ops), at fp32 and at each --precisions")
    ap.add_argument("--force-slow", action="store_true", help="time bf16 even where the probe finds it slow")
    a = ap.parse_args()

    import numpy as np
    import torch

    from thinkrec.runtime import tune_malloc

    malloc_tuned = tune_malloc()  # for every provider of this process alike (THINKREC_DEFAULT_MALLOC=1: off)
    from _peft_providers import official_scores, peft_mixed_scores, prepare_mixtures, to_peft
    from thinkrec.cf.train import load_embeddings
    from thinkrec.infer import LoadedRun, ScoreJob, run_job
    from thinkrec.infer.rank import rank_items, read_candidates, user_history
    from thinkrec.scoring import plan_units, score_samples
    from thinkrec.model import ThinkRecLM

    if a.threads:
        torch.set_num_threads(a.threads)
    prep = ml1m_prepared()
    run, groups = _setup_run(prep, torch.get_num_threads())
    cf = load_embeddings(run, "mf")
    ue, ie = cf["user_emb"], cf["item_emb"]
    torch.manual_seed(0)
    lm, tok = ThinkRecLM.from_pretrained(None, n_experts=2, cf_dim=ue.shape[1])
    with torch.no_grad():
        for mod in lm.lora_layers().values():
            for B in mod.lora_B:
                B.normal_(0, 0.02)
    lm.eval()
    loaded = LoadedRun(run, lm, tok, prep, cf, "mf", groups["weights"], run / "stage3", 224, None)
    builder = loaded.builder("reason")
    rows = _rows(prep, groups, a.rows)
    samples = [builder.sample(int(r)) for r in rows]
    users = prep.inter.user[rows]
    weights = torch.as_tensor(groups["weights"][users])
    route = groups["route"][users]
    print(f"{len(rows)} rows of {ML1M}: routes global {int((route == 0).sum())}, one expert "
          f"{int((route == 1).sum())}, mixture {int((route == 2).sum())}; mean prompt "
          f"{np.mean([len(s.input_ids) for s in samples]):.0f} tokens; torch threads {torch.get_num_threads()}",
          flush=True)

    def set_mix(mode):
        for mod in lm.lora_layers().values():
            mod.mix = mode

    def ours(share=True):
        """infer.py's scorer: rows agreeing up to the target (one user, one history) share one prefix run."""
        cut = (lambda smp, i: builder.target_start(smp, int(prep.inter.item[rows[i]]))) if share else None
        job = ScoreJob(lambda i: samples[i], np.array([len(s) for s in samples]), weights, ue, ie, tok.pad_token_id,
                       cut=cut)
        return run_job(lm, job, batch_tokens=8192, max_rows=64)

    units = plan_units(ScoreJob(lambda i: samples[i], np.array([len(s) for s in samples]), weights,
                                cut=lambda smp, i: builder.target_start(smp, int(prep.inter.item[rows[i]]))))
    n_prefix = sum(1 for idx, c in units if c is not None) + sum(len(idx) for idx, c in units if c is None)
    print(f"prefixes: {len(rows)} rows have {n_prefix} distinct prompt prefixes (rows of one user rated in one "
          f"second share their history), {len(rows) / n_prefix:.2f} rows per prefix", flush=True)

    pm = to_peft(lm)
    t = time.perf_counter()
    names = prepare_mixtures(pm, lm, weights.numpy())
    prep_s = time.perf_counter() - t

    # --- correctness first: the same numbers, then the clock
    check_n = min(len(rows), 24)
    sub = list(range(check_n))
    set_mix("linear")
    ref_linear = score_samples(lm, [samples[i] for i in sub], weights[sub], ue, ie, tok.pad_token_id)
    set_mix("delta")
    ref = score_samples(lm, [samples[i] for i in sub], weights[sub], ue, ie, tok.pad_token_id)
    checks = {}
    if not a.skip_official:
        off = official_scores(pm, lm, [samples[i] for i in sub], users[sub], weights[sub].numpy(), ue, ie,
                              tok.pad_token_id)
        checks["official_vs_ours_linear"] = float(np.abs(off - ref_linear).max())
    mixed = peft_mixed_scores(pm, lm, [samples[i] for i in sub], users[sub], weights[sub].numpy(), ue, ie,
                              tok.pad_token_id, adapter_names=[names[i] for i in sub])
    one = route[sub] != 2
    checks["peft_mixed_vs_ours_one_route"] = float(np.abs(mixed - ref)[one].max()) if one.any() else None
    checks["peft_mixed_vs_ours_linear_mixture"] = float(np.abs(mixed - ref_linear)[~one].max()) if (~one).any() else None
    bad = {k: v for k, v in checks.items() if v is not None and v > 1e-3}
    if bad:
        raise SystemExit(f"scores disagree before timing: {bad}")
    print("scores agree: " + ", ".join(f"{k} max |diff| {v:.1e}" for k, v in checks.items() if v is not None),
          flush=True)

    # --- throughput: each provider scores every row once (after one warm-up batch)
    results = {}

    def timed(name, fn):
        t = time.perf_counter()
        fn()
        s = time.perf_counter() - t
        results[name] = {"seconds": round(s, 2), "rows_per_s": round(len(rows) / s, 2)}
        print(f"  {name:12} {s:8.1f} s  {len(rows) / s:7.2f} rows/s", flush=True)

    score_samples(lm, samples[:4], weights[:4], ue, ie, tok.pad_token_id)  # warm-up
    shared_scores = ours()  # warm-up of the shared path, and its agreement with scoring each row alone
    checks["ours_shared_vs_alone"] = float(np.abs(shared_scores - ours(share=False)).max())
    if checks["ours_shared_vs_alone"] > 1e-3:
        raise SystemExit(f"shared-prefix scoring disagrees with scoring each row alone: {checks}")
    timed("ours", ours)
    timed("ours-unshared", lambda: ours(share=False))
    timed("peft-mixed", lambda: peft_mixed_scores(pm, lm, samples, users, weights.numpy(), ue, ie,
                                                  tok.pad_token_id, adapter_names=names))
    results["peft-mixed"]["prepare_mixtures_s"] = round(prep_s, 2)
    if not a.skip_official:
        timed("official", lambda: official_scores(pm, lm, samples, users, weights.numpy(), ue, ie, tok.pad_token_id))
    fused_warmup_s = None
    if a.fused_ops:  # the element-wise ops compiled (infer.py --fused-ops); the warm-up run compiles them
        from thinkrec.model import fused

        fused.enable(check=True)
        t = time.perf_counter()
        fused_scores = ours()
        fused_warmup_s = round(time.perf_counter() - t, 2)  # one scoring pass, compiling included
        timed("ours-fused", ours)
        fused.enable(False)
        checks["ours_fused_vs_eager"] = float(np.abs(fused_scores - shared_scores).max())
    gemm = _gemm_rate()
    flops = _flops(lm, samples)
    # FLOPs of scoring each row alone: over the shared run's time it is an effective rate (work skipped counts)
    peak_fraction = flops / results["ours-unshared"]["seconds"] / 1e9 / gemm
    effective_fraction = flops / results["ours"]["seconds"] / 1e9 / gemm

    # --- ours at other precisions: same rows; speed, score change and AUC drift against fp32
    import copy

    from thinkrec import hardware
    from thinkrec import precision as P
    from thinkrec.model import lowp
    from thinkrec.metrics import evaluate

    labels = prep.inter.label[rows]
    fp32_scores = ours()
    auc32 = evaluate(users, fp32_scores, labels)["auc"]
    probe = hardware.probe(threads=torch.get_num_threads())  # rates for the table; auto is the machine's
    auto = P.resolve("auto", "cpu")  # decision (CPU flags, then a cached once-per-machine probe), as in train.py
    print(f"precision probe: {probe}; auto -> {auto.name} ({auto.reason})", flush=True)
    prec_rows = {}

    def batch_effect(m, invariant=False) -> float:
        """Largest score change of the first rows, each scored as a job of its own, against the full job."""
        alone = np.concatenate([
            run_job(m, ScoreJob(lambda _, i=i: samples[i], np.array([len(samples[i])]), weights[[i]], ue, ie,
                                tok.pad_token_id, cut=lambda smp, _, i=i: builder.target_start(smp, int(prep.inter.item[rows[i]]))),
                    alone=invariant) for i in sub])
        return float(np.abs(alone - together[sub]).max())

    cal_rows = _rows(prep, groups, 16, seed=1)  # int8's SmoothQuant calibration: 16 other rows, as infer.py's
    calib = [builder.sample(int(r)) for r in cal_rows]
    cal_w = torch.as_tensor(groups["weights"][prep.inter.user[cal_rows]])
    together = fp32_scores
    fp32_batch = batch_effect(lm)  # the floor: fp32 GEMMs round differently for other batch sizes
    for req in [p for p in a.precisions.split(",") if p]:
        p = P.resolve(req, "cpu")
        key = f"ours-{req}" if req == "auto" else f"ours-{p.name}"
        if p.name == "fp32":
            prec_rows[key] = {"precision": "fp32", "same_as": "ours"}
            continue
        if p.name == "bf16" and "SLOWER" in p.reason and not a.force_slow:
            prec_rows[key] = {"precision": "bf16", "skipped": f"bf16 GEMM {probe['bf16_gflops']} GFLOP/s against "
                              f"fp32 {probe['fp32_gflops']} here (no native bf16); --force-slow times it anyway"}
            print(f"  {key:12} skipped: {prec_rows[key]['skipped']}", flush=True)
            continue
        m = copy.deepcopy(lm)
        lowp.apply(m, p, calibrate=lambda: score_samples(m, calib, cal_w, ue, ie, tok.pad_token_id))  # int8: smoothing
        score_samples(m, samples[:4], weights[:4], ue, ie, tok.pad_token_id)  # warm-up
        job = ScoreJob(lambda i: samples[i], np.array([len(x) for x in samples]), weights, ue, ie, tok.pad_token_id,
                       cut=lambda smp, i: builder.target_start(smp, int(prep.inter.item[rows[i]])))
        t = time.perf_counter()
        invariant = p.name == "int8"  # as infer.py scores int8: each row a function of itself
        sc = run_job(m, job, batch_tokens=8192, max_rows=64, alone=invariant)
        sec = time.perf_counter() - t
        rate = _precision_rate(p.name)
        prec_rows[key] = {"precision": p.name, "seconds": round(sec, 2), "rows_per_s": round(len(rows) / sec, 2),
                          "speedup_vs_fp32": round(results["ours"]["seconds"] / sec, 3),
                          "max_abs_score_diff": round(float(np.abs(sc - fp32_scores).max()), 4),
                          "auc_drift": round(float(evaluate(users, sc, labels)["auc"] - auc32), 5),
                          "gemm_rate": round(rate, 1), "peak_fraction": round(flops / sec / 1e9 / rate, 3)}
        if a.fused_ops:  # the same model with the element-wise ops compiled
            fused.enable()
            run_job(m, job, batch_tokens=8192, max_rows=64, alone=invariant)  # compiles for this dtype
            t = time.perf_counter()
            scf = run_job(m, job, batch_tokens=8192, max_rows=64, alone=invariant)
            secf = time.perf_counter() - t
            fused.enable(False)
            prec_rows[key].update(fused_seconds=round(secf, 2), fused_vs_eager=round(sec / secf, 3),
                                  fused_speedup_vs_fp32=round(results["ours"]["seconds"] / secf, 3),
                                  fused_max_abs_diff=round(float(np.abs(scf - sc).max()), 5))
            print(f"  {key + '-fused':12} {secf:8.1f} s  {len(rows) / secf:7.2f} rows/s  ({sec / secf:.2f}x unfused)",
                  flush=True)
        together = sc
        eff = batch_effect(m, invariant)  # a row's score alone against beside its batch-mates, vs fp32's rounding
        prec_rows[key].update(batch_max_abs_diff=round(eff, 6), fp32_batch_max_abs_diff=round(fp32_batch, 6),
                              batch_independent=bool(eff <= max(10 * fp32_batch, 1e-3)), batch_invariant_plan=invariant)
        print(f"  {key:12} {sec:8.1f} s  {len(rows) / sec:7.2f} rows/s  ({prec_rows[key]['speedup_vs_fp32']:.2f}x fp32, "
              f"AUC drift {prec_rows[key]['auc_drift']:+.4f}, a row alone vs in its batch {eff:.1e}, fp32 "
              f"{fp32_batch:.1e})", flush=True)
        del m

    # --- ranking: one user's candidates, shared prefix vs each as an ordinary row
    user = int(users[np.flatnonzero(route == 2)[0]] if (route == 2).any() else users[0])
    items = read_candidates("all", loaded, user)[: a.candidates]
    t = time.perf_counter()
    shared = rank_items(loaded, user, items, "reason")
    rank_shared = time.perf_counter() - t
    hist = user_history(prep, user)
    cand = [builder.sample_for(user, int(i), hist) for i in items]
    cw = torch.as_tensor(groups["weights"][[user] * len(items)])
    t = time.perf_counter()
    alone = run_job(lm, ScoreJob(lambda i: cand[i], np.array([len(s) for s in cand]), cw, ue, ie, tok.pad_token_id),
                    batch_tokens=8192, max_rows=64)
    rank_alone = time.perf_counter() - t
    rank_diff = float(np.abs(shared - alone).max())
    if rank_diff > 1e-3:
        raise SystemExit(f"shared-prefix ranking disagrees with scoring each candidate: {rank_diff}")

    base = results["ours"]["seconds"]
    print("\n| provider | seconds | rows/s | ours is faster by |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['seconds']:.1f} | {r['rows_per_s']:.2f} | {r['seconds'] / base:.2f}x |")
    if prec_rows:
        print("\n| ours at | precision | seconds | rows/s | vs ours fp32 | max score change | AUC drift | "
              "GEMM rate here | peak fraction |")
        print("|---|---|---|---|---|---|---|---|---|")
        for key, r in prec_rows.items():
            if "seconds" in r:
                print(f"| {key} | {r['precision']} | {r['seconds']:.1f} | {r['rows_per_s']:.2f} | "
                      f"{r['speedup_vs_fp32']:.2f}x | {r['max_abs_score_diff']:.4f} | {r['auc_drift']:+.5f} | "
                      f"{r['gemm_rate']:.0f} | {r['peak_fraction']:.2f} |")
            else:
                print(f"| {key} | {r['precision']} | {r.get('skipped') or 'same as ours (fp32)'} | | | | | | |")
    print(f"\nranking {len(items)} candidates: shared prefix {rank_shared:.1f} s, each alone {rank_alone:.1f} s "
          f"({rank_alone / rank_shared:.2f}x), max |diff| {rank_diff:.1e}")
    unshared = results["ours-unshared"]["seconds"]
    print(f"ours without prefix sharing: {flops / 1e12:.2f} TFLOP in {unshared:.1f} s = {flops / unshared / 1e9:.0f} "
          f"GFLOP/s; fp32 matmul here {gemm:.0f} GFLOP/s -> peak fraction {peak_fraction:.2f} (with sharing, "
          f"effective {effective_fraction:.2f}: {len(rows) / n_prefix:.2f} rows per prefix)")
    print_json({
        "bench": "infer_throughput", "rows": len(rows), "threads": torch.get_num_threads(), "malloc_tuned": malloc_tuned,
        "routes": {n: int((route == k).sum()) for k, n in enumerate(ROUTES)},
        "results": results, "checks": checks,
        "speedup_vs_official": None if a.skip_official else round(results["official"]["seconds"] / base, 3),
        "speedup_vs_peft_mixed": round(results["peft-mixed"]["seconds"] / base, 3),
        "precision_auto": auto.name, "precision_probe": probe, "precisions": prec_rows,
        "speedup_auto_vs_official": None if a.skip_official else round(
            results["official"]["seconds"] / prec_rows.get("ours-auto", {}).get("seconds", base), 3),
        "speedup_auto_fused_vs_official": None if a.skip_official or "fused_seconds" not in prec_rows.get(
            "ours-auto", {}) else round(results["official"]["seconds"] / prec_rows["ours-auto"]["fused_seconds"], 3),
        "fused_warmup_s": fused_warmup_s,
        "rank_prefix_speedup": round(rank_alone / rank_shared, 3), "rank_candidates": len(items),
        "rank_max_abs_diff": rank_diff, "rows_per_s": results["ours"]["rows_per_s"],
        "gemm_gflops_fp32": round(gemm, 1), "peak_fraction": round(peak_fraction, 3),
        "effective_peak_fraction": round(effective_fraction, 3), "rows_per_prefix": round(len(rows) / n_prefix, 3),
        "speedup_prefix_sharing": round(unshared / base, 3),
    })


if __name__ == "__main__":
    main()
