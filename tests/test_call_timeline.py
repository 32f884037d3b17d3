"""scripts/call_timeline.py refuses a case the bench suite does not have, or a cache format that is not fp8, naming
the argument and what it expected, before it touches a GPU; its tail is the last kernel's end after the decode
kernel's."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO, load_file


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "call_timeline.py"), *args], capture_output=True,
                          text=True, cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": ""}, timeout=120)


def test_an_unknown_case_is_refused_with_the_suite_cases() -> None:
    run = run_script("b8long", "nope:fp8_e4m3")
    assert run.returncode == 2, run.stderr
    assert "cases: expected suite case names" in run.stderr and "b8long" in run.stderr, run.stderr
    assert "'nope:fp8_e4m3'" in run.stderr, run.stderr


def test_a_cache_format_that_is_not_fp8_is_refused() -> None:
    run = run_script("4:bogus")
    assert run.returncode == 2, run.stderr
    assert "expected an fp8 cache format after the colon (fp8_e4m3, fp8_ds_mla), got '4:bogus'" in run.stderr


def test_the_tail_is_the_last_end_after_the_decode_kernel() -> None:
    tail = load_file("call_timeline", "scripts/call_timeline.py").tail
    assert tail({"mla_gen::narrow::decode_kernel": 43.7, "mla_gen::merge_kernel": 48.2}) == pytest.approx(4.5)
    assert tail({"mla_gen::plan_kernel": 2.0, "mla_gen::seesaw::decode_kernel": 27.0}) == 0.0
    assert tail({"mla_gen::merge_kernel": 3.0}) is None
