"""The feature parameters every config shares (load size, layer, facet, binning), declared once with their help;
each config gives its own default (``layer: int = layer_opt(9)``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from ..options import opt, zero_is_none
from .extractor import FACETS

__all__ = ["load_size_opt", "layer_opt", "facet_opt", "bin_opt", "FeatureOptions"]


def load_size_opt(default: Optional[int] = 224) -> Any:
    """Short side of the network input in pixels (None / 0 on the command line: the original size)."""
    return opt(default, "resize the shorter image side to this (0: the original size)", parse=zero_is_none)


def layer_opt(default: int = 11) -> Any:
    """Block index, 0-based; -1 is the last."""
    return opt(default, "block index, 0-based (-1 = last)")


def facet_opt(default: str = "key") -> Any:
    """One of :data:`~densevit.features.extractor.FACETS`."""
    return opt(default, "descriptor facet (key/query: before RoPE on rotary backbones; key_rope/query_rope: after "
                        "it)", choices=FACETS)


def bin_opt(default: bool = False) -> Any:
    """Log-binned descriptors (Amir et al. 2021)."""
    return opt(default, "log-binned descriptors")


@dataclass(frozen=True)
class FeatureOptions:
    """Which descriptors are read: the base of every app's config (each overrides the defaults it changes), and
    the flags of commands without a config of their own."""

    load_size: Optional[int] = load_size_opt()
    layer: int = layer_opt()
    facet: str = facet_opt()
    bin: bool = bin_opt()
