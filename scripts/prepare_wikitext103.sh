#!/usr/bin/env bash
# WikiText-103 (tokenized v1) for language modelling: fetch (or --from DIR), binarize into data/wikitext103/.
# Thin wrapper: the logic (and --help) is in powernorm_fairseq/pipeline/prepare/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m powernorm_fairseq.pipeline.prepare wikitext103 "$@"
