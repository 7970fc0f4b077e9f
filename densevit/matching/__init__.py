"""Matching descriptors: exact k-NN and best buddies (:mod:`.knn`), k-means (:mod:`.cluster`), label and
keypoint transfer (:mod:`.transfer`). ``densevit.matching.knn`` is the module (its function:
``densevit.matching.knn.knn``)."""
from .cluster import elbow_kmeans, kmeans
from .knn import best_buddies, faiss_available, nearest_both_ways, similarity_matrix
from .transfer import label_transfer, transfer_points

__all__ = [
    "similarity_matrix", "nearest_both_ways", "best_buddies", "faiss_available",
    "kmeans", "elbow_kmeans",
    "label_transfer", "transfer_points",
]
