"""The host split-kv planner: every kv block covered exactly once, balanced to one block, slots
within the workspace bound (the device planner is compared with it in the GPU tests)."""
import random

import pytest

from mla_gen.schedule import (INLINE_MERGE_SPLITS, PlanConfig, Segment, max_partials, merge_may_have_work,
                              part_blocks, plan, segments, spanned_parts)


def random_lengths(rng: random.Random, batch: int, hi: int) -> list[int]:
    kind = rng.choice(["uniform", "one_long", "equal", "tiny"])
    if kind == "uniform":
        return [rng.randint(1, hi) for _ in range(batch)]
    if kind == "one_long":
        return [rng.randint(1, 64) for _ in range(batch - 1)] + [hi * 8]
    if kind == "equal":
        return [hi] * batch
    return [rng.randint(1, 3) for _ in range(batch)]


def check_plan(lengths: list[int], cfg: PlanConfig) -> None:
    pl = plan(lengths, cfg)
    segs = list(segments(pl, lengths, cfg))
    # every kv block of every valid request exactly once
    seen: dict[tuple[int, int], int] = {}
    for s in segs:
        for blk in range(s.blk_lo, s.blk_hi):
            seen[(s.req, blk)] = seen.get((s.req, blk), 0) + 1
    want = {(b, k) for b, n in enumerate(lengths) for k in range(cfg.request_blocks(n))}
    assert set(seen) == want and all(c == 1 for c in seen.values())
    # the blocks of each part are exactly the block units of its cost range [x_p, x_{p+1})
    active, total = pl.active_parts, pl.total_cost
    bounds = [total * p // active for p in range(active)] + [total] * (cfg.num_parts - active + 1)
    blocks = part_blocks(pl, lengths, cfg)
    for p in range(cfg.num_parts):
        units = 0
        for b, n in enumerate(lengths):
            nb = cfg.request_blocks(n)
            if nb:
                start = pl.req_info[b][3] + cfg.fixed_cost
                units += max(0, min(bounds[p + 1], start + nb) - max(bounds[p], start))
        assert blocks[p] == units
    # balanced, measured on the plan's own segments: a part's load is its blocks plus the fixed cost of
    # each request it starts; a part boundary inside a fixed-cost stretch moves up to fixed_cost of it
    costs = [cfg.request_blocks(n) + cfg.fixed_cost for n in lengths if cfg.request_blocks(n)]
    assert total == sum(costs)
    assert active == min(cfg.num_parts, max(1, -(-total // cfg.min_part_cost)))
    loads = list(blocks)
    for s in segs:
        loads[s.part] += cfg.fixed_cost if s.blk_lo == 0 else 0
    assert sum(loads) == total and not any(loads[active:])
    if total:
        assert max(loads[:active]) - min(loads[:active]) <= 1 + 2 * cfg.fixed_cost, loads[:active]
    # split requests: contiguous parts, slots packed and inside the workspace bound
    slots = set()
    for s in segs:
        first, n, offset, _ = pl.req_info[s.req]
        assert first <= s.part <= first + n - 1
        assert s.split == (n > 1)
        if s.split:
            assert offset <= s.slot < offset + n and s.slot not in slots
            slots.add(s.slot)
    assert len(slots) == pl.num_partials <= max_partials(cfg.num_parts)
    assert all(pl.req_info[b][1] == 0 for b, n in enumerate(lengths) if cfg.request_blocks(n) == 0)
    # the parts a request spans, in closed form (each decode CTA's plan_part), against a search of the begins
    begins = [row[:2] for row in pl.part_info]
    for b, n in enumerate(lengths):
        nb = cfg.request_blocks(n)
        if nb:
            first = max(p for p in range(cfg.num_parts) if begins[p] <= (b, 0))
            last = max(p for p in range(cfg.num_parts) if begins[p] < (b, nb))
            assert spanned_parts(pl.req_info[b][3], nb, cfg.fixed_cost, total, active) == (first, last)
    # the kernels' walk (common.cuh for_each_segment) reads the split facts of a part's end requests from its
    # row only, and takes every request between them as whole: it gives the same segments and merges
    want = [(s, pl.req_info[s.req][1], pl.req_info[s.req][2] if s.split else 0) for s in segs]
    assert list(row_walk(pl, lengths, cfg)) == want


def row_walk(pl, lengths, cfg):
    """for_each_segment over the part rows: (segment, the request's parts, its first slot where it is split)."""
    for part, row in enumerate(pl.part_info):
        begin_req, begin_blk, end_req, end_blk, first_len, first_splits, first_slot, first_offset, *tail = row
        assert tail[2:] == [0, 0]
        for b in range(begin_req, min(end_req, len(lengths) - 1) + 1):
            n, slot, offset = first_splits, first_slot, first_offset
            if b == begin_req:
                assert first_len == lengths[b]
            else:
                n, slot, offset = (tail[0], tail[1], tail[1]) if b == end_req else (1, 0, 0)
            nb = cfg.request_blocks(lengths[b])
            lo = begin_blk if b == begin_req else 0
            hi = min(end_blk if b == end_req else nb, nb)
            if lo < hi:
                yield Segment(part, b, lo, hi, n > 1, slot), n, offset if n > 1 else 0


@pytest.mark.parametrize("seed", range(40))
def test_random_batches(seed):
    rng = random.Random(seed)
    cfg = PlanConfig(block_n=rng.choice([16, 32, 64]), num_parts=rng.choice([1, 2, 7, 66, 132, 264]),
                     fixed_cost=rng.choice([0, 1, 2, 5]), min_part_cost=rng.choice([1, 4, 12]),
                     s_q=rng.choice([1, 2]), page_size=64)
    lengths = [max(n, cfg.s_q) for n in random_lengths(rng, rng.randint(1, 300), rng.choice([64, 4096, 9000]))]
    check_plan(lengths, cfg)


def test_single_long_request_is_split_over_all_parts():
    cfg = PlanConfig(block_n=64, num_parts=66, fixed_cost=2, min_part_cost=6)
    pl = plan([32768], cfg)
    assert pl.active_parts == 66 and pl.req_info[0][1] == 66
    blocks = part_blocks(pl, [32768], cfg)
    assert max(blocks) - min(blocks[1:]) <= 1  # part 0 also carries the request's fixed cost


def test_short_batch_uses_few_parts():
    """Work below min_part_cost per part does not get cut into slivers."""
    cfg = PlanConfig(block_n=64, num_parts=132, fixed_cost=2, min_part_cost=10)
    pl = plan([100, 60], cfg)
    assert pl.active_parts == 1 and all(r[1] == 1 for r in pl.req_info)


def test_invalid_lengths_get_no_work():
    cfg = PlanConfig(block_n=32, num_parts=8, fixed_cost=1, min_part_cost=1, s_q=2, page_size=16, max_pages=4)
    lengths = [1, 64, 65, 0, 10]  # 1 < s_q, 65 > 4 pages of 16, 0 < s_q
    pl = plan(lengths, cfg)
    assert [r[1] for r in pl.req_info][0] == 0 and pl.req_info[2][1] == 0 and pl.req_info[3][1] == 0
    check_plan(lengths, cfg)


def test_no_merge_launch_means_no_request_beyond_the_inline_merge() -> None:
    """Where merge_may_have_work says no (the merge launch is skipped), no lengths the block table holds
    split a request over more than INLINE_MERGE_SPLITS parts. (Where it says yes the merge kernel runs and
    finds its own work: the bound may be loose there, never wrong.)"""
    rng = random.Random(17)
    skipped = kept = 0
    for _ in range(400):
        page = rng.choice([1, 16, 64])
        cfg = PlanConfig(block_n=rng.choice([32, 64]), num_parts=rng.choice([1, 4, 5, 16, 132]),
                         fixed_cost=rng.choice([1, 2, 4]), min_part_cost=rng.choice([1, 4, 6, 8]), page_size=page,
                         max_pages=rng.randint(1, 4096 // page))
        batch = rng.randint(1, 6)
        cap = cfg.max_pages * page
        if not merge_may_have_work(batch, cfg):
            skipped += 1
            for lengths in ([cap] * batch, [rng.randint(1, cap) for _ in range(batch)], [1] * (batch - 1) + [cap]):
                assert max(n for _, n, _, _ in plan(lengths, cfg).req_info) <= INLINE_MERGE_SPLITS, (cfg, lengths)
        else:
            kept += 1
    assert skipped > 50 and kept > 50


def test_merge_launch_skipped_for_a_short_table_only() -> None:
    # the host bench's shape, B1 S256 at page 64 (a 4-page table): 4 blocks + 2 fixed = one part
    assert not merge_may_have_work(1, PlanConfig(block_n=64, num_parts=132, fixed_cost=2, min_part_cost=6,
                                                  page_size=64, max_pages=4))
    # an engine's table for 4096 tokens: a request can take 11 parts
    assert merge_may_have_work(1, PlanConfig(block_n=64, num_parts=132, fixed_cost=2, min_part_cost=6,
                                              page_size=64, max_pages=64))
