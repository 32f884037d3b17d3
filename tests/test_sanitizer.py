"""compute-sanitizer over the reduced GPU matrix (scripts/sanitizer.sh, scripts/sanitizer_driver.py).

On the CPU: the matrix covers what issue 16 asks of it and its schedules split as their names say
(by the host planner), and the log summary counts every error and every racecheck hazard. On a GPU,
`python -m pytest -m sanitizer` runs each tool once over the matrix and wants it clean."""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, load_file
from generator.select import families_for
from generator.spec import FP8_FAMILIES, Arch, DType, Family
from mla_gen.schedule import INLINE_MERGE_SPLITS, PlanConfig, plan
from mla_gen.testing import LSE_TOL, LSE_TOL_QUANTIZED_Q

SCRIPT = REPO / "scripts" / "sanitizer.sh"


def driver():
    return load_file("sanitizer_driver", "scripts/sanitizer_driver.py")


@pytest.mark.parametrize("arch", [Arch.SM90A, Arch.SM80], ids=lambda a: a.nvcc_name)
def test_matrix_covers_every_family_and_factor_pair(arch: Arch) -> None:
    cases = driver().cases(arch)
    assert {c.family for c in cases} == set(families_for(arch))
    factors = {"heads": lambda c: c.heads, "dims": lambda c: (c.ckv, c.rope), "page": lambda c: c.page,
               "s_q": lambda c: c.s_q, "split": lambda c: c.split}
    for family in families_for(arch):
        mine = [c for c in cases if c.family is family]
        for (na, fa), (nb, fb) in itertools.combinations(factors.items(), 2):
            assert len({(fa(c), fb(c)) for c in mine}) == 4, (family, na, nb)
        assert {c.heads for c in mine} == {16, 128} and {(c.ckv, c.rope) for c in mine} == {(512, 64), (256, 32)}
        assert {c.combined for c in mine} == {True, False}
    lengths = {n for c in cases for n in c.lengths}
    assert {1, 63, 64, 65} <= lengths and all(len(set(c.lengths)) == len(c.lengths) >= 3 for c in cases)
    assert all(min(c.lengths) >= c.s_q for c in cases)


@pytest.mark.parametrize("arch", [Arch.SM90A, Arch.SM80], ids=lambda a: a.nvcc_name)
def test_split_cases_split_and_unsplit_cases_do_not(arch: Arch) -> None:
    """By the host planner (the device planner's twin, compared in the GPU tests); the run checks the device's."""
    sd = driver()
    for case in sd.cases(arch):
        d = case.decision(arch)
        cfg = PlanConfig(block_n=d.spec.tile.block_n, num_parts=d.num_parts, fixed_cost=d.fixed_cost,
                         min_part_cost=d.min_part_cost, s_q=case.s_q, page_size=case.page)
        splits = [n for _, n, _, _ in plan(case.lengths, cfg).req_info]
        assert sd.splits_as_named(case, splits), (case, splits)


def test_inline_merge_bound_is_the_kernels() -> None:
    text = (REPO / "templates" / "common.cuh").read_text()
    assert f"constexpr int kInlineMergeSplits = {INLINE_MERGE_SPLITS};" in text
    assert driver().INLINE_MERGE_SPLITS == INLINE_MERGE_SPLITS


def test_case_names_start_with_the_variant_id() -> None:
    sd = driver()
    for case in sd.cases(Arch.SM90A):
        vid = case.decision(Arch.SM90A).spec.variant_id
        assert case.name(Arch.SM90A).startswith(vid + f"-p{case.page}-sq{case.s_q}-")


def test_lse_bound_of_a_case_is_the_gpu_tests() -> None:
    """A kernel that quantizes q (narrow over fp8) gets the GPU tests' looser lse bound (tests/test_fp8_gpu.py
    check), every other case the 16-bit one: the driver failed narrow's correct fp8 cases at lse max abs 3.5e-3
    against 2e-3."""
    sd, arch = driver(), Arch.SM90A
    cases = sd.cases(arch)
    quantizing = [c for c in cases if c.decision(arch).spec.quantizes_q]
    assert quantizing, "no case of the matrix quantizes q"
    for case in cases:
        want = LSE_TOL_QUANTIZED_Q if case.decision(arch).spec.quantizes_q else LSE_TOL
        assert sd.lse_tol(case, arch) == want, case.name(arch)


def test_seesaws_fp8_case_runs_under_every_tool() -> None:
    """seesaw reads fp8_e4m3 (its e4m3 tensor-core path, templates/seesaw_e4m3.cuh): one case, under every tool
    (racecheck too, since no converter warp reads bytes the TMA wrote over the consumers' stores)."""
    sd = driver()
    seesaw_fp8 = [c for c in sd.cases(Arch.SM90A) if c.family is Family.SEESAW and c.kv is not DType.BF16]
    assert [c.kv for c in seesaw_fp8] == [DType.FP8_E4M3]


def test_list_and_ids_need_no_cuda() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    run = [sys.executable, str(REPO / "scripts" / "sanitizer_driver.py")]
    listed = subprocess.run([*run, "--list", "--arch", "sm_90a"], env=env, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    fp8_families = [f for f in families_for(Arch.SM90A) if f in FP8_FAMILIES]
    lines = listed.stdout.splitlines()
    # each fp8 family's fp8_e4m3 case, and its fp8_ds_mla case where it reads that format (not seesaw)
    assert len(lines) == 8 * len(families_for(Arch.SM90A)) + 2 * len(fp8_families) - 1
    assert sum("_fp8e4m3_" in ln for ln in lines) == len(fp8_families)
    assert sum("_fp8dsmla_" in ln for ln in lines) == len(fp8_families) - 1
    assert not any("_fp8dsmla_seesaw_" in ln for ln in lines)
    ids = subprocess.run([*run, "--ids", "--arch", "sm_90a"], env=env, capture_output=True, text=True, timeout=60)
    assert ids.returncode == 0, ids.stderr
    assert {line.split("_")[7] for line in ids.stdout.split()} == {f.value for f in Family}
    # heads x dims (each with one s_q) per family, and each fp8 case its own variant
    assert len(ids.stdout.split()) == 4 * len(families_for(Arch.SM90A)) + 2 * len(fp8_families) - 1


CLEAN_TAIL = "ok   case\nsanitizer_driver: 24/24 cases ok\n========= ERROR SUMMARY: 0 errors\n"


@pytest.mark.parametrize("tool, log, rc, clean, words", [
    ("memcheck", CLEAN_TAIL, 0, True, ["0 errors", "24/24 cases ok"]),
    ("memcheck", CLEAN_TAIL.replace("0 errors", "3 errors"), 1, False, ["3 errors"]),
    ("racecheck", CLEAN_TAIL + "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n", 0,
     True, ["0 hazards"]),
    # the probe: warnings only, ERROR SUMMARY 0, exit 0; still not clean
    ("racecheck", CLEAN_TAIL + "========= RACECHECK SUMMARY: 6 hazards displayed (0 errors, 6 warnings)\n", 0,
     False, ["6 hazards (0 errors, 6 warnings)"]),
    ("racecheck", CLEAN_TAIL + "========= RACECHECK SUMMARY: 2 races\n", 0, False, ["cannot read"]),
    ("racecheck", CLEAN_TAIL, 0, True, ["0 errors"]),  # no hazard at all: no RACECHECK SUMMARY line
    # compute-sanitizer 2025 (CUDA 13, H200) with --racecheck-report all: no ERROR SUMMARY, only these tails
    ("racecheck", "sanitizer_driver: 8/8 cases ok\n========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, "
     "0 warnings)\n", 0, True, ["0 hazards (0 errors, 0 warnings)", "8/8 cases ok"]),
    ("racecheck", "sanitizer_driver: 40/40 cases ok\n========= RACECHECK SUMMARY: 100 hazards displayed (608219 "
     "errors, 0 warnings)\n", 1, False, ["100 hazards (608219 errors, 0 warnings)"]),
    ("synccheck", "sanitizer_driver: 23/24 cases ok\n========= ERROR SUMMARY: 0 errors\n", 1, False, ["23/24"]),
    ("initcheck", "Traceback ... killed\n", 137, False, ["no ERROR SUMMARY", "driver did not finish", "exit 137"]),
])
def test_summary_counts_errors_hazards_and_results(tool, log, rc, clean, words) -> None:
    ok, line = driver().summarize(tool, log, rc)
    assert ok is clean and line.startswith(f"{tool}: {'clean' if clean else 'FAILED'}: "), line
    assert all(w in line for w in words), line


@pytest.mark.sanitizer
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck", "initcheck"])
def test_sanitizer_tool_is_clean(tool: str, tmp_path) -> None:
    if shutil.which("compute-sanitizer") is None:
        pytest.skip("compute-sanitizer is not on PATH")
    env = {**os.environ, "OUT": os.environ.get("OUT") or str(tmp_path)}
    proc = subprocess.run(["bash", str(SCRIPT), tool], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{tool}: clean: " in proc.stdout
