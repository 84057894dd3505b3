"""Whether a model's attention heads, KV groups and layers split over a parallel layout.

The model's own check, beside the model: ``parallel`` knows sizes and world sizes, not shapes.
"""

from __future__ import annotations

from solopo_mcore.config import ParallelConfig
from solopo_mcore.models.hf_config import ModelShape
from solopo_mcore.parallel.layout import LayoutError


def check_model_fits_layout(shape: ModelShape, parallel: ParallelConfig,
                            tp_name: str = "parallel.tensor_model_parallel_size",
                            pp_name: str = "pipeline_model_parallel_size") -> None:
    """Refuse a TP that does not divide the heads or KV groups, and PP x VPP that does not divide
    the layers, naming the key (or, for a command-line tool, the option) to change."""
    tp = parallel.tensor_model_parallel_size
    pp = parallel.pipeline_model_parallel_size
    vpp = parallel.virtual_pipeline_model_parallel_size or 1
    fitting = [d for d in range(1, shape.num_query_groups + 1)
               if shape.num_attention_heads % d == 0 and shape.num_query_groups % d == 0]
    if shape.num_attention_heads % tp:
        raise LayoutError(
            f"{tp_name}={tp} does not divide num_attention_heads={shape.num_attention_heads}; "
            f"choose a TP that divides the heads and the {shape.num_query_groups} KV groups: "
            f"{', '.join(map(str, fitting))}")
    if shape.num_query_groups % tp:
        raise LayoutError(
            f"{tp_name}={tp} does not divide the {shape.num_query_groups} KV groups "
            f"(num_key_value_heads); choose a TP that divides it, e.g. "
            f"{max(d for d in range(1, tp + 1) if shape.num_query_groups % d == 0)}")
    if shape.num_layers % (pp * vpp):
        raise LayoutError(
            f"num_layers={shape.num_layers} is not divisible by {pp_name} x "
            f"virtual_pipeline_model_parallel_size = {pp} x {vpp}; choose sizes whose product "
            f"divides the layer count")
