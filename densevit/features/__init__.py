"""Descriptors: the extractor, log-binning, similarity maps."""
