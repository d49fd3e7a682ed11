"""Explanations: the model's reasoning for rows, by batched decoding with the KV cache (each row keeps its
user's expert mixture at every step), written to OUT/explanations.jsonl and scored against reference
reasoning (teacher traces, or --references) with METEOR, BLEU-4, ROUGE-L and BLEURT (thinkrec/text_metrics.py).

The prompt is the paper's C.3 recommendation prompt ("... construct a persona of the user's preferences and
reevaluate whether the user would enjoy ... Please begin your analysis with "Yes" or "No"."), the one the
reasoning answers were trained on. Greedy by default; --temperature 0.4 --repetition-penalty 1.2
--no-repeat-ngram 2 (with --top-p) are the official generation settings.
"""

import json
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from thinkrec.data.errors import DataError, json_lines, malformed
from thinkrec.io import write_json, write_jsonl
from thinkrec.model.generate import generate
from thinkrec.text_metrics import explanation_metrics
from thinkrec.batches import cf_vectors, right_padded

from .job import row_weights
from .rows import Rows
from .run import LoadedRun


def read_references(path, prep) -> dict:
    """{data row: reference text} from JSON Lines with {"row", "reason"} (the trace file's format) or
    {"user_id", "item_id", "reason"} (matched to the data's rows of that pair)."""
    path = Path(path)
    users = {str(u): i for i, u in enumerate(prep.users)}
    items = {it["raw_id"]: it["item"] for it in prep.items}
    pair_rows = None
    out = {}
    for line_no, obj in json_lines(path):
        if not isinstance(obj, dict) or "reason" not in obj:
            raise malformed(path, line_no, 'expected {"row" or "user_id"+"item_id", "reason"}')
        text = str(obj["reason"])
        if "row" in obj:
            out[int(obj["row"])] = text
            continue
        if pair_rows is None:
            pair_rows = {}
            for r, (u, i) in enumerate(zip(prep.inter.user.tolist(), prep.inter.item.tolist())):
                pair_rows.setdefault((u, i), []).append(r)
        key = (users.get(str(obj.get("user_id"))), items.get(str(obj.get("item_id"))))
        if None in key:
            raise malformed(path, line_no, "unknown user_id / item_id")
        for r in pair_rows.get(key, []):
            out[r] = text
    return out


@torch.no_grad()
def explain(loaded: LoadedRun, rows: Rows, n: int, batch_size: int = 8, progress: bool = False,
            **gen) -> list:
    """[{"pos", "row", "user_id", "item_id", "label", "explanation", "new_tokens"}] for the first n rows."""
    lm, tok = loaded.lm, loaded.tok
    builder = loaded.builder("reason")
    picked = list(range(min(n, len(rows))))
    weights = row_weights(loaded, rows.user)
    ue, ie = loaded.token_tables()
    out = []
    for start in tqdm(range(0, len(picked), batch_size), desc="explain", disable=not progress):
        part = picked[start:start + batch_size]
        samples = [builder.sample(int(rows.data_row[i])) if rows.history is None else
                   builder.sample_for(rows.user[i], rows.item[i], rows.history[i]) for i in part]
        b = right_padded(samples, tok.pad_token_id)
        slots = b["slot_kind"] > 0  # CF vectors in row-major slot order, as the forward fills them
        cf = cf_vectors(b["slot_kind"][slots] - 1, b["slot_index"][slots], ue, ie)
        new = generate(lm, b["input_ids"], b["attention_mask"].sum(1), weights[part], cf_embeds=cf,
                       placeholder_mask=slots, eos_token_id=tok.eos_token_id, **gen)
        for i, toks in zip(part, new):
            out.append({"pos": i, "row": int(rows.data_row[i]), "user_id": str(loaded.prep.users[rows.user[i]]),
                        "item_id": loaded.prep.items[rows.item[i]]["raw_id"],
                        "label": None if rows.label[i] < 0 else int(rows.label[i]),
                        "explanation": tok.decode(toks, skip_special_tokens=True).strip(), "new_tokens": len(toks)})
    return out


def explain_cli(loaded: LoadedRun, rows: Rows, args, log) -> dict:
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
               repetition_penalty=args.repetition_penalty, no_repeat_ngram_size=args.no_repeat_ngram)
    if args.temperature > 0:
        gen["generator"] = torch.Generator().manual_seed(args.seed)
    log(f"explaining {min(args.explain, len(rows))} rows of {rows.source} ({gen})")
    t = time.perf_counter()
    lines = explain(loaded, rows, args.explain, batch_size=min(args.batch_size, 8), progress=not args.no_progress,
                    **gen)
    seconds = time.perf_counter() - t
    ref_path = Path(args.references) if args.references else loaded.dir / "reasoning" / "traces.jsonl"
    refs = read_references(ref_path, loaded.prep) if ref_path.is_file() else {}
    if args.references and not ref_path.is_file():
        raise DataError(f"--references {ref_path}: no such file")
    have = [x for x in lines if x["row"] in refs]
    for x in have:
        x["reference"] = refs[x["row"]]
    metrics = {"rows": len(lines), "with_reference": len(have), "references": str(ref_path) if refs else None,
               "new_tokens_per_s": round(sum(x["new_tokens"] for x in lines) / max(seconds, 1e-9), 2),
               "generation": {k: v for k, v in gen.items() if k != "generator"}, "seed": args.seed}
    if have:
        metrics["text"] = explanation_metrics([x["explanation"] for x in have], [x["reference"] for x in have],
                                              bleurt_checkpoint=args.bleurt_checkpoint)
    else:
        metrics["text"] = {"unavailable": f"no reference reasoning for these rows (looked in {ref_path}; "
                                          "--references FILE gives some)"}
    write_jsonl(args.out / "explanations.jsonl", lines)
    write_json(args.out / "explain_metrics.json", metrics)
    for x in lines[:3]:
        log(f"[{x['user_id']} / {x['item_id']}, label {x['label']}] {x['explanation'][:300]}")
    print(json.dumps(metrics), flush=True)
    return metrics
