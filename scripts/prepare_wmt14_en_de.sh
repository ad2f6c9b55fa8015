#!/usr/bin/env bash
# WMT14 en->de (europarl v7 + commoncrawl + news-commentary v12; newstest2013 valid, newstest2014 test), Moses -a tokenization, joint BPE 32764, binarize into data/wmt14_en_de/.
# Thin wrapper: the logic (and --help) is in powernorm_fairseq/pipeline/prepare/.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m powernorm_fairseq.pipeline.prepare wmt14_en_de "$@"
