"""The host-side check that skips the merge kernel's launch (templates/common.cuh merge_may_have_work)
decides as its Python mirror (mla_gen.schedule), whose safety tests/test_schedule.py checks against the
planner: compiled with nvcc (host code only, no GPU needed) and run over random launch parameters."""
from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest

from conftest import REPO
from mla_gen.schedule import PlanConfig, merge_may_have_work

PROGRAM = r"""
#include <cstdio>
#include "common.cuh"
int main() {
  mla_gen::DecodeParams p;
  int block_n;
  while (std::scanf("%d %d %d %d %d %d %d", &p.batch, &p.max_pages, &p.page_size, &p.num_parts, &p.fixed_cost,
                    &p.min_part_cost, &block_n) == 7)
    std::printf("%d\n", mla_gen::merge_may_have_work(p, block_n) ? 1 : 0);
}
"""


@pytest.mark.needs_nvcc
def test_kernel_check_matches_the_python_mirror(tmp_path: Path) -> None:
    from generator.toolchain import toolchain

    src, exe = tmp_path / "merge_skip.cu", tmp_path / "merge_skip"
    src.write_text(PROGRAM)
    subprocess.run([str(toolchain().nvcc), "-std=c++17", "-arch=sm_80", f"-I{REPO / 'templates'}", str(src), "-o",
                    str(exe)], check=True, capture_output=True)
    rng = random.Random(5)
    rows = []
    for _ in range(300):
        page = rng.choice([1, 16, 64])
        rows.append((rng.randint(1, 300), rng.randint(1, 2048 // page), page, rng.choice([1, 4, 5, 66, 132, 2048]),
                     rng.choice([1, 2, 4]), rng.choice([1, 5, 6, 10]), rng.choice([32, 64])))
    got = subprocess.run([str(exe)], input="\n".join(" ".join(map(str, r)) for r in rows), capture_output=True,
                         text=True, check=True).stdout.split()
    want = [str(int(merge_may_have_work(b, PlanConfig(block_n=n, num_parts=parts, fixed_cost=fixed,
                                                        min_part_cost=mpc, page_size=page, max_pages=pages))))
            for b, pages, page, parts, fixed, mpc, n in rows]
    assert got == want
    assert "0" in got and "1" in got
