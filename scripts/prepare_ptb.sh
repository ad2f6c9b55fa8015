#!/usr/bin/env bash
# Penn Treebank (Mikolov's 10k-vocabulary version) for language modelling: fetch (or --from DIR, e.g. ../shared/data/ptb), binarize into data/ptb/.
# Thin wrapper: the logic (and --help) is in powernorm_fairseq/pipeline/prepare/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m powernorm_fairseq.pipeline.prepare ptb "$@"
