"""Tensor-parallel MLA decode over torch.distributed (NCCL): heads sharded, latent cache replicated.

    torchrun --nproc-per-node 8 examples/tp_decode.py --preset deepseek-v3

Each rank holds num_heads / world heads of one MLA layer (q and kv_b projections sharded by heads,
o_proj by its input columns), a full copy of the paged latent cache, and decodes the batch with
mla-gen; the o_proj partial sums are all-reduced. Rank 0 then runs the whole layer on its GPU and
prints the relative L2 error of the tensor-parallel result against it and against a float64
vanilla layer, the compile count per kernel variant (all ranks start on one cache directory; with
--cold they share a new empty one, removed afterwards, so each variant must be compiled once and
loaded by every rank; the user's cache is never touched), and every rank's decode step time.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from generator import jit  # noqa: E402
from generator.presets import model_config  # noqa: E402
from mla_gen.layer import MLAAttention, head_range_for  # noqa: E402


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="deepseek-v3")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (scaled down; head dims stay real)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=2048, help="cached tokens per request before the decode step")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=20, help="timed decode steps")
    p.add_argument("--cold", action="store_true", help="start every rank on a new empty cache folder (removed at the end), "
                                                           "not MLA_GEN_CACHE_DIR")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@contextlib.contextmanager
def cold_cache(share: Callable[[str | None], str], rank: int = 0) -> Iterator[Path]:
    """A new empty cache folder for this run, exported as MLA_GEN_CACHE_DIR: rank 0 makes it,
    `share` hands its path to every rank, and rank 0 removes it on exit. The cache the user had
    (MLA_GEN_CACHE_DIR or ~/.cache/mla_gen) is never written or deleted."""
    made = tempfile.mkdtemp(prefix="mla_gen_cold_") if rank == 0 else None
    path = share(made)
    before = os.environ.get("MLA_GEN_CACHE_DIR")
    os.environ["MLA_GEN_CACHE_DIR"] = path
    try:
        yield Path(path)
    finally:
        if before is None:
            del os.environ["MLA_GEN_CACHE_DIR"]
        else:
            os.environ["MLA_GEN_CACHE_DIR"] = before
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


def from_rank0(value: str | None) -> str:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main() -> int:
    args = parse_args()
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on shared GPUs
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    dev = torch.device("cuda", local)
    with cold_cache(from_rank0, rank) if args.cold else contextlib.nullcontext():
        decode_and_compare(args, rank, world, dev)
        dist.barrier()  # every rank done with the cache before rank 0 removes a cold one
    dist.destroy_process_group()
    return 0


def decode_and_compare(args: argparse.Namespace, rank: int, world: int, dev: torch.device) -> None:
    """The tensor-parallel decode on every rank; rank 0 prints the comparison and compile counts."""
    cfg = model_config(args.preset)
    # One full layer, the same random weights on every rank (float32 on the CPU), sliced per rank.
    full = MLAAttention(cfg, hidden_size=args.hidden, generator=torch.Generator().manual_seed(args.seed))
    state = full.state_dict()
    h0, h1 = head_range_for(cfg.num_heads, world, rank)
    shard = MLAAttention(cfg, hidden_size=args.hidden, head_range=(h0, h1), dtype=torch.bfloat16, device=dev)
    shard.load_state_dict({k: v.to(torch.bfloat16) for k, v in MLAAttention.shard_state_dict(state, cfg, (h0, h1)).items()})

    # The same cache contents on every rank: prefill the same hidden states (kv_a is not sharded).
    g = torch.Generator().manual_seed(args.seed + 1)
    B, S, P = args.batch, args.seqlen, args.page_size
    pages = -(-(S + 1) // P)
    block_table = torch.randperm(B * pages, generator=g).view(B, pages).to(torch.int32).to(dev)
    prefill = torch.randn(B, S, args.hidden, generator=g).to(torch.bfloat16).to(dev)
    step = torch.randn(B, 1, args.hidden, generator=g).to(torch.bfloat16).to(dev)
    lens0 = torch.zeros(B, dtype=torch.int32, device=dev)
    cache = shard.new_cache(B * pages, P)
    lens = shard.append_kv(prefill, cache, block_table, lens0)

    def tp_step() -> torch.Tensor:
        partial = shard(step, cache, block_table, lens, form="absorbed")
        dist.all_reduce(partial)
        return partial

    out = tp_step()
    torch.cuda.synchronize()
    for _ in range(3):
        tp_step()
    times = []
    for _ in range(args.steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        start.record()
        tp_step()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    compiled = jit.compiled_here()
    gathered: list[object] = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "heads": (h0, h1), "compiled": compiled,
                                      "step_us": sorted(times)[len(times) // 2], "backend": shard.last_backend})

    if rank == 0:
        whole = MLAAttention(cfg, hidden_size=args.hidden, dtype=torch.bfloat16, device=dev)
        whole.load_state_dict({k: v.to(torch.bfloat16) for k, v in state.items()})
        single = whole(step, cache, block_table, lens, form="absorbed")
        exact = MLAAttention(cfg, hidden_size=args.hidden, dtype=torch.float64, device=dev)
        exact.load_state_dict({k: v.to(torch.bfloat16).double() for k, v in state.items()})  # same weights
        cache64 = exact.new_cache(B * pages, P)
        lens64 = exact.append_kv(prefill.double(), cache64, block_table, lens0)
        ref = exact(step.double(), cache64, block_table, lens64, form="vanilla")
        variant = f"heads {h1 - h0} of {cfg.num_heads}"
        print(f"{args.preset}: tp {world}, {variant} per rank, batch {B}, {S} cached tokens, page {P}, bf16")
        print(f"rel L2 tp vs single-GPU layer:     {rel_l2(out, single):.3e}")
        print(f"rel L2 tp vs float64 vanilla layer: {rel_l2(out, ref):.3e}")
        counts: dict[str, int] = {}
        for g_ in gathered:
            for vid in g_["compiled"]:
                counts[vid] = counts.get(vid, 0) + 1
        for vid, n in sorted(counts.items()):
            print(f"compiles of {vid}: {n} (loaded by all {world} ranks)")
        if not counts:
            print("compiles: 0 (every rank loaded the variant from the cache)")
        for g_ in gathered:
            print(f"rank {g_['rank']}: heads [{g_['heads'][0]}, {g_['heads'][1]}), decode step "
                  f"(layer + all-reduce) {g_['step_us']:.1f} us median of {args.steps}, backend {g_['backend']}")


if __name__ == "__main__":
    sys.exit(main())
