#!/usr/bin/env bash
# The GPU check (issue 17): one command, at most 9.2 minutes (550 s) on an H100/H200, no network,
# the machine's own torch; every stage under its own time limit, a failed stage logged and
# the next one run; results appended as they are taken, all of them in DIR (five files).
#
#   bash benchmarks/gpu_suite.sh --out "$OUT"          # GPU
#   bash benchmarks/gpu_suite.sh --out DIR --smoke     # CPU, tiny sizes: every stage end to end
#   bash benchmarks/gpu_suite.sh --out DIR --stages kernel_timing,host_overhead
#
# Stages, budget and files: benchmarks/gpu_suite.py. Nothing is installed into the
# environment and nothing is written into the repository. PYTHON picks the interpreter.
# A relative --out is the caller's, not the repository's: made absolute before the cd below.
caller="$PWD"
absolute() { case "$1" in /*) printf '%s' "$1" ;; *[![:space:]]*) printf '%s/%s' "$caller" "$1" ;; *) printf '%s' "$1" ;; esac; }
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) args+=("$1"); shift; [ $# -gt 0 ] && { args+=("$(absolute "$1")"); shift; } ;;
    --out=*) args+=("--out=$(absolute "${1#--out=}")"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done
cd "$(dirname "$0")/.." || exit 2
export PYTHONDONTWRITEBYTECODE=1
py="${PYTHON:-$(command -v python || command -v python3)}"
exec "$py" -m benchmarks.gpu_suite "${args[@]}"
