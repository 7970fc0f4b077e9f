"""On disk: the feature store, dataset extraction into it, the corpus patch index (its lists in memory or on
disk: :mod:`densevit.storage.ondisk`, :mod:`densevit.storage.index_ondisk`), the descriptor cache.

The patch index's functions keep their module's short names (``build_index``, ``load_index``; its ``search``
and ``Match`` as :mod:`densevit.storage.patch_index`)."""
from . import patch_index
from .cache import CacheError, CacheWarning, DescriptorCache
from .extract import ExtractionConfig, ExtractionReport, extract_to_store, gather_dataset
from .index_ondisk import IndexSpaceError, build_on_disk, update_index
from .patch_index import IndexConfig, PatchIndex, PatchIndexError, build_index, load_index
from .store import FeatureStore, StoreError, StoreFullError, StoreLock, StoreWriter

__all__ = [
    "FeatureStore", "StoreWriter", "StoreLock", "StoreError", "StoreFullError",
    "ExtractionConfig", "ExtractionReport", "extract_to_store", "gather_dataset",
    "patch_index", "IndexConfig", "PatchIndex", "PatchIndexError", "build_index", "load_index",
    "build_on_disk", "update_index", "IndexSpaceError",
    "DescriptorCache", "CacheError", "CacheWarning",
]
