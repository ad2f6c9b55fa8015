#!/usr/bin/env bash
# IWSLT14 de->en as the paper (fairseq's prepare-iwslt14.sh): tokenize, lowercase, clean, valid = every 23rd pair, joint BPE 10k, binarize into data/iwslt14/.
# Thin wrapper: the logic (and --help) is in powernorm_fairseq/pipeline/prepare/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m powernorm_fairseq.pipeline.prepare iwslt14 "$@"
