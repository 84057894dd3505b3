#!/usr/bin/env bash
# One prepared device run (one H200, under 10 minutes): the GPU-only code paths listed in
# docs/design.md ("Runs only on GPU, untested here") and the open GPU figures in
# benchmarks/RESULTS.md.
# Usage on the GPU machine (carry .whl with megatron-core's cp312 wheel, e.g. 0.19.2, the version
# Python 3.12 users get; see platform notes for the download line):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \
#     export PYTHONPATH=/tmp/site:$PWD && bash benchmarks/device_run.sh $OUT
# Dry run on CPU (tiny shapes, fp32, same code paths): bash benchmarks/device_run.sh /tmp/out --tiny
# Steps and their time limits: 0. device checks 150 s, 1. model core 180 s, 2. profile 240 s.
set -uo pipefail
OUT=${1:-/tmp/solopo_device}; TINY=${2:-}
mkdir -p "$OUT"; export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
PY=${PYTHON:-python3}
if [ "$TINY" = "--tiny" ]; then
  SHAPE=small; SEQS=512,1024; LONGS=1024,2048; SHORT=256; MAXSTART=1024; MAXLIM=4096; DT=fp32
  OFFLOAD=false; CHECKS_FLAGS=--tiny
else
  SHAPE=qwen2.5-7b; SEQS=8192,32768,131072; LONGS=8192,16384,32768; SHORT=1024
  MAXSTART=16384; MAXLIM=262144; DT=bf16; OFFLOAD=true; CHECKS_FLAGS=
fi
$PY -c 'import sys, torch; from solopo_mcore.compat import MEGATRON_CORE_VERSION as m
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, megatron-core {m}")'
$PY - "$OUT" "$SHAPE" <<'PYEOF'
import json, sys
from solopo_mcore.models.reference_configs import QWEN25_7B_INSTRUCT
from benchmarks.bench_model_core import SMALL
cfg = dict(QWEN25_7B_INSTRUCT if sys.argv[2] == "qwen2.5-7b" else SMALL)
open(f"{sys.argv[1]}/config.json", "w").write(json.dumps(cfg))
PYEOF
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>/dev/null
# 0. GPU-only code paths: bf16 vs HF, lean MLP vs the fused SwiGLU, cuDNN/flash SDPA choice, CUDA allocator +
#    NVML, CUDA RNG checkpoint round trip, TE spec vs local when TE is importable
timeout 150 $PY benchmarks/device_checks.py --out "$OUT/device_checks.jsonl" $CHECKS_FLAGS 2>&1 \
  | grep -v "^\[checkpoint\]"
# 1. model core, 4 layers, vs HF
timeout 180 $PY benchmarks/bench_model_core.py --shape $SHAPE --layers 4 --seq $SEQS --dtype $DT \
  --iters 3 --out "$OUT/model_core.jsonl" 2>&1 | tee "$OUT/model_core.txt"
# 2. solo vs long on the full model, one GPU (long-PO unshared: the paper's baseline, what the
#    open H200 targets name; add long/shared to --modes for the strongest one, at more device time)
timeout 240 $PY -m torch.distributed.run --nproc-per-node 1 examples/profile_solopo.py --config tiny_cpu \
  --out "$OUT/profile" --long-lengths $LONGS --short-tokens $SHORT --response-tokens 256 \
  --steps 2 --find-max-len --max-len-start $MAXSTART --max-len-limit $MAXLIM \
  --max-len-granularity 8192 --modes solo,long/unshared \
  model.hf_config_path="$OUT/config.json" model.params_dtype=$DT \
  model.recompute_granularity=full parallel.tensor_model_parallel_size=1 \
  optimizer.optimizer_cpu_offload=$OFFLOAD 2>&1 | tail -n 40 | tee "$OUT/profile.txt"
# The GPU machine returns at most 8 files: pack the profiler's folder into one.
[ -d "$OUT/profile" ] && tar czf "$OUT/profile.tgz" -C "$OUT" profile && rm -r "$OUT/profile"
echo "device run finished"
