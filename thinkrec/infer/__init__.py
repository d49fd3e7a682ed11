"""Inference on a trained run: batch scoring (resumable, mixed routes per batch), ranking candidates of one
user with a shared prompt prefix, and explanations by batched decoding with a KV cache. The CLI is
infer.py at the repo root."""

from .job import row_weights, score_rows
from .rows import Rows, read_input, split_rows
from .run import LoadedRun, RunError, load_run, route_names
from thinkrec.scoring import ScoreJob, plan_batches, run_job, score_samples

from .score import ScoreLog

__all__ = ["row_weights", "score_rows", "Rows", "read_input", "split_rows", "LoadedRun", "RunError", "load_run",
           "route_names", "ScoreJob", "ScoreLog", "plan_batches", "run_job", "score_samples"]
