"""Training: batches, losses through the kernels, the loop (mixed sampling, schedule, selection,
resumable checkpoints, data parallelism) and the three stages. The CLI is train.py at the repo root."""

from thinkrec.batches import Batch, collate
from thinkrec.data.sampler import subsample

from .data import SampleSet, read_traces
from .ddp import Dist, init_from_env
from .loop import LoopConfig, StageInputs, score, train_stage
from thinkrec.stages import STAGES

from .stages import is_done, setup, stage_dir

__all__ = ["Batch", "collate", "SampleSet", "read_traces", "subsample", "Dist", "init_from_env", "LoopConfig",
           "StageInputs", "score", "train_stage", "STAGES", "is_done", "setup", "stage_dir"]
