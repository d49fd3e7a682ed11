"""Export a trained run's fused scorer for serving without Python (torch.export + AOTInductor, loaded from
C++ by libtorch's AOTIModelPackageLoader; see CMakeLists.txt and csrc/).

    python -m thinkrec.export aoti --run-dir RUN --out DIR                    # train.py's test rows
    python -m thinkrec.export aoti --run-dir RUN --out DIR --input rows.jsonl # any infer.py input
    cmake -S . -B build -DCMAKE_PREFIX_PATH=$(python -c "import torch.utils; print(torch.utils.cmake_prefix_path)")
    cmake --build build -j && build/thinkrec-score DIR > scores.jsonl

DIR holds:
    scorer.pt2          the AOTInductor package: (input_ids, attention_mask, slot_kind, slot_index, weights)
                        -> Yes logit [B]; dynamic batch and sequence length; adapters, projector and CF
                        tables baked in. input_ids/attention_mask [B, T] int64, right-padded; slot_kind
                        [B, T] int64 0 = token, 1 = user slot, 2 = item slot; slot_index [B, T] int64 the
                        user / item index of a slot; weights [B, E] float32, each row its user's adapter
                        weights (the exact mixture sum_e w_e B_e A_e, as infer.py)
    gate.safetensors    "weights" [n_users, E] float32: the gate's weights per user index
    users.txt, items.txt raw ids, line k = index k
    rows.safetensors    the tokenised rows to score (the same prompts as infer.py): input_ids, attention_mask,
                        slot_kind, slot_index [N, T] int64, user, item, label (-1 unknown), pos [N] int64
                        (the row's position in the input), sorted by length so consecutive rows batch well
    expected.safetensors "score" [N] float64: infer.py's scores of the same rows, in rows.safetensors order
    export.json         what was exported (run, stage, prompt, precision, shapes, seconds)
The scorer runs the model's padded Hugging Face forward (the padding-free path's data-dependent indexing
does not export); with right padding and real-token positions its scores equal infer.py's (ctest checks).
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save as st_save

from thinkrec.data.errors import DataError
from thinkrec.io import atomic_write_bytes, atomic_write_text, write_json
from thinkrec.model.lora import expert_weights
from thinkrec.batches import right_padded


class ExportedScorer(torch.nn.Module):
    """The fused scorer as one module of plain tensors (see the module docstring for the inputs)."""

    def __init__(self, lm, user_emb: torch.Tensor, item_emb: torch.Tensor):
        super().__init__()
        self.lm = lm
        self.register_buffer("user_emb", user_emb.float().contiguous())
        self.register_buffer("item_emb", item_emb.float().contiguous())
        self.register_buffer("yes_row", lm.lm_head_weight[lm.yes_token_id].detach().float().clone())

    def forward(self, input_ids, attention_mask, slot_kind, slot_index, weights):
        lm = self.lm
        slots = slot_kind > 0
        emb = lm.llm.get_input_embeddings()(input_ids.masked_fill(slots, 0))
        if lm.projector is not None:
            users = self.user_emb[torch.where(slot_kind == 1, slot_index, 0)]
            items = self.item_emb[torch.where(slot_kind == 2, slot_index, 0)]
            cf = torch.where((slot_kind == 1)[..., None], users, items)
            emb = torch.where(slots[..., None], lm.projector(cf).to(emb.dtype), emb)
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with expert_weights(weights):  # [B, E]: every LoRA layer, each row its own weights
            h = lm.llm.model(inputs_embeds=emb, attention_mask=attention_mask, position_ids=positions,
                             use_cache=False).last_hidden_state
        last = attention_mask.sum(1) - 1  # right padding: each row's last real token
        return h[torch.arange(h.shape[0], device=h.device), last].float() @ self.yes_row


def export_aoti(loaded, rows, out, prompt: str = "reason", log=print) -> dict:
    """Export the scorer of `loaded` (thinkrec.infer.LoadedRun) and the tokenised `rows` into `out`."""
    from thinkrec.infer import row_weights, score_rows

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if rows.unknown_users or rows.unknown_items:
        raise DataError("rows with unknown user or item ids cannot be exported (the CF tables are baked in)")
    builder = loaded.builder(prompt)
    samples = [builder.sample(int(rows.data_row[i])) if rows.history is None else
               builder.sample_for(rows.user[i], rows.item[i], rows.history[i], max(int(rows.label[i]), 0))
               for i in range(len(rows))]
    order = np.argsort([len(s.input_ids) for s in samples], kind="stable")
    tensors = right_padded([samples[i] for i in order], loaded.tok.pad_token_id)
    tensors.update(user=torch.as_tensor(rows.user[order]), item=torch.as_tensor(rows.item[order]),
                   label=torch.as_tensor(rows.label[order]), pos=torch.as_tensor(order.astype(np.int64)))

    # the Python path's scores of the same rows, for the C++ side to check against
    log(f"scoring {len(rows)} rows with infer.py's path")
    m = score_rows(loaded, rows, out / "python", prompt, log=log)
    scores = np.array([json.loads(line)["score"] for line in (out / "python" / "scores.jsonl").read_text().splitlines()])

    lm = loaded.lm.eval()
    model = ExportedScorer(lm, *loaded.token_tables()).eval()
    k = min(3, len(rows))
    example = tuple(tensors[n][:k, : int(tensors["attention_mask"][:k].sum(1).max())].clone() for n in
                    ("input_ids", "attention_mask", "slot_kind", "slot_index"))  # own storage: no guards on a base
    example += (row_weights(loaded, rows.user[order[:k]]),)
    batch, seq = torch.export.Dim("batch", min=1, max=1 << 16), torch.export.Dim("seq", min=2, max=1 << 16)
    dims = ({0: batch, 1: seq},) * 4 + ({0: batch},)
    t = time.perf_counter()
    with torch.no_grad():
        log("torch.export ...")
        ep = torch.export.export(model, example, dynamic_shapes=dims)
        log(f"exported in {time.perf_counter() - t:.0f} s; AOTInductor compile ...")
        t2 = time.perf_counter()
        tmp = out / ".scorer.tmp.pt2"  # written whole, then renamed
        torch._inductor.aoti_compile_and_package(ep, package_path=str(tmp))
        tmp.replace(out / "scorer.pt2")
    compile_s = time.perf_counter() - t2
    atomic_write_bytes(out / "gate.safetensors", st_save({"weights": torch.as_tensor(loaded.gate_weights).float()}))
    atomic_write_text(out / "users.txt", "".join(f"{u}\n" for u in loaded.prep.users))
    atomic_write_text(out / "items.txt", "".join(f"{it['raw_id']}\n" for it in loaded.prep.items))
    atomic_write_bytes(out / "rows.safetensors", st_save({k: v.contiguous() for k, v in tensors.items()}))
    atomic_write_bytes(out / "expected.safetensors",
                       st_save({"score": torch.as_tensor(scores[order], dtype=torch.float64)}))
    info = {"run": str(loaded.dir), "stage": loaded.stage.name, "prompt": prompt, "precision": "fp32",
            "rows": len(rows), "max_len": int(tensors["input_ids"].shape[1]), "n_adapters": lm.n_adapters,
            "export_seconds": round(t2 - t, 1), "compile_seconds": round(compile_s, 1),
            "python_rows_per_s": m["rows_per_s"]}
    write_json(out / "export.json", info)
    log(f"wrote {out}: scorer.pt2 (compiled in {compile_s:.0f} s), {len(rows)} rows")
    return info


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m thinkrec.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("aoti", help="AOTInductor package of the fused scorer + tokenised rows for the C++ scorer")
    a.add_argument("--run-dir", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--model", default=None, help="base model, when the one recorded with the adapters moved")
    a.add_argument("--split", default="test", choices=["train", "valid", "test"])
    a.add_argument("--max-rows", type=int, default=None, help="rows of the split (default: train.py's test rows)")
    a.add_argument("--input", default=None, help="JSON Lines rows (as infer.py --input) instead of a split")
    a.add_argument("--prompt", default="reason", choices=["reason", "ids", "text"])
    args = p.parse_args(argv)

    from thinkrec.infer import load_run, read_input, split_rows
    from thinkrec.infer.run import run_arg, train_args

    loaded = load_run(args.run_dir, model=args.model, precision="fp32")  # the AOTInductor scorer is fp32
    if args.input:
        rows = read_input(args.input, loaded.prep, max_rows=args.max_rows or 0)
    else:
        targs = train_args(Path(args.run_dir))
        n = args.max_rows if args.max_rows is not None else int(run_arg(targs, "max_test_samples", 0))
        rows = split_rows(loaded.prep, args.split, n, int(run_arg(targs, "seed", 0)) + 2)
    return export_aoti(loaded, rows, args.out, args.prompt, log=lambda *m: print(*m, file=sys.stderr, flush=True))


if __name__ == "__main__":
    from thinkrec.errors import run_cli

    run_cli("python -m thinkrec.export", main)
