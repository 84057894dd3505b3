"""solopo-mcore: the Megatron-Core trainer for SoLoPO (short-to-long preference optimization)."""

import warnings

# megatron-core warns at import time, once per module, that apex / Transformer Engine are absent
# and it falls back to torch implementations. Which attention path runs is printed by the trainer.
warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine|apex).*not installed.*")
warnings.filterwarnings("ignore", message=r"Apex is not installed.*")

__version__ = "0.1.0"
