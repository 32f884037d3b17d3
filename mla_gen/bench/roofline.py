"""The device's measured ceilings and the floor time they give a workload.

Torch-free: the ceilings are measured by mla_gen.bench.timing; this module only does their arithmetic.
The plot (mla_gen.bench.plot) needs matplotlib, an optional dependency: `pip install 'mla-gen[plot]'`.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any


@dataclasses.dataclass(frozen=True)
class Ceilings:
    """Measured on the device: a large device-to-device copy (bytes read + written) and a dense bf16
    matmul (n^3, random data)."""
    copy_gbps: float
    matmul_tflops: float
    copy_bytes: int        # read + written by one timed copy
    matmul_n: int

    def memory_us(self, nbytes: int) -> float:
        return nbytes / (self.copy_gbps * 1e3)

    def compute_us(self, flops: int) -> float:
        return flops / (self.matmul_tflops * 1e6)

    def floor_us(self, nbytes: int, flops: int) -> float:
        """No kernel runs much faster: max(bytes / bandwidth, FLOPs / rate)."""
        return max(self.memory_us(nbytes), self.compute_us(flops))

    def bound(self, nbytes: int, flops: int) -> str:
        """Which ceiling sets the floor: 'memory' or 'compute'."""
        return "memory" if self.memory_us(nbytes) >= self.compute_us(flops) else "compute"

    @property
    def ridge(self) -> float:
        """Arithmetic intensity (FLOP/B) where the two ceilings meet."""
        return self.matmul_tflops * 1e3 / self.copy_gbps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"ridge_flop_per_byte": self.ridge}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Ceilings:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def require_matplotlib() -> None:
    """Raises ImportError with what to install when matplotlib is missing."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ImportError("matplotlib is not installed (pip install matplotlib, or 'mla-gen[plot]')")
