"""narrow_e4m3.cuh's ring protocol as a model, checked over every interleaving: one producer warp loads tile k into
stage k % ring once the stage's empty barrier shows tile k - ring released, and arms the stage's full barrier for the
tile's bytes; two consumer warpgroups take a segment's tiles alternately, and each segment starts only after both
finished the one before (the q write's barrier). `mbarrier.try_wait.parity(P)` passes while the barrier's current
phase has another parity than P, so a consumer waiting for tile k's phase also passes one phase early, while tile
k - ring has not landed. With 3 stages tile k - 3 is the other warpgroup's, and a warpgroup two tiles ahead read a
stage still filling (the bench's `unspecified launch failure`, PERF.md, seventeenth session). The kernel's consumer
therefore first waits on the empty barrier for tile k - ring's release, the producer's own condition for loading
tile k."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

KERNEL = Path(__file__).resolve().parents[1] / "templates" / "narrow_e4m3.cuh"


def passes(completed_phases: int, parity: int) -> bool:
    """mbarrier.try_wait.parity on a barrier that has completed `completed_phases` phases."""
    return (completed_phases & 1) != parity


def consumer_tiles(segments: list[int]) -> list[list[tuple[int, int]]]:
    """Per warpgroup, its (segment, tile k) in order: warpgroup w takes tiles w, w + 2, ... of each segment."""
    tiles: list[list[tuple[int, int]]] = [[], []]
    base = 0
    for s, n in enumerate(segments):
        for it in range(n):
            tiles[it % 2].append((s, base + it))
        base += n
    return tiles


def explore(segments: list[int], ring: int, consumer_waits_empty: bool) -> str | None:
    """Depth-first over every interleaving of the producer's loads, the boxes landing (in any order across
    stages) and the consumers' waits, reads and releases. Returns the first violation or deadlock, else None."""
    total = sum(segments)
    tiles = consumer_tiles(segments)
    seg_end = [sum(segments[:s + 1]) for s in range(len(segments))]
    # state: next tile to load, per stage (full phases done, armed and in flight, empty phases done, tile held,
    # landed), per warpgroup (tiles done, read but not released)
    start = (0, tuple((0, False, 0, -1, False) for _ in range(ring)), ((0, False), (0, False)))
    seen, stack = {start}, [start]
    while stack:
        pk, stages, wgs = stack.pop()
        moves = []
        if pk < total:  # the producer: wait for the stage's release, arm the full barrier, issue the boxes
            st = pk % ring
            full, armed, empty, _, _ = stages[st]
            if passes(empty, ((pk // ring) & 1) ^ 1):
                if armed:
                    return f"the producer armed stage {st} for tile {pk} while its last tile was in flight"
                new = list(stages)
                new[st] = (full, True, empty, pk, False)
                moves.append((pk + 1, tuple(new), wgs))
        for st, (full, armed, empty, tile, _) in enumerate(stages):
            if armed:  # the boxes land: the phase completes
                new = list(stages)
                new[st] = (full + 1, False, empty, tile, True)
                moves.append((pk, tuple(new), wgs))
        for w, (done, holding) in enumerate(wgs):
            if done == len(tiles[w]):
                continue
            seg, k = tiles[w][done]
            st = k % ring
            full, armed, empty, tile, landed = stages[st]
            new_wgs = list(wgs)
            if holding:  # release: this warpgroup's arrival completes the empty barrier's phase
                new = list(stages)
                new[st] = (full, armed, empty + 1, tile, landed)
                new_wgs[w] = (done + 1, False)
                moves.append((pk, tuple(new), tuple(new_wgs)))
                continue
            if seg > 0:  # the segment barrier: both warpgroups finished the segment before
                first = seg_end[seg - 1]
                if any(d < len(t) and t[d][1] < first for t, (d, _) in zip(tiles, wgs)):
                    continue
            if consumer_waits_empty and not passes(empty, ((k // ring) & 1) ^ 1):
                continue
            if not passes(full, (k // ring) & 1):
                continue
            if (tile, landed) != (k, True):
                return f"warpgroup {w} read stage {st} for tile {k}, holding tile {tile} (landed: {landed})"
            new_wgs[w] = (done, True)
            moves.append((pk, stages, tuple(new_wgs)))
        if not moves and not (pk == total and all(d == len(t) for t, (d, _) in zip(tiles, wgs))):
            return f"deadlock: producer at tile {pk}, warpgroups at {wgs}"
        for m in moves:
            if m not in seen:
                seen.add(m)
                stack.append(m)
    return None


LAYOUTS = [[9], [3, 6], [1, 8], [2, 3, 4], [5, 1, 3]]


def test_without_the_empty_wait_three_stages_read_a_stage_still_filling() -> None:
    found = explore([9], ring=3, consumer_waits_empty=False)
    assert found is not None and "read stage" in found, found


@pytest.mark.parametrize("segments", LAYOUTS, ids=str)
@pytest.mark.parametrize("ring", [3, 4])
def test_the_kernels_protocol_reads_only_landed_tiles(ring: int, segments: list[int]) -> None:
    assert explore(segments, ring, consumer_waits_empty=True) is None


@pytest.mark.parametrize("segments", LAYOUTS, ids=str)
def test_an_even_ring_needs_no_empty_wait(segments: list[int]) -> None:
    # tile k - 4 is the same warpgroup's within a segment, and the segment barrier orders the rest
    assert explore(segments, 4, consumer_waits_empty=False) is None


def test_the_kernel_waits_on_the_empty_barrier_before_the_full_one() -> None:
    """The model's consumer is the kernel's: the empty wait with the producer's parity, then the full wait."""
    text = KERNEL.read_text()
    waits = re.findall(r"mbarrier_wait\((empty|full) \+ 8 \* st, ([^;]+)\);", text)
    empty, full = ("empty", "((k / kRing) & 1) ^ 1"), ("full", "(k / kRing) & 1")
    # the producer's empty waits (one on each of its two paths: whole-tile boxes, row groups), the consumer's
    assert waits.count(empty) == 3 and waits.count(full) == 1 and len(waits) == 4, waits
    assert waits[waits.index(full) - 1] == empty
