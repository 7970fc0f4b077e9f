"""Backbones: the registry, weights (find, read, convert, fit, fingerprint), positional encodings, block families,
and the token grid they run on."""
from .families import FAMILIES, BlockFamily, make_adapter
from .grid import TokenGrid, grid_shape
from .layouts import LAYOUTS, Layout, get_layout
from .locate import WEIGHTS_ENV, find_checkpoint
from .own import adopt_module
from .posenc import PosEncoding, resample_pos_embed
from .registry import BACKBONES, HUB_ALIASES, BackboneSpec, get_spec
from .weights import create_model, load_backbone, load_weights_file, read_state_dict

__all__ = [
    "BACKBONES", "HUB_ALIASES", "BackboneSpec", "get_spec",
    "create_model", "load_backbone", "load_weights_file", "read_state_dict",
    "LAYOUTS", "Layout", "get_layout",
    "WEIGHTS_ENV", "find_checkpoint", "adopt_module",
    "FAMILIES", "BlockFamily", "make_adapter",
    "PosEncoding", "resample_pos_embed",
    "TokenGrid", "grid_shape",
]
