"""Readers of benchmark datasets (DAVIS, SPair-71k) and synthetic warp pairs."""
from .davis import DavisDataset, davis_palette, read_mask, write_mask
from .spair import SPair, SPairImage, SPairPair
from .warp import WarpConfig, WarpPair, WarpSource, default_sources, make_warp_pair, make_warp_pairs

__all__ = [
    "DavisDataset", "davis_palette", "read_mask", "write_mask",
    "SPair", "SPairImage", "SPairPair",
    "WarpConfig", "WarpPair", "WarpSource", "default_sources", "make_warp_pair", "make_warp_pairs",
]
