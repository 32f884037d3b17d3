#!/usr/bin/env bash
# One device call for the wgmma family: parallel builds, the correctness ladder, the family's GPU
# tests (time-boxed), and the bench against mma. Logs under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MLA_GEN_CACHE_DIR=${MLA_GEN_CACHE_DIR:-$PWD/.cache/mla_gen}
OUT=${OUT:-/tmp/mla_gen_out}; mkdir -p "$OUT"
TEST_S=${TEST_S:-150}; BENCH_CASES=${BENCH_CASES:-1,2,3,4,5,6}; ITERS=${ITERS:-20}; TEST_K=${TEST_K:-wgmma}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
start=$SECONDS
for dims in "512 64" "256 32"; do for dtype in bf16 fp16; do
  read -r ckv rope <<<"$dims"
  python -m generator build --heads 1 16 20 40 64 128 --ckv "$ckv" --rope "$rope" --dtype "$dtype" \
    --family wgmma --arch sm_90a -j 4 >>"$OUT/build.log" 2>&1 &
done; done
python -m generator build --heads 16 128 --ckv 512 --rope 64 --family mma --arch sm_90a -j 2 >>"$OUT/build.log" 2>&1 &
python -m generator build --heads 40 --ckv 256 --rope 32 --family mma --family wgmma --arch sm_90a -j 2 >>"$OUT/build.log" 2>&1 &
wait
echo "builds: $((SECONDS - start)) s, $(grep -c FAILED "$OUT/build.log") failed"
grep -A20 FAILED "$OUT/build.log" | head -40
python scripts/family_check.py --family wgmma 2>&1 | tee "$OUT/check.log"
echo "== bench"
timeout 200 python -m mla_gen.bench --families wgmma,mma --cases "$BENCH_CASES" --iters "$ITERS" ${BENCH_EXTRA:-} \
  --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -30
echo "== tests"
timeout "$TEST_S" python -m pytest -m gpu -q -x -p no:cacheprovider tests/test_decode_gpu.py -k "$TEST_K" 2>&1 \
  | tee "$OUT/pytest.log" | tail -25
echo "total $((SECONDS - start)) s"
