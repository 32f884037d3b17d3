"""scripts/call_timeline.py refuses a case the bench suite does not have, or a cache format that is not fp8, naming
the argument and what it expected, before it touches a GPU."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


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
