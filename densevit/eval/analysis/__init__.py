"""Analysis tools: attention statistics per head, layer similarity (linear CKA), best layer per task, plots."""
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
from .sweep import FunctionTask, available_tasks, best_layers, build_task, known_tasks, run_sweep

__all__ = [
    "AttentionAccumulator", "AttentionStats", "attention_stats", "head_statistics", "iter_layer_attention",
    "layer_sums", "resolve_layers", "MinibatchCKA", "cka_matrix", "hsic_unbiased", "linear_cka", "model_cka",
    "resample_tokens", "FunctionTask", "available_tasks", "best_layers", "build_task", "known_tasks", "run_sweep",
]
