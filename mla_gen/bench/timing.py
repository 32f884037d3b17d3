"""GPU timing for the benchmark (/work/.library/device/METHOD.md): CUDA events around each call, warm-up
first, L2 flushed before every timed call (a read of a buffer larger than L2, outside the timed
region), and the device's ceilings measured the same way."""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable

import torch

from mla_gen.bench.report import Timing
from mla_gen.bench.roofline import Ceilings

FLUSH_BYTES = 256 * 2**20
# NOTE(clean-flush): the flush reads the buffer, so a timed call starts on an L2 of clean lines that hold none of
# its inputs. Writing it (zero_) left ~60 MB of dirty lines whose write-back ran inside the timed call, the same
# extra time for every implementation: case 1's decode kernel took 92 us after a write against 85 us under ncu
# (PERF.md, seventeenth session).
FLUSH = "read"
# NOTE(host-lead): after the flush the GPU spins ~0.1 ms (outside the timed region; longer for a callable
# whose host time nears it: Timer.spin_for), so the host has queued the timed call's launches before the
# start event runs; otherwise a call whose Python launch cost exceeds the spin would count host time.
# host_us reports that cost separately, and the spin's measured length (spin_us) rides beside it so the
# report can check host_us < spin_us.
SPIN_CYCLES = 200_000
SPIN_SAMPLES = 10
SPIN_RETRIES = 3                # timings of a callable, each behind a longer spin, until its host time is under it
COPY_BYTES = 2 * 2**30          # the copied buffer; read + written = twice this
MATMUL_N = 8192
CEILING_ITERS = 20


class Timer:
    """Times zero-argument callables on the current CUDA stream."""

    def __init__(self, device: torch.device, iters: int, warmup: int):
        self.iters, self.warmup = iters, warmup
        self._flush = torch.empty(FLUSH_BYTES // 4, dtype=torch.int32, device=device)
        self.spin_us = self._spin_us()

    def _spin_us(self) -> float:
        """The GPU spin's length (median of a few, CUDA events around it alone)."""
        torch.cuda._sleep(SPIN_CYCLES)  # warm
        samples = []
        for _ in range(SPIN_SAMPLES):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.cuda._sleep(SPIN_CYCLES)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
        return statistics.median(samples)

    def spin_for(self, host_us: float) -> tuple[int, float]:
        """(cycles, us) of the spin before each timed call of a callable taking `host_us` of host time per
        call: the base spin, in whole multiples until it is at least twice the host time."""
        scale = max(1, math.ceil(2 * host_us / self.spin_us))
        return SPIN_CYCLES * scale, self.spin_us * scale

    def time(self, fn: Callable[[], object], iters: int | None = None) -> Timing:
        # NOTE(host-lead): a callable whose host time nears the base spin gets a longer one, so its GPU times
        # hold no host time; the Timing carries the spin it got and the report checks host_us against it. The
        # timed calls' host time can outgrow the warm-up's (seen for torch's baseline at B8 S16384): those calls
        # are timed again behind a spin sized from them.
        iters = iters or self.iters
        host_us = self._warm_host_us(fn)
        for _ in range(SPIN_RETRIES):
            timing = self._timed(fn, iters, *self.spin_for(host_us))
            if timing.host_us < timing.spin_us:
                break
            host_us = timing.host_us
        return timing

    def _warm_host_us(self, fn: Callable[[], object]) -> float:
        """The warm-up calls' median host time (us)."""
        warm = []
        for _ in range(self.warmup):
            t0 = time.perf_counter()
            fn()
            warm.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        return statistics.median(warm) * 1e6 if warm else 0.0

    def _timed(self, fn: Callable[[], object], iters: int, cycles: int, spin_us: float) -> Timing:
        """`iters` calls, each after the flush and a spin of `cycles`, between CUDA events."""
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        host = []
        for start, end in zip(starts, ends):
            self._flush.sum(dtype=torch.int64)
            torch.cuda._sleep(cycles)
            start.record()
            t0 = time.perf_counter()
            fn()
            host.append(time.perf_counter() - t0)
            end.record()
        torch.cuda.synchronize()
        host.sort()
        return Timing(tuple(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)), host[len(host) // 2] * 1e6,
                      spin_us)


def measure_ceilings(timer: Timer, device: torch.device) -> Ceilings:
    """Device-to-device copy bandwidth (bytes read + written) and dense bf16 matmul rate, random data."""
    gen = torch.Generator(device=device).manual_seed(1234)
    ceilings = Ceilings(copy_gbps=_copy_gbps(timer, device, gen), matmul_tflops=_matmul_tflops(timer, device, gen),
                        copy_bytes=2 * COPY_BYTES, matmul_n=MATMUL_N)
    torch.cuda.empty_cache()
    return ceilings


def _copy_gbps(timer: Timer, device: torch.device, gen: torch.Generator) -> float:
    src = torch.randn(COPY_BYTES // 2, dtype=torch.bfloat16, device=device, generator=gen)
    dst = torch.empty_like(src)
    return 2 * COPY_BYTES / timer.time(lambda: dst.copy_(src), CEILING_ITERS).median_us / 1e3


def _matmul_tflops(timer: Timer, device: torch.device, gen: torch.Generator) -> float:
    a = torch.randn(MATMUL_N, MATMUL_N, dtype=torch.bfloat16, device=device, generator=gen)
    b = torch.randn(MATMUL_N, MATMUL_N, dtype=torch.bfloat16, device=device, generator=gen)
    c = torch.empty_like(a)
    return 2 * MATMUL_N**3 / timer.time(lambda: torch.matmul(a, b, out=c), CEILING_ITERS).median_us / 1e6
