#!/usr/bin/env bash
# Shared-prefix pairs, side by side (issue 15's benchmark; not a test): SoLoPO and solo_both (both
# shared) against long-PO without and with shared prefixes, on the tests' tiny Qwen2, short 256 /
# long 2K and 4K tokens, alternating timed steps in one process. Prints the variant table and the
# step-time / peak-memory ratios (long-PO shared/unshared, solo_both/solo, solo against both
# long-PO baselines); results go in benchmarks/RESULTS.md ("Shared-prefix pairs").
#   bash benchmarks/bench_shared_prefix.sh [OUT_DIR]        # ~1 minute on 2 CPU cores
set -euo pipefail
OUT=${1:-/tmp/solopo_bench_shared_prefix}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT"
"$PY" -c "from solopo_mcore.models.tiny import build_tiny_hf_model; \
build_tiny_hf_model('$OUT/tiny', 'qwen2')" > /dev/null
PYTHONWARNINGS=ignore "$PY" -m torch.distributed.run --nproc-per-node 1 examples/profile_solopo.py \
  --config tiny_cpu --out "$OUT/profile" --long-lengths 2048,4096 --short-tokens 256 \
  --response-tokens 64 --steps 7 model.hf_config_path="$OUT/tiny" \
  parallel.tensor_model_parallel_size=1
