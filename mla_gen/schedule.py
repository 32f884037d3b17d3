"""Split-kv planning (DESIGN.md section 5), host side.

The work of a batch is a sequence of kv blocks (block_n tokens each), request after request; each
request also costs `fixed_cost` blocks (query load, epilogue, merge). The total cost is cut into
`active` equal pieces, one per part (a CTA column of the grid): part p starts at cost
floor(p * total / active), so loads differ by at most one block, and a part may cover the tail of
one request and the head of the next. `active` = min(num_parts, ceil(total / min_part_cost)), so a
short batch is not cut into slivers. Requests spread over several parts write partial (o, lse)
into slots merged afterwards.

The runtime computes this plan ON THE GPU from the device lengths: each decode CTA plans its own part
at its start (templates/common.cuh plan_part); this module is the same algorithm in Python: the
reference the tests compare the device plan with, and the tool for reasoning about balance.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Sequence


@dataclasses.dataclass(frozen=True)
class PlanConfig:
    block_n: int         # tokens per kv block (the kernel's tile)
    num_parts: int       # CTA columns of the grid
    fixed_cost: int      # blocks charged per request
    min_part_cost: int   # cost a part must get before another part is used
    s_q: int = 1
    page_size: int = 1
    max_pages: int = 1 << 30

    def request_blocks(self, length: int) -> int:
        """kv blocks of a request; 0 for an invalid length (the kernels then write NaN)."""
        if length < max(1, self.s_q) or length > self.max_pages * self.page_size:
            return 0
        return -(-length // self.block_n)


# ints in a part's row of the device work list (templates/common.cuh kPartInts)
PART_INTS = 12


@dataclasses.dataclass(frozen=True)
class Plan:
    """Mirrors the device work list: part_info rows and req_info rows (see templates/params.h)."""
    # begin_req, begin_blk, end_req, end_blk (end exclusive), then begin_req's length, num_splits, this part's
    # partial slot (0 unless split) and first slot; then, where the part ends inside a request that begins in
    # it, that request's num_splits and first slot (else 0, 0); then 0, 0 (common.cuh PartField)
    part_info: tuple[tuple[int, ...], ...]
    req_info: tuple[tuple[int, int, int, int], ...]   # first_part, num_splits, partial_offset, cost_begin
    active_parts: int
    total_cost: int

    @property
    def num_partials(self) -> int:
        return sum(n for _, n, _, _ in self.req_info if n > 1)


@dataclasses.dataclass(frozen=True)
class Segment:
    part: int
    req: int
    blk_lo: int
    blk_hi: int
    split: bool
    slot: int


def max_partials(num_parts: int) -> int:
    """Partial slots a plan can need: each of the num_parts-1 inner part boundaries splits at most one
    request and adds one slot to it, and each split request has one more slot than boundaries."""
    return max(2, 2 * (num_parts - 1))


# A request split over at most this many parts is merged inside the decode kernel (templates/common.cuh).
INLINE_MERGE_SPLITS = 4


def merge_may_have_work(batch: int, cfg: PlanConfig) -> bool:
    """Whether any lengths the block table holds can split a request over more than INLINE_MERGE_SPLITS
    parts, the merge kernel's work (common.cuh merge_may_have_work, which skips its launch otherwise): a
    request spans at most the active parts, and the total cost is at most every request at capacity."""
    total_max = batch * (-(-cfg.max_pages * cfg.page_size // cfg.block_n) + cfg.fixed_cost)
    return min(cfg.num_parts, -(-total_max // cfg.min_part_cost)) > INLINE_MERGE_SPLITS


def part_slot(req_row: tuple[int, int, int, int], part: int) -> int:
    """The partial slot of `part` in the split of the request with this req_info row, 0 when it is not split
    (common.cuh part_slot)."""
    first, n, offset, _ = req_row
    return offset + part - first if n > 1 else 0


def plan(seqlens: Sequence[int], cfg: PlanConfig) -> Plan:
    """The work list for these lengths (the same as the decode CTAs plan on the device)."""
    batch = len(seqlens)
    blocks = [cfg.request_blocks(int(n)) for n in seqlens]
    costs = [nb + cfg.fixed_cost if nb > 0 else 0 for nb in blocks]
    cost_begin, total = [], 0
    for c in costs:
        cost_begin.append(total)
        total += c
    active = min(cfg.num_parts, max(1, -(-total // cfg.min_part_cost)))

    def position(x: int) -> tuple[int, int]:
        if x >= total:
            return batch, 0
        lo, hi = 0, batch - 1  # last b with cost_begin[b] <= x
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if cost_begin[mid] <= x:
                lo = mid
            else:
                hi = mid - 1
        return lo, max(0, x - cost_begin[lo] - cfg.fixed_cost)

    begins = [position(total * p // active if p < active else total) for p in range(cfg.num_parts + 1)]
    req_info, offset = [], 0
    for b, nb in enumerate(blocks):
        if nb == 0:
            req_info.append((0, 0, offset, cost_begin[b]))
            continue
        first, last = spanned_parts(cost_begin[b], nb, cfg.fixed_cost, total, active)
        n = last - first + 1
        req_info.append((first, n, offset, cost_begin[b]))
        offset += n if n > 1 else 0

    def row(part: int) -> tuple[int, ...]:
        (b, blk), (e, e_blk) = begins[part], begins[part + 1]
        first = (int(seqlens[b]), req_info[b][1], part_slot(req_info[b], part), req_info[b][2]) if b < batch \
            else (0, 0, 0, 0)
        last = (req_info[e][1], req_info[e][2]) if e < batch and e_blk > 0 and e != b else (0, 0)
        return (b, blk, e, e_blk, *first, *last, 0, 0)

    return Plan(tuple(row(p) for p in range(cfg.num_parts)), tuple(req_info), active, total)


def spanned_parts(cost_begin: int, blocks: int, fixed_cost: int, total: int, active: int) -> tuple[int, int]:
    """The first and last part of a request of `blocks` kv blocks (> 0) whose cost range starts at cost_begin:
    the last parts that start at or before cost cost_begin + fixed_cost (its block 0), and before its end. Part
    q starts at floor(q total / active), at or before y exactly when q <= ((y + 1) active - 1) // total."""
    def last_starting_by(y: int) -> int:
        return min(active - 1, ((y + 1) * active - 1) // total)

    return last_starting_by(cost_begin + fixed_cost), last_starting_by(cost_begin + fixed_cost + blocks - 1)


def segments(pl: Plan, seqlens: Sequence[int], cfg: PlanConfig) -> Iterator[Segment]:
    """The segments each part processes, walked exactly as the kernels' for_each_segment does."""
    batch = len(seqlens)
    for part, (begin_req, begin_blk, end_req, end_blk, *_) in enumerate(pl.part_info):
        for b in range(begin_req, min(end_req, batch - 1) + 1):
            nb = cfg.request_blocks(int(seqlens[b]))
            lo = begin_blk if b == begin_req else 0
            hi = min(end_blk if b == end_req else nb, nb)
            if lo >= hi:
                continue
            yield Segment(part, b, lo, hi, pl.req_info[b][1] > 1, part_slot(pl.req_info[b], part))


def part_blocks(pl: Plan, seqlens: Sequence[int], cfg: PlanConfig) -> list[int]:
    """kv blocks each part processes."""
    loads = [0] * cfg.num_parts
    for seg in segments(pl, seqlens, cfg):
        loads[seg.part] += seg.blk_hi - seg.blk_lo
    return loads
