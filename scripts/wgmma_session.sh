#!/usr/bin/env bash
# One device call for the wgmma family: parallel builds, the correctness ladder, the family's GPU
# tests (time-boxed), attribution probes over template variants (wgexp/), and the bench against mma.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 MLA_GEN_CACHE_DIR=${MLA_GEN_CACHE_DIR:-$PWD/.cache/mla_gen}
OUT=${OUT:-/tmp/mla_gen_out}; mkdir -p "$OUT"
TEST_S=${TEST_S:-150}; BENCH_CASES=${BENCH_CASES:-1,2,3,4,5,6,minicpm3}; ITERS=${ITERS:-20}; TEST_K=${TEST_K:-wgmma}
PROBES=${PROBES:-}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv,noheader
start=$SECONDS
for dims in "512 64" "256 32"; do for dtype in bf16 fp16; do
  read -r ckv rope <<<"$dims"
  python -m generator build --heads 1 16 20 40 64 128 --ckv "$ckv" --rope "$rope" --dtype "$dtype" \
    --family wgmma --arch sm_90a -j 4 >>"$OUT/build.log" 2>&1 &
done; done
python -m generator build --heads 16 128 --ckv 512 --rope 64 --family mma --arch sm_90a -j 2 >>"$OUT/build.log" 2>&1 &
python -m generator build --heads 40 --ckv 256 --rope 32 --family mma --family wgmma --arch sm_90a -j 2 >>"$OUT/build.log" 2>&1 &
# probe variants: NAME=DIR (a folder holding wgmma.cuh) or NAME=+MACRO[:VALUE] (the working tree's wgmma.cuh with
# MACRO defined as VALUE, default 1)
for spec in $PROBES; do
  name=${spec%%=*}; what=${spec#*=}; dir=/tmp/tpl_$name; rm -rf "$dir"; cp -r templates "$dir"
  if [[ $what == +* ]]; then
    m=${what#+}; v=1; [[ $m == *:* ]] && { v=${m#*:}; m=${m%%:*}; }
    sed -i "1i #define $m $v" "$dir/wgmma.cuh"
  else cp "$what/wgmma.cuh" "$dir/wgmma.cuh"; fi
  MLA_GEN_TEMPLATE_DIR=$dir python -m generator build --heads 16 128 --ckv 512 --rope 64 --family wgmma --arch sm_90a \
    >>"$OUT/build_probe.log" 2>&1 &
done
wait
echo "builds: $((SECONDS - start)) s, $(grep -c FAILED "$OUT/build.log" "$OUT/build_probe.log" 2>/dev/null | tr '\n' ' ') failed"
grep -A20 FAILED "$OUT/build.log" | head -40
python scripts/family_check.py --family wgmma 2>&1 | tee "$OUT/check.log"
echo "== tests"
timeout "$TEST_S" python -m pytest -m gpu -q -x -p no:cacheprovider tests/test_decode_gpu.py tests/test_layer_gpu.py tests/test_readme_gpu.py tests/test_tp_decode.py -k "$TEST_K" 2>&1 \
  | tee "$OUT/pytest.log" | tail -8
echo "== probes"
if [[ -n "$PROBES" && ${PROBE_WITH:-bench} == probe ]]; then
  python scripts/family_probe.py --family wgmma --label tree --cases ${PROBE_CASES:-2,3} 2>&1 | tee -a "$OUT/probe.log"
fi
for spec in $PROBES; do
  name=${spec%%=*}
  if [[ ${PROBE_WITH:-bench} == probe ]]; then  # unchecked timing (for kernels that skip work on purpose)
    MLA_GEN_TEMPLATE_DIR=/tmp/tpl_$name python scripts/family_probe.py --family wgmma --label "$name" \
      --cases ${PROBE_CASES:-2,3} 2>&1 | tee -a "$OUT/probe.log"
  else  # the bench (checked, L2 flushed) on the variant's templates
    MLA_GEN_TEMPLATE_DIR=/tmp/tpl_$name timeout 120 python -m mla_gen.bench --families wgmma --cases ${PROBE_CASES:-2,3} \
      --iters "$ITERS" > "$OUT/bench_$name.log" 2>&1
    echo "variant $name:"; grep "mla-gen:wgmma" "$OUT/bench_$name.log" | grep -v "^  " | cut -c1-100
  fi
done
echo "== bench"
timeout ${BENCH_S:-200} python -m mla_gen.bench --families wgmma,mma --cases "$BENCH_CASES" --iters "$ITERS" ${BENCH_EXTRA:-} \
  --json "$OUT/bench.json" 2>&1 | tee "$OUT/bench.log" | tail -${BENCH_TAIL:-26}
echo "total $((SECONDS - start)) s"
