"""Mid-stage checkpoints without pickle: tensors in safetensors, everything else in JSON.

    DIR/ckpt.safetensors   "param.<name>"   trainable parameters now
                           "best.<name>"    trainable parameters of the best evaluation so far
                           "opt.<i>.<key>"  AdamW state of parameter i (step, exp_avg, exp_avg_sq)
                           "rng.torch"      torch.get_rng_state() (uint8), "rng.cuda" when on a GPU
    DIR/ckpt.json          {"tag", "state": loop counters and history, "param_groups": AdamW scalars}

Both files are written atomically, tensors first. Each carries the same random `tag` (the JSON in its
body, the safetensors in its metadata), so a run killed between the two writes is detected instead of
pairing new counters with old tensors.
"""

import json
import uuid
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from thinkrec.io import atomic_write_bytes, atomic_write_text

TENSORS, META = "ckpt.safetensors", "ckpt.json"


class CheckpointError(RuntimeError):
    pass


def exists(directory) -> bool:
    d = Path(directory)
    return (d / TENSORS).is_file() and (d / META).is_file()


def save(directory, params: dict, optimizer, state: dict, best: dict = None) -> None:
    """params: {name: Parameter} (trainable), optimizer: torch AdamW over params.values() in that order,
    state: JSON-able loop counters, best: {name: tensor} or None."""
    tag = uuid.uuid4().hex
    tensors = {f"param.{n}": p.detach().cpu().contiguous() for n, p in params.items()}
    for n, t in (best or {}).items():
        tensors[f"best.{n}"] = t.detach().cpu().contiguous()
    opt_sd = optimizer.state_dict()
    for i, st in opt_sd["state"].items():
        for k, v in st.items():
            if not torch.is_tensor(v):
                raise CheckpointError(f"optimizer state {k!r} of parameter {i} is "
                                      f"a {type(v).__name__}, only tensors are stored")
            tensors[f"opt.{i}.{k}"] = v.detach().cpu().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt_sd["param_groups"]]
    d = Path(directory)
    atomic_write_bytes(d / TENSORS, st_save(tensors, metadata={"tag": tag}))
    atomic_write_text(d / META, json.dumps({"tag": tag, "state": state, "param_groups": groups}, indent=1) + "\n")


def load(directory, params: dict, optimizer) -> tuple:
    """Restore params, optimizer and RNG in place; returns (state dict, best {name: tensor} or None)."""
    d = Path(directory)
    meta = json.loads((d / META).read_text())
    raw = (d / TENSORS).read_bytes()
    # safetensors layout: 8-byte little-endian header length, then the JSON header with __metadata__
    tag = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")]).get("__metadata__", {}).get("tag")
    if tag != meta["tag"]:
        raise CheckpointError(f"{d / TENSORS} (tag {tag}) and {d / META} "
                              f"(tag {meta['tag']}) come from different saves; delete both to restart the stage")
    tensors = st_load(raw)
    missing = [n for n in params if f"param.{n}" not in tensors]
    if missing:
        raise CheckpointError(f"{d / TENSORS} lacks parameters {missing[:3]} "
                              f"({len(missing)} in all); it was written for a different stage or model")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
    state = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            _, i, k = key.split(".", 2)
            state.setdefault(int(i), {})[k] = v
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")} or None
    return meta["state"], best

