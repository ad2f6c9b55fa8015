#!/usr/bin/env bash
# Multi30k de->en: fetch (or --from DIR, e.g. ../shared/data/multi30k), Moses-tokenize, lowercase, joint BPE 8k, binarize into data/multi30k/ (or --out DIR).
# Thin wrapper: the logic (and --help) is in powernorm_fairseq/pipeline/prepare/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m powernorm_fairseq.pipeline.prepare multi30k "$@"
