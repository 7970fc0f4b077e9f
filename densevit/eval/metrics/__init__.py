"""Evaluation metrics (DAVIS J/F, PCK)."""
