"""A DeepSeek-V3-shaped decode loop captured once in a CUDA graph and replayed while lengths change.

    python examples/serve_decode.py                      # 61 layers, TP-8 heads (16), hidden 1024
    python examples/serve_decode.py --layers 3 --hidden 256 --slots 4 --requests 8 --max-len 512 --max-output 16

61 MLAAttention layers (deepseek-v3 at tensor-parallel 8: 16 heads per rank, hidden size scaled
down, head dims real) share one paged latent cache pool and one block table. A fixed number of
batch slots serves a queue of requests of different prompt and output lengths: a request joins a
free slot (its pages are allocated, its prompt written into every layer's cache), decodes one token
per step, and finishes, freeing its slot and pages. Free slots decode a dummy token into a page of
their own, so the batch shape never changes.

The loop runs twice over the same requests (same seeds): eagerly, then with each decode step (all
layers) captured once in a CUDA graph and replayed, the new lengths, block-table rows and token
inputs written in place before each replay. It prints decode tokens/s of both and the largest
relative L2 difference of the graphed outputs from the eager ones, and exits 1 if that exceeds
--tol (the graph runs the same kernels on the same data: the difference should be 0).
"""
from __future__ import annotations

import argparse
import dataclasses
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mla_gen.layer import LatentCache, MLAAttention  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="deepseek-v3")
    p.add_argument("--layers", type=int, default=61)
    p.add_argument("--tp", type=int, default=8, help="tensor-parallel size: this rank holds heads / tp")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size (scaled down; head dims stay real)")
    p.add_argument("--slots", type=int, default=16, help="batch slots (the captured batch size)")
    p.add_argument("--requests", type=int, default=48, help="requests served in all")
    p.add_argument("--max-len", type=int, default=4096, help="longest request (prompt + output tokens)")
    p.add_argument("--max-output", type=int, default=256, help="most output tokens of a request")
    p.add_argument("--page-size", type=int, default=64)
    p.add_argument("--tol", type=float, default=1e-3, help="largest rel L2 of graphed vs eager outputs")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


@dataclasses.dataclass
class Request:
    rid: int
    prompt: int
    output: int
    done: int = 0


class Server:
    """Slots, a page allocator, the layers' caches (views of one pool) and the step's device state."""

    def __init__(self, args: argparse.Namespace, layers: list[MLAAttention], device: torch.device):
        self.args, self.layers, self.device = args, layers, device
        page = args.page_size
        self.pages_per_slot = -(-args.max_len // page)
        num_pages = args.slots * (self.pages_per_slot + 1)  # + one parking page per slot
        first = layers[0]
        width = first.kv_lora_rank + first.rope_dim
        self.pool = torch.zeros(len(layers), num_pages, page, width, dtype=first.dtype, device=device)
        self.caches = [LatentCache(kv[..., :first.kv_lora_rank], kv[..., first.kv_lora_rank:]) for kv in self.pool]
        self.parking = list(range(args.slots * self.pages_per_slot, num_pages))
        self.block_table = torch.zeros(args.slots, self.pages_per_slot, dtype=torch.int32, device=device)
        self.lens = torch.zeros(args.slots, dtype=torch.int32, device=device)
        self.x = torch.zeros(args.slots, 1, args.hidden, dtype=first.dtype, device=device)
        rng = random.Random(args.seed)
        most = min(args.max_output, args.max_len - 1)
        self.queue = [Request(i, rng.randint(1, args.max_len - most), rng.randint(1, most))
                      for i in range(args.requests)]
        self.reset()

    def reset(self) -> None:
        self.pool.zero_()
        self.free_pages = list(range(self.args.slots * self.pages_per_slot))
        self.waiting = [dataclasses.replace(r) for r in self.queue]
        self.slots: list[Request | None] = [None] * self.args.slots
        self.host_lens = [0] * self.args.slots
        for s in range(self.args.slots):
            self._park(s)
        self.step_no = 0

    def _park(self, s: int) -> None:
        self.block_table[s].fill_(self.parking[s])
        self.lens[s] = 0
        self.host_lens[s] = 0

    def admit(self) -> None:
        """Finished requests leave; waiting ones join free slots (pages allocated, prompt written)."""
        for s, r in enumerate(self.slots):
            if r is not None and r.done == r.output:
                n = -(-(r.prompt + r.output) // self.args.page_size)
                self.free_pages += self.block_table[s, :n].tolist()
                self.slots[s] = None
                self._park(s)
        for s in range(self.args.slots):
            if self.slots[s] is None and self.waiting:
                r = self.waiting.pop(0)
                n = -(-(r.prompt + r.output) // self.args.page_size)
                pages, self.free_pages = self.free_pages[:n], self.free_pages[n:]
                self.block_table[s, :n] = torch.tensor(pages, dtype=torch.int32, device=self.device)
                self._prefill(s, r)
                self.slots[s] = r

    def _prefill(self, s: int, r: Request) -> None:
        g = torch.Generator(device=self.device).manual_seed(1000 + r.rid)
        zero = torch.zeros(1, dtype=torch.int32, device=self.device)
        for layer, cache in zip(self.layers, self.caches):
            ctx = torch.randn(1, r.prompt, self.args.hidden, generator=g, device=self.device).to(layer.dtype)
            layer.append_kv(ctx, cache, self.block_table[s:s + 1], zero)
        self.lens[s] = r.prompt
        self.host_lens[s] = r.prompt

    def next_input(self) -> None:
        g = torch.Generator(device=self.device).manual_seed(5000 + self.step_no)
        self.x.copy_(torch.randn(self.x.shape, generator=g, device=self.device).to(self.x.dtype))

    def advance(self) -> int:
        """After a step: active requests gained a token. Returns how many tokens the step produced."""
        active = 0
        for s, r in enumerate(self.slots):
            if r is not None:
                r.done += 1
                self.host_lens[s] += 1
                active += 1
        self.lens.copy_(torch.tensor(self.host_lens, dtype=torch.int32), non_blocking=False)
        self.step_no += 1
        return active

    def active(self) -> list[int]:
        return [s for s, r in enumerate(self.slots) if r is not None]

    def busy(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.slots)


def decode_step(server: Server) -> torch.Tensor:
    """One token for every slot through all layers (absorbed form: mla_decode), a residual stream."""
    h = server.x
    for layer, cache in zip(server.layers, server.caches):
        h = h + layer(h, cache, server.block_table, server.lens, form="absorbed")
    return h


def serve(server: Server, graphed: bool) -> tuple[float, int, dict[tuple[int, int], torch.Tensor]]:
    """Runs every request to completion; returns decode seconds, tokens, and each step's outputs of
    active slots keyed by (step, request id)."""
    server.reset()
    outputs: dict[tuple[int, int], torch.Tensor] = {}
    graph, static_out = None, None
    seconds, tokens = 0.0, 0
    while server.busy():
        server.admit()
        server.next_input()
        if graphed and graph is None:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up on the capture stream: plans made outside the capture
                decode_step(server)
            torch.cuda.current_stream().wait_stream(stream)
            # the warm-up wrote this step's token into the caches; the replay below rewrites the same slots
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                static_out = decode_step(server)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        if graphed:
            graph.replay()
            out = static_out
        else:
            out = decode_step(server)
        torch.cuda.synchronize()
        seconds += time.perf_counter() - t0
        for s in server.active():
            outputs[(server.step_no, server.slots[s].rid)] = out[s].float().cpu()
        tokens += server.advance()
    return seconds, tokens, outputs


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("serve_decode: needs a CUDA device", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    torch.manual_seed(args.seed)
    from generator.presets import model_config
    heads = model_config(args.preset).num_heads // args.tp
    g = torch.Generator().manual_seed(args.seed)
    layers = [MLAAttention(args.preset, hidden_size=args.hidden, head_range=(0, heads), dtype=torch.bfloat16,
                           device=device, generator=g) for _ in range(args.layers)]
    for layer in layers:  # keep the residual stream O(1) over many layers
        layer.o_proj.weight.data.mul_(0.5 / args.layers ** 0.5)
    server = Server(args, layers, device)
    print(f"{args.layers} layers of {args.preset} MLA, {heads} heads (TP {args.tp}), hidden {args.hidden}, "
          f"{args.slots} slots, {args.requests} requests of up to {args.max_len} tokens, page {args.page_size}")
    eager_s, eager_tok, eager_out = serve(server, graphed=False)
    graph_s, graph_tok, graph_out = serve(server, graphed=True)
    assert eager_tok == graph_tok and eager_out.keys() == graph_out.keys()
    worst = 0.0
    for key, want in eager_out.items():
        got = graph_out[key]
        if not torch.isfinite(got).all():
            worst = float("inf")
            break
        worst = max(worst, float((got - want).norm() / want.norm().clamp_min(1e-30)))
    print(f"eager:  {eager_tok} tokens in {eager_s * 1e3:.1f} ms of decode steps: {eager_tok / eager_s:,.0f} tokens/s")
    print(f"graph:  {graph_tok} tokens in {graph_s * 1e3:.1f} ms of decode steps: {graph_tok / graph_s:,.0f} tokens/s "
          f"({eager_s / graph_s:.2f}x)")
    print(f"graphed vs eager: max rel L2 {worst:.2e} over {len(eager_out)} (step, request) outputs "
          f"({'ok' if worst <= args.tol else 'FAILED'}, tol {args.tol:.0e})")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
