#!/usr/bin/env bash
# GPU check in one command (issue #13): on a machine with a CUDA GPU,
#   1. runs every norm, model and fold test that has a CUDA variant, on CUDA only
#      (PN_TEST_DEVICES=cuda, pytest -k cuda): fp32 everywhere, fp16 and bf16 where the tests
#      cast (test_half_*, test_cuda_matches_cpu, test_training_steps_in_each_precision);
#   2. runs benchmarks/norm_speed.py --device cuda (every norm vs torch.nn.LayerNorm);
#   3. writes a record folder results/benchmarks/device_check_<UTC time>/ (never overwritten):
#      tests.log, tests.xml (JUnit), norm_speed_cuda.json, norm_speed_cuda.log, record.json.
# Budget: about 8 minutes on one GPU (tests <= 5 min, benchmark <= 2.5 min, both hard-limited).
# Without a GPU it exits with status 3 and says so; it never needs one to be installed.
#
# Usage: bash scripts/device_check.sh            (PYTHON=... to pick the interpreter)
set -uo pipefail
case "${1:-}" in
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    "") ;;
    *) echo "device_check: unknown argument '$1' (it takes none; see --help)" >&2; exit 2 ;;
esac
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ]; then
    echo "device_check: $PY not found; run 'bash scripts/setup_env.sh' first or set PYTHON" >&2
    exit 2
fi
if ! gpu=$("$PY" -c 'import sys, torch
if not torch.cuda.is_available():
    sys.exit(1)
print(torch.cuda.get_device_name(0))' 2>/dev/null); then
    echo "device_check: no CUDA GPU on this machine (torch.cuda.is_available() is False):" \
         "nothing checked, no record written. Run this on a machine with a GPU." >&2
    exit 3
fi

stamp=$(date -u +%Y%m%dT%H%M%SZ)
out=results/benchmarks/device_check_$stamp
if [ -e "$out" ]; then
    echo "device_check: $out exists; not overwriting it (rerun in a second)" >&2
    exit 2
fi
tmp=$(mktemp -d "results/benchmarks/.device_check_$stamp.XXXX")
trap 'rm -rf "$tmp"' EXIT
start=$(date +%s)
echo "device_check: $gpu; record $out"

PN_TEST_DEVICES=cuda OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} timeout 300 \
    "$PY" -m pytest -q -rs -p no:cacheprovider -k cuda --junitxml="$tmp/tests.xml" \
    tests/test_norms.py tests/test_norms_numerics.py tests/test_fold.py \
    tests/test_fold_fairseq.py tests/test_fairseq_models.py 2>&1 | tee "$tmp/tests.log"
tests_rc=${PIPESTATUS[0]}

timeout 150 "$PY" benchmarks/norm_speed.py --device cuda --shapes 64x64x512 128x32x1024 \
    --pad 0 0.3 --reps 30 --out "$tmp/norm_speed_cuda.json" 2>&1 | tee "$tmp/norm_speed_cuda.log"
bench_rc=${PIPESTATUS[0]}

record_rc=0
"$PY" - "$tmp" "$gpu" "$tests_rc" "$bench_rc" "$start" <<'EOF'
import json, os, subprocess, sys, time
import xml.etree.ElementTree as ET
import torch
tmp, gpu, tests_rc, bench_rc, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
def git(*args):
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True).stdout.strip()
    except OSError:
        return None
tests = None
try:
    suites = ET.parse(os.path.join(tmp, "tests.xml")).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    tests = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    tests["passed"] = tests["tests"] - tests["failures"] - tests["errors"] - tests["skipped"]
except (OSError, ET.ParseError, AttributeError):
    pass
record = {
    "what": "scripts/device_check.sh: CUDA tests (pytest -k cuda, PN_TEST_DEVICES=cuda) and "
            "benchmarks/norm_speed.py --device cuda",
    "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
    "commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain")),
    "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    "wall_s": round(time.time() - start, 1),
    "tests_exit_code": tests_rc, "tests": tests,
    "benchmark_exit_code": bench_rc, "benchmark": "norm_speed_cuda.json",
    "exit_124_means": "hit its time limit (tests 300 s, benchmark 150 s)",
}
with open(os.path.join(tmp, "record.json"), "w") as f:
    json.dump(record, f, indent=1)
print(json.dumps(record, indent=1))
EOF
[ $? -eq 0 ] || { record_rc=1; echo "device_check: record.json could not be written" >&2; }
mv "$tmp" "$out" && trap - EXIT
echo "device_check: wrote $out (tests exit $tests_rc, benchmark exit $bench_rc)"
[ "$tests_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$record_rc" -eq 0 ]
