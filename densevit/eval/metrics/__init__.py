"""Evaluation metrics (DAVIS J/F, PCK)."""
from .davis import DavisScores, db_eval_boundary, db_eval_iou, evaluate_semisupervised
from .pck import PairRecord, PCKRow, pck_counts, summarize

__all__ = [
    "DavisScores", "db_eval_iou", "db_eval_boundary", "evaluate_semisupervised",
    "PairRecord", "PCKRow", "pck_counts", "summarize",
]
