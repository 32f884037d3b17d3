#!/usr/bin/env bash
# One device call (see README, "GPU"): build the variants the GPU tests need in parallel, then run
# what is asked. Logs go under $OUT (the device tool brings them back).
#   scripts/gpu_session.sh build            only the builds (and their ptxas summary)
#   scripts/gpu_session.sh test [ARGS...]   builds, then python -m pytest -m gpu ARGS
#   scripts/gpu_session.sh bench [ARGS...]  builds, then python -m mla_gen.bench ARGS
#   scripts/gpu_session.sh all [ARGS...]    builds, pytest -m gpu, the sanitizer (scripts/sanitizer.sh), the serve
#                                           example, then the bench with ARGS; every log packed into
#                                           $OUT/logs.tar.gz (the device returns at most 8 files), the summary
#                                           lines in $OUT/summary.txt
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MLA_GEN_CACHE_DIR=${MLA_GEN_CACHE_DIR:-$PWD/.cache/mla_gen}
export NCCL_NVLS_ENABLE=0
OUT=${OUT:-/tmp/mla_gen_out}; mkdir -p "$OUT"
what=${1:-test}; shift || true
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader | tee "$OUT/gpu.txt"
families=$(python -c "from generator.select import families_for; from generator.spec import Arch; print(' '.join('--family '+f.value for f in families_for(Arch.SM90A)))")
start=$SECONDS
for dims in "512 64" "256 32"; do
  for dtype in bf16 fp16; do
    read -r ckv rope <<<"$dims"
    python -m generator build --heads 1 16 20 40 64 128 --ckv "$ckv" --rope "$rope" --dtype "$dtype" \
      $families --s-q 1 2 --arch sm_90a -j 4 >>"$OUT/build.log" 2>&1 &
  done
done
wait
echo "builds: $((SECONDS - start)) s, $(grep -c FAILED "$OUT/build.log") failed" | tee "$OUT/summary.txt"
grep -A8 FAILED "$OUT/build.log" | head -60
python - <<'PY' | tee -a "$OUT/summary.txt"
import glob, json
for m in sorted(glob.glob(".cache/mla_gen/sm90a/*/meta.json")):
    d = json.load(open(m))
    k = next(p for p in d["ptxas"] if p["function"] == "decode_kernel")
    print(f"{d['variant_id']}: {k['registers']} regs, spill {k['spill_stores']}/{k['spill_loads']} B, {d['build_seconds']} s")
PY
# A kernel that hangs (an mbarrier or setmaxnreg waiting forever) would take the whole device call: with
# pytest-timeout present, a test past 300 s stops the run with every thread's stack (the thread method: a hung
# CUDA call never returns to Python for a signal to land).
hang_limit=$(python -c "import pytest_timeout" 2>/dev/null && echo "--timeout 300 --timeout-method thread")
case "$what" in
  build) ;;
  test) python -m pytest -m gpu -q -p no:cacheprovider $hang_limit "$@" >"$OUT/pytest.log" 2>&1
        rc=$?; tail -40 "$OUT/pytest.log"; echo "pytest exit status $rc" | tee -a "$OUT/summary.txt"; exit $rc ;;
  bench) python -m mla_gen.bench "$@" 2>&1 | tee "$OUT/bench.log" ;;
  all) logs="$OUT/logs"; mkdir -p "$logs"
       python -m pytest -m gpu -q -p no:cacheprovider $hang_limit >"$logs/pytest.log" 2>&1
       echo "pytest -m gpu: $(tail -1 "$logs/pytest.log")" | tee -a "$OUT/summary.txt"
       OUT="$logs" scripts/sanitizer.sh 2>&1 | tee -a "$OUT/summary.txt"
       python examples/serve_decode.py >"$logs/serve.log" 2>&1
       tail -4 "$logs/serve.log" | tee -a "$OUT/summary.txt"
       python -m mla_gen.bench "$@" --json "$logs/bench.json" >"$logs/bench.log" 2>&1
       tail -60 "$logs/bench.log"
       tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs build.log && rm -rf "$logs" "$OUT/build.log" ;;
  *) echo "unknown step $what" >&2; exit 2 ;;
esac
