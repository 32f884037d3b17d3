"""Quick correctness ladder for one kernel family on the GPU, to localise a failure before the full
test matrix: prints, per case, the output's relative L2 and max error and the lse error separately
(lse depends on Q K^T and the softmax only, out also on P V), the error per 64-column block of the
output and per 16-row group, and NaN counts. Exit status 1 if any case is out of tolerance.

    PYTHONPATH=. python scripts/family_check.py --family wgmma [--quick]
    PYTHONPATH=. python scripts/family_check.py --family seesaw [--quick]

--family takes any family name (simt, mma, wgmma, seesaw); cases that exercise seesaw's pairs of tiles:
"one tile" (a lone K0, K1 missing), "len 37", "4 tiles" (two full pairs), "h128 len 4097" (65 tiles: odd).
"""
from __future__ import annotations

import argparse
import sys

import torch

import mla_gen
from mla_gen.reference import mla_decode_reference
from mla_gen.dtypes import to_dtype
from mla_gen.testing import LSE_TOL, REF_TOL, make_inputs, max_abs, rel_l2


def run_case(family: str, name: str, lengths, *, heads, ckv=512, rope=64, s_q=1, page=64, dtype=torch.bfloat16,
             num_parts=None, zero_q=False, q_scale=1.0, seed=0) -> bool:
    g = torch.Generator(device="cuda").manual_seed(seed)
    inp = make_inputs(lengths, heads=heads, ckv=ckv, rope=rope, s_q=s_q, page_size=page, dtype=dtype, device="cuda",
                      generator=g)
    if zero_q:
        inp.q_nope.zero_()
        inp.q_pe.zero_()
    if q_scale != 1.0:  # spiky scores: row maxima jump by more than 8 (log2) between tiles, so the lazy
        inp.q_nope.mul_(q_scale)  # softmax reference moves mid-segment (rescales of O and l in both warpgroups)
        inp.q_pe.mul_(q_scale)
    out = torch.full((len(lengths), s_q, heads, ckv), float("nan"), dtype=dtype, device="cuda")
    lse = torch.full((len(lengths), s_q, heads), float("nan"), dtype=torch.float32, device="cuda")
    try:
        mla_gen.mla_decode(*inp.args(), out=out, lse=lse, family=family, num_parts=num_parts)
        torch.cuda.synchronize()
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"{name:44s} ERROR {type(e).__name__}: {str(e)[:300]}")
        return False
    ref, ref_lse = mla_decode_reference(*inp.args())
    nan_o, nan_l = int(out.isnan().sum()), int(lse.isnan().sum())
    o, l = out.nan_to_num(0.0), lse.nan_to_num(0.0)
    l2, mx, lerr = rel_l2(o, ref), max_abs(o, ref) / float(ref.abs().max()), max_abs(l, ref_lse)
    ok = nan_o == 0 and nan_l == 0 and l2 <= REF_TOL[to_dtype(dtype).value][0] and lerr <= LSE_TOL
    print(f"{name:44s} {'ok  ' if ok else 'FAIL'} relL2 {l2:.2e} max {mx:.2e} lse {lerr:.2e} nan {nan_o}/{nan_l}")
    if not ok:
        d = (o.double() - ref).abs()
        cols = [f"{float(d[..., c:c + 64].max()):.1e}" for c in range(0, ckv, 64)]
        print(f"    max err per 64 cols: {' '.join(cols)}")
        rows = d.reshape(len(lengths), s_q * heads, ckv).amax(dim=(0, 2))
        groups = [f"{float(rows[r:r + 16].max()):.1e}" for r in range(0, s_q * heads, 16)]
        print(f"    max err per 16 rows: {' '.join(groups)}")
        le = (l.double() - ref_lse).abs().reshape(len(lengths), -1).amax(dim=0)
        print(f"    lse err per 16 rows: {' '.join(f'{float(le[r:r + 16].max()):.1e}' for r in range(0, s_q * heads, 16))}")
        print(f"    out[0,0,0,:8] {o[0, 0, 0, :8].float().tolist()}")
        print(f"    ref[0,0,0,:8] {ref[0, 0, 0, :8].float().tolist()}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="wgmma")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    f = a.family
    cases = [
        ("one tile h64 uniform P (q=0)", [64], dict(heads=64, num_parts=1, zero_q=True)),
        ("one tile h64", [64], dict(heads=64, num_parts=1)),
        ("one tile h64 len 37", [37], dict(heads=64, num_parts=1)),
        ("4 tiles h64 len 200", [200], dict(heads=64, num_parts=1)),
        ("h128 len 4097 unsplit", [4097], dict(heads=128, num_parts=1)),
        ("h128 len 4097 split", [4097], dict(heads=128, num_parts=64)),
        ("h128 s_q2 page16 batch", [2, 15, 16, 17, 3000], dict(heads=128, s_q=2, page=16)),
        ("h16 page1", [1, 63, 64, 65, 999], dict(heads=16, page=1)),
        ("h20 s_q2 page16", [2, 100, 777], dict(heads=20, s_q=2, page=16)),
        ("h1", [1, 64, 65, 2000], dict(heads=1)),
        ("c256r32 h64", [64, 200, 1000], dict(heads=64, ckv=256, rope=32)),
        ("c256r32 h128 s_q2 page1", [5, 300], dict(heads=128, ckv=256, rope=32, s_q=2, page=1)),
        ("fp16 h128", [64, 1000], dict(heads=128, dtype=torch.float16)),
        ("fp16 c256r32 h40 split", [4097, 9], dict(heads=40, ckv=256, rope=32, dtype=torch.float16, num_parts=64)),
        ("h128 s_q4", [4, 700], dict(heads=128, s_q=4)),
        ("h128 spiky scores (q x4)", [1000, 333, 64], dict(heads=128, q_scale=4.0)),
        ("h64 spiky s_q2 page16 split", [130, 2000], dict(heads=64, s_q=2, page=16, q_scale=4.0, num_parts=40)),
        ("fp16 h128 spiky 3 tiles", [150, 129], dict(heads=128, dtype=torch.float16, q_scale=4.0)),
    ]
    if a.quick:
        cases = cases[:6] + cases[-3:-2]
    bad = 0
    for name, lengths, kw in cases:
        bad += not run_case(f, name, lengths, **kw)
    print(f"family_check {f}: {len(cases) - bad}/{len(cases)} ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
