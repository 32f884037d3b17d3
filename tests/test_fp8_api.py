"""fp8 caches through the public API on the CPU (issue 13): mla_decode and MLADecodeWrapper.plan reject each
bad fp8 input before launching with TypeError/ValueError naming the argument; valid fp8 inputs pass every
check (on the CPU they then stop at the CUDA check); the host path (a launcher that launches nothing) passes
the kernels what params.h documents (byte strides, fp8_ds_mla's rope at byte 528, kv_scale's pointer per
call) and a changed fp8 structure raises what an uncached call raises; dispatch surfaces an arch without an
fp8 kernel as a SpecError naming kv_dtype; the float64 reference reads the dequantized cache."""
from __future__ import annotations

import pytest
import torch

import mla_gen
import mla_gen.api as api
from fp8_cases import Fp8Inputs, fp8_inputs, quantize
from generator.errors import SpecError
from generator.select import decide
from generator.spec import Arch, DType, Family
from mla_gen import dispatch, fp8, validate
from mla_gen.bench.host import FakeLauncher, fake_host, fake_wrapper
from mla_gen.dtypes import to_dtype
from mla_gen.reference import mla_decode_reference
from mla_gen.testing import make_inputs, outcome, rel_l2

NOT_ON_GPU = r"^q_nope: expected a CUDA tensor"


def e4m3(**kw) -> Fp8Inputs:
    return fp8_inputs("fp8_e4m3", [5, 70], scale=0.0173, **kw)


def ds(**kw) -> Fp8Inputs:
    return fp8_inputs("fp8_ds_mla", [5, 70], **kw)


def call(case: Fp8Inputs, **overrides):
    args = dict(zip(("q_nope", "q_pe", "ckv_cache", "kpe_cache", "block_table", "cache_seqlens", "sm_scale"),
                    case.args()), **case.kwargs())
    args.update({"check_values": True, **overrides})
    return mla_gen.mla_decode(**args)


@pytest.mark.parametrize("make", [
    lambda: e4m3(), lambda: e4m3(separate=True), lambda: e4m3(dtype=torch.float16),
    lambda: e4m3(ckv=256, rope=32), lambda: ds(), lambda: ds(as_float8=True)],
    ids=["e4m3-views", "e4m3-separate", "e4m3-fp16-q", "e4m3-256-32", "ds-uint8", "ds-float8"])
def test_valid_fp8_inputs_pass_every_check(make):
    case = make()
    with pytest.raises(ValueError, match=NOT_ON_GPU):
        call(case)
    shape = validate.check_structure(*case.args(), kv_scale=case.kv_scale)
    assert shape.kv_dtype is DType.parse(case.kv_dtype) and shape.ckv_dim == case.base.q_nope.shape[3]
    assert (shape.num_pages, shape.page_size) == tuple(case.ckv_cache.shape[:2])


def _misaligned_e4m3(case: Fp8Inputs, width: int, ckv_at: int, kpe_at: int) -> dict:
    """ckv and kpe views of a [P, page, width] float8 cache, at the given byte offsets of a token."""
    pages, page_size, ckv = case.ckv_cache.shape
    big = torch.zeros(pages, page_size, width, dtype=torch.float8_e4m3fn)
    return {"ckv_cache": big[..., ckv_at:ckv_at + ckv], "kpe_cache": big[..., kpe_at:kpe_at + 64]}


BAD = [
    # fp8_e4m3 and its kv_scale
    ("e4m3", lambda c: {"kv_scale": None}, TypeError,
     r"^kv_scale: expected a float32 tensor of one element .*got NoneType"),
    ("e4m3", lambda c: {"kv_scale": 0.5}, TypeError, r"^kv_scale: expected a float32 tensor .*got float"),
    ("e4m3", lambda c: {"kv_scale": torch.ones(2)}, ValueError, r"^kv_scale: expected one element .*got shape \(2,\)"),
    ("e4m3", lambda c: {"kv_scale": torch.ones(1, dtype=torch.float64)}, TypeError,
     r"^kv_scale: expected dtype torch.float32, got torch.float64"),
    ("e4m3", lambda c: {"kv_scale": torch.ones(1, dtype=torch.bfloat16)}, TypeError, r"^kv_scale: expected dtype"),
    ("e4m3", lambda c: {"kv_scale": torch.full((1,), float("nan"))}, ValueError,
     r"^kv_scale: expected a finite number > 0, got nan"),
    ("e4m3", lambda c: {"kv_scale": torch.zeros(())}, ValueError, r"^kv_scale: expected a finite number > 0, got 0.0"),
    ("e4m3", lambda c: {"kpe_cache": None}, TypeError, r"^kpe_cache: expected a float8_e4m3fn tensor .*got None"),
    ("e4m3", lambda c: {"kpe_cache": c.kpe_cache.float().bfloat16()}, TypeError,
     r"^kpe_cache: expected dtype torch.float8_e4m3fn, got torch.bfloat16"),
    ("e4m3", lambda c: {"ckv_cache": c.ckv_cache.float().bfloat16(), "kv_scale": None}, TypeError,
     r"^kpe_cache: expected dtype torch.bfloat16, got torch.float8_e4m3fn"),
    ("e4m3", lambda c: {"kpe_cache": c.kpe_cache[..., :32]}, ValueError, r"^kpe_cache: expected rope_dim .*64.*got 32"),
    ("e4m3", lambda c: _misaligned_e4m3(c, 584, 0, 512), ValueError,
     r"^ckv_cache: stride 584 of dim 1 is not a multiple of 16 bytes"),
    ("e4m3", lambda c: _misaligned_e4m3(c, 592, 0, 520), ValueError,
     r"^kpe_cache: data pointer is not 16-byte aligned"),
    ("e4m3", lambda c: _misaligned_e4m3(c, 592, 8, 528), ValueError,
     r"^ckv_cache: data pointer is not 16-byte aligned"),
    ("e4m3", lambda c: {"q_nope": c.base.q_nope.float()}, TypeError, r"^q_nope: expected dtype"),
    # fp8_ds_mla
    ("ds", lambda c: {"kv_scale": torch.ones(1)}, ValueError,
     r"^kv_scale: expected None: .*fp8_ds_mla cache holds its scales in its tokens"),
    ("ds", lambda c: {"ckv_cache": c.ckv_cache[..., :576]}, ValueError,
     r"^ckv_cache: expected fp8_ds_mla's 656-byte tokens .*got last dim 576"),
    ("ds", lambda c: {"ckv_cache": c.ckv_cache[:, :, None]}, ValueError, r"^ckv_cache: expected 3 dims"),
    ("ds", lambda c: {"kpe_cache": c.base.kpe_cache}, ValueError, r"^kpe_cache: expected None with a 656-byte"),
    ("ds", lambda c: {"ckv_cache": c.ckv_cache.view(torch.float8_e4m3fn), "kpe_cache": c.base.kpe_cache}, ValueError,
     r"^kpe_cache: expected None with a 656-byte"),
    ("ds", lambda c: {"q_pe": c.base.q_pe[..., :32]}, ValueError,
     r"^q_pe: an fp8_ds_mla cache holds 64 rope values per token, got rope_dim 32"),
    ("ds", lambda c: {"q_nope": c.base.q_nope[..., :256]}, ValueError,
     r"^q_nope: an fp8_ds_mla cache holds 512 ckv values per token, got ckv_dim 256"),
    ("ds", lambda c: {"q_nope": c.base.q_nope.half(), "q_pe": c.base.q_pe.half()}, TypeError,
     r"^q_nope: an fp8_ds_mla cache keeps its rope in bf16"),
    ("ds", lambda c: {"ckv_cache": torch.zeros(c.ckv_cache.shape[0], 16, 664, dtype=torch.uint8)[..., :656]},
     ValueError, r"^ckv_cache: stride 664 of dim 1 is not a multiple of 16 bytes"),
    ("ds", lambda c: {"ckv_cache": torch.zeros(c.ckv_cache.shape[0], 16, 672, dtype=torch.uint8)[..., 8:664]},
     ValueError, r"^ckv_cache: data pointer is not 16-byte aligned"),
    # a 16-bit cache
    ("bf16", lambda c: {"kv_scale": torch.ones(1)}, ValueError,
     r"^kv_scale: expected None: .*bf16 cache is not scaled"),
    ("bf16", lambda c: {"kpe_cache": None}, TypeError, r"^kpe_cache: expected a torch.Tensor, got NoneType"),
]


@pytest.mark.parametrize("kind, override, exc, pattern", BAD,
                         ids=[f"{k}-{i}" for i, (k, *_rest) in enumerate(BAD)])
def test_bad_fp8_inputs_name_the_argument(kind, override, exc, pattern):
    if kind == "bf16":
        base = make_inputs([5, 70], heads=4, page_size=16, generator=torch.Generator().manual_seed(0))
        case = Fp8Inputs(base, "bf16", base.ckv_cache, base.kpe_cache, None)
    else:
        case = e4m3() if kind == "e4m3" else ds()
    with pytest.raises(exc, match=pattern):
        call(case, **override(case))


def test_kv_scale_on_another_device_is_named():
    """Where the kernels run is the CPU here (fake_host), so the device check itself is reached."""
    case = e4m3()
    pattern = r"^kv_scale: expected a tensor on cpu \(where q_nope is\), got meta"
    with fake_host(), pytest.raises(ValueError, match=pattern):
        call(case, kv_scale=case.kv_scale.to("meta"), check_values=False)


# -- plan ------------------------------------------------------------------------------------------

PLAN = dict(num_heads=16, page_size=64, max_pages=4, sm_scale=0.1)


@pytest.mark.parametrize("kw, exc, pattern", [
    (dict(kv_dtype="fp8"), ValueError, r"^kv_dtype: expected None .*'fp8_e4m3' .*'fp8_ds_mla', got 'fp8'"),
    (dict(kv_dtype=torch.bfloat16), ValueError, r"^kv_dtype: expected None"),
    (dict(kv_dtype="bf16"), ValueError, r"^kv_dtype: expected None"),
    (dict(kv_dtype=1), ValueError, r"^kv_dtype: expected None"),
    (dict(kv_dtype="fp8_ds_mla", rope_dim=32), ValueError, r"^rope_dim: an fp8_ds_mla cache holds 64 rope values"),
    (dict(kv_dtype="fp8_ds_mla", ckv_dim=256, rope_dim=32), ValueError, r"^ckv_dim: an fp8_ds_mla cache holds 512"),
    (dict(kv_dtype="fp8_ds_mla", dtype=torch.float16), TypeError,
     r"^dtype: an fp8_ds_mla cache keeps its rope in bf16"),
    # valid: the arguments pass, the host tensor then fails the device check
    (dict(kv_dtype="fp8_e4m3"), ValueError, r"^cache_seqlens: expected a tensor on cuda:0"),
    (dict(kv_dtype=torch.float8_e4m3fn, dtype=torch.float16), ValueError,
     r"^cache_seqlens: expected a tensor on cuda:0"),
    (dict(kv_dtype="fp8_ds_mla"), ValueError, r"^cache_seqlens: expected a tensor on cuda:0"),
    (dict(kv_dtype=None), ValueError, r"^cache_seqlens: expected a tensor on cuda:0"),
])
def test_plan_checks_kv_dtype(kw, exc, pattern):
    w = mla_gen.MLADecodeWrapper("cuda:0")  # no device is touched before the arguments are checked
    with pytest.raises(exc, match=pattern):
        w.plan(torch.tensor([3, 4], dtype=torch.int32), **{**PLAN, **kw})


def test_dispatch_of_fp8_per_arch(monkeypatch, request):
    # choose caches decisions per device index: forget this test's fake devices
    dispatch.choose.cache_clear()
    request.addfinalizer(dispatch.choose.cache_clear)
    monkeypatch.setattr(dispatch, "device_info", lambda index: dispatch.DeviceInfo(index, "T4", Arch.SM75, 40))
    with pytest.raises(SpecError,
                       match=r"^kv_dtype: fp8_e4m3 caches are read by the narrow, seesaw, wgmma, mma families"):
        dispatch.choose(0, 16, 512, 64, torch.bfloat16, 1, kv_dtype=DType.FP8_E4M3)
    assert dispatch.choose(0, 16, 512, 64, torch.bfloat16, 1).spec.kv_dtype is DType.BF16  # 16-bit still runs
    monkeypatch.setattr(dispatch, "device_info", lambda index: dispatch.DeviceInfo(index, "A100", Arch.SM80, 108))
    assert dispatch.choose(0, 16, 512, 64, torch.bfloat16, 1, kv_dtype=DType.FP8_E4M3).spec.family is Family.MMA
    monkeypatch.setattr(dispatch, "device_info", lambda index: dispatch.DeviceInfo(index, "H200", Arch.SM90A, 132))
    d = dispatch.choose(0, 16, 512, 64, torch.bfloat16, 1, kv_dtype=DType.FP8_DS_MLA)
    assert d.spec.variant_id == "mla_decode_h16_c512_r64_bf16_fp8dsmla_narrow_m16n64s2w8_sm90a" and d.m_blocks == 1
    d = dispatch.choose(0, 128, 512, 64, torch.bfloat16, 2, kv_dtype=DType.FP8_DS_MLA)
    assert d.spec.variant_id == "mla_decode_h128_c512_r64_bf16_fp8dsmla_wgmma_m64n32s4w8_sm90a" and d.m_blocks == 4
    with pytest.raises(SpecError, match=r"^kv_dtype: seesaw reads fp8_e4m3 caches only .*got fp8_ds_mla"):
        dispatch.choose(0, 16, 512, 64, torch.bfloat16, 1, "seesaw", kv_dtype=DType.FP8_DS_MLA)
    with pytest.raises(SpecError, match=r"^kv_dtype: fp8_e4m3 caches are read by the narrow, seesaw, wgmma, mma "
                                        r"families only, got family simt"):
        dispatch.choose(0, 16, 512, 64, torch.bfloat16, 1, "simt", kv_dtype=DType.FP8_E4M3)


@pytest.mark.parametrize("ckv, rope, field", [(192, 64, "ckv_dim"), (384, 144, "rope_dim")])
def test_fp8_dims_the_narrow_gather_cannot_read_are_refused(ckv, rope, field):
    with pytest.raises(SpecError, match=rf"^{field}: an fp8 cache"):
        decide(arch=Arch.SM90A, num_heads=16, ckv_dim=ckv, rope_dim=rope, dtype=DType.BF16, kv_dtype=DType.FP8_E4M3)


# -- the host path, with a launcher that launches nothing ------------------------------------------

class RecordingLauncher(FakeLauncher):
    """FakeLauncher whose launch also takes the kv_scale overload (pointers, then replan)."""

    def __init__(self):
        super().__init__()
        self.record = True

    def launch(self, params, stream, *pointers_then_replan):
        *pointers, replan = pointers_then_replan
        self.launches.append((params, stream, tuple(pointers), replan))


def planned(case: Fp8Inputs, launcher: FakeLauncher, kv_dtype: DType | None = None) -> api.MLADecodeWrapper:
    """A wrapper planned on CPU (the decision an H200 would make) for `case`'s shape in `kv_dtype` (default:
    the case's), launching through `launcher`; also mla_decode's wrapper for it (stream 0). In fake_host()."""
    b, s_q, h, c = case.base.q_nope.shape
    kv = kv_dtype or DType.parse(case.kv_dtype)
    shape = validate.check_structure(*case.args(), kv_scale=case.kv_scale)
    decision = decide(arch=Arch.SM90A, num_heads=h, ckv_dim=c, rope_dim=shape.rope_dim, dtype=to_dtype(shape.dtype),
                      s_q=s_q, kv_dtype=kv)
    cpu = torch.device("cpu")
    plan = api.DecodePlan(cpu, b, s_q, h, c, shape.rope_dim, shape.dtype, shape.page_size, shape.max_pages,
                          float(case.base.sm_scale), False, decision, api.max_partials(decision.num_parts))
    wrapper = api.MLADecodeWrapper.__new__(api.MLADecodeWrapper)
    wrapper._device, wrapper._family, wrapper._num_parts = cpu, None, None
    wrapper._install(plan, launcher)
    api._WRAPPERS[api._wrapper_key(shape, cpu, 0, False, None, None)] = wrapper
    return wrapper


@pytest.fixture
def host():
    with fake_host():
        try:
            yield RecordingLauncher()
        finally:
            api._WRAPPERS.clear()
            api._CALLS.clear()


def test_e4m3_launch_gets_each_calls_scale_pointer(host):
    case = e4m3()
    w = planned(case, host)
    assert w.plan_info.kv_dtype is DType.FP8_E4M3
    other = case.kv_scale.clone() * 2  # same structure, another tensor: its pointer, not the first's
    w.run(*case.args()[:6], kv_scale=case.kv_scale)
    w.run(*case.args()[:6], kv_scale=other)
    assert len(w._sites) == 1  # the second call was a hit
    (p1, _, ptr1, _), (p2, _, ptr2, _) = host.launches
    assert p1 is p2 and p1.kv_scale == 0  # the site's params hold no scale
    assert ptr1[-1] == case.kv_scale.data_ptr() and ptr2[-1] == other.data_ptr() and len(ptr1) == 9
    assert ptr1[2:4] == (case.ckv_cache.data_ptr(), case.kpe_cache.data_ptr())
    assert case.ckv_cache.data_ptr() + 512 == case.kpe_cache.data_ptr()  # views of one [P, page, 576] cache
    # element strides of a 1-byte cache are its byte strides
    assert (p1.ckv_stride_page, p1.ckv_stride_tok) == (16 * 576, 576) == case.ckv_cache.stride()[:2]
    assert (p1.kpe_stride_page, p1.kpe_stride_tok) == (16 * 576, 576)


def test_e4m3_mla_decode_hit_passes_each_calls_scale(host):
    case = e4m3()
    planned(case, host)
    scales = [case.kv_scale, case.kv_scale * 3, torch.full((), 0.5)]  # a 0-dim scale is another structure
    for s in scales:
        api.mla_decode(*case.args(), kv_scale=s)
    assert [ptrs[-1] for _, _, ptrs, _ in host.launches] == [s.data_ptr() for s in scales]
    assert len(api._CALLS) == 2


def test_ds_mla_launch_reads_the_rope_inside_each_token(host):
    case = ds(page_size=64)
    w = planned(case, host)
    w.run(*case.args()[:6])
    api.mla_decode(*case.args())
    for p, _, ptrs, _ in host.launches:
        ckv, kpe = ptrs[2:4]
        assert len(ptrs) == 8 and ckv == case.ckv_cache.data_ptr() and kpe == ckv + fp8.DS_MLA_ROPE_OFFSET == ckv + 528
        assert (p.ckv_stride_page, p.ckv_stride_tok) == (64 * 656, 656)  # bytes
        assert (p.kpe_stride_page, p.kpe_stride_tok) == (64 * 328, 328)  # bf16 elements
        assert p.kv_scale == 0


@pytest.mark.parametrize("plan_kv, inputs, got, want", [
    (DType.BF16, "e4m3", "fp8_e4m3", "bf16"), (DType.FP8_E4M3, "bf16", "bf16", "fp8_e4m3"),
    (DType.FP8_E4M3, "ds", "fp8_ds_mla", "fp8_e4m3"), (DType.FP8_DS_MLA, "e4m3", "fp8_e4m3", "fp8_ds_mla")])
def test_a_cache_not_in_the_plans_kv_dtype_is_named(host, plan_kv, inputs, got, want):
    base = make_inputs([5, 70], heads=4, page_size=16, generator=torch.Generator().manual_seed(0))
    cases = {"e4m3": quantize(base, "fp8_e4m3", scale=0.02), "ds": quantize(base, "fp8_ds_mla"),
             "bf16": Fp8Inputs(base, "bf16", base.ckv_cache, base.kpe_cache, None)}
    w = planned(cases["e4m3"], host, plan_kv)
    with pytest.raises(ValueError, match=rf"^ckv_cache: kv_dtype {got} differs from the plan's {want}; call plan"):
        w.run(*cases[inputs].args()[:6], **cases[inputs].kwargs())
    assert not host.launches


@pytest.mark.parametrize("entry", ["run", "mla_decode"])
def test_a_changed_fp8_structure_raises_what_an_uncached_call_raises(host, entry):
    case = e4m3()
    w = planned(case, host)
    args = case.args()[:6]
    run = ((lambda a, kw: w.run(*a, **kw)) if entry == "run"
           else (lambda a, kw: api.mla_decode(*a, case.base.sm_scale, **kw)))
    good = {"kv_scale": case.kv_scale}
    with_arg = lambda i, t: args[:i] + (t,) + args[i + 1:]  # noqa: E731
    changes = {"no scale": (args, {}), "float64 scale": (args, {"kv_scale": case.kv_scale.double()}),
               "two scales": (args, {"kv_scale": torch.ones(2)}), "a float": (args, {"kv_scale": 0.5}),
               "scale on meta": (args, {"kv_scale": case.kv_scale.to("meta")}),
               "no kpe_cache": (with_arg(3, None), good),
               "bf16 ckv_cache": (with_arg(2, case.ckv_cache.float().bfloat16()), good),
               "kpe_cache misaligned": (with_arg(3, case.ckv_cache[..., 8:72]), good)}
    for name, (bad, kw) in changes.items():
        w._sites.clear()
        api._CALLS.clear()
        cold = outcome(lambda: run(bad, kw))
        run(args, good)  # a hit from here on
        run(args, good)
        assert outcome(lambda: run(bad, kw)) == cold, name
        assert cold is not None and cold[1].split(":")[0] in ("kv_scale", "kpe_cache"), (name, cold)


def test_a_hit_still_checks_the_scale_when_asked(host):
    case = e4m3()
    planned(case, host)
    api.mla_decode(*case.args(), kv_scale=case.kv_scale, check_values=True)
    with pytest.raises(ValueError, match=r"^kv_scale: expected a finite number > 0, got -1.0"):
        api.mla_decode(*case.args(), kv_scale=-case.kv_scale / case.kv_scale, check_values=True)
    assert len(host.launches) == 1


def test_a_16bit_plan_keeps_its_launch_arguments(host):
    """A 16-bit call passes the eight pointers, as the launcher's first launch() overload takes them."""
    base = make_inputs([5, 70], heads=4, page_size=16, generator=torch.Generator().manual_seed(0))
    w = fake_wrapper(base, host)
    w.run(*base.args()[:6])
    assert len(host.launches[0][2]) == 8 and w.plan_info.kv_dtype is DType.BF16


# -- the float64 reference ---------------------------------------------------------------------------

@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_ds_mla"])
def test_reference_reads_the_dequantized_cache(kv_dtype):
    case = fp8_inputs(kv_dtype, [1, 40, 100], heads=8, s_q=1, seed=3, **({"scale": 0.013} if kv_dtype == "fp8_e4m3"
                                                                          else {}))
    out, lse = case.ref()
    if kv_dtype == "fp8_e4m3":
        ckv, kpe = case.ckv_cache.double() * 0.013, case.kpe_cache.double() * 0.013
    else:
        ckv, kpe = fp8.dequantize_ds_mla(case.ckv_cache)
    b = case.base
    want, want_lse = mla_decode_reference(b.q_nope, b.q_pe, ckv, kpe, b.block_table, b.cache_seqlens, b.sm_scale)
    assert rel_l2(out, want) < 1e-6 and float((lse - want_lse).abs().max()) < 1e-6
    # and within e4m3's rounding of the 16-bit cache it was quantized from
    exact, _ = mla_decode_reference(*b.args())
    assert not out.isnan().any() and 1e-4 < rel_l2(out, exact) < 5e-2
