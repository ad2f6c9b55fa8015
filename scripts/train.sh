#!/usr/bin/env bash
# Usage: scripts/train.sh EXPERIMENT NORM --data DIR [--cpu | --cpu-workers N] [overrides...]   (NORM: a short name of the norm vocabulary, listed by --help). Runs configs/EXPERIMENT_NORM.yaml, scaled to this machine's world size; rerun to resume.
# Thin wrapper: the logic (and --help) is in powernorm_fairseq/pipeline/train.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PN_TRAIN_COMMAND="$0"  # named in the resume line printed on Ctrl-C
exec "$PYTHON" -m powernorm_fairseq.pipeline.train "$@"
