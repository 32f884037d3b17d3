#!/usr/bin/env bash
# compute-sanitizer memcheck, racecheck, synccheck and initcheck over the reduced GPU matrix of
# scripts/sanitizer_driver.py (every family the device runs), one sanitized process per tool. Logs
# go under $OUT (default /tmp/mla_gen_out); one summary line per tool; exit 1 unless every tool is
# clean: 0 errors, the driver's results right, and for racecheck 0 hazards, warnings included.
#   scripts/sanitizer.sh [--family F]... [TOOL...]
#     TOOL: memcheck racecheck synccheck initcheck (default all four); F: a kernel family (default every
#     family the device runs), to narrow a slow run
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MLA_GEN_CACHE_DIR=${MLA_GEN_CACHE_DIR:-$PWD/.cache/mla_gen}
OUT=${OUT:-/tmp/mla_gen_out}; mkdir -p "$OUT"
tools=() driver_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --family) driver_args+=(--family "$2"); shift 2 ;;
    *) tools+=("$1"); shift ;;
  esac
done
[ ${#tools[@]} -eq 0 ] && tools=(memcheck racecheck synccheck initcheck)
command -v compute-sanitizer >/dev/null || { echo "sanitizer.sh: compute-sanitizer is not on PATH" >&2; exit 2; }

# Build outside the sanitizer, in parallel; under it a cache miss raises instead of compiling.
ids=$(python scripts/sanitizer_driver.py --ids "${driver_args[@]}") || exit 2
build_args=()
for id in $ids; do build_args+=(--id "$id"); done
if ! python -m generator build "${build_args[@]}" -j 8 >"$OUT/sanitizer_build.log" 2>&1; then
  tail -40 "$OUT/sanitizer_build.log"; exit 1
fi
export MLA_GEN_DISABLE_JIT=1
export PYTORCH_NO_CUDA_MEMORY_CACHING=1  # a tensor per allocation, so memcheck sees overruns past its end

status=0
for tool in "${tools[@]}"; do
  extra=()
  [ "$tool" = racecheck ] && extra=(--racecheck-report all)
  log="$OUT/sanitizer_$tool.log"
  start=$SECONDS
  compute-sanitizer --tool "$tool" --error-exitcode 1 "${extra[@]}" python scripts/sanitizer_driver.py \
    "${driver_args[@]}" >"$log" 2>&1
  rc=$?
  line=$(python scripts/sanitizer_driver.py --summary "$tool" "$log" "$rc") || status=1
  echo "$line; $((SECONDS - start)) s; log $log" | tee -a "$OUT/sanitizer_summary.txt"
done
exit $status
