"""Setting a stage up for training: which parameters its `trains` kind (the table in thinkrec/stages.py) makes
trainable, and where its artifact goes.

    global     adapter 0 of every layer
    projector  the CF projector (LoRA frozen)
    experts    adapters 1..N of the last 8 layers, from stage 3's frozen-prefix cache

Stage 3 starts every expert from the global adapter (so below the trainable layers the experts ARE the
global adapter, see thinkrec/train/prefix.py) and trains all of them together: batches mix users of all
groups and each row is routed one-hot to its group's expert. Every stage writes RUN/<stage>/ with the
model's adapters and projector (thinkrec.model.save_adapters, atomic, adapters.json last); a stage whose
directory is complete is skipped on a rerun, and its mid-stage checkpoint lives in RUN/<stage>/ckpt/.
"""

from pathlib import Path

from thinkrec import stages
from thinkrec.model.adapters import CONFIG
from thinkrec.rundir import RunDir

from .prefix import FrozenPrefix

EXPERT_LAYERS = 8  # stage 3 trains the LoRA of the last 8 decoder layers (the paper's choice)


def stage_dir(run_dir, stage: str) -> Path:
    return RunDir(run_dir).stage(stage)


def is_done(run_dir, stage: str) -> bool:
    return (stage_dir(run_dir, stage) / CONFIG).is_file()


def setup(lm, stage: str, expert_layers: int = EXPERT_LAYERS, prefix_cache_mb: float = 0.0) -> FrozenPrefix | None:
    """Set requires_grad for `stage`; returns stage 3's FrozenPrefix (caching up to `prefix_cache_mb` MB of
    prefix outputs, 0 = no cache), or None where the model's own forward runs."""
    trains = stages.get(stage).trains  # what the stage trains: thinkrec/stages.py
    if trains == "global":
        lm.set_trainable(layers=None, adapters=[0], projector=False)
        return None
    if trains == "projector":
        if lm.projector is None:
            raise ValueError("stage 2 trains the CF projector but the model has none (build ThinkRecLM with cf_dim)")
        lm.set_trainable(layers=[], adapters=[], projector=True)
        return None
    if trains == "experts":
        if lm.n_experts < 1:
            raise ValueError("stage 3 needs n_experts >= 1")
        lm.init_experts_from_global()
        layers = lm.last_layers(expert_layers)
        lm.set_trainable(layers=layers, adapters=range(1, lm.n_experts + 1), projector=False)
        n_layers = len(lm.llm.model.layers)
        if not lm.packed:  # no layer-range forward: the plain one (no graph below the trainable layers)
            return None
        return FrozenPrefix(lm, n_layers - min(layers), cache_mb=prefix_cache_mb)
    raise ValueError(f"stage {stage!r} trains {trains!r}: setup does not know it")
