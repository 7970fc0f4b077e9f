"""Measuring: benchmark datasets, metrics, keypoint evaluation, analysis of layers and heads."""
