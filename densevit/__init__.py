"""densevit: dense visual descriptors and correspondences from self-supervised Vision Transformers."""
from .backbones import BACKBONES, BackboneSpec, get_spec
from .coords import TokenGrid
from .device import select_device
from .errors import DensevitError, WeightsNotFoundError
from .extractor import FACETS, Features, ViTExtractor
from .preprocess import load_image, preprocess
from .weights import load_backbone

__version__ = "0.1.0"

__all__ = [
    "BACKBONES", "BackboneSpec", "get_spec", "TokenGrid", "select_device", "DensevitError", "WeightsNotFoundError",
    "FACETS", "Features", "ViTExtractor", "load_image", "preprocess", "load_backbone", "__version__",
]
