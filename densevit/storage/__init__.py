"""On disk: the feature store, dataset extraction into it, the corpus patch index, the descriptor cache."""
