"""Host time per call: `calls` calls back to back, warm, no sync inside (one before and one after),
wall time / calls; the bench's host section (issue 12: MLADecodeWrapper.run <= 15 us, mla_decode <= 30 us,
both below FlashMLA's call), and the same per-call path on CPU tensors with a launcher that launches
nothing, so the Python part is measured without a GPU:

    python -m mla_gen.bench.host            # CPU: run() and mla_decode() per-call overhead, fake launcher

The clock stops before the closing sync: a call's host time is what it costs the caller, and the GPU's
time (the drain) is recorded beside it.
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import time
from typing import Any, Callable, Iterator

import torch

from generator.render import param_fields
from generator.select import decide
from generator.spec import Arch, DType
from mla_gen import api, validate
from mla_gen.bench.cases import Case
from mla_gen.bench.report import HostTimes
from mla_gen.testing import DecodeInputs, make_inputs

CALLS = 200
REPEATS = 5
WARMUP = 20
# B1 S256 H16: the kernels take a few microseconds, so host time is what a call costs.
HOST_CASE = Case("host", 1, 16, 512, 64, seqlen=256)
TARGETS = {"MLADecodeWrapper.run": 15.0, "mla_decode": 30.0}   # us per call (issue 12, acceptance 3)


def per_call_us(fn: Callable[[], object], sync: Callable[[], None], calls: int = CALLS, repeats: int = REPEATS,
                warmup: int = WARMUP) -> tuple[float, float]:
    """(host, drain) us per call, medians over `repeats` rounds: host = wall time of `calls` back-to-back
    calls / calls (no sync inside, a sync before), drain = the same until the sync after them."""
    for _ in range(warmup):
        fn()
    host, drain = [], []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter_ns()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter_ns()
        sync()
        t2 = time.perf_counter_ns()
        host.append((t1 - t0) / calls / 1e3)
        drain.append((t2 - t0) / calls / 1e3)
    return statistics.median(host), statistics.median(drain)


# -- on the GPU (the bench's host section) ----------------------------------------------------------

def host_times(device: torch.device, inp: DecodeInputs, case: Case, flashmla: Callable[[], object] | None,
               flashmla_absent: str = "", sync: Callable[[], None] = torch.cuda.synchronize) -> HostTimes:
    """The three figures on `device`: mla_decode, MLADecodeWrapper.run (planned once, default dispatch) and
    FlashMLA's call (None when absent: `flashmla_absent` says why)."""
    args = (inp.q_nope, inp.q_pe, inp.ckv_cache, inp.kpe_cache, inp.block_table, inp.cache_seqlens)
    wrapper = api.MLADecodeWrapper(device)
    wrapper.plan(inp.cache_seqlens, case.s_q, num_heads=case.heads, ckv_dim=case.ckv, rope_dim=case.rope,
                 page_size=case.page_size, max_pages=inp.block_table.shape[1], sm_scale=case.sm_scale,
                 dtype=inp.q_nope.dtype)
    calls: dict[str, Callable[[], object] | None] = {
        "mla_decode": lambda: api.mla_decode(*args, case.sm_scale),
        "MLADecodeWrapper.run": lambda: wrapper.run(*args),
        "flashmla": flashmla,
    }
    host: dict[str, float | None] = {}
    drain: dict[str, float | None] = {}
    for name, fn in calls.items():
        host[name], drain[name] = per_call_us(fn, sync) if fn is not None else (None, None)
    notes = {"flashmla": flashmla_absent} if flashmla is None else {}
    return HostTimes(case.shape, CALLS, host, drain, dict(TARGETS), "flashmla", notes)


# -- on CPU, with a launcher that launches nothing --------------------------------------------------

class FakeParams:
    """DecodeParams without the launcher: the same fields, plain attributes."""
    __slots__ = param_fields()

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)


class FakeLauncher:
    """An opened variant that launches nothing and counts its calls; `params` is the class of its
    DecodeParams (FakeParams, or a built launcher's DecodeParams to time the real binding's fields)."""

    def __init__(self, params: type = FakeParams):
        self.DecodeParams = params
        self.launches: list[tuple] = []
        self.record = False

    def launch(self, params: Any, stream: int, q_nope: int, q_pe: int, ckv: int, kpe: int, block_table: int,
               seqlens: int, out: int, lse: int, replan: bool) -> None:
        if self.record:
            self.launches.append((params, stream, (q_nope, q_pe, ckv, kpe, block_table, seqlens, out, lse), replan))

    def run(self, params: Any, stream: int, replan: bool = True) -> None:
        if self.record:
            self.launches.append((params, stream, None, replan))


@contextlib.contextmanager
def fake_host() -> Iterator[None]:
    """Lets the host path run on CPU tensors: stream 0, no device switch, 'cpu' where the kernels run."""
    saved = api._current_stream, api._current_device, validate.DEVICE_TYPE
    api._current_stream, api._current_device, validate.DEVICE_TYPE = (lambda index: 0), (lambda: None), "cpu"
    try:
        yield
    finally:
        api._current_stream, api._current_device, validate.DEVICE_TYPE = saved


def cpu_inputs(case: Case = HOST_CASE) -> DecodeInputs:
    return make_inputs(case.lengths(), heads=case.heads, ckv=case.ckv, rope=case.rope, s_q=case.s_q,
                       page_size=case.page_size, generator=torch.Generator().manual_seed(case.seed),
                       sm_scale=case.sm_scale)


def fake_wrapper(inp: DecodeInputs, launcher: FakeLauncher, *, return_lse: bool = False) -> api.MLADecodeWrapper:
    """A wrapper planned on CPU for `inp` (the decision an H100 would make), launching through `launcher`;
    also registered as mla_decode's wrapper for these inputs (stream 0). Use inside fake_host()."""
    b, s_q, h, c = inp.q_nope.shape
    shape = validate.check_structure(*inp.args())
    decision = decide(arch=Arch.SM90A, num_heads=h, ckv_dim=c, rope_dim=inp.q_pe.shape[3],
                      dtype=DType.parse({torch.bfloat16: "bf16", torch.float16: "fp16"}[inp.q_nope.dtype]), s_q=s_q,
                      sm_count=132)
    cpu = torch.device("cpu")
    plan = api.DecodePlan(cpu, b, s_q, h, c, shape.rope_dim, inp.q_nope.dtype, shape.page_size, shape.max_pages,
                          float(inp.sm_scale), return_lse, decision, api.max_partials(decision.num_parts))
    wrapper = api.MLADecodeWrapper.__new__(api.MLADecodeWrapper)
    wrapper._device, wrapper._family, wrapper._num_parts = cpu, None, None
    wrapper._install(plan, launcher)
    api._WRAPPERS[api._wrapper_key(shape, cpu, 0, return_lse, None, None)] = wrapper
    return wrapper


def cpu_host_times(params: type = FakeParams, calls: int = CALLS) -> dict[str, float]:
    """run() and mla_decode() us per call on CPU tensors through a launcher that launches nothing."""
    inp = cpu_inputs()
    args = inp.args()[:6]
    with fake_host():
        wrapper = fake_wrapper(inp, FakeLauncher(params))
        try:
            fns = {"MLADecodeWrapper.run": lambda: wrapper.run(*args),
                   "mla_decode": lambda: api.mla_decode(*args, inp.sm_scale)}
            return {name: per_call_us(fn, lambda: None, calls=calls, repeats=REPEATS * 4)[0]
                    for name, fn in fns.items()}
        finally:
            api._WRAPPERS.clear()
            api._CALLS.clear()


def main() -> int:
    params, what = FakeParams, "plain-Python DecodeParams"
    if "--binding" in sys.argv[1:]:  # the built launcher's DecodeParams (builds it on a miss: about 10 s)
        from generator.cache import BinaryCache
        from generator.launcher import load_launcher
        params, what = load_launcher(BinaryCache()).DecodeParams, "the launcher's DecodeParams"
    for name, us in cpu_host_times(params).items():
        print(f"{name}: {us:.2f} us per call (CPU, {what}, launches nothing)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
