"""densevit applications (installed as ``densevit.apps``): co-segmentation, part co-segmentation, correspondence,
video object propagation, descriptor PCA, object discovery without labels (TokenCut, LOST)."""
