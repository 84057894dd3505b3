"""solopo-mcore: the Megatron-Core trainer for SoLoPO (short-to-long preference optimization)."""

import warnings

# megatron-core warns at import time, once per module, that apex / Transformer Engine are absent
# and it falls back to torch implementations. Which attention path runs is printed by the trainer.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|apex).*not installed.*")
warnings.filterwarnings("ignore", message=r"Apex is not installed.*")
# Printed by every rank on every run, about code that is not ours to change:
# - megatron-core's TransformerConfig warns about its own default cuda_graph_scope (no CUDA graphs
#   are used here);
# - torch deprecates the collectives megatron-core's DDP and sequence parallelism call;
# - megatron-core 0.19 announces, at import, an experimental multimodal config we do not use.
warnings.filterwarnings("ignore", message=r"full scope is deprecated")
warnings.filterwarnings("ignore", message=r"MimoModelConfig is experimental")
warnings.filterwarnings("ignore", category=FutureWarning,
                        message=r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)"
                                r"` is deprecated")

__version__ = "0.1.0"
