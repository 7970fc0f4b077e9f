"""Matching descriptors: exact k-NN and best buddies (:mod:`.knn`), k-means (:mod:`.cluster`), label and
keypoint transfer (:mod:`.transfer`)."""
