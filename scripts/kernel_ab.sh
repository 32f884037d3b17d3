#!/usr/bin/env bash
# Decode-kernel time (ncu, one launch after a warm one) of one shape for each template directory given, so a
# kernel edit can be timed against main before it is finished (an experiment copy may be wrong on purpose,
# e.g. with a phase removed; the bench would refuse to time it, ncu does not check). Each directory is a copy
# of templates/ (MLA_GEN_TEMPLATE_DIR), or a whole checkout (a folder with generator/ and templates/, e.g. a
# branch exported with `git archive BRANCH | tar -x -C DIR`: its Python side too, when a branch changes the
# shared-memory formula in generator/spec.py); "main" means this repository's own templates.
#   scripts/kernel_ab.sh main /tmp/exp_a /tmp/exp_b
#   SHAPE="--batch 4 --seqlen 65536 --heads 128" FAMILIES="seesaw wgmma" scripts/kernel_ab.sh main /tmp/exp_a
# scripts/ablate.py makes copies with one part of seesaw taken away (no-loads, no-softmax, ...) to time this way.
# Each run is cut off after KERNEL_AB_TIMEOUT seconds (default 120): a copy that deadlocks (an experiment
# that skips an mbarrier wait can) then costs that, not the device call, and the lines before it still print.
# The time is the median of KERNEL_AB_LAUNCHES profiled launches (default 5) after a warm one: one launch moves by
# 1-2 us between runs on 25-50 us kernels, more than the edits this script is for.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MLA_GEN_CACHE_DIR=${MLA_GEN_CACHE_DIR:-$PWD/.cache/mla_gen}
shape=${SHAPE:-"--batch 128 --seqlen 4096 --heads 128"}
limit=${KERNEL_AB_TIMEOUT:-120}
launches=${KERNEL_AB_LAUNCHES:-5}
repo=$PWD
for dir in "$@"; do
  root=$repo
  if [ "$dir" = main ]; then
    unset MLA_GEN_TEMPLATE_DIR
  elif [ -d "$dir/generator" ] && [ -d "$dir/templates" ]; then  # a checkout: its own Python side and templates
    unset MLA_GEN_TEMPLATE_DIR
    root=$(realpath "$dir")
  else
    export MLA_GEN_TEMPLATE_DIR=$(realpath "$dir")
  fi
  export PYTHONPATH=$root  # main and template copies: this checkout; a checkout: its own
  for family in ${FAMILIES:-seesaw wgmma}; do
    timeout "$limit" python "$repo/scripts/kernel_times.py" $shape --family "$family" --calls 1 >/dev/null ||
      { echo "$dir $family: failed or timed out"; continue; }
    t=$(timeout "$limit" ncu --clock-control none --metrics gpu__time_duration.sum -k regex:decode_kernel \
          -c "$launches" --launch-skip 1 python "$repo/scripts/kernel_times.py" $shape --family "$family" \
          --calls $((launches + 1)) 2>&1 |
        python3 -c 'import statistics, sys
rows = [l.split() for l in sys.stdin if "gpu__time_duration" in l]
v = sorted(float(r[-1].replace(",", "")) for r in rows)
print(f"{rows[0][-2]} {statistics.median(v):.2f} (median of {len(v)}, {v[0]:.2f}..{v[-1]:.2f})" if v else "")')
    echo "$dir $family $shape: decode kernel ${t:-not measured}"
  done
done
