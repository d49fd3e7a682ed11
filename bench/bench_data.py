"""Benchmark the data layer: prepare (parse, filter, split, index), history building, token assembly.

    python bench/bench_data.py                      # shared ML-1M split + synthetic Yelp-scale log (2M rows)
    python bench/bench_data.py --rows 200000        # a smaller synthetic log
    python bench/bench_data.py --gguf DIR/SmolLM2-135M-Instruct.Q4_1.gguf   # the real tokenizer

Workloads:
  ml1m-collm  `prepare("csv")` of ../shared/data/ml1m-collm (the paper's split; counts checked).
  yelp-synth  a Yelp Open Dataset-format log written to a temp dir (review.json + business.json: `--rows`
              reviews over `--items` businesses and rows/40 users, 2010..2022), then `prepare("yelp")`
              (--raw-dir keeps the files for reruns): JSON parsing, the > 20 filter, the time split, re-indexing, the atomic save.
Then on each prepared log: `build_histories` (max_len 10) and the prompt builder in mode `reason`:
`warm` (batched tokenisation of every distinct segment) and `sample` (assembly) over up to
`--assemble` rows. Before timing, assembled ids are checked against tokenising the full prompt string.
Without --gguf the tokenizer is a small byte-level BPE trained here (more tokens per prompt than
SmolLM2's 49k vocabulary, so assembly is timed on longer arrays than the real one gives).
Prints a table, then one JSON line.
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from _util import ML1M, Stopwatch, print_json

from thinkrec.data import prepare
from thinkrec.data.history import build_histories
from thinkrec.data.tokenize import PromptBuilder


def write_synthetic_yelp(d: Path, rows: int, items: int, seed: int = 0) -> None:
    """Yelp JSON with Zipf-like business popularity and uniform times over 2010..2022."""
    rng = np.random.default_rng(seed)
    users = max(1, rows // 40)
    pop = 1.0 / np.arange(1, items + 1) ** 0.6
    user = rng.integers(0, users, rows)
    item = rng.choice(items, size=rows, p=pop / pop.sum())
    lo, hi = np.datetime64("2010-01-01T00:00:00").astype(int), np.datetime64("2022-12-31T23:59:59").astype(int)
    dates = np.datetime_as_string(rng.integers(lo, hi, rows).astype("datetime64[s]"))
    stars = rng.integers(1, 6, rows)
    with open(d / "review.json", "w") as f:
        f.writelines(f'{{"review_id": "r{k}", "user_id": "u{u:07d}", "business_id": "b{i:06d}", "stars": {s}, '
                     f'"date": "{t[:10]} {t[11:]}", "text": "Nice place."}}\n'
                     for k, (u, i, s, t) in enumerate(zip(user.tolist(), item.tolist(), stars.tolist(), dates.tolist())))
    cats = ["Restaurants", "Coffee & Tea", "Bars", "Pizza", "Italian", "Mexican", "Nightlife", "Bakeries", "Sushi"]
    with open(d / "business.json", "w") as f:
        f.writelines(json.dumps({"business_id": f"b{i:06d}", "name": f"Place {i} on Main St",
                                 "categories": ", ".join(cats[(i + j) % len(cats)] for j in range(1 + i % 4))}) + "\n"
                     for i in range(items))


def get_tokenizer(gguf: str | None):
    if gguf:
        from transformers import AutoTokenizer
        p = Path(gguf)
        tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
        tok.add_special_tokens({"additional_special_tokens": ["<UserID>", "<ItemID>"]})
        return tok, "smollm2-gguf"
    from tests.data_fixtures import tiny_tokenizer
    return tiny_tokenizer(vocab_size=1000), "tiny-bpe-1000"


def bench_prepared(name, prep, tok, n_assemble, seed=0):
    inter = prep.inter
    clock = Stopwatch()
    build_histories(inter.user, inter.timestamp, 10)
    t_hist = clock.wall()
    ph = {k: tok.convert_tokens_to_ids(k) for k in ("<UserID>", "<ItemID>")}
    clock = Stopwatch()
    b = PromptBuilder(prep, tok, mode="reason", placeholder_ids=ph, max_len=1024)
    t_init = clock.wall()
    rows = np.random.default_rng(seed).choice(len(inter), size=min(n_assemble, len(inter)), replace=False)
    clock = Stopwatch()
    b.warm(rows)
    t_warm = clock.wall()
    for r in rows[:200].tolist():  # check before timing
        s = b.sample(r)
        full = tok(b.text(r) + (" Yes" if s.label else " No"))["input_ids"]
        if s.n_history == int((b.hist[r] >= 0).sum()) and full != s.input_ids.tolist() + s.answer_ids.tolist():
            raise AssertionError(f"{name}: row {r}: assembled ids differ from tokenising the full prompt")
    clock = Stopwatch()
    lengths = [len(b.sample(r)) for r in rows.tolist()]
    t_asm, c_asm = clock.wall(), clock.cpu()
    clock = Stopwatch()
    vec = b.lengths(rows)
    t_len = clock.wall()
    assert np.array_equal(vec, lengths), f"{name}: vectorised lengths differ from the samples"
    return {"history_s": round(t_hist, 3), "history_rows_per_s": round(len(inter) / t_hist),
            "builder_init_s": round(t_init, 3), "warm_s": round(t_warm, 3), "assembled": len(rows),
            "assemble_s": round(t_asm, 3), "assemble_samples_per_s": round(len(rows) / t_asm),
            "assemble_samples_per_cpu_s": round(len(rows) / c_asm), "lengths_rows_per_s": round(len(rows) / t_len),
            "mean_tokens": round(float(np.mean(lengths)), 1), "segments_cached": len(b.seg.cache)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=2_000_000, help="synthetic Yelp reviews")
    ap.add_argument("--items", type=int, default=60_000, help="synthetic Yelp businesses")
    ap.add_argument("--assemble", type=int, default=100_000, help="rows assembled per workload")
    ap.add_argument("--gguf", default=None, help="SmolLM2 GGUF file for the real tokenizer (else a tiny BPE)")
    ap.add_argument("--raw-dir", default=None, help="keep/reuse the synthetic Yelp files here (else a temp dir)")
    args = ap.parse_args()
    tok, tok_name = get_tokenizer(args.gguf)
    results = {"bench": "data", "tokenizer": tok_name, "cpus": os.cpu_count()}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if (ML1M / "interactions.csv").exists():
            clock = Stopwatch()
            prep = prepare("csv", data_dir=ML1M, out=tmp / "ml1m", noun="movie", quiet=True)
            results["ml1m-collm"] = {"prepare_s": round(clock.wall(), 3),
                                     "prepare_cpu_s": round(clock.cpu(), 3), "rows": len(prep.inter),
                                     "split_rows": [prep.stats[s]["rows"] for s in ("train", "valid", "test")],
                                     "users": prep.n_users, "items": prep.n_items,
                                     **bench_prepared("ml1m-collm", prep, tok, args.assemble)}
            assert results["ml1m-collm"]["split_rows"] == [33891, 10401, 7331], "shared split counts changed"
        raw = Path(args.raw_dir) if args.raw_dir else tmp / "yelp_raw"
        raw.mkdir(parents=True, exist_ok=True)
        stamp = raw / f"rows{args.rows}_items{args.items}.done"
        clock = Stopwatch()
        if not stamp.exists():
            write_synthetic_yelp(raw, args.rows, args.items)
            stamp.write_text("")
        t_write = clock.wall()
        clock = Stopwatch()
        prep = prepare("yelp", data_dir=raw, out=tmp / "yelp", quiet=True)
        results["yelp-synth"] = {"raw_rows": args.rows, "write_raw_s": round(t_write, 1),
                                 "prepare_s": round(clock.wall(), 3),
                                 "prepare_cpu_s": round(clock.cpu(), 3), "rows": len(prep.inter),
                                 "split_rows": [prep.stats[s]["rows"] for s in ("train", "valid", "test")],
                                 "users": prep.n_users, "items": prep.n_items,
                                 **bench_prepared("yelp-synth", prep, tok, args.assemble)}

    print(f"tokenizer: {tok_name}")
    print("| workload | rows | prepare s (cpu s) | history s | history rows/s | warm s | assembly samples/s "
          "(per cpu s) | mean tokens |")
    print("|---|---|---|---|---|---|---|---|")
    for name in ("ml1m-collm", "yelp-synth"):
        if name in results:
            r = results[name]
            print(f"| {name} | {r['rows']:,} | {r['prepare_s']:.2f} ({r['prepare_cpu_s']:.2f}) | {r['history_s']:.2f} | "
                  f"{r['history_rows_per_s']:,} | {r['warm_s']:.2f} | {r['assemble_samples_per_s']:,} "
                  f"({r['assemble_samples_per_cpu_s']:,}) | {r['mean_tokens']} |")
    print_json(results)


if __name__ == "__main__":
    main()
