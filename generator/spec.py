"""VariantSpec: the full description of one generated kernel variant.

A spec is a frozen dataclass of ints and enums. It validates itself on
construction (SpecError names the field, the value and what is allowed), has a
readable stable id that parses back (`VariantSpec.from_id`), and hashes its
build inputs with sha256 over canonical JSON, never Python's hash().
"""
from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import re
from typing import Any, Mapping

from generator.errors import SpecError


class DType(enum.Enum):
    """Element types. q and out are 16-bit; the latent cache is 16-bit (q's type) or one of the fp8
    formats engines store (mla_gen/fp8.py): fp8_e4m3, the 576-wide latent in e4m3 with one fp32 scale
    per tensor (vLLM's fp8 cache), and fp8_ds_mla, DeepSeek-V3.2's 656-byte token (512 e4m3 values,
    one fp32 scale per 128 of them, 64 bf16 rope values)."""
    BF16 = "bf16"
    FP16 = "fp16"
    FP8_E4M3 = "fp8e4m3"
    FP8_DS_MLA = "fp8dsmla"

    @property
    def is_fp8(self) -> bool:
        return self in (DType.FP8_E4M3, DType.FP8_DS_MLA)

    @property
    def c_type(self) -> str:
        """The CUDA type of one element (fp8 formats: one e4m3 value)."""
        return {"bf16": "__nv_bfloat16", "fp16": "__half"}.get(self.value, "__nv_fp8_e4m3")

    @property
    def itemsize(self) -> int:
        return 1 if self.is_fp8 else 2

    @property
    def scale_granularity(self) -> str | None:
        """What one scale covers: None (16-bit, unscaled), "tensor" or "128 values" (per token)."""
        return {DType.FP8_E4M3: "tensor", DType.FP8_DS_MLA: "128 values"}.get(self)

    @property
    def cli_name(self) -> str:
        """The spelling of the CLI and the Python API (the id's spelling drops the underscores)."""
        return {DType.FP8_E4M3: "fp8_e4m3", DType.FP8_DS_MLA: "fp8_ds_mla"}.get(self, self.value)

    @classmethod
    def parse(cls, text: str | DType, field: str = "dtype") -> DType:
        if isinstance(text, DType):
            return text
        aliases = {"bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16", "float16": "fp16", "half": "fp16",
                   "fp8_e4m3": "fp8e4m3", "fp8e4m3": "fp8e4m3", "float8_e4m3fn": "fp8e4m3",
                   "fp8_ds_mla": "fp8dsmla", "fp8dsmla": "fp8dsmla"}
        key = aliases.get(str(text).strip().lower().removeprefix("torch."))
        if key is None:
            raise SpecError(f"{field}: unknown dtype {text!r}; expected one of "
                            f"{', '.join(d.cli_name for d in cls)}")
        return cls(key)


# The fp8_ds_mla token: 512 e4m3 ckv values, 4 fp32 scales, 64 bf16 rope values (mla_gen/fp8.py).
DS_MLA_CKV, DS_MLA_ROPE, DS_MLA_TOKEN_BYTES = 512, 64, 656


class Family(enum.Enum):
    """Kernel designs (DESIGN.md section 3)."""
    SIMT = "simt"   # CUDA cores, fp32 accumulation; any arch; the correctness baseline
    MMA = "mma"     # tensor cores via mma.sync m16n8k16, cp.async pipeline; sm_80+
    WGMMA = "wgmma"  # Hopper warpgroup MMA (wgmma.mma_async), cp.async pipeline; sm_90a only
    NARROW = "narrow"  # Hopper wgmma with kv tokens on M and few query rows on N; sm_90a only
    SEESAW = "seesaw"  # wgmma with FlashMLA's seesaw: kv tiles in pairs, one WG's softmax under the other's MMA

    @property
    def min_cc(self) -> int:
        return {"simt": 75, "mma": 80, "wgmma": 90, "narrow": 90, "seesaw": 90}[self.value]

    def runs_on(self, arch: Arch) -> bool:
        """Whether variants of this family can be built for `arch`: wgmma is an arch-specific
        (sm_90a) instruction, so that family needs exactly sm_90a."""
        if self in (Family.WGMMA, Family.NARROW, Family.SEESAW):
            return arch is Arch.SM90A
        return arch.cc >= self.min_cc

    @classmethod
    def parse(cls, text: str | Family) -> Family:
        if isinstance(text, Family):
            return text
        try:
            return cls(str(text).strip().lower())
        except ValueError:
            raise SpecError(f"family: unknown family {text!r}; expected one of "
                            f"{', '.join(f.value for f in cls)}") from None


class Arch(enum.Enum):
    """Compile targets. Values are the id spelling (no underscore)."""
    SM75 = "sm75"
    SM80 = "sm80"
    SM86 = "sm86"
    SM89 = "sm89"
    SM90 = "sm90"
    SM90A = "sm90a"
    SM100A = "sm100a"
    SM120 = "sm120"

    @property
    def cc(self) -> int:
        """Compute capability as major*10+minor, e.g. 90."""
        return int(re.sub(r"\D", "", self.value))

    @property
    def nvcc_name(self) -> str:
        return "sm_" + self.value[2:]

    @property
    def gencode(self) -> str:
        # NOTE(arch): sm_90a must be spelled as -gencode; `-arch=sm_90a` also runs a plain sm_90
        # pass with nvcc 13.0 that rejects arch-specific instructions (DESIGN.md section 4).
        num = self.value[2:]
        return f"-gencode=arch=compute_{num},code=sm_{num}"

    @property
    def max_smem_per_block(self) -> int:
        """Opt-in dynamic shared memory per block, bytes."""
        return {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024,
                100: 227 * 1024, 120: 99 * 1024}[self.cc]

    @classmethod
    def parse(cls, text: str | Arch) -> Arch:
        if isinstance(text, Arch):
            return text
        key = str(text).strip().lower().replace("_", "").replace(".", "")
        if not key.startswith("sm"):
            key = "sm" + key
        try:
            return cls(key)
        except ValueError:
            raise SpecError(f"arch: unknown arch {text!r}; expected one of "
                            f"{', '.join(a.nvcc_name for a in cls)}") from None

    @classmethod
    def for_capability(cls, major: int, minor: int) -> Arch:
        """The best target for a device: arch-specific where a family uses its instructions."""
        table = {(7, 5): cls.SM75, (8, 0): cls.SM80, (8, 6): cls.SM86, (8, 7): cls.SM86, (8, 9): cls.SM89,
                 (9, 0): cls.SM90A, (10, 0): cls.SM100A, (12, 0): cls.SM120}
        if (major, minor) in table:
            return table[(major, minor)]
        raise SpecError(f"device: compute capability {major}.{minor} is not supported; "
                        f"supported: {', '.join(f'{a}.{b}' for a, b in table)}")


@dataclasses.dataclass(frozen=True)
class Tile:
    """Tile shape: query rows per CTA, kv tokens per step, pipeline stages, warps per CTA."""
    block_m: int
    block_n: int
    stages: int
    warps: int

    @property
    def name(self) -> str:
        return f"m{self.block_m}n{self.block_n}s{self.stages}w{self.warps}"

    @classmethod
    def parse(cls, text: str) -> Tile:
        m = re.fullmatch(r"m(\d+)n(\d+)s(\d+)w(\d+)", text.strip())
        if not m:
            raise SpecError(f"tile: {text!r} is not of the form m<rows>n<tokens>s<stages>w<warps>, "
                            f"e.g. m16n32s1w8")
        return cls(*(int(g) for g in m.groups()))


# Query heads per GPU: every MLA model has at most 128 (DeepSeek-V2/V3), and the GPU tests cover 1..128.
MAX_HEADS = 128

_ID_RE = re.compile(r"mla_decode_h(\d+)_c(\d+)_r(\d+)_([a-z0-9]+)_([a-z0-9]+)_([a-z]+)_"
                    r"(m\d+n\d+s\d+w\d+)_(sm\d+a?)")


@dataclasses.dataclass(frozen=True)
class VariantSpec:
    num_heads: int
    ckv_dim: int
    rope_dim: int
    q_dtype: DType
    kv_dtype: DType
    out_dtype: DType
    family: Family
    tile: Tile
    arch: Arch

    def __post_init__(self) -> None:
        _check_int("num_heads", self.num_heads, 1, MAX_HEADS, "the most query heads of an MLA model and of the tests")
        _check_int("ckv_dim", self.ckv_dim, 16, 1024)
        _check_int("rope_dim", self.rope_dim, 16, 256)
        for name in ("ckv_dim", "rope_dim"):
            if getattr(self, name) % 16:
                raise SpecError(f"{name}: expected a multiple of 16 (16-byte vector loads and k16 MMA "
                                f"steps), got {getattr(self, name)}")
        for name in ("q_dtype", "kv_dtype", "out_dtype", "family", "tile", "arch"):
            want = {"family": Family, "tile": Tile, "arch": Arch}.get(name, DType)
            if not isinstance(getattr(self, name), want):
                raise SpecError(f"{name}: expected a {want.__name__}, got {getattr(self, name)!r}")
        if self.q_dtype.is_fp8:
            raise SpecError(f"q_dtype: expected bf16 or fp16 (fp8 is a cache format), got {self.q_dtype.cli_name}")
        if self.kv_dtype != self.q_dtype and not self.kv_dtype.is_fp8:
            raise SpecError(f"kv_dtype: expected the q dtype ({self.q_dtype.value}), fp8_e4m3 or fp8_ds_mla, "
                            f"got {self.kv_dtype.cli_name}")
        if self.out_dtype != self.q_dtype:
            raise SpecError(f"out_dtype: expected the q dtype ({self.q_dtype.value}), got {self.out_dtype.value}")
        if self.kv_dtype.is_fp8:
            _check_fp8(self)
        if self.arch.cc < self.family.min_cc:
            raise SpecError(f"arch: family {self.family.value} needs sm_{self.family.min_cc} or newer, "
                            f"got {self.arch.nvcc_name}")
        if not self.family.runs_on(self.arch):
            raise SpecError(f"arch: family {self.family.value} uses sm_90a-specific instructions (wgmma) and "
                            f"builds only for sm_90a, got {self.arch.nvcc_name}")
        _FAMILY_CHECKS[self.family](self)
        smem = self.smem_bytes
        if smem > self.arch.max_smem_per_block:
            raise SpecError(f"tile: {self.tile.name} needs {smem} bytes of shared memory, more than the "
                            f"{self.arch.max_smem_per_block} a block may use on {self.arch.nvcc_name}")

    # -- identity ---------------------------------------------------------------------------------

    @property
    def variant_id(self) -> str:
        """Readable, stable, [a-z0-9_] only; parses back with from_id."""
        return (f"mla_decode_h{self.num_heads}_c{self.ckv_dim}_r{self.rope_dim}_{self.q_dtype.value}_"
                f"{self.kv_dtype.value}_{self.family.value}_{self.tile.name}_{self.arch.value}")

    @classmethod
    def from_id(cls, variant_id: str) -> VariantSpec:
        m = _ID_RE.fullmatch(variant_id.strip())
        if not m:
            raise SpecError(f"variant id: {variant_id!r} does not look like "
                            f"mla_decode_h<heads>_c<ckv>_r<rope>_<q>_<kv>_<family>_<tile>_<arch>")
        h, c, r, q, kv, fam, tile, arch = m.groups()
        qd = DType.parse(q, "q_dtype")
        return cls(int(h), int(c), int(r), qd, DType.parse(kv, "kv_dtype"), qd, Family.parse(fam),
                   Tile.parse(tile), Arch.parse(arch))

    def to_dict(self) -> dict[str, Any]:
        return {"num_heads": self.num_heads, "ckv_dim": self.ckv_dim, "rope_dim": self.rope_dim,
                "q_dtype": self.q_dtype.value, "kv_dtype": self.kv_dtype.value,
                "out_dtype": self.out_dtype.value, "family": self.family.value,
                "tile": dataclasses.asdict(self.tile), "arch": self.arch.value}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> VariantSpec:
        return cls(int(d["num_heads"]), int(d["ckv_dim"]), int(d["rope_dim"]),
                   DType.parse(d["q_dtype"], "q_dtype"), DType.parse(d["kv_dtype"], "kv_dtype"),
                   DType.parse(d["out_dtype"], "out_dtype"), Family.parse(d["family"]),
                   Tile(**d["tile"]), Arch.parse(d["arch"]))

    def content_hash(self, sources: Mapping[str, str], flags: list[str], toolchain: Mapping[str, str]) -> str:
        """sha256 (hex) over everything that changes the binary: this spec, the rendered sources,
        the compiler flags and the toolchain fingerprint (nvcc and host compiler versions,
        generator version, Python extension suffix)."""
        doc = {"spec": self.to_dict(), "sources": dict(sorted(sources.items())), "flags": list(flags),
               "toolchain": dict(sorted(toolchain.items()))}
        return hashlib.sha256(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    # -- derived sizes ----------------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        """Width of the single kv head: ckv + rope."""
        return self.ckv_dim + self.rope_dim

    @property
    def threads(self) -> int:
        """The decode kernel's block: the tile's working warps, and the producer warpgroup beside them of seesaw and
        of narrow over an fp8 cache."""
        producer = self.family is Family.SEESAW or (self.family is Family.NARROW and self.kv_dtype.is_fp8)
        return 32 * self.tile.warps + (128 if producer else 0)

    @property
    def quantizes_q(self) -> bool:
        """Whether the kernel turns q into e4m3 (narrow over an fp8 cache, seesaw over fp8_e4m3: two e4m3 parts a
        value in a per-row scale, about bf16's precision, so that Q K^T reads the cache's bytes with e4m3
        tensor-core math; an fp8_ds_mla cache's bf16 rope meets q's rope in bf16)."""
        return (self.family is Family.NARROW and self.kv_dtype.is_fp8) or \
            (self.family is Family.SEESAW and self.kv_dtype is DType.FP8_E4M3)

    @property
    def smem_bytes(self) -> int:
        """Dynamic shared memory of the decode kernel (must match the family's .cuh layout)."""
        return smem_bytes(self.family, self.tile, self.ckv_dim, self.rope_dim, self.kv_dtype)


def smem_bytes(family: Family, tile: Tile, ckv_dim: int, rope_dim: int, kv_dtype: DType) -> int:
    """Dynamic shared memory of a family's decode kernel for a tile and dims, bytes (must match the
    family's .cuh layout). Computable before a spec exists, so tile rules can test the fit. Every kernel
    holds the kv tile in 16 bits (an fp8 cache is dequantized on its way into shared memory)."""
    t, d, kv = tile, ckv_dim + rope_dim, 2
    if family is Family.NARROW:
        return _narrow_smem_bytes(t, ckv_dim, rope_dim, kv_dtype)
    if family is Family.SIMT:
        # q tile in fp32, one kv tile, scores/probabilities in fp32, three per-row fp32 arrays
        return t.block_m * d * 4 + t.block_n * d * kv + t.block_m * t.block_n * 4 + 3 * t.block_m * 4
    if family is Family.WGMMA:
        return _wgmma_smem_bytes(t, ckv_dim, rope_dim, kv_dtype)
    if family is Family.SEESAW:
        return _seesaw_smem_bytes(t, ckv_dim, rope_dim, kv_dtype)
    # mma (templates/mma.cuh Layout): q tile [M][C+R], `stages` kv tiles [N][C+R], the P tile [M][N]
    # (16-bit), then row max and row sum exchange arrays [WN][M] fp32 between the column-split warps
    # (fp8: see _kv_stages_bytes).
    wn = _mma_column_splits(t)
    stages = _kv_stages_bytes(t, d, kv_dtype, align=128)
    return t.block_m * d * kv + stages + t.block_m * t.block_n * kv + 2 * wn * t.block_m * 4


def _kv_stages_bytes(tile: Tile, d: int, kv_dtype: DType, align: int) -> int:
    """The kv stages of mma and wgmma: `stages` 16-bit tiles [N][d]; with an fp8 cache, `stages` tiles of
    the cache's own bytes per token (templates/common.cuh RawKVTile, each `align`-byte aligned) and the one
    16-bit tile they are dequantized into."""
    if not kv_dtype.is_fp8:
        return tile.stages * tile.block_n * d * 2
    raw = DS_MLA_TOKEN_BYTES if kv_dtype is DType.FP8_DS_MLA else d
    return tile.stages * (-(-tile.block_n * raw // align) * align) + tile.block_n * d * 2


def _check_int(name: str, value: Any, lo: int, hi: int, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{name}: expected an integer, got {value!r}")
    if not lo <= value <= hi:
        raise SpecError(f"{name}: expected {lo}..{hi}{f' ({why})' if why else ''}, got {value}")


def _check_simt(spec: VariantSpec) -> None:
    t = spec.tile
    _check_int("tile.block_m", t.block_m, 1, 64)
    if t.block_n not in (16, 32, 64):
        raise SpecError(f"tile.block_n: simt takes 16, 32 or 64 kv tokens per step, got {t.block_n}")
    if t.stages != 1:
        raise SpecError(f"tile.stages: simt loads synchronously, expected 1, got {t.stages}")
    if t.warps not in (1, 2, 4, 8, 16):
        raise SpecError(f"tile.warps: expected 1, 2, 4, 8 or 16, got {t.warps}")
    if spec.ckv_dim % (64 * t.warps):
        raise SpecError(f"tile.warps: simt gives each thread a pair of output columns, so 64*warps must "
                        f"divide ckv_dim {spec.ckv_dim}; got warps={t.warps}")


def _mma_warp_rows(tile: Tile) -> int:
    """Query rows a warp of the mma family owns: one m16 tile at block_m 16, else two."""
    return 16 if tile.block_m <= 16 else 32


def _mma_column_splits(tile: Tile) -> int:
    """Warps sharing a row group in the mma family (they split O's columns and S's tokens)."""
    return max(1, tile.warps // max(1, tile.block_m // _mma_warp_rows(tile)))


def _check_mma(spec: VariantSpec) -> None:
    t = spec.tile
    if t.block_m not in (16, 32, 64):
        raise SpecError(f"tile.block_m: mma takes 16, 32 or 64 query rows per CTA, got {t.block_m}")
    for name in ("ckv_dim", "rope_dim"):
        dim = getattr(spec, name)
        if dim % 64 and dim not in (16, 32):
            raise SpecError(f"{name}: mma swizzles rows of 16-byte chunks and needs 16, 32 or a multiple of 64, "
                            f"got {dim}")
    warp_rows = _mma_warp_rows(t)
    groups = t.block_m // warp_rows
    if t.warps not in (1, 2, 4, 8) or t.warps % groups:
        raise SpecError(f"tile.warps: mma needs warps in (1, 2, 4, 8), a multiple of the {groups} row group(s) of "
                        f"{warp_rows} rows at block_m={t.block_m}; got warps={t.warps}")
    wn = t.warps // groups
    if spec.ckv_dim % (16 * wn):
        raise SpecError(f"tile.warps: {wn} column splits of ckv_dim {spec.ckv_dim} are not multiples of 16")
    cols = spec.ckv_dim // wn
    if cols > 64 and cols % 64:
        raise SpecError(f"tile.warps: each of the {wn} column splits gets {cols} ckv columns; mma needs at most 64 "
                        f"or a multiple of 64")
    o_floats = (warp_rows // 16) * (spec.ckv_dim // wn // 8) * 4
    if o_floats > 128:
        raise SpecError(f"tile.warps: {wn} column split(s) leave each thread {o_floats} fp32 output accumulators "
                        f"(at most 128); use more warps for block_m={t.block_m}, ckv_dim={spec.ckv_dim}")
    if t.block_n not in (16, 32, 64, 128) or t.block_n % (8 * wn):
        raise SpecError(f"tile.block_n: expected 16, 32, 64 or 128 and at least 8 tokens for each of the {wn} "
                        f"column-split warps, got {t.block_n}")
    s_floats = (warp_rows // 16) * (t.block_n // wn // 8) * 4
    if s_floats > 32:
        raise SpecError(f"tile.block_n: {t.block_n} tokens over {wn} warp(s) leave each thread {s_floats} fp32 "
                        f"score accumulators (at most 32)")
    _check_int("tile.stages", t.stages, 2, 8)


def _wgmma_smem_bytes(tile: Tile, ckv: int, rope: int, kv_dtype: DType) -> int:
    """templates/wgmma.cuh Layout: q tile [M][C+R], `stages` kv tiles [N][C+R], the P tile [M][N]
    (16-bit), then row max and row sum exchange arrays [2][M] fp32 between the two warpgroups (fp8: see
    _kv_stages_bytes)."""
    d, kv = ckv + rope, 2
    stages = _kv_stages_bytes(tile, d, kv_dtype, align=1024)
    return tile.block_m * d * kv + stages + tile.block_m * tile.block_n * kv + 2 * 2 * tile.block_m * 4


def _check_wgmma(spec: VariantSpec) -> None:
    t = spec.tile
    if t.block_m != 64:
        raise SpecError(f"tile.block_m: wgmma takes 64 query rows per CTA (one m64 tile), got {t.block_m}")
    if t.block_n not in (32, 64):
        raise SpecError(f"tile.block_n: wgmma takes 32 or 64 kv tokens per step, got {t.block_n}")
    if t.warps != 8:
        raise SpecError(f"tile.warps: wgmma runs two warpgroups (8 warps), got {t.warps}")
    _check_int("tile.stages", t.stages, 2, 8)
    if spec.ckv_dim % 128 or spec.ckv_dim > 512:
        raise SpecError(f"ckv_dim: wgmma splits ckv into two halves of whole 64-column blocks (wgmma n <= 256): "
                        f"expected a multiple of 128 up to 512, got {spec.ckv_dim}")
    if spec.rope_dim % 64 and spec.rope_dim not in (16, 32):
        raise SpecError(f"rope_dim: wgmma stores rows in 32-, 64- or 128-byte swizzle atoms: expected 16, 32 or a "
                        f"multiple of 64, got {spec.rope_dim}")


def narrow_max_rows(ckv_dim: int, kv_dtype: DType = DType.BF16) -> int:
    """Most query rows a narrow CTA takes: O^T (ckv / 64 m-tiles x rows / 2 per thread) and the two S^T
    chains (rows each) must fit 255 registers without spills: measured 254 at 32 rows (ckv 512) and 40
    rows (ckv 256); 64 rows at ckv 256 spilled. The fp8 kernel (narrow_e4m3.cuh, both formats) keeps O^T
    beside two or three buffers of V^T fragments (and fp8_ds_mla's per-group score chains) within its consumers'
    240 registers (setmaxnreg; ptxas reports the 168 at entry): 16 rows at ckv 512, 32 at ckv 256."""
    if kv_dtype.is_fp8:
        return 16 if ckv_dim > 256 else 32
    return 32 if ckv_dim > 256 else 40


def _narrow_e4m3_smem_bytes(tile: Tile, ckv: int, kv_dtype: DType) -> int:
    """templates/narrow_e4m3.cuh E4m3Layout: q hi and lo ([M][C] and [M][128] e4m3 each, 1024-byte aligned as a
    whole), a ring of 3 (ckv 512) or 4 raw stages [N][C + 128] (fp8_ds_mla: and the tokens' scales [N][4] fp32),
    P^T [2][M][N] fp16, O [2][M][C + 4] fp32 (an area per warpgroup), then 1 / q scale [M], per-warp row max/sum
    [2][4][M], m [2][M] and lse [M] fp32, and 2 mbarriers per stage."""
    rows, n = tile.block_m, tile.block_n
    ring = 3 if ckv > 256 else 4
    scales = n * (ckv // 128) * 4 if kv_dtype is DType.FP8_DS_MLA else 0
    ring_off = -(-2 * rows * (ckv + 128) // 1024) * 1024
    return (ring_off + ring * (n * (ckv + 128) + scales) + 2 * rows * n * 2 + 2 * rows * (ckv + 4) * 4
            + (1 + 2 * 4 + 2 + 1) * rows * 4 + 2 * ring * 8)


def _narrow_smem_bytes(tile: Tile, ckv: int, rope: int, kv_dtype: DType) -> int:
    """templates/narrow.cuh Layout (fp8 caches: _narrow_e4m3_smem_bytes): q [M][C] and [M][R] (each panel
    1024-byte aligned), two kv stages [N][C + R] (16-bit), P^T [2][M][N] (16-bit), per-warp row max/sum [2][4][M],
    m [2][M] and lse [M] fp32."""
    if kv_dtype.is_fp8:
        return _narrow_e4m3_smem_bytes(tile, ckv, kv_dtype)
    up = lambda x: -(-x // 1024) * 1024  # noqa: E731 - the kernel's align()
    rows, n, kv = tile.block_m, tile.block_n, 2
    kv_off = up(up(rows * ckv * kv) + rows * rope * kv)
    return kv_off + 2 * n * (ckv + rope) * kv + 2 * rows * n * kv + (2 * 4 + 2 + 1) * rows * 4


def _check_narrow(spec: VariantSpec) -> None:
    t = spec.tile
    limit = narrow_max_rows(spec.ckv_dim, spec.kv_dtype)
    if spec.ckv_dim % 64 or spec.ckv_dim > 512:
        raise SpecError(f"ckv_dim: narrow reads V in 64-column blocks: expected a multiple of 64 up to 512, "
                        f"got {spec.ckv_dim}")
    if t.block_m % 8 or not 8 <= t.block_m <= limit:
        raise SpecError(f"tile.block_m: narrow takes a multiple of 8 query rows up to {limit} at ckv {spec.ckv_dim} "
                        f"and kv {spec.kv_dtype.cli_name} (wgmma n; registers), got {t.block_m}")
    if t.block_n != 64:
        raise SpecError(f"tile.block_n: narrow takes 64 kv tokens per step (wgmma m64), got {t.block_n}")
    if t.stages != 2:
        raise SpecError(f"tile.stages: narrow has one kv stage per warpgroup, expected 2, got {t.stages}")
    if t.warps != 8:
        raise SpecError(f"tile.warps: narrow runs two warpgroups (8 warps), got {t.warps}")
    if spec.rope_dim % 64 and spec.rope_dim not in (16, 32):
        raise SpecError(f"rope_dim: narrow stores rows in 32-, 64- or 128-byte swizzle atoms: expected 16, 32 or a "
                        f"multiple of 64, got {spec.rope_dim}")


def _seesaw_smem_bytes(tile: Tile, ckv: int, rope: int, kv_dtype: DType) -> int:
    """templates/seesaw.cuh Layout: q tile [M][C+R], `stages` kv tiles [N][C+RK] (K0, K1 of a pair, or of two
    pairs; RK = R, or 64 when R < 64: TMA boxes of 128-byte rows; P0 / P1 live in their first rope block), the row
    max and row sum exchanges [2][M] fp32 between the two warpgroups, and the mbarriers (per kv tile: one per
    64-column ckv block and one for the rope, the boxes landed; per kv tile half: the consumers freed it).
    512/64, 2 stages: 72 + 2 x 72 + 1 KB + 176 B = 217 KB; 256/32, 4 stages: 36 + 4 x 40 + 1 KB + 144 B = 197 KB.
    fp8_e4m3 (templates/seesaw_e4m3.cuh E4m3Layout): q hi and lo [M][C] e4m3, their ropes [M][128] each, a ring of
    `stages` raw tiles [N][C + 128], P [3][M][N] fp16, row max and scale [2][2][2][M], row sum [2][M] and 1 / q
    scale [M] fp32, 4 move flags, the ring position (8 bytes) and 2 mbarriers per stage: 512/64 with 3 stages
    227 KB."""
    if kv_dtype is DType.FP8_E4M3:
        m, n = tile.block_m, tile.block_n
        return (2 * m * ckv + 2 * m * 128 + tile.stages * n * (ckv + 128) + 3 * m * n * 2 + (8 + 2 + 1) * m * 4 + 16
                + 8 + tile.stages * 2 * 8)
    rope_k = rope if rope % 64 == 0 else 64
    units = tile.stages * (ckv // 64 + 1)
    itemsize = 2
    return (tile.block_m * (ckv + rope) * itemsize + tile.stages * tile.block_n * (ckv + rope_k) * itemsize
            + 2 * 2 * tile.block_m * 4 + units * 8 + tile.stages * 2 * 8)


def _check_seesaw(spec: VariantSpec) -> None:
    t = spec.tile
    if t.block_m != 64:
        raise SpecError(f"tile.block_m: seesaw takes 64 query rows per CTA (one m64 tile), got {t.block_m}")
    if t.block_n != 64:
        raise SpecError(f"tile.block_n: seesaw takes 64 kv tokens per tile (S = m64n64 per warpgroup), got {t.block_n}")
    if t.warps != 8:
        raise SpecError(f"tile.warps: seesaw runs two warpgroups (8 warps), got {t.warps}")
    if spec.kv_dtype is DType.FP8_E4M3:
        if t.stages < 3:
            raise SpecError(f"tile.stages: seesaw over fp8_e4m3 keeps a ring of raw tiles, at least 3 (the next pair's "
                            f"loads in flight), got {t.stages}")
    elif t.stages not in (2, 4):
        raise SpecError(f"tile.stages: seesaw holds the two kv tiles (K0, K1) of one pair or of two (the next pair's "
                        f"loads in flight): expected 2 or 4, got {t.stages}")
    if spec.ckv_dim not in (128, 256, 512):
        raise SpecError(f"ckv_dim: seesaw gives each warpgroup ckv/2 output columns as one wgmma n (64, 128 or "
                        f"256): expected 128, 256 or 512, got {spec.ckv_dim}")
    if spec.rope_dim % 64 and spec.rope_dim not in (16, 32):
        raise SpecError(f"rope_dim: seesaw stores rows in 32-, 64- or 128-byte swizzle atoms: expected 16, 32 or a "
                        f"multiple of 64, got {spec.rope_dim}")


# Families with an fp8-cache path (dequantized to fp16 on the way into, or inside, shared memory).
FP8_FAMILIES = (Family.NARROW, Family.SEESAW, Family.WGMMA, Family.MMA)


def seesaw_fp8_dims(ckv_dim: int, rope_dim: int) -> bool:
    """Whether seesaw's fp8_e4m3 path takes these dims: those it was measured and tested at on a GPU (the models'
    512/64 and 256/32, and their crosses)."""
    return ckv_dim in (256, 512) and rope_dim in (32, 64)


def _check_fp8(spec: VariantSpec) -> None:
    if spec.family not in FP8_FAMILIES:
        raise SpecError(f"kv_dtype: {spec.kv_dtype.cli_name} caches are read by the "
                        f"{', '.join(f.value for f in FP8_FAMILIES)} families only, got family "
                        f"{spec.family.value}")
    # narrow's fp8 gather: a team of 8 lanes reads a token's ckv in 128-byte steps and its rope in one
    # 16-byte chunk per lane (templates/narrow.cuh issue_tile)
    if spec.ckv_dim % 128:
        raise SpecError(f"ckv_dim: an fp8 cache is read in 128-value steps per token, expected a multiple of 128, "
                        f"got {spec.ckv_dim}")
    if spec.rope_dim > 128:
        raise SpecError(f"rope_dim: an fp8 cache's rope is read in one 16-byte chunk per lane of 8, expected at "
                        f"most 128, got {spec.rope_dim}")
    if spec.family is Family.SEESAW:
        if spec.kv_dtype is not DType.FP8_E4M3:
            raise SpecError(f"kv_dtype: seesaw reads fp8_e4m3 caches only (e4m3 Q K^T over the cache's bytes), "
                            f"got {spec.kv_dtype.cli_name}")
        if not seesaw_fp8_dims(spec.ckv_dim, spec.rope_dim):
            raise SpecError(f"ckv_dim: seesaw's fp8_e4m3 path takes ckv 256 or 512 with rope 32 or 64, got ckv "
                            f"{spec.ckv_dim}, rope {spec.rope_dim}")
    if spec.kv_dtype is DType.FP8_DS_MLA:
        if (spec.ckv_dim, spec.rope_dim) != (DS_MLA_CKV, DS_MLA_ROPE):
            raise SpecError(f"kv_dtype: the {DS_MLA_TOKEN_BYTES}-byte fp8_ds_mla token holds ckv {DS_MLA_CKV} and "
                            f"rope {DS_MLA_ROPE}, got ckv {spec.ckv_dim}, rope {spec.rope_dim}")
        if spec.q_dtype is not DType.BF16:
            raise SpecError(f"q_dtype: fp8_ds_mla keeps its rope in bf16 and takes bf16 queries, "
                            f"got {spec.q_dtype.value}")


_FAMILY_CHECKS = {Family.SIMT: _check_simt, Family.MMA: _check_mma, Family.WGMMA: _check_wgmma,
                  Family.NARROW: _check_narrow, Family.SEESAW: _check_seesaw}
