#!/usr/bin/env bash
# Install everything into .venv, then run the quickstart: synthetic shards, two-process CPU training of the tiny
# model, patch-inference evaluation into the embedded MLflow store, prediction and training-curve pictures.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
exec .venv/bin/python scripts/quickstart.py "$@"
