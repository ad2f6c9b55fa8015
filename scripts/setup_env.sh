#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install powernorm-fairseq into it.
#
#   bash scripts/setup_env.sh            # venv in ./.venv (override with PN_VENV=/path)
#
# Why this is more than `pip install -e .`:
# * torch must be pinned to the CPU wheel (2.13.0 here); a bare `torch` pulls a multi-GB CUDA build.
# * fairseq-fixed has no wheel for Python 3.11 and builds from source (~5 min). It needs torch,
#   cython and numpy at build time, so it is built with --no-build-isolation (with isolation pip
#   installs a second torch into the build env). The built wheel is cached in
#   ${XDG_CACHE_HOME:-~/.cache}/powernorm-fairseq/wheels so a fresh clone installs in seconds.
# * A venv that already holds this exact dependency set (stamp file keyed by pyproject.toml's hash)
#   is reused as is.
set -euo pipefail
case "${1:-}" in
  -h|--help) echo "usage: bash scripts/setup_env.sh   (no arguments; environment: PYTHON, PN_VENV, PN_TORCH_SPEC)"
             sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
  "") ;;
  *) echo "[setup] error: unknown argument $1 (see --help)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${PN_VENV:-.venv}
TORCH_SPEC=${PN_TORCH_SPEC:-torch==2.13.0}
FAIRSEQ_SPEC=fairseq-fixed==0.12.3.1
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/powernorm-fairseq/wheels
stamp="$VENV/.powernorm-setup-$(cat pyproject.toml scripts/setup_env.sh | sha256sum | cut -c1-16)"

if [ -f "$stamp" ] && "$VENV/bin/python" -c "import fairseq, powernorm_fairseq" 2>/dev/null; then
  echo "[setup] reusing $VENV"
  exit 0
fi

if ! "$PY" -c 'import sys; sys.exit(not ((3, 11) <= sys.version_info[:2] < (3, 13)))'; then
  echo "[setup] error: need Python 3.11 or 3.12 (found $("$PY" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
  exit 1
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

echo "[setup] installing $TORCH_SPEC and build tools"
pip install -q "$TORCH_SPEC" cython numpy setuptools wheel

mkdir -p "$CACHE"
if ! ls "$CACHE"/fairseq_fixed-0.12.3.1-*.whl >/dev/null 2>&1; then
  echo "[setup] building $FAIRSEQ_SPEC from source (about 5 minutes, once; cached in $CACHE)"
  tmp=$(mktemp -d)
  pip wheel -q --no-build-isolation --no-deps -w "$tmp" "$FAIRSEQ_SPEC"
  mv "$tmp"/fairseq_fixed-*.whl "$CACHE"/
  rmdir "$tmp" 2>/dev/null || true
fi
echo "[setup] installing fairseq-fixed and powernorm-fairseq"
# The constraint keeps pip from swapping torch while resolving fairseq-fixed's dependencies.
cons=$(mktemp)
"$VENV/bin/python" -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > "$cons"
PIP_CONSTRAINT="$cons" pip install -q --find-links "$CACHE" "$FAIRSEQ_SPEC"
PIP_CONSTRAINT="$cons" pip install -q --no-build-isolation --find-links "$CACHE" -e ".[test]"
rm -f "$cons"
"$VENV/bin/python" -c "import fairseq, powernorm_fairseq; print('[setup] ok: fairseq', fairseq.__version__)"
rm -f "$VENV"/.powernorm-setup-*
touch "$stamp"
