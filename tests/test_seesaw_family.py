"""The seesaw family (templates/seesaw.cuh): sm_90a only, dispatch's family there from 40 query rows on (narrow
below, whatever the call's size), tile rules, the shared-memory formula, and (slow, real nvcc) builds with no spills
and no warnings whose SASS carries HGMMA 64x64 (S per warpgroup) and 64xCW (P V, V read transposed, P from registers
and from shared memory) and TMA loads by a producer warpgroup (setmaxnreg); on a GPU, the page sizes the main matrix
lacks (TMA boxes of 1, 16 and 64 rows, tiles inside one page)."""
from __future__ import annotations

import pytest

from build_checks import assert_clean_decode_kernel, builds_with_nvcc, built_entry, reads_sass, sass as sass_of
from generator.errors import SpecError
from generator.render import render_sources
from generator.select import FAMILY_ORDER, decide, default_tile, families_for
from generator.spec import Arch, DType, Family, Tile, VariantSpec

BF16, FP16, E4M3 = DType.BF16, DType.FP16, DType.FP8_E4M3


def seesaw(heads: int = 128, ckv: int = 512, rope: int = 64, tile: Tile | None = None, arch: Arch = Arch.SM90A,
           dtype: DType = BF16, kv_dtype: DType | None = None) -> VariantSpec:
    tile = tile or default_tile(Family.SEESAW, heads, ckv, rope, Arch.SM90A, kv_dtype=kv_dtype or dtype)
    return VariantSpec(heads, ckv, rope, dtype, kv_dtype or dtype, dtype, Family.SEESAW, tile, arch)


@pytest.mark.parametrize("arch", [a for a in Arch if a is not Arch.SM90A], ids=lambda a: a.nvcc_name)
def test_seesaw_only_for_sm90a(arch: Arch) -> None:
    assert Family.SEESAW not in families_for(arch)
    with pytest.raises(SpecError, match=r"^arch: family seesaw"):
        seesaw(arch=arch)
    with pytest.raises(SpecError, match=r"^family: seesaw does not run on"):
        decide(arch=arch, num_heads=128, ckv_dim=512, rope_dim=64, dtype=BF16, family=Family.SEESAW)


def dispatched_family(heads: int, s_q: int = 1, arch: Arch = Arch.SM90A, ckv: int = 512, rope: int = 64,
                      **kw) -> Family:
    """The family dispatch picks for bf16 q (kw: decide's other arguments)."""
    return decide(arch=arch, num_heads=heads, ckv_dim=ckv, rope_dim=rope, dtype=BF16, s_q=s_q, **kw).spec.family


def test_dispatch_picks_seesaw_from_40_rows_on_sm90a() -> None:
    assert Family.SEESAW.min_cc == 90
    fams = families_for(Arch.SM90A)
    assert Family.SEESAW in fams and fams.index(Family.WGMMA) < fams.index(Family.SEESAW)
    assert FAMILY_ORDER[0] is Family.WGMMA

    assert dispatched_family(16, s_q=2) is Family.NARROW  # 32 rows fit one narrow CTA
    assert dispatched_family(36) is Family.WGMMA  # 33-39 rows at ckv 512: past narrow, below seesaw's 40
    for heads, s_q in ((40, 1), (20, 2), (64, 1), (128, 1), (128, 2), (16, 5), (32, 2)):  # 40 rows and more
        assert dispatched_family(heads, s_q) is Family.SEESAW, (heads, s_q)
    # MiniCPM3's 40 heads fit one narrow CTA at ckv 256, yet seesaw was measured ahead (121.6 / 131.2 us)
    minicpm3 = decide(arch=Arch.SM90A, num_heads=40, ckv_dim=256, rope_dim=32, dtype=BF16)
    assert minicpm3.spec.family is Family.SEESAW
    d = decide(arch=Arch.SM90A, num_heads=128, ckv_dim=512, rope_dim=64, dtype=DType.FP16)
    assert d.spec.family is Family.SEESAW and any(r.startswith("family seesaw: 128 query rows") for r in d.reasons)
    assert dispatched_family(128, kv_dtype=DType.FP8_E4M3) is Family.SEESAW  # e4m3 Q K^T (seesaw_e4m3.cuh)
    assert dispatched_family(40, kv_dtype=DType.FP8_E4M3) is Family.SEESAW
    assert dispatched_family(128, kv_dtype=DType.FP8_DS_MLA) is Family.WGMMA  # seesaw reads fp8_e4m3 only
    # fp8_e4m3 at dims seesaw's fp8 path does not take: wgmma's
    assert decide(arch=Arch.SM90A, num_heads=128, ckv_dim=512, rope_dim=128, dtype=BF16,
                  kv_dtype=DType.FP8_E4M3).spec.family is Family.WGMMA
    assert dispatched_family(128, arch=Arch.SM80) is Family.MMA
    d = decide(arch=Arch.SM90A, num_heads=128, ckv_dim=512, rope_dim=64, dtype=BF16, s_q=2, family=Family.SEESAW)
    assert d.spec.family is Family.SEESAW and d.m_blocks == 4 and d.spec.tile == Tile(64, 64, 2, 8)


@pytest.mark.parametrize("batch", [1, 8, 32, 132, 1024])
def test_below_40_rows_small_calls_run_narrow_too(batch: int) -> None:
    """Below 40 rows narrow runs calls of any size: the rule that gave small calls to seesaw (fourteenth session)
    came from a bench whose writing L2 flush cost narrow more; with a reading flush narrow led 8 of 12 small calls
    (PERF.md, seventeenth session)."""
    for heads, s_q in ((16, 1), (32, 1), (16, 2)):
        d = decide(arch=Arch.SM90A, num_heads=heads, ckv_dim=512, rope_dim=64, dtype=BF16, s_q=s_q, batch=batch)
        assert d.spec.family is Family.NARROW, (heads, s_q)
        assert d.reasons[0].startswith(f"family narrow: {heads * s_q} query rows fit one narrow CTA")
    assert dispatched_family(128, batch=batch) is Family.SEESAW
    assert dispatched_family(36, batch=batch) is Family.WGMMA  # 33-39 rows: past narrow, below seesaw


def test_default_tile_and_shared_memory() -> None:
    big = seesaw()
    assert big.tile == Tile(64, 64, 2, 8)
    # q 64x576 + K0, K1 64x576 (P0, P1 in their rope panels) + red_max/red_sum [2][64] fp32 + 2 x 9 "landed"
    # mbarriers + 2 x 2 "freed" ones (the producer warpgroup's)
    assert big.smem_bytes == 64 * 576 * 2 + 2 * 64 * 576 * 2 + 2 * 2 * 64 * 4 + 2 * 9 * 8 + 4 * 8 == 222384
    assert big.smem_bytes <= Arch.SM90A.max_smem_per_block
    # rope 32: the kv rope panels are stored 64 wide (128-byte TMA rows; P0, P1 live there too); ckv 256 holds the
    # buffers of two pairs (4 stages: the next pair's loads in flight), 4 x 5 "landed" and 4 x 2 "freed" mbarriers
    small = seesaw(heads=40, ckv=256, rope=32)
    assert small.tile == Tile(64, 64, 4, 8)
    assert small.smem_bytes == 64 * 288 * 2 + 4 * 64 * (256 + 64) * 2 + 2 * 2 * 64 * 4 + 4 * 5 * 8 + 8 * 8 == 201952
    assert seesaw(ckv=256, rope=32, tile=Tile(64, 64, 2, 8)).smem_bytes == (
        64 * 288 * 2 + 2 * 64 * (256 + 64) * 2 + 2 * 2 * 64 * 4 + 2 * 5 * 8 + 4 * 8)
    assert seesaw(ckv=128, rope=16).smem_bytes == 64 * 144 * 2 + 4 * 64 * (128 + 64) * 2 + 1024 + 4 * 3 * 8 + 8 * 8
    # fp8_e4m3 (seesaw_e4m3.cuh): q hi and lo [64][C] + their ropes [64][128] e4m3, a ring of raw tiles [64][C + 128]
    # (three at ckv 512, four at 256), P [3][64][64] fp16, row max and scale [2][2][2][64], row sum [2][64] and
    # 1 / q scale [64] fp32, 4 move flags, the ring position (8 bytes), a full and an empty mbarrier per stage
    e4m3 = seesaw(kv_dtype=E4M3)
    assert e4m3.tile == Tile(64, 64, 3, 8) and e4m3.quantizes_q
    assert e4m3.smem_bytes == 232264 == (2 * 64 * 512 + 2 * 64 * 128 + 3 * 64 * 640 + 3 * 8192 + 11 * 64 * 4 + 16
                                         + 8 + 3 * 16)
    assert e4m3.smem_bytes <= Arch.SM90A.max_smem_per_block
    small_e4m3 = seesaw(heads=40, ckv=256, rope=32, kv_dtype=E4M3)
    assert small_e4m3.tile == Tile(64, 64, 4, 8)
    assert small_e4m3.smem_bytes == 2 * 64 * 256 + 2 * 64 * 128 + 4 * 64 * 384 + 3 * 8192 + 11 * 64 * 4 + 16 + 8 + 4 * 16
    with pytest.raises(SpecError, match=r"^tile.stages: seesaw over fp8_e4m3 keeps a ring of raw tiles, at least 3"):
        seesaw(kv_dtype=E4M3, tile=Tile(64, 64, 2, 8))


@pytest.mark.parametrize("ckv, rope", [(128, 64), (512, 128), (256, 16)])
def test_fp8_at_dims_its_path_was_not_tested_at_names_ckv_dim(ckv: int, rope: int) -> None:
    with pytest.raises(SpecError, match=r"^ckv_dim: seesaw's fp8_e4m3 path takes ckv 256 or 512 with rope 32 or 64"):
        seesaw(ckv=ckv, rope=rope, kv_dtype=E4M3)


def test_sources_carry_wgmma_header() -> None:
    src = render_sources(seesaw())
    assert {"seesaw.cuh", "wgmma.cuh", "common.cuh", "ptx.cuh", "params.h", "kernel.cu"} <= set(src)
    assert '#include "seesaw.cuh"' in src["kernel.cu"]
    assert "seesaw::decode_kernel<VariantConfig>" in src["kernel.cu"]


@pytest.mark.parametrize("kwargs, field", [
    (dict(tile=Tile(32, 64, 2, 8)), "tile.block_m"),
    (dict(tile=Tile(64, 32, 2, 8)), "tile.block_n"),
    (dict(tile=Tile(64, 64, 2, 4)), "tile.warps"),
    (dict(tile=Tile(64, 64, 3, 8)), "tile.stages"),
    (dict(tile=Tile(64, 64, 1, 8)), "tile.stages"),
    (dict(ckv=384), "ckv_dim"),
    (dict(ckv=192), "ckv_dim"),
    (dict(rope=48), "rope_dim"),
    (dict(rope=128), "tile"),  # 72 + 2 x 80 KB: over 227 KB
])
def test_invalid_specs_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(SpecError) as info:
        seesaw(**kwargs)
    assert str(info.value).startswith(f"{field}:"), str(info.value)


def test_family_round_trips_through_the_id() -> None:
    spec = seesaw()
    assert spec.variant_id == "mla_decode_h128_c512_r64_bf16_bf16_seesaw_m64n64s2w8_sm90a"
    assert VariantSpec.from_id(spec.variant_id) == spec


BUILDS = {
    "h128_c512_r64_bf16": dict(),
    "h64_c512_r64_bf16": dict(heads=64),
    "h128_c512_r64_fp16": dict(dtype=FP16),
    "h40_c256_r32_bf16": dict(heads=40, ckv=256, rope=32),
    "h128_c512_r64_bf16_fp8": dict(kv_dtype=E4M3),
    "h40_c256_r32_bf16_fp8": dict(heads=40, ckv=256, rope=32, kv_dtype=E4M3),
}


@pytest.fixture(scope="module", params=list(BUILDS), ids=list(BUILDS))
def seesaw_entry(request, tmp_path_factory):
    return request.param, built_entry(seesaw(**BUILDS[request.param]), tmp_path_factory, "seesaw_cache")


@builds_with_nvcc
def test_seesaw_variant_has_no_spills_and_no_warnings(seesaw_entry):
    _, entry = seesaw_entry
    assert_clean_decode_kernel(entry)  # no spills, no stack, no warning
    log = (entry.path / "build.log").read_text()
    decode = next(k for k in entry.meta()["ptxas"] if k["function"] == "decode_kernel")
    assert decode["registers"] <= 255
    assert "serialized" not in log.lower(), log  # ptxas: wgmma pipeline serialized
    # ptxas inserts warpgroup.wait / warpgroup.arrive (C7517 / C7519) where it cannot prove the wgmma register
    # discipline: such a wait would silently serialize the seesaw (e.g. P0 V0_R behind S1)
    assert "is injected" not in log, log


@reads_sass
def test_seesaw_sass_uses_hgmma(seesaw_entry):
    name, entry = seesaw_entry
    sass = sass_of(entry)
    lines = sass.splitlines()
    cw = 256 if "c512" in name else 128
    rope = 64 if "r64" in name else 32
    ckv = 512 if "c512" in name else 256
    if name.endswith("_fp8"):  # seesaw_e4m3.cuh: e4m3 Q K^T from the raw ring, fp16 P V with V^T from registers
        qk = [ln for ln in lines if "QGMMA.64x64x32.F32.E4M3.E4M3" in ln]
        assert len(qk) == 2 * 2 * (ckv + rope) // 32, len(qk)  # S0 and S1, q's hi and lo parts
        pv = [ln for ln in lines if "HGMMA.64x64x16.F32 " in ln]
        assert len(pv) == 3 * 4 * (ckv // 128), len(pv)  # P0 V0 per warpgroup, P1 V1: k16 steps x m-tiles
        assert all(ln.split("HGMMA")[1].split(",")[1].strip().startswith("R") for ln in pv)  # A (V^T) in registers
        assert "F2FP.F16.E4M3.UNPACK_B" in sass and "UTMALDG.3D" in sass and "SYNCS.PHASECHK" in sass
        setmaxreg = sorted(tuple(ln.split(";")[0].split()[i] for i in (1, -1)) for ln in lines if "USETMAXREG" in ln)
        assert setmaxreg == [("USETMAXREG.DEALLOC.CTAPOOL", "0x18"),
                             ("USETMAXREG.TRY_ALLOC.CTAPOOL", "0xf0")], setmaxreg
        assert " LDL" not in sass and " STL" not in sass
        return
    dt = "F32 " if "fp16" in name else "F32.BF16 "  # fp16 inputs print as plain HGMMA...F32
    qk = [ln for ln in lines if f"HGMMA.64x64x16.{dt}" in ln]
    pv = [ln for ln in lines if f"HGMMA.64x{cw}x16.{dt}" in ln]
    assert len(qk) == 2 * (ckv + rope) // 16, len(qk)          # S0 and S1, each (C + R) / 16 k-steps
    assert len(pv) == 4 * 4 and all(".tnspB" in ln for ln in pv)  # 4 P V products of 64 tokens, V MN-major
    rs = [ln for ln in pv if "gdesc" in ln and ln.split("HGMMA")[1].split(",")[1].strip().startswith("R")]
    assert len(rs) == 8                                         # own P from registers (RS) in both warpgroups
    assert "LDGSTS.E.BYPASS.128" in sass                        # 16-byte cp.async copies of Q
    assert "UTMALDG.3D" in sass and "SYNCS.PHASECHK" in sass    # kv boxes by TMA, mbarrier waits
    regs = ("0x28", "0xe8")  # the producer warpgroup gives registers to the consumers
    setmaxreg = [ln.split(";")[0].split() for ln in lines if "USETMAXREG" in ln]
    assert sorted((w[1], w[-1]) for w in setmaxreg) == [("USETMAXREG.DEALLOC.CTAPOOL", regs[0]),
                                                        ("USETMAXREG.TRY_ALLOC.CTAPOOL", regs[1])], setmaxreg
    # named-barrier handshakes, synced on both sides (racecheck does not model bar.arrive)
    assert "BAR.SYNC.DEFER_BLOCKING 0x4, 0x100" in sass and "BAR.ARV" not in sass
    assert " LDL" not in sass and " STL" not in sass


@pytest.mark.gpu
@pytest.mark.parametrize("page", [3, 48, 128], ids=lambda p: f"p{p}")
@pytest.mark.parametrize("dims", [(512, 64), (256, 32)], ids=lambda d: f"c{d[0]}r{d[1]}")
@pytest.mark.parametrize("num_parts", [1, 64], ids=["unsplit", "split"])
def test_seesaw_page_sizes_the_matrix_lacks(page, dims, num_parts):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import mla_gen
    from mla_gen.reference import mla_decode_reference
    from mla_gen.testing import accuracy_problems, make_inputs

    heads, dt = 128, torch.bfloat16
    lengths = [1, page - 1, page + 1, 63, 65, 129, 1000, 4097]
    inp = make_inputs([n for n in lengths if n >= 1], heads=heads, ckv=dims[0], rope=dims[1], page_size=page,
                      dtype=dt, device="cuda", combined=page % 2 == 1,
                      generator=torch.Generator(device="cuda").manual_seed(page * 7 + num_parts))
    out = torch.full(inp.q_nope.shape, float("nan"), dtype=dt, device="cuda")
    lse = torch.full(inp.q_nope.shape[:3], float("nan"), dtype=torch.float32, device="cuda")
    w = mla_gen.MLADecodeWrapper(family="seesaw", num_parts=num_parts)
    w.plan(inp.cache_seqlens, 1, num_heads=heads, ckv_dim=dims[0], rope_dim=dims[1], page_size=page,
           max_pages=inp.block_table.shape[1], sm_scale=inp.sm_scale, dtype=dt)
    w.run(*inp.args()[:6], out=out, lse=lse)
    ref, ref_lse = mla_decode_reference(*inp.args())
    problems = accuracy_problems(out, lse, ref, ref_lse, DType.BF16)
    assert not problems, "; ".join(problems)


@pytest.mark.gpu
def test_seesaw_encodes_new_tensor_maps_when_the_cache_changes():
    """launch_decode reuses the thread's last tensor maps while the cache's pointers, strides and page counts stay
    the same: caches that differ in one of them, alternated through one wrapper (same checked structure where
    they allow it), each give the reference's answer. A stale map would read the previous cache."""
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    import mla_gen
    from mla_gen.reference import mla_decode_reference
    from mla_gen.testing import accuracy_problems, make_inputs

    heads, dt, page = 16, torch.bfloat16, 16
    lengths = [300, 17, 64]

    def inputs(seed: int, extra_pages: int = 3, combined: bool = False):
        return make_inputs(lengths, heads=heads, page_size=page, dtype=dt, device="cuda", combined=combined,
                           extra_pages=extra_pages, generator=torch.Generator(device="cuda").manual_seed(seed))

    a, b = inputs(1), inputs(2)            # same shapes and strides, other pointers
    c = inputs(3, extra_pages=9)           # more pages
    d = inputs(4, combined=True)           # other strides (views of one [pages, page, C + R] cache)
    max_pages = a.block_table.shape[1]
    assert all(x.block_table.shape[1] == max_pages for x in (b, c, d))
    w = mla_gen.MLADecodeWrapper(family="seesaw")
    w.plan(a.cache_seqlens, 1, num_heads=heads, page_size=page, max_pages=max_pages, sm_scale=a.sm_scale, dtype=dt)
    for inp in (a, b, a, c, d, a, d):
        out = torch.full(inp.q_nope.shape, float("nan"), dtype=dt, device="cuda")
        lse = torch.full(inp.q_nope.shape[:3], float("nan"), dtype=torch.float32, device="cuda")
        w.run(*inp.args()[:6], out=out, lse=lse)
        ref, ref_lse = mla_decode_reference(*inp.args())
        problems = accuracy_problems(out, lse, ref, ref_lse, DType.BF16)
        assert not problems, "; ".join(problems)
