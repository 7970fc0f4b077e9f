"""densevit: dense visual descriptors and correspondences from self-supervised Vision Transformers."""
from .errors import DensevitError, WeightsNotFoundError
from .features.extractor import FACETS, Features, ViTExtractor
from .features.source import FeatureSource
from .io.images import load_image, preprocess
from .models.grid import TokenGrid
from .models.registry import BACKBONES, BackboneSpec, get_spec
from .models.weights import load_backbone
from .runtime.device import select_device
from . import upsample
from .upsample import UPSAMPLERS
from .version import __version__

__all__ = [
    "BACKBONES", "BackboneSpec", "get_spec", "TokenGrid", "select_device", "DensevitError", "WeightsNotFoundError",
    "FACETS", "Features", "ViTExtractor", "FeatureSource", "load_image", "preprocess", "load_backbone", "upsample", "UPSAMPLERS",
    "__version__",
]
