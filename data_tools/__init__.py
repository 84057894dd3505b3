"""data_tools: from raw multi-hop QA to a Megatron indexed dataset of SoLoPO triplets."""

import warnings

# megatron-core (imported for its indexed dataset) warns at import time that apex / Transformer
# Engine are absent; the data tools use neither.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|apex).*not installed.*")
warnings.filterwarnings("ignore", message=r"Apex is not installed.*")
