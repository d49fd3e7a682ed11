"""Collaborative-filtering models (MF, LightGCN, SASRec): training, selection on valid AUC, export.

    python -m thinkrec.cf train --cf-model mf --run-dir RUN
"""

from .lightgcn import LightGCN
from .mf import MF
from .sasrec import SASRec
from .train import GRIDS, MODELS, CFConfig, build_model, fit, row_data, save, search, split_metrics, train_cf

__all__ = ["MF", "LightGCN", "SASRec", "GRIDS", "MODELS", "CFConfig", "build_model", "fit", "row_data", "save",
           "search", "split_metrics", "train_cf"]
