"""The bench run: prebuild, per case inputs, reference, each implementation checked then timed, the
table, the JSON and the plot. `main` is `python -m mla_gen.bench` (see the package docstring)."""
from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import functools
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from generator import __version__, env, jit
from generator.build import build_many
from generator.errors import MlaGenError, SpecError
from generator.select import decide, families_for
from generator.spec import FP8_FAMILIES, DType, Family, VariantSpec
from mla_gen.bench.args import PROG, Options, UsageError, parse_options
from mla_gen.bench.cases import Case, Work, fp8_unsupported, subsample, work
from mla_gen.bench.host import HOST_CASE, host_times
from mla_gen.bench.impls import (FP8_TOL, PEER_16BIT_NOTE, PEER_TOL, NotApplicable, Peers, Prepared, QuantizedCache,
                                 Reference, build_inputs, compare, prepare_mlagen, prepare_peer, prepare_torch,
                                 quantize)
from mla_gen.bench.plot import plot_roofline
from mla_gen.bench.report import (MLAGEN_PREFIX, PLANNER_SUFFIX, TORCH_IMPL, Check, HostTimes, Record, balance_lines,
                                  flush_line, format_table, fp8_lines, header_lines, json_document, make_record,
                                  page_lines, read_document, read_host, spin_lines, target_lines, with_16bit_ratio)
from mla_gen.bench.roofline import Ceilings
from mla_gen.bench.timing import FLUSH, FLUSH_BYTES, SPIN_CYCLES, Timer, measure_ceilings
from mla_gen.dispatch import DeviceInfo, device_info
from mla_gen.testing import REF_TOL, DecodeInputs

WARMUP = 5
REF_REQUESTS = 4


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@contextlib.contextmanager
def hang_watchdog(seconds: int) -> Iterator[None]:
    """A kernel that never finishes (an mbarrier or setmaxnreg waiting forever) would hold the run, and its
    device, until killed from outside: past `seconds` the process prints every thread's stack under the last
    progress line (which names the case) and exits with status 1. A C-level watchdog: it fires even while the
    main thread waits inside a CUDA call. Where stderr is no file (a notebook's), the process's own stderr takes the
    stacks; without one either, nothing watches."""
    out = next((f for f in (sys.stderr, sys.__stderr__) if _has_fileno(f)), None)
    if out is None:
        yield
        return
    faulthandler.dump_traceback_later(seconds, exit=True, file=out)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


def _has_fileno(stream: Any) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        return False
    return True


@dataclasses.dataclass
class Context:
    """What every case shares: device, timer, ceilings, families, the fp8 format and the families timed on it,
    peers, variants that failed to build."""
    device: torch.device
    info: DeviceInfo
    timer: Timer
    ceilings: Ceilings
    families: list[Family]
    available: list[Family]
    kv_dtype: DType | None
    fp8_families: list[Family]
    peers: Peers | None
    build_errors: dict[VariantSpec, Exception]

    def fp8_impl(self, family: Family) -> str:
        return f"{MLAGEN_PREFIX}{family.value}[{self.kv_dtype.cli_name}]"

    def fp8_work(self, case: Case) -> Work:
        """The case's work on the fp8 cache; on its own cache where the format cannot hold it (an n/a row)."""
        return work(case) if fp8_unsupported(case, self.kv_dtype) else work(case, self.kv_dtype)

    def absent_records(self, case: Case) -> list[Record]:
        absent = self.peers.absent if self.peers else {}
        return [make_record(case, work(case), name, self.ceilings, "absent", note=why) for name, why in absent.items()]

    def failed_case(self, case: Case, why: str) -> list[Record]:
        """Every implementation's row of a case that could not run at all."""
        names = ([f"{MLAGEN_PREFIX}{f.value}" for f in self.families] + [TORCH_IMPL]
                 + (self.peers.names if self.peers else []))
        fp8 = [make_record(case, self.fp8_work(case), self.fp8_impl(f), self.ceilings, "error", note=why,
                           kv_dtype=self.kv_dtype.cli_name) for f in self.fp8_families]
        return ([make_record(case, work(case), name, self.ceilings, "error", note=why) for name in names] + fp8
                + self.absent_records(case))


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".strip()


def _decision_spec(case: Case, family: Family | None, info: DeviceInfo, kv_dtype: DType | None = None) -> VariantSpec:
    """The variant a planned wrapper of the case loads (its batch, as build_inputs makes it)."""
    return decide(arch=info.arch, num_heads=case.heads, ckv_dim=case.ckv, rope_dim=case.rope,
                  dtype=DType.parse(case.dtype), s_q=case.s_q, sm_count=info.sm_count, family=family,
                  kv_dtype=kv_dtype, batch=case.batch, page_size=case.page_size).spec


def prebuild(cases: Sequence[Case], families: Sequence[tuple[Family, DType | None]],
             info: DeviceInfo) -> dict[VariantSpec, Exception]:
    """Builds the variants the cases need, per (family, fp8 format or None), in parallel (a cold cache would
    otherwise build them one by one inside plan()). Returns the variants that failed, so their rows report
    it without building again."""
    specs = []
    for case in cases:
        for family, kv_dtype in families:
            try:
                specs.append(_decision_spec(case, family, info, kv_dtype))
            except SpecError:
                continue  # plan() raises the same on the case's row, or the fp8 row is n/a
    missing = [s for s in dict.fromkeys(specs) if jit.find_entry(s) is None]
    if not missing or env.disable_jit():
        return {}
    log(f"building {len(missing)} variant(s): {', '.join(s.variant_id for s in missing)}")
    start = time.perf_counter()
    try:
        results = build_many(missing, jobs=min(len(missing), max(1, (os.cpu_count() or 2) // 2)))
    except MlaGenError as e:
        log(f"prebuild skipped: {_error_text(e)}")
        return {}
    failed = {spec: err for spec, _, err in results if err is not None}
    log(f"built {len(missing) - len(failed)} of {len(missing)} in {time.perf_counter() - start:.0f} s")
    for spec, err in failed.items():
        log(f"  {spec.variant_id}: {_error_text(err)}")
    return failed


def evaluate(ctx: Context, case: Case, impl: str, prepare: Callable[[], Prepared],
             judge: Callable[[torch.Tensor], Check],
             kv_dtype: DType | None = None) -> tuple[Record, torch.Tensor | None]:
    """Prepares, checks, then times one implementation (reading an fp8 cache of `kv_dtype`): (record, its
    checked output or None)."""
    record = functools.partial(make_record, case, work(case, kv_dtype), impl, ctx.ceilings,
                               kv_dtype=kv_dtype.cli_name if kv_dtype else None)
    try:
        prepared = prepare()
        out = prepared.check_run()
        torch.cuda.synchronize()
        check = judge(out)
        if not check.ok:
            return record("WRONG", note=check.why_wrong(), check=check), None
        return record("ok", note=prepared.note, timing=ctx.timer.time(prepared.run), check=check), out
    except NotApplicable as e:
        return record("n/a", note=str(e)), None
    except Exception as e:  # one implementation failing on one case is a row, not the end of the run
        return record("error", note=_error_text(e)), None


def _progress(r: Record) -> str:
    if r.status == "ok":
        ratio = f"; {r.vs_16bit:.3f}x {r.vs_16bit_impl}" if r.vs_16bit is not None else ""
        return (f"  {r.impl}: {r.time_us:.1f} us, {r.gbps:.0f} GB/s ({r.bw_frac:.2f} of copy), "
                f"{r.tflops:.1f} TFLOP/s, {r.time_over_floor:.2f}x floor; vs {r.check_against} max abs "
                f"{r.max_abs_diff:.1e}{ratio}")
    return f"  {r.impl}: {r.status}: {r.note.splitlines()[0] if r.note else ''}"


def bench_case(ctx: Context, case: Case) -> list[Record]:
    """Every implementation's record for one case; the case's tensors are freed before the next."""
    records = _bench_case(ctx, case)
    torch.cuda.empty_cache()
    return records


def _bench_case(ctx: Context, case: Case) -> list[Record]:
    try:
        inp = build_inputs(case, ctx.device)
        ref = Reference.compute(inp, subsample(case.lengths(), REF_REQUESTS, case.seed))
    except Exception as e:
        return ctx.failed_case(case, f"inputs or reference: {_error_text(e)}")
    records: list[Record] = []
    anchor: tuple[str, torch.Tensor] | None = None

    def mlagen(family: Family, replan: bool = False, fp8: QuantizedCache | None = None) -> Prepared:
        if family not in ctx.available:
            raise NotApplicable(f"family {family.value} does not run on {ctx.info.arch.nvcc_name} (available: "
                                f"{', '.join(f.value for f in ctx.available)})")
        err = ctx.build_errors.get(_decision_spec(case, family, ctx.info, fp8.kv_dtype if fp8 else None))
        if err is not None:
            raise err
        return prepare_mlagen(family, inp, case, replan, fp8)

    def peer(name: str) -> Prepared:
        prepared = prepare_peer(ctx.peers, name, inp, case)
        return dataclasses.replace(prepared, note=PEER_16BIT_NOTE) if ctx.kv_dtype else prepared

    def judge(out: torch.Tensor) -> Check:
        if anchor is None:
            return ref.check(out, REF_TOL[case.dtype])
        return compare(out, anchor[1], anchor[0], PEER_TOL[case.dtype])

    def add(rec: Record) -> None:
        records.append(rec)
        log(_progress(rec))

    for family in ctx.families:
        rec, out = evaluate(ctx, case, f"{MLAGEN_PREFIX}{family.value}", functools.partial(mlagen, family),
                            lambda o: ref.check(o, REF_TOL[case.dtype]))
        add(rec)
        if anchor is None and out is not None:
            anchor = (rec.impl, out)
    default = _decision_spec(case, None, ctx.info).family
    if default in ctx.families:
        add(evaluate(ctx, case, f"{MLAGEN_PREFIX}{default.value}{PLANNER_SUFFIX}",
                     functools.partial(mlagen, default, True), lambda o: ref.check(o, REF_TOL[case.dtype]))[0])
    if ctx.kv_dtype is not None:
        # the ratio compares what mla_decode runs: the family dispatch picks for each cache
        baseline = next((r for r in records if r.impl == f"{MLAGEN_PREFIX}{default.value}"), None)
        dispatched = _dispatched_fp8_impl(ctx, case)
        for rec in fp8_records(ctx, case, inp, ref.rows, mlagen):
            add(with_16bit_ratio(rec, baseline) if rec.impl == dispatched else rec)
    add(evaluate(ctx, case, TORCH_IMPL, lambda: prepare_torch(inp, case), judge)[0])
    if ctx.peers is not None:
        for name in ctx.peers.names:
            add(evaluate(ctx, case, name, functools.partial(peer, name), judge)[0])
    return records + ctx.absent_records(case)


def _dispatched_fp8_impl(ctx: Context, case: Case) -> str | None:
    """The fp8 row of the family dispatch picks for the case's fp8 cache on this device, or None (none can)."""
    try:
        return ctx.fp8_impl(_decision_spec(case, None, ctx.info, ctx.kv_dtype).family)
    except SpecError:
        return None


def fp8_records(ctx: Context, case: Case, inp: DecodeInputs, rows: list[int],
                mlagen: Callable[..., Prepared]) -> list[Record]:
    """mla-gen's fp8 families on the case's cache quantized to ctx.kv_dtype (once, untimed), each checked
    against the float64 reference on the dequantized cache."""
    kv = ctx.kv_dtype

    def untimed(status: str, note: str) -> list[Record]:
        return [make_record(case, ctx.fp8_work(case), ctx.fp8_impl(f), ctx.ceilings, status, note=note,
                            kv_dtype=kv.cli_name) for f in ctx.fp8_families]

    why = fp8_unsupported(case, kv)
    if why:  # e.g. fp8_ds_mla on a 256/32 case
        return untimed("n/a", why)
    try:
        cache = quantize(inp, kv)
        ref = Reference.compute(inp, rows, cache.dequantized())
    except Exception as e:
        return untimed("error", f"quantize or reference: {_error_text(e)}")
    return [evaluate(ctx, case, ctx.fp8_impl(f), functools.partial(mlagen, f, fp8=cache),
                     lambda o: ref.check(o, FP8_TOL), kv)[0] for f in ctx.fp8_families]


def host_section(ctx: Context) -> HostTimes | None:
    """The three host figures on B1 S256 H16 (mla_gen.bench.host); None (logged) if it cannot run."""
    case = HOST_CASE
    try:
        inp = build_inputs(case, ctx.device)
        flashmla, why = None, "FlashMLA not loaded (--peers)"
        if ctx.peers is not None:
            if "flashmla" in ctx.peers.names:
                flashmla = ctx.peers.module.prepare("flashmla", inp.q, inp.kv, inp.block_table, inp.cache_seqlens,
                                                    case.sm_scale, dv=case.ckv)
            else:
                why = ctx.peers.absent.get("flashmla", "FlashMLA does not load")
        return host_times(ctx.device, inp, case, flashmla, why)
    except Exception as e:  # the cases' table still prints
        log(f"host section failed: {_error_text(e)}")
        return None
    finally:
        torch.cuda.empty_cache()


def _device_doc(info: DeviceInfo) -> dict[str, Any]:
    return {"name": info.name, "arch": info.arch.nvcc_name, "sm_count": info.sm_count, "torch": torch.__version__,
            "cuda": torch.version.cuda, "mla_gen": __version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def portable_path(path: Path) -> str:
    """A path as a result file may record it: relative to the working directory when inside it,
    else the folder's name alone (never a machine's absolute path)."""
    resolved = path.resolve()
    try:
        return str(resolved.relative_to(Path.cwd().resolve()))
    except ValueError:
        return resolved.name


def _settings(opts: Options, ctx: Context) -> dict[str, Any]:
    return {"iters": opts.iters, "warmup": WARMUP, "flush_bytes": FLUSH_BYTES, "flush": FLUSH,
            "spin_cycles": SPIN_CYCLES,
            "reference_requests": REF_REQUESTS, "families": [f.value for f in ctx.families],
            "peers_dir": portable_path(opts.peers_dir) if opts.peers_dir else None,
            "cache_layout": "one combined [num_pages, page_size, C+R] cache; mla-gen reads views of it",
            "kv_dtype": opts.kv_dtype.cli_name if opts.kv_dtype else None,
            "fp8_cache": "the combined cache quantized once per case (mla_gen.fp8), read by mla-gen's fp8 rows; "
                         "the others read the 16-bit cache" if opts.kv_dtype else None,
            "argv": [portable_path(Path(a)) if os.path.isabs(a) else a for a in sys.argv[1:]]}


def run(opts: Options) -> int:
    device = torch.device("cuda", torch.cuda.current_device())
    info = device_info(device.index)
    device_doc = _device_doc(info)
    timer = Timer(device, opts.iters, WARMUP)
    log(f"device {info.name} ({info.arch.nvcc_name}, {info.sm_count} SMs): measuring the ceilings")
    ceilings = measure_ceilings(timer, device)
    for line in header_lines(device_doc, ceilings):
        log(line)
    available = families_for(info.arch)
    families = opts.families or available
    peers = Peers.load(opts.peers_dir) if opts.peers_dir else None
    if peers is not None:
        log(f"peers from {opts.peers_dir}: {', '.join(peers.names) or 'none'} load"
            + "".join(f"; {n} absent ({why})" for n, why in peers.absent.items()))
    # fp8 rows: the requested families that read an fp8 cache (a device without them shows n/a rows)
    fp8_families = [f for f in (opts.families or FP8_FAMILIES) if f in FP8_FAMILIES] if opts.kv_dtype else []
    builds = [(f, None) for f in families if f in available] + [(f, opts.kv_dtype) for f in fp8_families
                                                                 if f in available]
    build_errors = prebuild(opts.cases, builds, info)
    ctx = Context(device, info, timer, ceilings, families, available, opts.kv_dtype, fp8_families, peers, build_errors)
    records: list[Record] = []
    start = time.perf_counter()
    for i, case in enumerate(opts.cases, 1):
        log(f"[{i}/{len(opts.cases)}] case {case.name}: {case.shape} ({time.perf_counter() - start:.0f} s)")
        try:
            with hang_watchdog(opts.case_timeout_s):
                records += bench_case(ctx, case)
        except Exception as e:  # e.g. a CUDA error that outlives the row that caused it: keep the table
            log(f"  case {case.name} failed: {_error_text(e)}")
            records += ctx.failed_case(case, _error_text(e))
    log(f"host time per call: {HOST_CASE.shape} ({time.perf_counter() - start:.0f} s)")
    with hang_watchdog(opts.case_timeout_s):
        host = host_section(ctx)
    log(f"done in {time.perf_counter() - start:.0f} s")
    settings = {**_settings(opts, ctx), "spin_us": timer.spin_us}  # the GPU spin's measured length
    if opts.json_path:
        doc = json_document(device_doc, ceilings, settings, opts.cases, records, host)
        opts.json_path.write_text(json.dumps(doc, indent=1) + "\n")
        log(f"wrote {opts.json_path}")
    report(device_doc, ceilings, records, opts, settings, host)
    ours = [r for r in records if r.impl.startswith(MLAGEN_PREFIX) or r.impl == TORCH_IMPL]
    return 1 if any(r.status in ("WRONG", "error") for r in ours) else 0


def report(device: dict[str, Any], ceilings: Ceilings, records: Sequence[Record], opts: Options,
           settings: dict[str, Any], host: HostTimes | None = None) -> None:
    """The table, the spin check and the host section on stdout, and the plot if asked."""
    print("\n".join(header_lines(device, ceilings) + [flush_line(settings)]))
    print(format_table(records))
    host_lines = host.lines() if host is not None else []
    for line in (balance_lines(records) + page_lines(records) + target_lines(records) + fp8_lines(records)
                 + spin_lines(records) + host_lines):
        print(line)
    if opts.plot_path:
        n = plot_roofline(records, ceilings, opts.plot_path, f"MLA decode, {device.get('name')}, {device.get('date')}")
        log(f"wrote {opts.plot_path} ({n} points)")


def replay(opts: Options) -> int:
    try:
        doc = json.loads(opts.from_json.read_text())
        device, ceilings, records = read_document(doc)
        host = read_host(doc)
    except (ValueError, KeyError, TypeError) as e:
        print(f"{PROG}: error: argument --from-json: {opts.from_json}: {e}", file=sys.stderr)
        return 2
    report(device, ceilings, records, opts, doc.get("settings", {}), host)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        opts = parse_options(argv)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    if opts.from_json:
        return replay(opts)
    if not torch.cuda.is_available():
        print(f"{PROG}: error: no CUDA device (torch {torch.__version__} sees none); "
              f"--from-json prints an earlier run's table without one", file=sys.stderr)
        return 1
    return run(opts)
