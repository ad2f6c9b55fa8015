#!/usr/bin/env bash
# Usage: scripts/evaluate_ppl.sh --data data/<corpus> --checkpoint CKPT   fairseq-eval-lm test perplexity, JSON record beside the checkpoint.
# Thin wrapper: the logic (and --help) is in powernorm_fairseq/pipeline/evaluate.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m powernorm_fairseq.pipeline.evaluate ppl "$@"
