"""Mid-stage checkpoints without pickle: tensors in safetensors, everything else in JSON.

    DIR/ckpt.safetensors   "param.<name>"   trainable parameters now
                           "best.<name>"    trainable parameters of the best evaluation so far
                           "opt.<i>.<key>"  AdamW state of parameter i (step, exp_avg, exp_avg_sq)
                           "rng.torch"      torch.get_rng_state() (uint8), "rng.cuda" when on a GPU
    DIR/ckpt.json          {"tag", "state": loop counters and history, "param_groups": AdamW scalars}

Both files are written atomically, tensors first. Each carries the same random `tag` (the JSON in its
body, the safetensors in its metadata), so a run killed between the two writes is detected instead of
pairing new counters with old tensors. A damaged or mismatched pair is reported in one line (ArtifactError,
CheckpointError) that says to delete DIR/, after which the stage restarts from its beginning.
"""

import math
import uuid
from pathlib import Path

import torch
from safetensors.torch import save as st_save

from thinkrec.errors import UserError
from thinkrec.io import atomic_write_bytes, read_json, read_safetensors, safetensors_metadata, write_json

TENSORS, META = "ckpt.safetensors", "ckpt.json"
# JSON has no inf/NaN but the loop state does (best_score starts at -inf, a one-label AUC is NaN); the
# checkpoint must give back exactly what it was given, so they are stored as {"__float__": "-inf"}.
_FLOAT = "__float__"


class CheckpointError(UserError, RuntimeError):
    pass


def _encode(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return {_FLOAT: repr(obj)}  # "inf", "-inf", "nan"
    if isinstance(obj, dict):
        return {k: _encode(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_encode(v) for v in obj]
    return obj


def _decode(obj):
    if isinstance(obj, dict):
        if obj.keys() == {_FLOAT} and obj[_FLOAT] in ("inf", "-inf", "nan"):  # what _encode writes
            return float(obj[_FLOAT])
        return {k: _decode(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v) for v in obj]
    return obj


def _fits(value, own) -> bool:
    """Whether a saved optimizer setting can stand for the optimizer's own `own`: a flag for a flag (or None),
    a number for a number, a pair of numbers for a pair."""
    if own is None or isinstance(own, bool):
        return value is None or isinstance(value, bool)
    if isinstance(own, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(own, (tuple, list)):
        return isinstance(value, list) and len(value) == len(own) and all(map(_fits, value, own))
    return isinstance(value, type(own))


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
    write_json(d / META, _encode({"tag": tag, "state": state, "param_groups": groups}))


def load(directory, params: dict, optimizer) -> tuple:
    """Restore params, optimizer and RNG in place; returns (state dict, best {name: tensor} or None). Every
    tensor and group is checked against `params` before anything is restored: a file that does not fit (damaged,
    or written for another model) is a CheckpointError naming it, never a torch error or a silent broadcast."""
    d = Path(directory)
    redo = f"delete {d}/ to restart the stage from its beginning"
    meta = _decode(read_json(d / META, redo))
    if not isinstance(meta, dict) or not {"tag", "state", "param_groups"} <= meta.keys() \
            or not isinstance(meta["state"], dict):
        raise CheckpointError(f"{d / META} is not a checkpoint (no tag, state, param_groups); {redo}")
    tag = safetensors_metadata(d / TENSORS, redo).get("tag")
    if tag != meta["tag"]:
        raise CheckpointError(f"{d / TENSORS} (tag {tag!r}) and {d / META} "
                              f"(tag {meta['tag']!r}) come from different saves; {redo}")
    tensors = read_safetensors(d / TENSORS, redo)
    missing = [n for n in params if f"param.{n}" not in tensors]
    if missing:
        raise CheckpointError(f"{d / TENSORS} lacks parameters {missing[:3]} "
                              f"({len(missing)} in all); it was written for a different stage or model; {redo}")
    wrong = [(n, tuple(tensors[f"param.{n}"].shape), tuple(p.shape)) for n, p in params.items()
             if tensors[f"param.{n}"].shape != p.shape]
    if wrong:
        raise CheckpointError(f"{d / TENSORS}: parameter shapes differ (name, saved, model): {wrong[:3]}; "
                              f"it was written for a different stage or model; {redo}")
    order = list(params.values())  # the optimizer's parameter indices
    state = {}
    for key, v in tensors.items():
        if key.startswith("opt."):
            i, _, k = key[len("opt."):].partition(".")
            if not (i.isascii() and i.isdigit() and k and int(i) < len(order)
                    and v.shape in (torch.Size(), order[int(i)].shape)):
                raise CheckpointError(f"{d / TENSORS}: {key!r} {tuple(v.shape)} is not optimizer state of one of "
                                      f"the {len(order)} parameters; {redo}")
            state.setdefault(int(i), {})[k] = v
    groups = meta["param_groups"]
    own = getattr(optimizer, "param_groups", None)  # a torch optimizer's groups: the settings it has now
    if not (isinstance(groups, list) and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                                             and isinstance(g.get("betas", []), list) for g in groups)
            and (own is None or len(groups) == len(own) and all(
                set(g) <= set(w) and all(_fits(g[k], w[k]) for k in g if k != "params") for g, w in zip(groups, own)))):
        raise CheckpointError(f"{d / META}: \"param_groups\" is not a list of this optimizer's parameter groups "
                              f"(settings {sorted(k for k in (own or [{}])[0] if k != 'params')}); {redo}")
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    rng, cuda = tensors.get("rng.torch"), "rng.cuda" in tensors and torch.cuda.is_available()
    if rng is None or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        raise CheckpointError(f"{d / TENSORS} holds no CPU random state of this torch (\"rng.torch\"); {redo}")
    if cuda and (tensors["rng.cuda"].dtype != torch.uint8
                 or tensors["rng.cuda"].shape != torch.cuda.get_rng_state().shape):
        raise CheckpointError(f"{d / TENSORS} holds no CUDA random state of this torch (\"rng.cuda\"); {redo}")
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, TypeError, ValueError) as e:  # torch's checks of the groups against the optimizer's
        raise CheckpointError(f"{d / TENSORS} and {d / META}: the optimizer state does not fit this optimizer "
                              f"({' '.join(str(e).split())[:160]}); {redo}") from None
    torch.set_rng_state(rng)
    if cuda:
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
    best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")} or None
    return meta["state"], best
