"""Analysis tools: attention statistics per head, layer similarity (linear CKA), best layer per task, spatial
information per layer, occlusion robustness, neuron visualisation, unsupervised segmentation, plots."""
from .attention import (
                        AttentionAccumulator,
                        AttentionStats,
                        attention_stats,
                        head_statistics,
                        iter_layer_attention,
                        layer_sums,
                        resolve_layers,
)
from .cka import MinibatchCKA, cka_matrix, hsic_unbiased, linear_cka, model_cka, resample_tokens
from .neurons import NeuronImage, unit_activation, visualize_unit, visualize_units
from .robustness import RobustnessStats, occlusion_robustness
from .spatial import SpatialStats, own_position_share, position_similarity, spatial_information
from .sweep import FunctionTask, available_tasks, best_layers, build_task, known_tasks, run_sweep
from .unsup_seg import UnsupSegResult, hungarian_miou, unsupervised_segmentation

__all__ = [
    "AttentionAccumulator", "AttentionStats", "attention_stats", "head_statistics", "iter_layer_attention",
    "layer_sums", "resolve_layers", "MinibatchCKA", "cka_matrix", "hsic_unbiased", "linear_cka", "model_cka",
    "resample_tokens", "FunctionTask", "available_tasks", "best_layers", "build_task", "known_tasks", "run_sweep",
    "NeuronImage", "unit_activation", "visualize_unit", "visualize_units", "RobustnessStats", "occlusion_robustness",
    "SpatialStats", "own_position_share", "position_similarity", "spatial_information", "UnsupSegResult",
    "hungarian_miou", "unsupervised_segmentation",
]
