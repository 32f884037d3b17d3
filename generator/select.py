"""Dispatch RULES, torch-free: (arch, shape, dtype, batch and length statistics) -> the variant,
the split-kv grid and the reasons. `python -m generator explain` prints a Decision; the runtime
(mla_gen.dispatch) asks the same function with the device's numbers.
"""
from __future__ import annotations

import dataclasses
import math

from generator.errors import SpecError
from generator.spec import (FP8_FAMILIES, MAX_HEADS, Arch, DType, Family, Tile, VariantSpec, narrow_max_rows,
                            seesaw_fp8_dims, smem_bytes)

# Families with a template, fastest first (decide makes two exceptions on sm_90a: seesaw from SEESAW_MIN_ROWS
# rows on, narrow below that where all rows fit one narrow CTA).
FAMILY_ORDER = (Family.WGMMA, Family.NARROW, Family.SEESAW, Family.MMA, Family.SIMT)
# seesaw from 40 query rows on, ahead of wgmma and narrow there (H200, `python -m mla_gen.bench --peers`, us
# seesaw / other; PERF.md). Since its producer warpgroup (eighth session, two runs): B128 S4096 H40 183.0 and
# 181.4 / wgmma 195.3 and 195.5 (the seventh session had 191.0 / 195.9, the sixth 197.9 / 195.6); MiniCPM3 B128
# S4096 H40 c256/r32 121.6 / narrow 131.2; H64 191.1 / 206.9, H128 280.8 / 351.4. Below 40 rows narrow stays:
# B128 S4096 H32 179.1 / 179.8 and H16 s_q 2 178.2 / 180.3 are even, H16 170.8 / 167.0 favours narrow.
SEESAW_MIN_ROWS = 40
# Seesaw's producer loads a kv tile as TMA boxes of one page's rows (the largest power of two dividing the page size,
# at most 64), and the TMA unit takes ~32 cycles a box: at page 1 that is 576 boxes a tile, and B128 S4096 H128 took
# 1310 us against 254 at page 64 and wgmma's 344 (cp.async gathers, any page size the same); at page 16 (36 boxes)
# 276-288 us. So from 40 rows seesaw needs boxes of at least this many rows, else wgmma runs (H200, PERF.md,
# twenty-fourth session; a seesaw that gathered small pages by cp.async from its producer warps took 548 us).
SEESAW_MIN_BOX_ROWS = 8
# Below 40 rows narrow takes small calls too: from the fourteenth session seesaw took calls of at most 24 kv tiles
# per SM, measured under the bench's writing L2 flush, whose dirty lines cost narrow more; with a reading flush
# narrow led 8 of 12 such shapes by 3-16 % and trailed 4 by 1.5-4.5 % (B32 S1024 H16 25.6 / 29.6 us seesaw; PERF.md,
# seventeenth session).
# Why few heads do not go back to mma on sm_90a: wgmma pads rows to a 64-row tile, but measured it is
# not slower there (H100 bench, same runs, us wgmma vs mma): B128 S4096 H16 238 vs 241, B32 S1024 H16
# 40.3 vs 42.3, B128 S4096 H40 c256/r32 143 vs 201, B64 S8192 H128 s_q 2 623 vs 1078.
WGMMA_FEW_HEADS_NOTE = ("also for few heads: measured on H100 at 16 heads no slower than mma "
                        "(238 vs 241 us B128 S4096, 40 vs 42 us B32 S1024)")
# Tokens of kv that one part must at least get before splitting pays for its fixed costs.
MIN_TOKENS_PER_PART = 256
# Most CTA columns a grid may have: the merge kernel holds one weight per part of a request in shared
# memory (templates/common.cuh kMergeMaxSplits).
MAX_PARTS = 2048
# Fixed cost of a request or a split (q load, epilogue, merge), in kv tokens.
FIXED_COST_TOKENS = 128
# A grid whose parts line up with the requests: fewer parts that each take k whole requests (batch >= parts; uniform
# lengths then split none: no partial rows, no merge, one segment fewer), or batch x k parts so that each request
# spans k of them (batch < parts; uniform lengths then split into k equal pieces, each part one segment) is worth up
# to 5 % of the parts idle. H200, seesaw, same run (scripts/split_sweep.py, us): B128 S4096 H128 at 64 parts 258.9
# against 66 parts 271.4; B64 S8192 H128 253.9 against 267.9; B32 S1024 H16 at 128 parts 26.2 against 28.5 (132);
# B4 S65536 H128 at 64 parts 145.6 against 149.1 (66); B8 S16384 H16 at 128 parts 56.6 against 57.4 (132).
ALIGNED_PARTS_MIN_FILL = 0.95


def aligned_parts(parts: int, batch: int) -> int:
    """The parts of a grid lined up with the requests, if they keep at least ALIGNED_PARTS_MIN_FILL of `parts`
    busy, else `parts`: batch / k parts when k = ceil(batch / parts) divides the batch (k whole requests each),
    and batch x k parts for k = parts // batch when the batch is smaller (each request over k parts)."""
    if batch < parts:
        aligned = batch * (parts // batch)
    else:
        per_part = math.ceil(batch / parts)
        aligned = batch // per_part if batch % per_part == 0 else parts
    return aligned if aligned >= ALIGNED_PARTS_MIN_FILL * parts else parts


def dispatch_specs(*, arch: Arch, num_heads: int, ckv_dim: int, rope_dim: int, dtype: DType, s_q: int = 1,
                   kv_dtype: DType | None = None, tile: Tile | None = None) -> list[VariantSpec]:
    """The variants dispatch may load for a shape, whatever the batch and page size. What `build` makes ahead of
    time."""
    shape = dict(arch=arch, num_heads=num_heads, ckv_dim=ckv_dim, rope_dim=rope_dim, dtype=dtype, s_q=s_q,
                 kv_dtype=kv_dtype, tile=tile)
    specs = [decide(**shape).spec]
    small_pages = decide(**shape, page_size=1).spec  # page sizes of small TMA boxes
    return specs + ([small_pages] if small_pages != specs[0] else [])


def tma_box_rows(page_size: int) -> int:
    """Rows of a TMA box of one page (templates/sm90.cuh tma_box_rows): the largest power of two dividing the page
    size, at most 64."""
    return min(page_size & -page_size, 64)


def families_for(arch: Arch) -> list[Family]:
    """Families that run on `arch`, fastest first."""
    return [f for f in FAMILY_ORDER if f.runs_on(arch)]


def default_tile(family: Family, num_heads: int, ckv_dim: int, rope_dim: int, arch: Arch | None = None,
                 s_q: int = 1, kv_dtype: DType = DType.BF16) -> Tile:
    """The tile a family uses for a head count and query length (rows per CTA)."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or not 1 <= num_heads <= MAX_HEADS:
        raise SpecError(f"num_heads: expected 1..{MAX_HEADS}, got {num_heads!r}")
    if family is Family.SIMT:
        block_m = min(16, 1 << max(0, math.ceil(math.log2(num_heads))))
        warps = 8 if ckv_dim % 512 == 0 else (4 if ckv_dim % 256 == 0 else 2 if ckv_dim % 128 == 0 else 1)
        block_n = 16 if arch is not None and arch.max_smem_per_block < 96 * 1024 else 32
        return Tile(block_m, block_n, 1, warps)
    if family is Family.MMA:
        return _mma_tile(num_heads, ckv_dim, rope_dim, arch, kv_dtype)
    if family is Family.WGMMA:
        return _wgmma_tile(ckv_dim, rope_dim, arch, kv_dtype)
    if family is Family.NARROW:
        # all rows in one CTA where they fit (else row blocks of the most rows, each reading the cache)
        rows = -(-num_heads * s_q // 8) * 8
        return Tile(min(rows, narrow_max_rows(ckv_dim, kv_dtype)) if ckv_dim % 64 == 0 else 8, 64, 2, 8)
    if family is Family.SEESAW:
        # 64 rows x pairs of 64-token tiles (K0, K1), two warpgroups; the kv buffers of two pairs where they fit
        # (ckv 256: 197 KB), so that a pair's loads go out while the pair before it computes
        # (fp8_e4m3: a ring of raw tiles, four where they fit, else three)
        two_pairs = Tile(64, 64, 4, 8)
        if arch is not None and _fits(family, two_pairs, ckv_dim, rope_dim, arch, kv_dtype):
            return two_pairs
        return Tile(64, 64, 3 if kv_dtype is DType.FP8_E4M3 else 2, 8)
    raise SpecError(f"family: no tile rules for {family.value}")


def _fits(family: Family, tile: Tile, ckv_dim: int, rope_dim: int, arch: Arch, kv_dtype: DType = DType.BF16) -> bool:
    """Whether the tile's shared memory fits a block on `arch` (16-bit q and kv tiles in every kernel; an
    fp8 cache's stages hold its own bytes)."""
    return smem_bytes(family, tile, ckv_dim, rope_dim, kv_dtype) <= arch.max_smem_per_block


def _mma_tile(num_heads: int, ckv_dim: int, rope_dim: int, arch: Arch | None, kv_dtype: DType = DType.BF16) -> Tile:
    """mma tile: rows per CTA from the head count (a warp owns 16 rows at block_m 16, else 32, and
    a quarter of the ckv columns), then as many kv stages as shared memory holds (at most 8), so
    the memory-bound small-head cases keep the most bytes in flight. Candidates that do not fit
    the arch's shared memory fall back to smaller tiles."""
    if num_heads <= 16:
        candidates = [(16, 32, 4)]                      # 16 rows x 4 warps of 128 (ckv 512) columns
    elif num_heads <= 32:
        candidates = [(32, 32, 4), (16, 32, 4)]          # 32 rows x 4 column quarters
    else:
        candidates = [(64, 64, 8), (64, 32, 8), (32, 32, 4), (16, 32, 4)]  # 2 row groups x 4 quarters
    for block_m, block_n, warps in candidates:
        for stages in range(8, 1, -1):
            tile = Tile(block_m, block_n, stages, warps)
            if not _fits(Family.MMA, tile, ckv_dim, rope_dim, arch or Arch.SM80, kv_dtype):
                continue  # fewer stages
            try:  # the family's other rules for these dims (stage-independent)
                VariantSpec(num_heads, ckv_dim, rope_dim, DType.BF16, kv_dtype, DType.BF16, Family.MMA, tile,
                            arch or Arch.SM80)
            except SpecError:
                break  # this shape does not suit the dims: next candidate
            return tile
    # nothing fits: return the smallest so that VariantSpec reports the problem with its field
    return Tile(*candidates[-1][:2], 2, candidates[-1][2])


def _wgmma_tile(ckv_dim: int, rope_dim: int, arch: Arch | None, kv_dtype: DType = DType.BF16) -> Tile:
    """wgmma tile: 64 rows (one m64 tile) x 64 tokens, two warpgroups, as many kv stages as shared
    memory holds, at most 4 (512/64: 2 stages, 225 KB; 256/32: 4 stages). 32-token tiles where two
    64-token stages do not fit (fp8_ds_mla at 512/64: its 656-byte stages and the fp16 tile)."""
    for block_n in (64, 32):
        for stages in range(4, 1, -1):
            tile = Tile(64, block_n, stages, 8)
            if _fits(Family.WGMMA, tile, ckv_dim, rope_dim, arch or Arch.SM90A, kv_dtype):
                return tile
    return Tile(64, 64, 2, 8)


@dataclasses.dataclass(frozen=True)
class Decision:
    spec: VariantSpec
    m_blocks: int          # CTAs along the packed query rows
    num_parts: int         # CTA columns along kv (the split-kv grid); the plan may use fewer
    fixed_cost: int        # plan blocks charged per request
    min_part_cost: int     # plan blocks a part must get before another part is used
    reasons: tuple[str, ...]

    def to_dict(self) -> dict[str, object]:
        return {"variant_id": self.spec.variant_id, "spec": self.spec.to_dict(), "m_blocks": self.m_blocks,
                "num_parts": self.num_parts, "grid": [self.m_blocks, self.num_parts],
                "fixed_cost": self.fixed_cost, "min_part_cost": self.min_part_cost, "reasons": list(self.reasons)}


def decide(*, arch: Arch, num_heads: int, ckv_dim: int, rope_dim: int, dtype: DType, s_q: int = 1,
           sm_count: int = 132, ctas_per_sm: int | None = None, family: Family | None = None,
           tile: Tile | None = None, num_parts: int | None = None, batch: int | None = None,
           mean_seqlen: float | None = None, kv_dtype: DType | None = None, page_size: int | None = None) -> Decision:
    """Chooses family, tile and grid. dtype: q and out (and the cache unless kv_dtype names an fp8
    format). page_size: the cache's (None: one of whole TMA boxes). Raises SpecError for an impossible request."""
    reasons: list[str] = []
    if s_q < 1:
        raise SpecError(f"s_q: expected >= 1, got {s_q}")
    if page_size is not None and (isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1):
        raise SpecError(f"page_size: expected a positive int, got {page_size!r}")
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    available = families_for(arch)
    rows = num_heads * s_q
    seesaw_rows = Family.SEESAW in available and rows >= SEESAW_MIN_ROWS
    # seesaw's TMA boxes of page_size's rows (SEESAW_MIN_BOX_ROWS)
    boxes_ok = page_size is None or tma_box_rows(page_size) >= SEESAW_MIN_BOX_ROWS
    box = tma_box_rows(page_size or 64)
    small_boxes = (f"; not seesaw: page size {page_size} makes its TMA boxes {box} row{'s' if box > 1 else ''} high, "
                   f"under {SEESAW_MIN_BOX_ROWS}")
    if family is None and kv_dtype.is_fp8:
        family = next((f for f in available if f in FP8_FAMILIES), None)
        if family is None:
            raise SpecError(f"kv_dtype: {kv_dtype.cli_name} caches are read by the "
                            f"{', '.join(f.value for f in FP8_FAMILIES)} families (sm_80 and newer), "
                            f"not on {arch.nvcc_name}")
        limit = narrow_max_rows(ckv_dim, kv_dtype)
        if Family.NARROW in available and ckv_dim % 64 == 0 and rows <= limit:
            family = Family.NARROW
            how = ("Q K^T in e4m3 straight from the cache's bytes (q quantized per row into two e4m3 parts), P V "
                   "in fp16 with V converted in registers" if kv_dtype is DType.FP8_E4M3 else
                   "Q K^T in e4m3 straight from the cache's bytes, a chain per scale group (q quantized per row into "
                   "two e4m3 parts) and the bf16 rope in bf16, P V in fp16 with V scaled and converted in registers")
            reasons.append(f"family narrow: {rows} query rows fit one narrow CTA (at most {limit} with an fp8 cache "
                           f"at ckv {ckv_dim}); {how}")
        elif (seesaw_fp8 := seesaw_rows and kv_dtype is DType.FP8_E4M3 and seesaw_fp8_dims(ckv_dim, rope_dim)) \
                and boxes_ok:
            family = Family.SEESAW
            reasons.append(f"family seesaw: {rows} query rows (from {SEESAW_MIN_ROWS} on); Q K^T in e4m3 straight "
                           f"from a ring of the cache's TMA-loaded bytes (q quantized per row into two e4m3 parts), "
                           f"P V in fp16 with V converted in registers")
        else:
            reasons.append(f"family {family.value}: the fastest family with an fp8 path on {arch.nvcc_name} "
                           f"({kv_dtype.cli_name}: the cache's bytes staged, dequantized to fp16 inside shared "
                           f"memory, fp16 tensor-core math)" + (small_boxes if seesaw_fp8 else ""))
    elif family is None:
        family = available[0]
        if seesaw_rows and boxes_ok:
            family = Family.SEESAW
            reasons.append(f"family seesaw: {rows} query rows (from {SEESAW_MIN_ROWS} on): two warpgroups trade "
                           f"softmax and tensor-core work, a producer warpgroup loads kv by TMA; measured faster "
                           f"than wgmma and narrow there on H200")
        elif Family.NARROW in available and ckv_dim % 64 == 0 and rows <= narrow_max_rows(ckv_dim):
            family = Family.NARROW
            reasons.append(f"family narrow: {rows} query rows fit one narrow CTA (at most "
                           f"{narrow_max_rows(ckv_dim)} at ckv {ckv_dim}): kv tokens on wgmma's M, no padding "
                           f"of the rows to 64")
        else:
            note = f" ({WGMMA_FEW_HEADS_NOTE})" if family is Family.WGMMA else ""
            if seesaw_rows and not boxes_ok:
                note = small_boxes + " (cp.async gathers, any page size)"
            reasons.append(f"family {family.value}: fastest of {[f.value for f in available]} on "
                           f"{arch.nvcc_name}{note}")
    elif family not in available:
        raise SpecError(f"family: {family.value} does not run on {arch.nvcc_name}; available: "
                        f"{', '.join(f.value for f in available)}")
    else:
        reasons.append(f"family {family.value}: requested")
    if tile is None:
        tile = default_tile(family, num_heads, ckv_dim, rope_dim, arch, s_q, kv_dtype)
        reasons.append(f"tile {tile.name}: {family.value} rule for {num_heads} heads "
                       f"({tile.block_m} rows per CTA, {tile.block_n} kv tokens per step)")
    spec = VariantSpec(num_heads, ckv_dim, rope_dim, dtype, kv_dtype, dtype, family, tile, arch)
    m_blocks = math.ceil(rows / tile.block_m)
    padded = m_blocks * tile.block_m
    reasons.append(f"{rows} query rows (heads {num_heads} x s_q {s_q}) -> {m_blocks} row block(s) of "
                   f"{tile.block_m}" + (f", {padded - rows} padded rows" if padded != rows else ""))
    if ctas_per_sm is None:
        ctas_per_sm = 1
    if num_parts is None:
        num_parts = min(MAX_PARTS, max(1, (sm_count * ctas_per_sm) // m_blocks))
        reasons.append(f"{num_parts} parts: {sm_count} SMs x {ctas_per_sm} CTA(s)/SM over {m_blocks} row "
                       f"block(s)")
        if batch is not None and (aligned := aligned_parts(num_parts, batch)) != num_parts:
            how = (f"each request over {aligned // batch} of them (at uniform lengths, equal pieces)" if batch < aligned
                   else f"{batch // aligned} whole request(s) of the {batch} each (at uniform lengths none is split: "
                        f"no partial rows or merge)")
            reasons.append(f"{aligned} parts: {how}, {num_parts - aligned} of {num_parts} columns left idle")
            num_parts = aligned
    else:
        if isinstance(num_parts, bool) or not isinstance(num_parts, int) or not 1 <= num_parts <= MAX_PARTS:
            raise SpecError(f"num_parts: expected 1..{MAX_PARTS}, got {num_parts!r}")
        reasons.append(f"{num_parts} parts: requested")
    # The plan charges a request's fixed work (q load, epilogue) to the part holding its first block. When the
    # batch is split anyway (at most half a request per part), every part pays that work for its own piece, and
    # the charge would only make the first pieces shorter than the rest (B32 S1024 H16: 27.7 against 26.2 us).
    split_all = batch is not None and 2 * batch <= num_parts
    fixed_cost = 0 if split_all else math.ceil(FIXED_COST_TOKENS / tile.block_n)
    min_part_cost = max(1, math.ceil(MIN_TOKENS_PER_PART / tile.block_n) + fixed_cost)
    reasons.append(f"the device plan balances kv blocks + {fixed_cost} per request"
                   + (f" (batch {batch} over {num_parts} parts: every request is split)" if split_all else "")
                   + f" over the parts, and uses fewer when a part would get under {min_part_cost} blocks")
    if batch is not None and mean_seqlen is not None:
        blocks = batch * (math.ceil(mean_seqlen / tile.block_n) + fixed_cost)
        used = max(1, min(num_parts, math.ceil(blocks / min_part_cost)))
        per_part = blocks / used
        splits = "requests are split across parts" if used > batch else "whole requests per part"
        reasons.append(f"batch {batch} x ~{mean_seqlen:.0f} tokens = ~{blocks} cost blocks over {used} parts "
                       f"(~{per_part:.1f} each): {splits}")
    return Decision(spec, m_blocks, num_parts, fixed_cost, min_part_cost, tuple(reasons))
