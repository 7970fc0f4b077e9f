"""Moved to :mod:`densevit.matching` (``knn``, ``cluster``, ``transfer``); this alias is kept for one release
(see CHANGELOG.md)."""
from densevit.matching.cluster import FAISS_KMEANS_SEED, FAISS_MAX_POINTS_PER_CENTROID, elbow_kmeans, kmeans  # noqa: F401
from densevit.matching.knn import *  # noqa: F401,F403
from densevit.matching.knn import __all__ as _knn_all
from densevit.matching.transfer import label_transfer  # noqa: F401

__all__ = list(_knn_all) + ["label_transfer", "kmeans", "elbow_kmeans"]
