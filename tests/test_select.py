"""generator.select: the grid and split arithmetic of a Decision, and the tile rules' shared-memory fit,
each worked out by hand beside the code's answer."""
from __future__ import annotations

import dataclasses

import pytest

from generator.errors import SpecError
from generator.select import (FIXED_COST_TOKENS, MAX_PARTS, MIN_TOKENS_PER_PART, SEESAW_MIN_BOX_ROWS, aligned_parts,
                              decide, default_tile, dispatch_specs, families_for, tma_box_rows)
from generator.spec import MAX_HEADS, Arch, DType, Family, Tile, smem_bytes
from mla_gen.schedule import PlanConfig, part_blocks, plan

BF16 = DType.BF16


def test_constants_the_hand_numbers_assume() -> None:
    """The numbers below are worked out for these; a new policy updates both together."""
    assert (FIXED_COST_TOKENS, MIN_TOKENS_PER_PART, MAX_PARTS) == (128, 256, 2048)


WGMMA = dict(arch=Arch.SM90A, family=Family.WGMMA)
SEESAW = dict(arch=Arch.SM90A, family=Family.SEESAW)


def test_wgmma_h128_grid_by_hand() -> None:
    d = decide(**WGMMA, num_heads=128, ckv_dim=512, rope_dim=64, dtype=BF16)
    assert d.spec.tile == Tile(64, 64, 2, 8)
    assert d.m_blocks == 2                      # 128 rows / 64 per CTA
    assert d.fixed_cost == 2                    # 128 tokens / 64 per block
    assert d.min_part_cost == 4 + 2             # 256 tokens / 64, plus the fixed cost
    assert d.num_parts == 66                    # 132 SMs x 1 CTA / 2 row blocks
    assert decide(**WGMMA, num_heads=128, ckv_dim=512, rope_dim=64, dtype=BF16, ctas_per_sm=2).num_parts == 132


def test_s_q_multiplies_the_rows() -> None:
    d = decide(**WGMMA, num_heads=128, ckv_dim=512, rope_dim=64, dtype=BF16, s_q=2)
    assert (d.m_blocks, d.num_parts) == (4, 33)          # 256 rows / 64; 132 // 4


def test_padded_rows_are_reported() -> None:
    d = decide(**WGMMA, num_heads=16, ckv_dim=512, rope_dim=64, dtype=BF16)
    assert (d.m_blocks, d.num_parts) == (1, 132)
    assert any("48 padded rows" in r for r in d.reasons)  # one 64-row tile for 16 rows


def test_simt_h40_s_q2_by_hand() -> None:
    d = decide(arch=Arch.SM90A, num_heads=40, ckv_dim=256, rope_dim=32, dtype=BF16, s_q=2, family=Family.SIMT)
    assert d.spec.tile.block_m == 16 and d.spec.tile.block_n == 32
    assert d.m_blocks == 5                      # 80 rows / 16
    assert d.num_parts == 26                    # 132 // 5
    assert (d.fixed_cost, d.min_part_cost) == (4, 8 + 4)


def test_at_least_one_part_when_rows_outnumber_the_sms() -> None:
    d = decide(**WGMMA, num_heads=128, ckv_dim=512, rope_dim=64, dtype=BF16, s_q=4, sm_count=4)
    assert (d.m_blocks, d.num_parts) == (8, 1)


def test_parts_are_capped_by_the_merge_kernel() -> None:
    d = decide(**WGMMA, num_heads=16, ckv_dim=512, rope_dim=64, dtype=BF16, sm_count=10_000)
    assert d.num_parts == MAX_PARTS  # not 10000 // 1
    for bad in (0, MAX_PARTS + 1):
        with pytest.raises(SpecError, match=r"^num_parts: "):
            decide(**WGMMA, num_heads=16, ckv_dim=512, rope_dim=64, dtype=BF16, num_parts=bad)


@pytest.mark.parametrize("page, box", [(1, 1), (2, 2), (3, 1), (4, 4), (8, 8), (12, 4), (16, 16), (48, 16),
                                       (64, 64), (128, 64), (192, 64)])
def test_tma_box_rows_by_hand(page: int, box: int) -> None:
    assert tma_box_rows(page) == box


@pytest.mark.parametrize("kv_dtype", [None, DType.FP8_E4M3])
@pytest.mark.parametrize("page", [None, 1, 2, 4, 6, 8, 16, 24, 64])
def test_seesaw_only_where_its_tma_boxes_are_tall_enough(page, kv_dtype) -> None:
    """From 40 rows seesaw loads tiles as TMA boxes of one page's rows; boxes under SEESAW_MIN_BOX_ROWS rows (page
    sizes not a multiple of 8) take wgmma, which gathers by cp.async at any page size."""
    d = decide(arch=Arch.SM90A, num_heads=128, ckv_dim=512, rope_dim=64, dtype=BF16, page_size=page,
               kv_dtype=kv_dtype)
    tall = page is None or page % SEESAW_MIN_BOX_ROWS == 0
    assert d.spec.family is (Family.SEESAW if tall else Family.WGMMA), d.reasons
    assert tall or any(f"page size {page} makes its TMA boxes" in r for r in d.reasons), d.reasons
    # below 40 rows the rule does not apply: narrow
    assert decide(arch=Arch.SM90A, num_heads=16, ckv_dim=512, rope_dim=64, dtype=BF16, page_size=page,
                  kv_dtype=kv_dtype).spec.family is Family.NARROW


def test_build_ahead_makes_the_small_page_variant_too() -> None:
    specs = dispatch_specs(arch=Arch.SM90A, num_heads=128, ckv_dim=512, rope_dim=64, dtype=BF16)
    assert [s.family for s in specs] == [Family.SEESAW, Family.WGMMA]
    assert [s.family for s in dispatch_specs(arch=Arch.SM90A, num_heads=16, ckv_dim=512, rope_dim=64, dtype=BF16)] \
        == [Family.NARROW]


@pytest.mark.parametrize("bad", [0, -64, True, 1.5, "64"])
def test_a_bad_page_size_is_named(bad) -> None:
    with pytest.raises(SpecError, match=r"^page_size: expected a positive int"):
        decide(arch=Arch.SM90A, num_heads=128, ckv_dim=512, rope_dim=64, dtype=BF16, page_size=bad)


def test_requested_parts_are_kept() -> None:
    d = decide(arch=Arch.SM80, num_heads=16, ckv_dim=512, rope_dim=64, dtype=BF16, num_parts=7)
    assert d.num_parts == 7 and "7 parts: requested" in d.reasons


@pytest.mark.parametrize("batch, seqlen, used, per_part, how", [
    (64, 4096, 64, 4224 / 64, "whole requests per part"),           # 64 x (64 + 2) = 4224 blocks over 64 parts
    (40, 4096, 66, 2640 / 66, "requests are split across parts"),   # 40 whole requests would leave 26 of 66 idle
    (1, 100, 1, 2.0, "whole requests per part"),                    # 1 x (2 + 0) = 2 < 4, one part's minimum
    (1, 600, 3, 10 / 3, "requests are split across parts"),         # 1 x (10 + 0) = 10 over ceil(10 / 4) = 3 parts
    (8, 1000, 14, 8 * 18 / 14, "requests are split across parts"),   # 8 x (16 + 2) = 144; 24 parts, capped at 14
])
def test_split_reason_by_hand(batch: int, seqlen: int, used: int, per_part: float, how: str) -> None:
    d = decide(**WGMMA, num_heads=128, ckv_dim=512, rope_dim=64, dtype=BF16, batch=batch,
               mean_seqlen=seqlen, num_parts=14 if batch == 8 else None)
    line = d.reasons[-1]
    assert f"over {used} parts (~{per_part:.1f} each): {how}" in line, line


@pytest.mark.parametrize("parts, batch, want", [
    (66, 128, 64),    # 2 requests per part: 64 parts, 2 of 66 idle (97 %)
    (66, 64, 64),     # 1 each
    (132, 256, 128),  # 2 each
    (132, 128, 128),
    (132, 132, 132),  # already whole
    (66, 100, 66),    # 2 each would be 50 parts: 76 % of 66, so the split grid stays
    (66, 4, 64),      # each request over 16 parts: 2 of 66 idle
    (132, 32, 128),   # each over 4
    (132, 8, 128),    # each over 16
    (66, 1, 66),      # one request over all
    (132, 100, 132),  # each over 1 would idle 32 columns
    (132, 60, 132),   # each over 2: 120 parts, 91 %
    (66, 126, 63),    # 2 each: 63 parts (95.5 %)
    (66, 127, 66),    # 2 each does not divide 127: the planner would split a request anyway
    (66, 1000, 66),   # 16 each does not divide 1000
])
def test_aligned_parts_by_hand(parts: int, batch: int, want: int) -> None:
    assert aligned_parts(parts, batch) == want


def test_a_batch_that_fills_a_whole_request_grid_gets_it() -> None:
    d = decide(**WGMMA, num_heads=128, ckv_dim=512, rope_dim=64, dtype=BF16, batch=128)
    assert d.num_parts == 64 and "64 parts: 2 whole request(s) of the 128 each" in d.reasons[-2], d.reasons
    assert decide(**WGMMA, num_heads=128, ckv_dim=512, rope_dim=64, dtype=BF16).num_parts == 66  # batch unknown
    assert decide(**WGMMA, num_heads=128, ckv_dim=512, rope_dim=64, dtype=BF16, batch=128, num_parts=66).num_parts == 66


def test_a_small_batch_is_cut_into_equal_pieces_without_a_fixed_cost() -> None:
    d = decide(**SEESAW, num_heads=16, ckv_dim=512, rope_dim=64, dtype=BF16, batch=32)
    assert (d.num_parts, d.fixed_cost, d.min_part_cost) == (128, 0, 4), d.reasons
    assert "128 parts: each request over 4 of them" in d.reasons[-2], d.reasons
    assert "every request is split" in d.reasons[-1], d.reasons
    # 32 x 16 blocks over 128 parts: 4 each, one segment per part
    cfg = PlanConfig(block_n=64, num_parts=d.num_parts, fixed_cost=d.fixed_cost, min_part_cost=d.min_part_cost)
    pl = plan([1024] * 32, cfg)
    assert set(part_blocks(pl, [1024] * 32, cfg)) == {4} and pl.active_parts == 128
    big = decide(**SEESAW, num_heads=16, ckv_dim=512, rope_dim=64, dtype=BF16, batch=67)
    assert (big.num_parts, big.fixed_cost) == (132, 2), big.reasons  # 134 > 132: not every request is split
    assert decide(**WGMMA, num_heads=16, ckv_dim=512, rope_dim=64, dtype=BF16).fixed_cost == 2  # batch unknown


@pytest.mark.parametrize("arch, heads, dims, tile", [
    # mma, (64, 64, s, 8): 64*576*2 + s*64*576*2 + 64*64*2 + 2*4*64*4 = 83968 + 73728 s
    (Arch.SM90A, 128, (512, 64), Tile(64, 64, 2, 8)),     # s = 2: 231424 <= 232448 (227 KB)
    (Arch.SM80, 128, (512, 64), Tile(64, 32, 2, 8)),      # s = 2 is 231424 > 166912 (163 KB): next shape,
                                                           # 79872 + 36864 s: s = 2 (153600)
    # mma (16, 32, s, 4): 16*576*2 + s*32*576*2 + 16*32*2 + 2*4*16*4 = 19968 + 36864 s
    (Arch.SM90A, 16, (512, 64), Tile(16, 32, 5, 4)),      # s = 5: 204288; s = 6 is 241152
    (Arch.SM80, 16, (512, 64), Tile(16, 32, 3, 4)),       # s = 3: 130560; s = 4 is 167424
    (Arch.SM86, 16, (512, 64), Tile(16, 32, 2, 4)),       # 99 KB = 101376: s = 2 (93696)
])
def test_mma_stages_are_the_most_that_fit_by_hand(arch: Arch, heads: int, dims: tuple[int, int], tile: Tile) -> None:
    assert default_tile(Family.MMA, heads, *dims, arch) == tile


@pytest.mark.parametrize("dims, stages", [((512, 64), 2), ((256, 32), 4)])
def test_wgmma_stages_by_hand(dims: tuple[int, int], stages: int) -> None:
    # 64*(C+R)*2 * (1 + s) + 64*64*2 + 2*2*64*4: 512/64 -> 82944 + 73728 s (s = 2: 230400 <= 232448);
    # 256/32 -> 46080 + 36864 s (s = 4, the most the rule tries: 193536)
    assert default_tile(Family.WGMMA, 128, *dims, Arch.SM90A) == Tile(64, 64, stages, 8)
    assert smem_bytes(Family.WGMMA, Tile(64, 64, 2, 8), 512, 64, DType.BF16) == 230400


@pytest.mark.parametrize("arch", [Arch.SM80, Arch.SM86, Arch.SM90A])
@pytest.mark.parametrize("heads", [1, 16, 20, 40, 64, 128])
@pytest.mark.parametrize("dims", [(512, 64), (256, 32)])
def test_default_tiles_fit_and_take_the_most_stages(arch: Arch, heads: int, dims: tuple[int, int]) -> None:
    """The rule is computed, not guessed: each tile fits, and one more stage would not (or is past the cap)."""
    cap = {Family.MMA: 8, Family.WGMMA: 4, Family.SIMT: 1}
    for family in [f for f in families_for(arch) if f in cap]:  # the families whose stages the fit decides
        tile = default_tile(family, heads, *dims, arch)
        assert smem_bytes(family, tile, *dims, DType.BF16) <= arch.max_smem_per_block
        more = dataclasses.replace(tile, stages=tile.stages + 1)
        assert tile.stages == cap[family] or smem_bytes(family, more, *dims, DType.BF16) > arch.max_smem_per_block


@pytest.mark.parametrize("kwargs, field", [
    (dict(s_q=0), "s_q"),
    (dict(num_heads=MAX_HEADS + 1), "num_heads"),
    (dict(family=Family.WGMMA, arch=Arch.SM80), "family"),
    (dict(ckv_dim=500), "ckv_dim"),
])
def test_impossible_requests_name_the_field(kwargs: dict, field: str) -> None:
    args = dict(arch=Arch.SM90A, num_heads=16, ckv_dim=512, rope_dim=64, dtype=BF16) | kwargs
    with pytest.raises(SpecError, match=rf"^{field}:"):
        decide(**args)
