"""Adapter files: our format (all adapters in one file) and PEFT's (one directory per adapter).

Ours, in a directory:
    adapters.safetensors   "<module path>.lora_A.<adapter>" [r, K], "<module path>.lora_B.<adapter>" [N, r]
                           (module path inside the HF causal LM, e.g. model.layers.3.self_attn.q_proj;
                           adapter "global", "expert_1", ...), plus "projector.<name>" when there is one
    adapters.json          {"format": "thinkrec-lora", "version": 1, "r", "alpha", "dropout",
                            "target_modules", "n_experts", "adapters", "modules", "base_model",
                            "projector": {"cf_dim", "mid", "hidden", "inputs", "slots"} or null}
Both written atomically; the JSON last, so a directory with adapters.json is complete. A damaged file is
reported as one ArtifactError line naming it and the directory to delete.

PEFT (`export_peft`): DIR/<adapter>/adapter_config.json + adapter_model.safetensors with keys
"base_model.model.<module path>.lora_A.weight" [r, K] and ".lora_B.weight" [N, r]; peft computes
W x + (alpha / r) B A x, the same as our layer with that adapter's weight 1.
"""

from pathlib import Path

import torch
from safetensors.torch import save as st_save

from thinkrec.errors import UserError
from thinkrec.io import atomic_write_bytes, read_json, read_safetensors, write_json

from .lora import adapter_names

WEIGHTS, CONFIG = "adapters.safetensors", "adapters.json"


class AdapterFileError(UserError, ValueError):
    pass


def _tensors(lm) -> dict:
    names = adapter_names(lm.n_experts)
    out = {}
    for path, mod in lm.lora_layers().items():
        for e, name in enumerate(names):
            out[f"{path}.lora_A.{name}"] = mod.lora_A[e].detach().float().contiguous().cpu()
            out[f"{path}.lora_B.{name}"] = mod.lora_B[e].detach().float().contiguous().cpu()
    if lm.projector is not None:
        for k, v in lm.projector.state_dict().items():
            out[f"projector.{k}"] = v.detach().float().contiguous().cpu()
    return out


def _config(lm) -> dict:
    c = lm.lora_config
    p = lm.projector
    return {"format": "thinkrec-lora", "version": 1, "r": c.r, "alpha": c.alpha, "dropout": c.dropout,
            "target_modules": list(c.target_modules), "n_experts": lm.n_experts,
            "adapters": adapter_names(lm.n_experts), "modules": list(lm.lora_layers()),
            "base_model": lm.base_model,
            "projector": None if p is None else {"cf_dim": p.cf_dim, "mid": p.mid, "hidden": p.hidden,
                                                 "inputs": p.inputs, "slots": p.slots}}


def save_adapters(lm, directory) -> Path:
    """Write every adapter of `lm` (a ThinkRecLM) and its projector to `directory`."""
    d = Path(directory)
    atomic_write_bytes(d / WEIGHTS, st_save(_tensors(lm), metadata={"format": "thinkrec-lora"}))
    write_json(d / CONFIG, _config(lm))
    return d


def read_adapters(directory, recompute: str | None = None):
    """(config dict, {name: tensor}) from an adapter directory, with clear errors for missing files;
    a damaged file raises thinkrec.io.ArtifactError ending in `recompute` (default: delete the directory
    and rerun the stage that wrote it)."""
    d = Path(directory)
    for f in (CONFIG, WEIGHTS):
        if not (d / f).is_file():
            raise AdapterFileError(f"{d / f} is missing; an adapter directory holds "
                                   f"{CONFIG} and {WEIGHTS} (written by save_adapters)")
    recompute = recompute or _redo(d)
    cfg = read_json(d / CONFIG, recompute)
    if not isinstance(cfg, dict) or cfg.get("format") != "thinkrec-lora":
        raise AdapterFileError(f"{d / CONFIG} is not a thinkrec-lora config; {recompute}")
    missing = [k for k in _KEYS if k not in cfg]
    if missing:
        raise AdapterFileError(f"{d / CONFIG} lacks {missing}; {recompute}")
    return cfg, read_safetensors(d / WEIGHTS, recompute)


_KEYS = ("r", "alpha", "dropout", "target_modules", "n_experts", "adapters", "modules", "base_model")  # what is read


def _redo(directory) -> str:
    return f"delete {Path(directory)}/ and rerun the stage that wrote it"


def load_adapters(lm, directory, projector: bool = True) -> dict:
    """Copy saved adapters (and projector) into `lm`; checks r, alpha, experts, names and shapes first
    and changes nothing when any differs. Returns the saved config. projector=False leaves the model's
    projector as it is and ignores the saved one (stage 1's, which never trained: a run may give its tokens
    other inputs than the run stage 1 came from)."""
    cfg, tensors = read_adapters(directory)
    d, redo = Path(directory), _redo(directory)
    mine = _config(lm)
    for key in ("r", "alpha", "n_experts", "target_modules"):
        if cfg[key] != mine[key]:
            raise AdapterFileError(f"{d / CONFIG}: saved {key}={cfg[key]!r} but the model has {key}={mine[key]!r}; "
                                   f"{redo}")
    want = _tensors(lm)
    if not projector:
        want = {k: v for k, v in want.items() if not k.startswith("projector.")}
        tensors = {k: v for k, v in tensors.items() if not k.startswith("projector.")}
    if projector and lm.projector is not None:  # saved before these buffers existed: their neutral values
        neutral = {"projector.in_mean": torch.zeros_like, "projector.in_std": torch.ones_like,  # raw inputs
                   "projector.out_norm": torch.zeros_like}  # norm free
        tensors = {**{k: f(want[k]) for k, f in neutral.items() if k not in tensors}, **tensors}
    missing, extra = sorted(set(want) - set(tensors)), sorted(set(tensors) - set(want))
    if missing or extra:
        raise AdapterFileError(f"{d / WEIGHTS}: tensor names differ; missing {missing[:4]} ({len(missing)} in all), "
                               f"unexpected {extra[:4]} ({len(extra)} in all); {redo}")
    bad = [(k, tuple(tensors[k].shape), tuple(v.shape)) for k, v in want.items() if tensors[k].shape != v.shape]
    if bad:
        raise AdapterFileError(f"{d / WEIGHTS}: shapes differ (name, saved, model): {bad[:4]}; {redo}")
    with torch.no_grad():
        names = adapter_names(lm.n_experts)
        for path, mod in lm.lora_layers().items():
            for e, name in enumerate(names):
                mod.lora_A[e].copy_(tensors[f"{path}.lora_A.{name}"])
                mod.lora_B[e].copy_(tensors[f"{path}.lora_B.{name}"])
        if lm.projector is not None and projector:
            lm.projector.load_state_dict({k[len("projector."):]: v for k, v in tensors.items()
                                          if k.startswith("projector.")})
    return cfg


def resize_adapters(directory, n_experts: int) -> None:
    """Rewrite a stage-1/2 adapter directory with `n_experts` experts, each a copy of the global adapter
    (what stage 3 starts them from); the projector is kept. Files are replaced, never written through, so
    the hard-linked donor is untouched."""
    directory = Path(directory)
    cfg, tensors = read_adapters(directory)
    names = adapter_names(n_experts)
    out = {k: v for k, v in tensors.items() if k.startswith("projector.")}
    for path in cfg["modules"]:
        for part in ("lora_A", "lora_B"):
            for name in names:  # safetensors refuses tensors that share memory: one clone each
                out[f"{path}.{part}.{name}"] = tensors[f"{path}.{part}.global"].clone()
    atomic_write_bytes(directory / WEIGHTS, st_save(out, metadata={"format": "thinkrec-lora"}))
    write_json(directory / CONFIG, {**cfg, "n_experts": n_experts, "adapters": names})


def export_peft(directory, out, adapters=None, base_model: str = None) -> list:
    """Write each adapter of a saved adapter directory as a PEFT LoRA in out/<adapter>/.

    adapters: names to export (default all); base_model overrides the saved base model name.
    Returns the directories written.
    """
    cfg, tensors = read_adapters(directory)
    names = cfg["adapters"] if adapters is None else list(adapters)
    unknown = sorted(set(names) - set(cfg["adapters"]))
    if unknown:
        raise AdapterFileError(f"no adapter {unknown} in {directory}; "
                               f"it has {cfg['adapters']}")
    peft_cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg["r"], "lora_alpha": cfg["alpha"],
                "lora_dropout": cfg["dropout"], "target_modules": cfg["target_modules"], "bias": "none",
                "fan_in_fan_out": False, "use_rslora": False, "inference_mode": True,
                "base_model_name_or_path": base_model or cfg["base_model"]}
    written = []
    for name in names:
        sd = {}
        for path in cfg["modules"]:
            sd[f"base_model.model.{path}.lora_A.weight"] = tensors[f"{path}.lora_A.{name}"].contiguous()
            sd[f"base_model.model.{path}.lora_B.weight"] = tensors[f"{path}.lora_B.{name}"].contiguous()
        d = Path(out) / name
        atomic_write_bytes(d / "adapter_model.safetensors", st_save(sd, metadata={"format": "pt"}))
        write_json(d / "adapter_config.json", peft_cfg)
        written.append(d)
    return written
