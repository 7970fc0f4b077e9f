"""On disk: the feature store, dataset extraction into it, the corpus patch index, the descriptor cache.

The patch index's functions keep their module's short names (``build_index``, ``load_index``; its ``search``
and ``Match`` as :mod:`densevit.storage.patch_index`)."""
from . import patch_index
from .cache import CacheError, CacheWarning, DescriptorCache
from .extract import ExtractionConfig, ExtractionReport, extract_to_store, gather_dataset
from .patch_index import IndexConfig, PatchIndex, PatchIndexError, build_index, load_index
from .store import FeatureStore, StoreError, StoreFullError, StoreLock, StoreWriter

__all__ = [
    "FeatureStore", "StoreWriter", "StoreLock", "StoreError", "StoreFullError",
    "ExtractionConfig", "ExtractionReport", "extract_to_store", "gather_dataset",
    "patch_index", "IndexConfig", "PatchIndex", "PatchIndexError", "build_index", "load_index",
    "DescriptorCache", "CacheError", "CacheWarning",
]
