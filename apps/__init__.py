"""densevit applications (installed as ``densevit.apps``): co-segmentation, part co-segmentation, correspondence,
video object propagation, descriptor PCA, object discovery without labels (TokenCut, LOST), the explorer."""
from .correspondence import (CorrespondenceConfig, Correspondences, find_correspondences,
                             find_correspondences_features, transfer_keypoints, transfer_keypoints_features)
from .coseg import CosegConfig, CosegResult, cosegment, cosegment_features
from .discovery import DiscoverConfig, Discovery, discover, discover_features, discover_mask
from .explore import Explorer, Settings
from .partseg import PartsegConfig, PartsegResult, part_cosegment, part_cosegment_features
from .pca import PCAConfig, PCAImage, descriptor_pca, pca_features
from .vos import VOSConfig, propagate, segment_video

__all__ = [
    "CosegConfig", "CosegResult", "cosegment", "cosegment_features",
    "PartsegConfig", "PartsegResult", "part_cosegment", "part_cosegment_features",
    "CorrespondenceConfig", "Correspondences", "find_correspondences", "find_correspondences_features",
    "transfer_keypoints", "transfer_keypoints_features",
    "PCAConfig", "PCAImage", "descriptor_pca", "pca_features",
    "DiscoverConfig", "Discovery", "discover", "discover_features", "discover_mask",
    "VOSConfig", "propagate", "segment_video",
    "Explorer", "Settings",
]
