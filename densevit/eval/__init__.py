"""Measuring: benchmark datasets (:mod:`.datasets`), metrics (:mod:`.metrics`), keypoint evaluation
(:mod:`.keypoints`), analysis of layers and heads (:mod:`.analysis`)."""
from .keypoints import EvalPair, ImageDescriber, ResultsLog, TransferSettings, evaluate_pair

__all__ = ["ImageDescriber", "EvalPair", "TransferSettings", "evaluate_pair", "ResultsLog"]
