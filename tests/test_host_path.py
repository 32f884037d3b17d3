"""The host path of a call (mla_gen.api, issue 12), on CPU with a launcher that launches nothing
(mla_gen.bench.host): a call whose inputs' structure passed once skips the structural checks, and any
change of shape, stride, dtype, device or alignment (even in place, on the same tensor objects) raises
exactly the error an uncached call raises; the launcher gets each call's own pointers; the bench's host
section and spin check format and serialize. GPU: run() and mla_decode() equal the reference across
cached calls with changing inputs, and the host figures print (no timed assertions)."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mla_gen.api as api
from conftest import REPO
from mla_gen.bench.cases import default_suite, work
from mla_gen.bench.host import FakeLauncher, FakeParams, cpu_host_times, cpu_inputs, fake_host, fake_wrapper
from mla_gen.bench.report import (HostTimes, Timing, format_table, json_document, make_record, read_host,
                                  spin_lines)
from mla_gen.bench.roofline import Ceilings
from mla_gen.testing import make_inputs, outcome

ARG_NAMES = ("q_nope", "q_pe", "ckv_cache", "kpe_cache", "block_table", "cache_seqlens")


@pytest.fixture
def fake():
    """(inputs [5, 70] tokens, 4 heads, page 16; the wrapper; its launcher), inside fake_host()."""
    inp = make_inputs([5, 70], heads=4, page_size=16, generator=torch.Generator().manual_seed(0))
    with fake_host():
        launcher = FakeLauncher()
        launcher.record = True
        wrapper = fake_wrapper(inp, launcher)
        try:
            yield inp, wrapper, launcher
        finally:
            api._WRAPPERS.clear()
            api._CALLS.clear()


def _args(inp, **override) -> dict:
    args = {name: getattr(inp, name) for name in ARG_NAMES}
    args.update(override)
    return args


def _forget(wrapper) -> None:
    wrapper._sites.clear()
    api._CALLS.clear()


def _pointers(args: dict) -> tuple[int, ...]:
    return tuple(args[name].data_ptr() for name in ARG_NAMES)


def test_a_hit_launches_with_the_calls_own_pointers(fake) -> None:
    inp, wrapper, launcher = fake
    first = _args(inp)
    out = wrapper.run(**first)
    assert out is wrapper._out and len(wrapper._sites) == 1
    # same structure, other tensors: the cached site, this call's pointers
    second = {name: t.clone() for name, t in first.items()}
    given = torch.empty_like(out)
    assert wrapper.run(**second, out=given) is given
    wrapper.run(**second)
    assert len(wrapper._sites) == 2  # out= given is another structure
    (p1, s1, ptr1, r1), (p2, s2, ptr2, r2), (p3, s3, ptr3, r3) = launcher.launches
    assert r1 and r2 and r3
    assert ptr1 == _pointers(first) + (wrapper._out.data_ptr(), 0)
    assert ptr2 == _pointers(second) + (given.data_ptr(), 0)
    assert ptr3 == _pointers(second) + (wrapper._out.data_ptr(), 0)
    assert p3 is p1 and s1 == s2 == s3 == 0
    # the cached params hold everything but the pointers
    assert (p1.batch, p1.max_pages, p1.page_size, p1.sm_scale) == (2, inp.block_table.shape[1], 16, inp.sm_scale)
    assert (p1.ckv_stride_page, p1.ckv_stride_tok) == inp.ckv_cache.stride()[:2]
    assert p1.q_nope == 0 and p1.out == 0 and p1.partial_o == wrapper._partial_o.data_ptr()


def test_mla_decode_hit_allocates_a_fresh_out_per_call(fake) -> None:
    inp, wrapper, launcher = fake
    a = api.mla_decode(*inp.args())
    b = api.mla_decode(*inp.args())
    assert a.data_ptr() != b.data_ptr() and a.shape == b.shape == (2, 1, 4, 512)
    assert len(api._CALLS) == 1 and [ptrs[6] for _, _, ptrs, _ in launcher.launches] == [a.data_ptr(), b.data_ptr()]
    given = torch.empty_like(a)
    assert api.mla_decode(*inp.args(), out=given) is given and launcher.launches[-1][2][6] == given.data_ptr()


def test_mla_decode_plans_again_for_a_wrapper_dropped_behind_its_back(fake, monkeypatch) -> None:
    inp, wrapper, launcher = fake
    api.mla_decode(*inp.args())
    planned = []
    monkeypatch.setattr(api, "_wrapper_for", lambda *a: planned.append(a) or (api._wrapper_key(*a[:3], *a[4:]),
                                                                                wrapper))
    api._WRAPPERS.clear()
    api.mla_decode(*inp.args())
    assert len(planned) == 1 and len(launcher.launches) == 2


def _mutations(inp):
    """(name, inputs of the valid call's structure changed in one way)."""
    big = torch.zeros(inp.ckv_cache.shape[0], 16, 520, dtype=torch.bfloat16)
    yield "dtype", _args(inp, ckv_cache=inp.ckv_cache.half())
    yield "shape", _args(inp, kpe_cache=inp.kpe_cache[:-1])
    yield "dims", _args(inp, q_nope=inp.q_nope[0])
    yield "stride", _args(inp, q_nope=inp.q_nope.transpose(2, 3).contiguous().transpose(2, 3))
    yield "row stride", _args(inp, block_table=torch.zeros(2, 2 * inp.block_table.shape[1], dtype=torch.int32)[:, ::2])
    yield "device", _args(inp, q_pe=inp.q_pe.to("meta"))
    yield "not a tensor", _args(inp, cache_seqlens=inp.cache_seqlens.tolist())
    yield "misaligned", _args(inp, ckv_cache=big[..., 4:516])
    yield "sparse, after a bad dtype", _args(inp, q_pe=inp.q_pe.half(), kpe_cache=inp.kpe_cache.to_sparse())
    yield "aligned, other strides", _args(inp, ckv_cache=big[..., :512])  # valid: a new site


@pytest.mark.parametrize("entry", ["run", "mla_decode"])
def test_a_changed_structure_raises_what_an_uncached_call_raises(fake, entry: str) -> None:
    inp, wrapper, _ = fake
    call = ((lambda a: wrapper.run(**a)) if entry == "run"
            else (lambda a: api.mla_decode(**a, sm_scale=inp.sm_scale)))
    for name, args in _mutations(inp):
        _forget(wrapper)
        cold = outcome(lambda: call(args))
        call(_args(inp))  # a hit from here on
        call(_args(inp))
        warm = outcome(lambda: call(args))
        assert warm == cold, name
        assert (cold is None) == (name == "aligned, other strides"), (name, cold)
        if name.startswith("sparse"):  # the checks' order, not the key's: q_pe before kpe_cache
            assert cold[0] is TypeError and cold[1].startswith("q_pe: expected dtype torch.bfloat16"), cold


def test_a_hit_with_an_odd_data_pointer_names_it(fake) -> None:
    inp, wrapper, launcher = fake
    big = torch.zeros(inp.ckv_cache.shape[0], 16, 520, dtype=torch.bfloat16)
    wrapper.run(**_args(inp, ckv_cache=big[..., :512]))
    n = len(launcher.launches)
    wrapper.run(**_args(inp, ckv_cache=big[..., 8:520]))  # same key, pointer 16 bytes on: aligned, a hit
    assert len(launcher.launches) == n + 1 and len(wrapper._sites) == 1
    with pytest.raises(ValueError, match=r"^ckv_cache: data pointer is not 16-byte aligned"):
        wrapper.run(**_args(inp, ckv_cache=big[..., 4:516]))
    assert len(launcher.launches) == n + 1  # nothing launched


def test_in_place_changes_of_the_same_tensors_are_seen(fake) -> None:
    """A cache hit keyed on the tensors' metadata, not on their identity."""
    inp, wrapper, launcher = fake
    args = _args(inp)
    wrapper.run(**args)
    args["ckv_cache"].data = args["ckv_cache"].data.half()
    with pytest.raises(TypeError, match=r"^ckv_cache: expected dtype torch.bfloat16, got torch.float16"):
        wrapper.run(**args)
    args["ckv_cache"].data = args["ckv_cache"].data.bfloat16()
    wrapper.run(**args)
    args["cache_seqlens"].as_strided_((2,), (0,))
    with pytest.raises(ValueError, match=r"^cache_seqlens: expected a contiguous tensor"):
        wrapper.run(**args)
    args["cache_seqlens"].as_strided_((2,), (1,))
    wrapper.run(**args)
    args["block_table"].t_()
    with pytest.raises(ValueError, match=r"^block_table: expected batch"):
        wrapper.run(**args)
    assert len(launcher.launches) == 3


@pytest.mark.parametrize("first,then,exc,pattern", [
    (1, True, TypeError, r"^sm_scale: expected a float, got bool"),
    (0.5, np.float32(math.nan), ValueError, r"^sm_scale: expected a finite number > 0"),
], ids=["bool after int", "nan after float"])
def test_mla_decode_keys_sm_scale_by_type_and_value(fake, first, then, exc, pattern) -> None:
    inp, _, _ = fake
    api.mla_decode(*inp.args()[:6], first)
    api.mla_decode(*inp.args()[:6], first)
    with pytest.raises(exc, match=pattern):
        api.mla_decode(*inp.args()[:6], then)


def test_mla_decode_keys_num_parts_by_type(fake) -> None:
    inp, _, _ = fake
    with pytest.raises(ValueError, match=r"^num_parts: expected a positive integer or None, got True"):
        api.mla_decode(*inp.args(), num_parts=True)


def test_a_hit_still_checks_values_when_asked(fake) -> None:
    inp, wrapper, launcher = fake
    api.mla_decode(*inp.args(), check_values=True)
    bad = inp.cache_seqlens.clone()
    bad[1] = 10_000
    args = _args(inp, cache_seqlens=bad)
    with pytest.raises(ValueError, match=r"^cache_seqlens: length 10000 at index 1 needs"):
        api.mla_decode(**args, sm_scale=inp.sm_scale, check_values=True)
    n = len(launcher.launches)
    api.mla_decode(**args, sm_scale=inp.sm_scale, check_values=False)  # unchecked: launched (the kernels flag it)
    assert len(launcher.launches) == n + 1 and len(api._CALLS) == 1


def test_replan_false_reuses_the_work_list_on_a_hit_too(fake) -> None:
    inp, wrapper, launcher = fake
    with pytest.raises(ValueError, match=r"^replan: False needs a work list"):
        wrapper.run(*inp.args()[:6], replan=False)
    with pytest.raises(TypeError, match=r"^replan: expected a bool, got int"):
        wrapper.run(*inp.args()[:6], replan=1)
    wrapper.run(*inp.args()[:6])
    wrapper.run(*inp.args()[:6], replan=False)
    assert [replan for *_, replan in launcher.launches] == [True, False]


def test_run_before_plan_and_a_replan_forget_the_sites(fake) -> None:
    inp, wrapper, _ = fake
    unplanned = api.MLADecodeWrapper.__new__(api.MLADecodeWrapper)
    unplanned._plan, unplanned._sites = None, None
    with pytest.raises(RuntimeError, match=r"call plan\(\) first"):
        unplanned.run(*inp.args()[:6])
    wrapper.run(*inp.args()[:6])
    assert len(wrapper._sites) == 1
    wrapper._install(wrapper._plan, wrapper._module)
    assert wrapper._sites == {}


def test_debug_flag_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from generator import env

    monkeypatch.delenv("MLA_GEN_DEBUG", raising=False)
    assert env.debug() is False
    monkeypatch.setenv("MLA_GEN_DEBUG", "1")
    assert env.debug() is True
    monkeypatch.setenv("MLA_GEN_DEBUG", "0")
    assert env.debug() is False


def test_fake_launcher_harness_runs() -> None:
    times = cpu_host_times(FakeParams, calls=20)
    assert set(times) == {"MLADecodeWrapper.run", "mla_decode"}
    assert all(math.isfinite(us) and us > 0 for us in times.values()), times
    print(f"\nCPU host path, launcher launching nothing: " + ", ".join(f"{k} {v:.1f} us" for k, v in times.items()))
    assert not api._CALLS and not api._WRAPPERS


def test_the_bench_host_section_runs_on_the_fake_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """host_times as the bench calls it, with the wrapper planned on CPU (fake_wrapper) instead of a GPU."""
    from mla_gen import validate
    from mla_gen.bench.host import HOST_CASE, host_times

    inp = cpu_inputs()
    launcher = FakeLauncher()

    def plan(self, cache_seqlens, s_q, **kw):
        self.__dict__.update(fake_wrapper(inp, launcher).__dict__)

    with fake_host():
        monkeypatch.setattr(validate, "check_device", lambda device: torch.device("cpu"))
        monkeypatch.setattr(api.MLADecodeWrapper, "plan", plan)
        try:
            host = host_times(torch.device("cpu"), inp, HOST_CASE, None, "absent here", sync=lambda: None)
        finally:
            api._WRAPPERS.clear()
            api._CALLS.clear()
    assert host.shape == "B1 S256 H16" and host.calls == 200 and host.host_us["flashmla"] is None
    assert all(host.host_us[name] > 0 and host.drain_us[name] >= host.host_us[name]
               for name in ("mla_decode", "MLADecodeWrapper.run"))
    assert any("absent here" in line for line in host.lines())


def test_harness_cli() -> None:
    proc = subprocess.run([sys.executable, "-m", "mla_gen.bench.host"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "MLADecodeWrapper.run: " in proc.stdout and "mla_decode: " in proc.stdout


# -- the bench's host section and spin check --------------------------------------------------------

HOST = HostTimes("B1 S256 H16", 200, {"mla_decode": 21.0, "MLADecodeWrapper.run": 9.5, "flashmla": 35.0},
                 {"mla_decode": 40.0, "MLADecodeWrapper.run": 40.0, "flashmla": 41.0},
                 {"MLADecodeWrapper.run": 15.0, "mla_decode": 30.0}, "flashmla")


def test_host_section_lines_and_verdicts() -> None:
    lines = HOST.lines()
    assert lines[0].startswith("host time per call (B1 S256 H16, 200 calls back to back")
    assert any(line.split()[:3] == ["mla_decode", "21.0", "us"] for line in lines)
    assert lines[-1] == "host targets: met"
    slow = HostTimes(**{**HOST.to_dict(), "host_us": {"mla_decode": 36.0, "MLADecodeWrapper.run": 9.5,
                                                      "flashmla": 8.0}})
    assert slow.failures() == ["MLADecodeWrapper.run 9.50 us >= flashmla 8.00 us", "mla_decode 36.0 us > 30.0 us",
                               "mla_decode 36.0 us >= flashmla 8.00 us"]
    assert slow.lines()[-1].startswith("host targets: MISSED: MLADecodeWrapper.run 9.50 us >= flashmla")
    absent = HostTimes(**{**HOST.to_dict(), "host_us": {**HOST.host_us, "flashmla": None},
                          "notes": {"flashmla": "FlashMLA not loaded (--peers)"}})
    assert any("FlashMLA not loaded" in line for line in absent.lines())
    assert absent.lines()[-1] == "host targets: met (flashmla not measured)"


def test_host_section_json_round_trip() -> None:
    cases = default_suite()[:1]
    doc = json.loads(json.dumps(json_document({"name": "GPU"}, CEILINGS, {}, cases, [], HOST), allow_nan=False))
    assert doc["schema"] >= 2  # the host section came with schema 2
    assert set(doc["host"]) == {"shape", "calls", "host_us", "drain_us", "targets", "reference", "notes"}
    assert read_host(doc) == HOST
    assert read_host(json_document({}, CEILINGS, {}, cases, [])) is None


CEILINGS = Ceilings(copy_gbps=3000.0, matmul_tflops=600.0, copy_bytes=2 * 2**30, matmul_n=8192)


def test_spin_check_rows() -> None:
    case = default_suite()[0]
    samples = tuple(float(x) for x in range(30))
    fine = make_record(case, work(case), "mla-gen:wgmma", CEILINGS, "ok", timing=Timing(samples, 9.0, 100.0))
    slow = make_record(case, work(case), "torch", CEILINGS, "ok", timing=Timing(samples, 150.0, 100.0))
    assert fine.spin_us == 100.0 and fine.host_us == 9.0
    assert json.loads(json.dumps(fine.to_dict()))["spin_us"] == 100.0
    assert spin_lines([fine])[0].endswith("ok, no host time in the GPU times")
    lines = spin_lines([fine, slow])
    assert lines[0].endswith("NOT below the spin") and lines[1].startswith(f"WARNING {case.name} torch: host time")
    table = format_table([fine, slow])
    assert "WARNING: host 150.0 us >= GPU spin 100.0 us" in table.splitlines()[2]
    assert "WARNING" not in table.splitlines()[1]
    assert spin_lines([make_record(case, work(case), "x", CEILINGS, "ok", timing=Timing(samples, 9.0))]) == []


def test_the_spin_grows_with_a_slow_callables_host_time() -> None:
    from mla_gen.bench.timing import SPIN_CYCLES, Timer

    timer = Timer.__new__(Timer)  # no GPU: the base spin as if measured
    timer.spin_us = 100.0
    assert timer.spin_for(9.0) == (SPIN_CYCLES, 100.0) and timer.spin_for(50.0) == (SPIN_CYCLES, 100.0)
    assert timer.spin_for(51.0) == (2 * SPIN_CYCLES, 200.0) and timer.spin_for(180.0) == (4 * SPIN_CYCLES, 400.0)


# -- the launcher's run and launch, on a variant that launches nothing ------------------------------

FAKE_VARIANT = r"""
#include "params.h"
static uint64_t seen[4];
MLA_GEN_EXPORT const char* mla_gen_variant_id() { return "fake_variant"; }
MLA_GEN_EXPORT const char* mla_gen_params_hash() { return PARAMS_HASH; }
MLA_GEN_EXPORT int mla_gen_decode(const mla_gen::DecodeParams* p, uint64_t s) {
  seen[0] = p->q_nope; seen[1] = s; seen[2] = p->replan; return FAIL == 1 ? 7 : 0;
}
MLA_GEN_EXPORT int mla_gen_merge(const mla_gen::DecodeParams* p, uint64_t s) {
  seen[3] = p->q_nope; return FAIL == 2 ? 7 : 0;
}
MLA_GEN_EXPORT int mla_gen_max_active_ctas(int* n) { *n = 1; return 0; }
MLA_GEN_EXPORT const char* mla_gen_error_string(int c) { return "fake error"; }
extern "C" __attribute__((visibility("default"))) const uint64_t* fake_seen() { return seen; }
"""


@pytest.mark.needs_nvcc
def test_launcher_run_and_launch(tmp_path: Path) -> None:
    import ctypes

    from generator.cache import BinaryCache
    from generator.launcher import load_launcher
    from generator.render import params_hash
    from generator.toolchain import toolchain

    src = tmp_path / "fake.cpp"
    src.write_text(FAKE_VARIANT)
    libs = {}
    for fail in (0, 1, 2):
        so = tmp_path / f"fake{fail}.so"
        subprocess.run([str(toolchain().cxx), "-shared", "-fPIC", f'-DPARAMS_HASH="{params_hash()}"',
                        f"-I{REPO / 'templates'}", f"-DFAIL={fail}", str(src), "-o", str(so)], check=True)
        libs[fail] = so
    launcher = load_launcher(BinaryCache())
    variant = launcher.Variant(str(libs[0]))
    seen = ctypes.CDLL(str(libs[0])).fake_seen
    seen.restype = ctypes.POINTER(ctypes.c_uint64)
    p = launcher.DecodeParams()
    p.q_nope, p.batch = 11, 3
    variant.run(p, 5)
    assert seen()[0] == seen()[3] == 11 and seen()[1] == 5 and seen()[2] == 1  # the decode kernel plans
    variant.run(p, 5, replan=False)
    assert seen()[2] == 0
    variant.launch(p, 6, 1024, 2048, 3072, 4096, 5120, 6144, 7168, 0, True)
    assert seen()[0] == seen()[3] == 1024 and seen()[1] == 6 and seen()[2] == 1
    assert p.q_nope == 11 and p.out == 0 and p.replan == 1  # launch works on a copy
    variant.launch(p, 7, 4096, 2048, 3072, 4096, 5120, 6144, 7168, 0, False)  # the last work list reused
    assert seen()[0] == seen()[3] == 4096 and seen()[1] == 7 and seen()[2] == 0
    for fail, step in ((1, "decode"), (2, "merge")):
        with pytest.raises(RuntimeError, match=rf"^fake_variant: {step} failed: fake error$"):
            launcher.Variant(str(libs[fail])).launch(p, 0, 0, 0, 0, 0, 0, 0, 0, 0, True)


# -- GPU ----------------------------------------------------------------------------------------------

def _check(out, lse, inp) -> None:
    from mla_gen.reference import mla_decode_reference
    from mla_gen.testing import accuracy_problems

    ref, ref_lse = mla_decode_reference(*inp.args())
    problems = accuracy_problems(out, lse, ref, ref_lse, "bf16")
    assert not problems, problems


def _gpu_inputs(seed: int, lengths=(300, 65, 1), combined: bool = False):
    """Lengths of one maximum (300), so every set fits one plan's block-table width."""
    return make_inputs(list(lengths), heads=16, page_size=64, device="cuda", combined=combined,
                       generator=torch.Generator(device="cuda").manual_seed(seed))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_run_equals_reference_across_cached_calls() -> None:
    a, a2 = _gpu_inputs(1), _gpu_inputs(2)              # one structure, other data and pointers
    c = _gpu_inputs(3, lengths=(128, 300, 5), combined=True)  # views of one cache: other strides
    w = api.MLADecodeWrapper()
    w.plan(a.cache_seqlens, 1, num_heads=16, page_size=64, max_pages=a.block_table.shape[1], sm_scale=a.sm_scale)
    for inp in (a, a2, c, a, a2, c):
        lse = torch.full((3, 1, 16), math.nan, device="cuda")
        out, got = w.run(*inp.args()[:6], lse=lse)
        assert got is lse
        _check(out.clone(), lse, inp)
    assert len(w._sites) == 2
    out = w.run(*a2.args()[:6])
    _check(out, None, a2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_mla_decode_equals_reference_across_cached_calls() -> None:
    for seed, scale in ((1, None), (2, None), (3, 0.1), (4, None)):
        inp = _gpu_inputs(seed)
        if scale is not None:
            inp.sm_scale = scale
        out, lse = api.mla_decode(*inp.args(), return_lse=True)
        _check(out, lse, inp)
        out = torch.full_like(out, math.nan)
        assert api.mla_decode(*inp.args(), out=out) is out
        _check(out, lse, inp)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        inp = _gpu_inputs(5)
        out, lse = api.mla_decode(*inp.args(), return_lse=True)
    s.synchronize()
    _check(out, lse, inp)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_host_figures_print() -> None:
    from mla_gen.bench.cases import Case
    from mla_gen.bench.host import HOST_CASE, host_times
    from mla_gen.bench.impls import build_inputs

    case: Case = HOST_CASE
    host = host_times(torch.device("cuda", torch.cuda.current_device()), build_inputs(case, torch.device("cuda")),
                      case, None, "not timed in the tests")
    print("\n" + "\n".join(host.lines()))
    assert host.host_us["mla_decode"] > 0 and host.host_us["MLADecodeWrapper.run"] > 0
