"""Results of `python -m mla_gen.bench`: timings, output checks, one Record per (case, implementation),
the aligned table and the JSON document. Torch-free: records are built from plain numbers."""
from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, Sequence

from generator.spec import DType
from mla_gen.bench.cases import Case, Work
from mla_gen.bench.roofline import Ceilings

# ok: checked and timed; WRONG: output mismatch, not timed; n/a: the implementation cannot take the
# case; absent: the implementation does not load here; error: it raised (message in `note`).
STATUSES = ("ok", "WRONG", "n/a", "absent", "error")
SCHEMA_VERSION = 4  # 2: records' spin_us, the "host" section; 3: records' kv_dtype, vs_16bit, vs_16bit_impl; 4: page_of
# Issue 13's acceptance, by cache format and suite case: time on the fp8 cache / time on the bf16 cache, at most.
FP8_TARGETS = {"fp8_e4m3": {"1": 0.58, "2": 1.0}, "fp8_ds_mla": {"1": 0.65, "2": 1.0}}
# Issues 11 and 12's acceptance, by suite case: the reference peer's time / mla-gen's, at least (mla-gen: the
# family dispatch picks, which mla_decode runs); where that peer cannot run the case, a fraction of the measured
# copy bandwidth, at least; and time(ragged case) / time(its equal-length twin), at most.
REFERENCE_PEER = "flashmla"
PEER_TARGETS = {"1": 1.0, "2": 1.05, "3": 1.05, "6": 1.05, "tp32": 1.0, "tp40": 1.0, "tp64": 1.0, "mtp2": 1.0,
                "mtp5": 1.0, "tp64mtp2": 1.0, "b256": 1.0, "4": 1.25, "5": 1.5, "b8long": 1.3, "b4long": 1.3}
COPY_TARGETS = {"minicpm3": 0.80}
BALANCE_TARGET = 1.05
PAGE_TARGET = 1.05  # issue 11: a case at another page size over the same case at page 64, at most
# Implementation names: mla-gen's families ("mla-gen:<family>", "+plan": dispatch's family planning the work list
# in each timed call), the naive torch baseline; every other name is a peer.
MLAGEN_PREFIX, PLANNER_SUFFIX, TORCH_IMPL = "mla-gen:", "+plan", "torch"


@dataclasses.dataclass(frozen=True)
class Timing:
    """Device times (us) of the timed calls, the median host time of one call (the launch cost), and the
    GPU spin before each timed call (us; None: not measured), which must outlast the host time."""
    samples_us: tuple[float, ...]
    host_us: float
    spin_us: float | None = None

    def __post_init__(self) -> None:
        if len(self.samples_us) < 2:
            raise ValueError(f"samples_us: expected at least 2 timed runs, got {len(self.samples_us)}")

    @property
    def median_us(self) -> float:
        return statistics.median(self.samples_us)

    def deciles(self) -> tuple[float, float]:
        """(p10, p90)."""
        cuts = statistics.quantiles(self.samples_us, n=10, method="inclusive")
        return cuts[0], cuts[-1]


@dataclasses.dataclass(frozen=True)
class Check:
    """An output compared with a reference: NaN count, relative L2 and max abs error; `ok` within
    tolerance = (max rel L2, max abs as a fraction of max |reference|)."""
    against: str
    max_abs: float
    rel_l2: float
    nan_count: int
    ref_max: float
    tolerance: tuple[float, float]

    @property
    def ok(self) -> bool:
        return (self.nan_count == 0 and self.rel_l2 <= self.tolerance[0]
                and self.max_abs <= self.tolerance[1] * self.ref_max)

    def why_wrong(self) -> str:
        if self.nan_count:
            return f"{self.nan_count} NaN outputs (unwritten or non-finite)"
        return (f"vs {self.against}: rel L2 {self.rel_l2:.2e} (tolerance {self.tolerance[0]:.0e}), max abs "
                f"{self.max_abs:.2e} (tolerance {self.tolerance[1]:.0e} x max|ref| {self.ref_max:.2e})")


@dataclasses.dataclass(frozen=True)
class Record:
    """One (case, implementation). Time fields are None unless status is 'ok'; check fields are set
    when the output was compared (ok and WRONG); bytes count the cache as `kv_dtype` holds it."""
    case: str
    shape: str
    impl: str
    status: str
    note: str
    bytes: int
    flops: int
    intensity: float              # FLOP / byte
    floor_us: float               # max(bytes / copy bandwidth, flops / matmul rate)
    bound: str                    # the larger term of the floor: memory or compute
    twin_of: str | None
    kv_dtype: str | None = None   # the cache format read (bf16, fp16, fp8_e4m3, fp8_ds_mla); None: schema < 3
    page_of: str | None = None    # the case this one repeats at another page size; None: none, or schema < 4
    time_us: float | None = None  # median
    min_us: float | None = None
    p10_us: float | None = None
    p90_us: float | None = None
    max_us: float | None = None
    iters: int | None = None
    host_us: float | None = None
    spin_us: float | None = None        # the GPU spin before each timed call; host_us must stay below it
    gbps: float | None = None
    tflops: float | None = None
    bw_frac: float | None = None        # gbps / measured copy bandwidth
    compute_frac: float | None = None   # tflops / measured matmul rate
    time_over_floor: float | None = None
    check_against: str | None = None
    max_abs_diff: float | None = None
    rel_l2: float | None = None
    # the fp8 row of the family dispatch picks: time_us / vs_16bit_impl's (dispatch's on the 16-bit cache)
    vs_16bit: float | None = None
    vs_16bit_impl: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Record:
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls)})


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def make_record(case: Case, work: Work, impl: str, ceilings: Ceilings, status: str, *, note: str = "",
                timing: Timing | None = None, check: Check | None = None, kv_dtype: str | None = None) -> Record:
    """kv_dtype: the cache format `work` counts (default: the case's dtype)."""
    if status not in STATUSES:
        raise ValueError(f"status: expected one of {', '.join(STATUSES)}, got {status!r}")
    if (status == "ok") != (timing is not None):
        raise ValueError("timing: a record has a timing exactly when its status is 'ok'")
    floor = ceilings.floor_us(work.bytes, work.flops)
    fields: dict[str, Any] = {}
    if check is not None:  # NaN (outputs with NaN) is stored as None: the document stays valid JSON
        fields.update(check_against=check.against, max_abs_diff=_finite(check.max_abs), rel_l2=_finite(check.rel_l2))
    if timing is not None:
        t = timing.median_us
        gbps, tflops = work.bytes / t / 1e3, work.flops / t / 1e6
        p10, p90 = timing.deciles()
        fields.update(time_us=t, min_us=min(timing.samples_us), p10_us=p10, p90_us=p90,
                      max_us=max(timing.samples_us), iters=len(timing.samples_us), host_us=timing.host_us,
                      spin_us=timing.spin_us,
                      gbps=gbps, tflops=tflops, bw_frac=gbps / ceilings.copy_gbps,
                      compute_frac=tflops / ceilings.matmul_tflops, time_over_floor=t / floor)
    return Record(case=case.name, shape=case.shape, impl=impl, status=status, note=note, bytes=work.bytes,
                  flops=work.flops, intensity=work.intensity, floor_us=floor,
                  bound=ceilings.bound(work.bytes, work.flops), twin_of=case.twin_of, kv_dtype=kv_dtype or case.dtype,
                  page_of=case.page_of, **fields)


def with_16bit_ratio(record: Record, baseline: Record | None) -> Record:
    """An fp8 record with its time over `baseline`'s (mla-gen on the case's 16-bit cache, same run); unchanged
    unless both were timed."""
    if record.status != "ok" or baseline is None or baseline.status != "ok":
        return record
    return dataclasses.replace(record, vs_16bit=record.time_us / baseline.time_us, vs_16bit_impl=baseline.impl)


# -- text ------------------------------------------------------------------------------------------

_COLUMNS = ("case", "shape", "impl", "kv", "time_us", "p10-p90", "host_us", "GB/s", "of_copy", "TFLOP/s", "of_mma",
            "floor_us", "x_floor", "check (max abs diff)", "note")


def _us(x: float) -> str:
    """Microseconds with about 3-4 significant digits."""
    return f"{x:.0f}" if x >= 1000 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _note(text: str, width: int = 110) -> str:
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= width else line[:width - 3] + "..."


def _row(r: Record) -> list[str]:
    check = "" if not r.check_against else f"{r.check_against} " + (
        f"{r.max_abs_diff:.1e}" if r.max_abs_diff is not None else "NaN")
    kv = r.kv_dtype or "-"
    if r.status != "ok":
        return [r.case, r.shape, r.impl, kv, r.status, "", "", "", "", "", "", _us(r.floor_us), "", check,
                _note(r.note)]
    return [r.case, r.shape, r.impl, kv, _us(r.time_us), f"{_us(r.p10_us)}-{_us(r.p90_us)}", _us(r.host_us),
            f"{r.gbps:.0f}", f"{r.bw_frac:.2f}", f"{r.tflops:.1f}", f"{r.compute_frac:.2f}", _us(r.floor_us),
            f"{r.time_over_floor:.2f}", check, _spin_note(r)]


def _spin_note(r: Record) -> str:
    if r.spin_us is not None and r.host_us is not None and r.host_us >= r.spin_us:
        return f"WARNING: host {_us(r.host_us)} us >= GPU spin {_us(r.spin_us)} us"
    return ""


def format_table(records: Sequence[Record]) -> str:
    """Aligned columns, numbers right-aligned; absent implementations are listed once below."""
    shown = [r for r in records if r.status != "absent"]
    rows = [list(_COLUMNS)] + [_row(r) for r in shown]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
    left = {0, 1, 2, 3, 13, 14}
    lines = []
    for row in rows:
        cells = [c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    absent = {r.impl: r.note for r in records if r.status == "absent"}
    lines += [f"absent: {impl}: {why}" for impl, why in absent.items()]
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def balance_lines(records: Sequence[Record]) -> list[str]:
    """time(ragged) / time(equal-length twin) per implementation timed on both (mla-gen's against issue 12's
    bound)."""
    ok = {(r.case, r.impl): r for r in records if r.status == "ok"}
    lines = []
    for twin in (r for r in records if r.twin_of and r.status == "ok"):
        ragged = ok.get((twin.twin_of, twin.impl))
        if ragged:
            ratio = ragged.time_us / twin.time_us
            bound = (f" (target <= {BALANCE_TARGET:.2f}: {_verdict(ratio <= BALANCE_TARGET)})"
                     if twin.impl.startswith(MLAGEN_PREFIX) else "")
            lines.append(f"balance {twin.impl}: time({ragged.case}) / time({twin.case}) = {ratio:.3f}{bound}")
    return lines


def _dispatched(recs: Sequence[Record]) -> tuple[Record, Record] | None:
    """(dispatch's family, the fastest family) among one case's timed 16-bit records, or None without mla-gen rows.
    Dispatch's family is the one the case's "+plan" row names, else the fastest."""
    ours = [r for r in recs if r.impl.startswith(MLAGEN_PREFIX) and not r.impl.endswith(PLANNER_SUFFIX)]
    if not ours:
        return None
    planned = {r.impl.removesuffix(PLANNER_SUFFIX) for r in recs
               if r.impl.startswith(MLAGEN_PREFIX) and r.impl.endswith(PLANNER_SUFFIX)}
    fastest = min(ours, key=lambda r: r.time_us)
    return next((r for r in ours if r.impl in planned), fastest), fastest


def _timed_16bit(records: Sequence[Record]) -> dict[str, list[Record]]:
    timed: dict[str, list[Record]] = {}
    for r in records:
        if r.status == "ok" and not (r.kv_dtype and DType.parse(r.kv_dtype).is_fp8):
            timed.setdefault(r.case, []).append(r)
    return timed


def page_lines(records: Sequence[Record]) -> list[str]:
    """Per case repeated at another page size (page_of): mla-gen's time there over the same case's at the suite's
    page, each the family dispatch picks for its page size (its "+plan" row; without one, the fastest family
    timed, and no verdict: dispatch's own family was not timed)."""
    timed = _timed_16bit(records)
    lines = []
    for case, recs in timed.items():
        page_of = recs[0].page_of
        if page_of is None or page_of not in timed:
            continue
        mine, base = _dispatched(recs), _dispatched(timed[page_of])
        if mine is None or base is None:
            continue
        ratio = mine[0].time_us / base[0].time_us
        judged = all(any(r.impl.endswith(PLANNER_SUFFIX) for r in rs) for rs in (recs, timed[page_of]))
        verdict = (f" (target <= {PAGE_TARGET:.2f}: {_verdict(ratio <= PAGE_TARGET)})" if judged else
                   " (no verdict: dispatch's family not timed on both)")
        lines.append(f"pages {case} ({mine[0].shape}): {mine[0].impl} {_us(mine[0].time_us)} us / {page_of} "
                     f"{base[0].impl} {_us(base[0].time_us)} us = {ratio:.3f}{verdict}")
    return lines


def target_lines(records: Sequence[Record]) -> list[str]:
    """Per case with an mla-gen time on a 16-bit cache: dispatch's family against the reference peer (issues 11
    and 12's bound where the case has one) or the copy bandwidth, and the peers it is not yet faster than; then
    the bounds met and missed. Dispatch's family is the one the case's "+plan" row names, else the fastest."""
    lines: list[str] = []
    bounds: list[tuple[bool, str]] = []  # (met, what was missed)
    ahead = with_peers = 0
    for case, recs in _timed_16bit(records).items():
        picked = _dispatched(recs)
        if picked is None:
            continue
        mine, fastest = picked
        parts = [f"{mine.impl} {_us(mine.time_us)} us"
                 + (f" (fastest family {fastest.impl} {_us(fastest.time_us)} us)" if fastest is not mine else "")]
        peers = [r for r in recs if not r.impl.startswith(MLAGEN_PREFIX) and r.impl != TORCH_IMPL]
        ref = next((r for r in peers if r.impl == REFERENCE_PEER), None)
        bound = PEER_TARGETS.get(case)
        if ref is not None:
            ratio = ref.time_us / mine.time_us
            text = f"{REFERENCE_PEER} {_us(ref.time_us)} us, {REFERENCE_PEER} / mla-gen = {ratio:.3f}"
            if bound is not None:
                bounds.append((ratio >= bound, f"{case} {ratio:.3f} < {bound:.2f}"))
                text += f" (target >= {bound:.2f}: {_verdict(bounds[-1][0])})"
            parts.append(text)
        elif bound is not None:
            parts.append(f"{REFERENCE_PEER} not timed (target >= {bound:.2f} not checked)")
        copy = COPY_TARGETS.get(case)
        if copy is not None:
            bounds.append((mine.bw_frac >= copy, f"{case} {mine.bw_frac:.2f} of copy < {copy:.2f}"))
            parts.append(f"{mine.bw_frac:.2f} of copy (target >= {copy:.2f}: {_verdict(bounds[-1][0])})")
        if peers:
            behind = [r for r in peers if r.time_us <= mine.time_us]
            with_peers += 1
            ahead += not behind
            parts.append("faster than every peer" if not behind else
                         "not faster than " + ", ".join(f"{r.impl} {_us(r.time_us)} us" for r in behind))
        lines.append(f"targets {case}: " + "; ".join(parts))
    if lines:
        missed = [what for ok, what in bounds if not ok]
        lines.append(f"targets: {len(bounds) - len(missed)} of {len(bounds)} bounds met"
                     + (f"; missed: {', '.join(missed)}" if missed else "")
                     + (f"; faster than every peer on {ahead} of {with_peers} cases with peers" if with_peers else ""))
    return lines


def fp8_lines(records: Sequence[Record]) -> list[str]:
    """Per fp8 record timed beside its 16-bit baseline: the two times, the ratio, and issue 13's target
    where the case has one."""
    timed = {(r.case, r.impl): r for r in records if r.status == "ok"}
    lines = []
    for r in records:
        base = timed.get((r.case, r.vs_16bit_impl))
        if r.vs_16bit is None or base is None:
            continue
        target = FP8_TARGETS.get(r.kv_dtype or "", {}).get(r.case)
        verdict = "" if target is None else f" (target <= {target:.2f}: {'met' if r.vs_16bit <= target else 'MISSED'})"
        lines.append(f"fp8 case {r.case} {r.impl}: {_us(r.time_us)} us / {base.impl} on {base.kv_dtype} "
                     f"{_us(base.time_us)} us = {r.vs_16bit:.3f}{verdict}")
    return lines


def header_lines(device: dict[str, Any], ceilings: Ceilings) -> list[str]:
    return [f"device: {device.get('name')} ({device.get('arch')}, {device.get('sm_count')} SMs), "
            f"torch {device.get('torch')}",
            f"ceilings: copy {ceilings.copy_gbps:.0f} GB/s ({ceilings.copy_bytes / 2**30:.0f} GiB read + written), "
            f"bf16 matmul {ceilings.matmul_tflops:.0f} TFLOP/s ({ceilings.matmul_n}^3), "
            f"ridge {ceilings.ridge:.0f} FLOP/B"]


# -- host time per call ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HostTimes:
    """The bench's host section: us per call of each entry point (`calls` back to back, wall / calls, no
    sync inside; None: did not run, `notes` says why), the wall until the GPU drained (`drain`), and
    upper bounds `targets` that each must also keep below the `reference` call's figure."""
    shape: str
    calls: int
    host_us: dict[str, float | None]
    drain_us: dict[str, float | None]
    targets: dict[str, float]
    reference: str
    notes: dict[str, str] = dataclasses.field(default_factory=dict)

    def failures(self) -> list[str]:
        """Each target missed, in words (empty: all met, or nothing measured to compare)."""
        ref = self.host_us.get(self.reference)
        out = []
        for name, bound in self.targets.items():
            us = self.host_us.get(name)
            if us is None:
                continue
            if us > bound:
                out.append(f"{name} {_us(us)} us > {_us(bound)} us")
            if ref is not None and us >= ref:
                out.append(f"{name} {_us(us)} us >= {self.reference} {_us(ref)} us")
        return out

    def lines(self) -> list[str]:
        names = list(self.host_us)
        width = max(len(n) for n in names)
        lines = [f"host time per call ({self.shape}, {self.calls} calls back to back, warm, no sync inside, "
                 f"wall / {self.calls}):"]
        for name in names:
            us, drain = self.host_us[name], self.drain_us.get(name)
            if us is None:
                lines.append(f"  {name.ljust(width)}  {'-':>7}     {self.notes.get(name, 'not run')}")
                continue
            bound = f"  (target <= {_us(self.targets[name])} us)" if name in self.targets else ""
            drained = f"; {_us(drain)} us with the GPU drained" if drain is not None else ""
            lines.append(f"  {name.ljust(width)}  {_us(us):>7} us{bound}{drained}")
        failures = self.failures()
        lines.append("host targets: " + ("met" if not failures else "MISSED: " + "; ".join(failures))
                     + ("" if self.host_us.get(self.reference) is not None else f" ({self.reference} not measured)"))
        return lines

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HostTimes:
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})


def flush_line(settings: dict[str, Any]) -> str:
    """How L2 was emptied before each timed call. Documents without a "flush" setting predate the reading flush
    (the seventeenth session): theirs wrote the buffer, whose dirty lines cost each call ~8 us at B128 S4096."""
    size = settings.get("flush_bytes")
    return (f"L2 flushed before each timed call by a {settings.get('flush', 'write')}"
            + (f" of {size >> 20} MB" if size else ""))


def spin_lines(records: Sequence[Record]) -> list[str]:
    """The GPU spin before each timed call against each implementation's host time per call: a timed call
    whose host time is not below the spin may count host time in its GPU time (a warning row)."""
    timed = [r for r in records if r.status == "ok" and r.spin_us is not None and r.host_us is not None]
    if not timed:
        return []
    worst = max(timed, key=lambda r: r.host_us / r.spin_us)
    lines = [f"GPU spin before each timed call: {_us(worst.spin_us)} us; longest host time per call "
             f"{_us(worst.host_us)} us ({worst.impl}, case {worst.case}): "
             + ("ok, no host time in the GPU times" if worst.host_us < worst.spin_us else "NOT below the spin")]
    for r in timed:
        if r.host_us >= r.spin_us:
            lines.append(f"WARNING {r.case} {r.impl}: host time per call {_us(r.host_us)} us >= GPU spin "
                         f"{_us(r.spin_us)} us; its time_us may hold host time")
    return lines


# -- JSON ------------------------------------------------------------------------------------------

def json_document(device: dict[str, Any], ceilings: Ceilings, settings: dict[str, Any], cases: Sequence[Case],
                  records: Sequence[Record], host: HostTimes | None = None) -> dict[str, Any]:
    doc = {"schema": SCHEMA_VERSION, "tool": "mla_gen.bench", "device": device, "ceilings": ceilings.to_dict(),
           "settings": settings, "cases": [c.to_dict() for c in cases], "records": [r.to_dict() for r in records]}
    if host is not None:
        doc["host"] = host.to_dict()
    return doc


def read_host(doc: dict[str, Any]) -> HostTimes | None:
    """The host section of a json_document, or None (an earlier document, or a run without it)."""
    return HostTimes.from_dict(doc["host"]) if doc.get("host") else None


def read_document(doc: dict[str, Any]) -> tuple[dict[str, Any], Ceilings, list[Record]]:
    """(device, ceilings, records) of a json_document. Raises ValueError naming what is missing."""
    for key in ("device", "ceilings", "records"):
        if key not in doc:
            raise ValueError(f"{key}: missing from the document (not a `python -m mla_gen.bench --json` file?)")
    return doc["device"], Ceilings.from_dict(doc["ceilings"]), [Record.from_dict(r) for r in doc["records"]]
