"""Builds scripts/proto_narrow_fp8.cu (the prototype of an fp8_e4m3 few-heads decode that keeps no 16-bit copy of
the cache), checks it against the float64 reference on the dequantized cache, and times it beside mla-gen's narrow
family on the same inputs, bf16 and fp8_e4m3 (bench timing: CUDA events, L2 flushed, median):

    python scripts/proto_narrow_fp8.py [--batch 128 --seqlen 4096]

H16, s_q 1, page 64, lengths a multiple of 64, one request per CTA (the prototype's limits). The bench is the
instrument for speed claims; this only says whether the design is worth building into the family.
"""
from __future__ import annotations

import argparse
import ctypes
import pathlib
import subprocess
import tempfile

import torch

from generator.spec import DType, Family
from mla_gen.bench.cases import Case
from mla_gen.bench.impls import build_inputs, prepare_mlagen, quantize
from mla_gen.bench.timing import Timer
from mla_gen.reference import mla_decode_reference
from mla_gen.testing import max_abs, rel_l2

SOURCE = pathlib.Path(__file__).with_suffix(".cu")


def build(out_dir: pathlib.Path, defines: list[str]) -> ctypes.CDLL:
    lib = out_dir / "proto_narrow_fp8.so"
    subprocess.run(["nvcc", "-gencode", "arch=compute_90a,code=sm_90a", "-O3", "-std=c++17", "-shared",
                    "-Xcompiler", "-fPIC", "-Xptxas", "-v", *(f"-D{d}" for d in defines), "-o", str(lib), str(SOURCE)],
                   check=True)
    dll = ctypes.CDLL(str(lib))
    dll.proto_decode.restype = ctypes.c_int
    dll.proto_decode.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 5 + [ctypes.c_float] * 2 + [ctypes.c_void_p]
    return dll


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=4096)
    ap.add_argument("--check", type=int, default=4, help="requests checked against the float64 reference")
    ap.add_argument("--pad", type=int, default=0, help="bytes after each token's 576 in the prototype's cache copy")
    ap.add_argument("-D", dest="defines", action="append", default=[],
                    help="a macro for the build: PROTO_NO_QK or PROTO_NO_PV take that part away (wrong on purpose)")
    a = ap.parse_args()
    if a.seqlen % 64:
        ap.error("--seqlen: the prototype takes a multiple of 64")
    device = torch.device("cuda")
    case = Case("proto", a.batch, 16, seqlen=a.seqlen)
    inp = build_inputs(case, device)
    fp8 = quantize(inp, DType.FP8_E4M3)
    q = torch.cat([inp.q_nope, inp.q_pe], dim=-1).contiguous()  # [B, 1, 16, 576]
    cache = torch.zeros(*fp8.cache.shape[:2], 576 + a.pad, dtype=torch.uint8, device=device)
    cache[..., :576] = fp8.cache.view(torch.uint8)
    bt = inp.block_table.contiguous()
    out = torch.full((a.batch, 1, 16, 512), float("nan"), dtype=torch.bfloat16, device=device)
    kv_scale = float(fp8.scale.item())  # outside the timed call: .item() waits for the GPU
    with tempfile.TemporaryDirectory() as tmp:
        dll = build(pathlib.Path(tmp), a.defines)

        def proto() -> torch.Tensor:
            err = dll.proto_decode(q.data_ptr(), cache.data_ptr(), bt.data_ptr(), out.data_ptr(), a.batch, a.seqlen,
                                   cache.shape[0], bt.shape[1], cache.stride(1), case.sm_scale, kv_scale,
                                   torch.cuda.current_stream().cuda_stream)
            if err:
                raise RuntimeError(f"proto_decode: error {err}")
            return out

        proto()
        torch.cuda.synchronize()
        n = min(a.check, a.batch)
        ckv, kpe, scale = fp8.run_args()
        ref, _ = mla_decode_reference(inp.q_nope[:n], inp.q_pe[:n], ckv, kpe, inp.block_table[:n],
                                      inp.cache_seqlens[:n], case.sm_scale, scale)
        narrow_fp8 = prepare_mlagen(Family.NARROW, inp, case, fp8=fp8)
        got = narrow_fp8.check_run()[:n].double()
        print(f"accuracy on {n} requests against the float64 reference (dequantized cache): "
              f"prototype rel L2 {rel_l2(out[:n].double(), ref):.2e}, max {max_abs(out[:n].double(), ref):.2e}, "
              f"NaN {bool(out.isnan().any())}; narrow fp8 rel L2 {rel_l2(got, ref):.2e}")
        timer = Timer(device, iters=20, warmup=3)
        narrow_bf16 = prepare_mlagen(Family.NARROW, inp, case)
        narrow_bf16.check_run()
        times = {name: timer.time(fn).median_us for name, fn in
                 (("narrow bf16", narrow_bf16.run), ("narrow fp8_e4m3", narrow_fp8.run), ("prototype fp8", proto))}
        fp8_bytes = a.batch * a.seqlen * 576
        for name, us in times.items():
            print(f"{name:16s} {us:8.1f} us  {us / times['narrow bf16']:.3f}x bf16  "
                  f"{fp8_bytes * (2 if 'bf16' in name else 1) / us / 1e3:7.0f} GB/s")


if __name__ == "__main__":
    main()
