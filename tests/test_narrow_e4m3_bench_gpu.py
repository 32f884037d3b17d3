"""narrow over fp8_e4m3 under the bench's call sequence, which the matrix does not make: a 16-bit narrow
wrapper's calls, then the fp8 wrapper's first call into a NaN-filled out and many replayed calls
(replan=False) with an L2 flush between them, on case 1 (B128 S4096 H16, 64 tiles a CTA). With its ring of
3 stages shared by two consumer warpgroups, a warpgroup two tiles ahead could pass the full barrier's parity
wait for a stage whose previous tile (the other warpgroup's) had not landed yet, read it and free it early:
`unspecified launch failure` in `python -m mla_gen.bench`, and in 400 such replays (PERF.md, seventeenth
session); the matrix's shorter runs never hit it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from generator.spec import DType, Family
from mla_gen.bench.cases import default_suite
from mla_gen.bench.impls import build_inputs, prepare_mlagen, quantize

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

REPO = Path(__file__).resolve().parents[1]


def case_1():
    return next(c for c in default_suite() if c.name == "1")


def test_replayed_calls_after_a_16_bit_wrapper_stay_clean_and_equal() -> None:
    case = case_1()
    inp = build_inputs(case, torch.device("cuda"))
    bf16 = prepare_mlagen(Family.NARROW, inp, case)
    for _ in range(3):
        bf16.run()
    fp8 = prepare_mlagen(Family.NARROW, inp, case, fp8=quantize(inp, DType.FP8_E4M3))
    first = fp8.check_run().clone()  # a NaN-filled out, the planner on the GPU
    flush = torch.empty(256 << 20, dtype=torch.uint8, device="cuda")
    for _ in range(400):
        flush.zero_()  # an L2 flush between calls, by a write as the bench flushed when the race showed
        last = fp8.run()
    torch.cuda.synchronize()  # a launch failure raises here
    assert not first.isnan().any(), "the first call left NaN in out"
    assert torch.equal(last, first), "a replayed call (the same work list) gave another result"


def test_the_bench_times_narrow_fp8_on_case_1_without_an_error() -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH", "")])))
    r = subprocess.run([sys.executable, "-m", "mla_gen.bench", "--cases", "1", "--kv-dtype", "fp8_e4m3",
                        "--families", "narrow", "--iters", "20"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
    text = r.stdout + r.stderr
    assert r.returncode == 0, text[-3000:]
    rows = [line for line in text.splitlines() if line.startswith("  mla-gen:")]
    assert any("narrow[fp8_e4m3]:" in line for line in rows), text[-3000:]
    assert not [line for line in rows if "error" in line], "\n".join(rows)
