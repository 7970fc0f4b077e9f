"""Descriptors: the extractor, one source of features for every app (the model or a store), upsampled features,
log-binning, similarity maps."""
from .binning import log_bin, num_bins
from .extractor import FACETS, Features, ViTExtractor
from .frames import FrameBatch, InputRule
from .options import FeatureOptions
from .similarity import (best_buddies_of, best_buddy, query_attention, similarity_map, similarity_maps, token_at,
                         topk_tokens)
from .source import FeatureSource, ImageFeatures, image_name
from .upsampled import UpsampledSource, UpsampleOptions, image_guide, input_guide

__all__ = [
    "FACETS", "Features", "ViTExtractor",
    "FeatureSource", "ImageFeatures", "image_name", "InputRule", "FrameBatch",
    "UpsampleOptions", "UpsampledSource", "input_guide", "image_guide",
    "FeatureOptions", "log_bin", "num_bins",
    "similarity_map", "similarity_maps", "topk_tokens", "best_buddy", "best_buddies_of", "query_attention",
    "token_at",
]
