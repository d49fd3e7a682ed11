"""Accuracy of stage 1 (global LoRA) against MF on the same test rows of the paper's ML-1M split.

    python bench/quality.py                                   # 1,000 train samples, 1,000 test rows (CPU: hours)
    python bench/quality.py --train-samples 64 --test-samples 128     # a quick look

Data: `../shared/data/ml1m-collm` (33,891 / 10,401 / 7,331 rows) through the data layer's `csv` source.
- MF: thinkrec.cf (256-d, lr 1e-3, weight decay 1e-6, the official setting), trained on the whole train
  split, early-stopped on valid AUC, scored on the test rows below.
- LLM: SmolLM2-135M-Instruct with the global LoRA trained by the stage-1 loop (prompts without CF ids,
  plain Yes/No samples, 0.9 BCE + 0.1 LM) on `--train-samples` random train rows for `--epochs`, then the
  Yes logit on the test rows; `zero-shot` is the same model before training.
Test rows: `--test-samples` random test rows (the same for every model).
Precisions (`--precisions fp32,bf16`, thinkrec/precision.py): stage 1 is trained once per precision from the
same initial adapter on the same batches; the JSON line gives each one's metrics, the AUC difference against
fp32 and the first batch's loss at each precision (dropout off). `--replicates R` trains each precision R
times, replicate r on its own dropout stream (the same stream at each precision): `paired_bf16_vs_fp32` is the
mean bf16 - fp32 AUC with a 95% t-interval, beside fp32's own spread across streams. bf16 is skipped on a CPU without native bf16
flags (avx512_bf16 / amx_bf16; thinkrec.hardware, as bench/train_step.py) unless --force-slow: never by a timing
taken now, which a loaded machine would flip. Prints a table, then one JSON line.
"""

import argparse
import time

from _util import ml1m_prepared, print_json


def _logit_stats(scores, labels) -> dict:
    """Mean Yes logit over liked and not-liked rows: how far training moved the logit, beside the ranking."""
    return {"logit_pos": float(scores[labels == 1].mean()), "logit_neg": float(scores[labels == 0].mean())}


def skip_reason(precision: str, machine, force_slow: bool) -> str:
    """Why a --precisions entry is not trained here ('' = train it): bf16 on a CPU without native bf16 flags
    (machine: thinkrec.hardware.MachineBf16), unless --force-slow."""
    if precision == "bf16" and not machine.native and not force_slow:
        return "this CPU has no native bf16 (no avx512_bf16 / amx_bf16 flag); --force-slow runs it anyway"
    return ""


def paired_summary(fp32: list, bf16: list) -> dict:
    """bf16 - fp32 AUC over replicates paired by dropout stream: the mean difference with its 95% t-interval,
    and fp32's own replicate spread (sd; and its largest pairwise gap), the noise a single pair is read against."""
    import numpy as np
    from scipy import stats

    if len(fp32) != len(bf16) or len(fp32) < 2:
        raise ValueError(f"paired_summary: {len(fp32)} fp32 and {len(bf16)} bf16 replicates (want as many, >= 2)")
    d = np.asarray(bf16, float) - np.asarray(fp32, float)
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
    return {"n": len(d), "mean_diff": round(float(d.mean()), 5),
            "ci95": [round(float(d.mean()) - half, 5), round(float(d.mean()) + half, 5)],
            "fp32_sd": round(float(np.std(fp32, ddof=1)), 5), "fp32_range": round(float(np.ptp(fp32)), 5),
            "bf16_sd": round(float(np.std(bf16, ddof=1)), 5)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model spec (default SmolLM2-135M-Instruct)")
    ap.add_argument("--train-samples", type=int, default=1000)
    ap.add_argument("--test-samples", type=int, default=1000)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-zero-shot", action="store_true", help="skip scoring the untrained model")
    ap.add_argument("--precisions", default="fp32", help="train stage 1 at each: fp32, bf16 (comma-separated)")
    ap.add_argument("--force-slow", action="store_true", help="run bf16 even on a CPU without native bf16")
    ap.add_argument("--replicates", type=int, default=1,
                    help="train each precision this many times, each on its own dropout stream (same adapter, "
                         "batches and rows): the paired bf16 - fp32 AUC gets an interval and fp32 its own spread")
    a = ap.parse_args()

    import numpy as np
    import torch

    from thinkrec.cf.train import predict, search
    from thinkrec.data.tokenize import PromptBuilder
    from thinkrec.metrics import evaluate
    from thinkrec.model import ThinkRecLM
    from thinkrec.train import LoopConfig, SampleSet, StageInputs, score, setup, subsample, train_stage
    from thinkrec.train.loop import derive_seed

    torch.manual_seed(a.seed)
    prep = ml1m_prepared()
    split = prep.inter.split
    test_rows = subsample(np.flatnonzero(split == 2), a.test_samples, a.seed + 2)
    train_rows = subsample(np.flatnonzero(split == 0), a.train_samples, a.seed)
    users, labels = prep.inter.user[test_rows], prep.inter.label[test_rows]
    results = {}

    # --- MF on the same rows
    t = time.perf_counter()
    mf, cfg, _, data = search("mf", prep, {"lr": [1e-3], "dim": [256], "weight_decay": [1e-6]}, seed=a.seed)
    results["mf"] = {**evaluate(users, predict(mf, data, test_rows), labels), "seconds": time.perf_counter() - t}

    # --- stage 1 of the LLM, at each precision from the same initial adapter
    from thinkrec import hardware
    from thinkrec import precision as P
    from thinkrec.model import lowp
    from thinkrec.batches import collate
    from thinkrec.train.losses import batch_loss, loss_positions

    probe = hardware.probe(threads=torch.get_num_threads())  # reported only
    machine = hardware.machine_bf16()
    first_losses, skipped = {}, {}
    aucs = {}  # precision -> AUC of each replicate
    runs = [(prec, r) for prec in [p for p in a.precisions.split(",") if p] for r in range(a.replicates)]
    for prec, r in runs:
        reason = skip_reason(prec, machine, a.force_slow)
        if reason:
            skipped[prec] = reason
            print(f"skipped {prec}: {skipped[prec]}")
            continue
        torch.manual_seed(a.seed)
        lm, tok = ThinkRecLM.from_pretrained(a.model, n_experts=0)
        lowp.apply(lm, P.Precision(prec, prec, "cpu", "bench"))
        builder = PromptBuilder(prep, tok, mode="text", max_len=a.max_len)
        test = SampleSet(builder, test_rows)
        inputs = StageInputs(plain=SampleSet(builder, train_rows), pad_id=tok.pad_token_id)
        if not a.no_zero_shot and prec == "fp32" and r == 0:
            t = time.perf_counter()
            s = score(lm, test, inputs, batch_size=16, progress=True, desc="zero-shot")
            results["zero-shot"] = {**evaluate(users, s, labels), "seconds": time.perf_counter() - t,
                                    **_logit_stats(s, labels)}
        setup(lm, "stage1")
        lm.eval()
        first = collate([inputs.plain.sample(i) for i in range(a.batch_size)], inputs.plain.users[:a.batch_size],
                        tok.pad_token_id)
        with torch.no_grad():
            h = lm(first.input_ids, first.attention_mask, select=loss_positions(first))
            first_losses[prec] = float(batch_loss(h, lm.lm_head_weight, lm.yes_token_id, first)[0])
        t = time.perf_counter()
        torch.manual_seed(derive_seed(a.seed, "dropout", r))  # replicate r's dropout stream, the same at each precision
        cfg = LoopConfig(epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed, desc=f"stage1 {prec} #{r}")
        res = train_stage(lm, inputs, cfg, None)
        train_s = time.perf_counter() - t
        t = time.perf_counter()
        s = score(lm, test, inputs, batch_size=16, progress=True, desc="test")
        name = ("stage1" if prec == "fp32" else f"stage1-{prec}") + (f" #{r}" if r else "")
        results[name] = {**evaluate(users, s, labels), "seconds": time.perf_counter() - t, "train_seconds": train_s,
                         "steps": res["state"].step, **_logit_stats(s, labels)}
        aucs.setdefault(prec, []).append(float(results[name]["auc"]))

    print("| model | AUC | UAUC | NDCG@5 | MAP@5 | seconds | mean Yes logit (liked / not) |\n|---|---|---|---|---|---|---|")
    for name, m in results.items():
        logit = f"{m['logit_pos']:.2f} / {m['logit_neg']:.2f}" if "logit_pos" in m else ""
        print(f"| {name} | {m['auc']:.4f} | {m['uauc']:.4f} | {m['ndcg@5']:.4f} | {m['map@5']:.4f} | "
              f"{m['seconds'] + m.get('train_seconds', 0):.0f} | {logit} |")
    out = {"train_samples": len(train_rows), "test_rows": len(test_rows), "test_users": int(len(np.unique(users))),
           "epochs": a.epochs, "lr": a.lr, "precision_probe": probe, "precisions_skipped": skipped,
           "first_loss": first_losses}
    for name, m in results.items():
        out[name] = {k: round(float(m[k]), 4) for k in ("auc", "uauc", "ndcg@5", "map@5", "logit_pos", "logit_neg")
                     if k in m}
    if "stage1" in results and "stage1-bf16" in results:
        out["auc_diff_bf16_vs_fp32"] = round(results["stage1-bf16"]["auc"] - results["stage1"]["auc"], 5)
        if a.replicates > 1:
            out["auc_replicates"] = {p: [round(v, 4) for v in vs] for p, vs in aucs.items()}
            out["paired_bf16_vs_fp32"] = paired_summary(aucs["fp32"], aucs["bf16"])
        out["first_loss_rel_bf16_vs_fp32"] = round(abs(first_losses["bf16"] - first_losses["fp32"])
                                                   / abs(first_losses["fp32"]), 5)
    print_json(out)


if __name__ == "__main__":
    main()
