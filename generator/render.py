"""Jinja2 rendering: a VariantSpec -> the source files of its build (StrictUndefined: a missing
parameter is an error, never an empty string)."""
from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

import jinja2

from generator import __version__, env
from generator.spec import DType, VariantSpec


def templates_dir() -> Path:
    """$MLA_GEN_TEMPLATE_DIR if set; else templates/ beside the package in a checkout, or
    generator/templates in an installed wheel. Raises FileNotFoundError when there is none."""
    override = env.template_dir()
    if override is not None:
        return override
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parent / "templates"):
        if (candidate / "kernel.cu.jinja").is_file():
            return candidate
    raise FileNotFoundError(f"mla-gen templates not found beside {here}")


class _CompiledTemplates(jinja2.FileSystemBytecodeCache):
    """Jinja's compiled templates kept beside the binaries: a new process's warm load skips jinja's parse and
    compile (about a third of it). Jinja checks each template's source checksum, so an edited template
    compiles again; a folder that cannot be read or written just means compiling in every process."""

    def load_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        try:
            super().load_bytecode(bucket)
        except OSError:
            pass

    def dump_bytecode(self, bucket: jinja2.bccache.Bucket) -> None:
        try:
            Path(self.directory).mkdir(parents=True, exist_ok=True)
            super().dump_bytecode(bucket)
        except OSError:
            pass


def _env() -> jinja2.Environment:
    return _env_for(templates_dir(), env.cache_dir() / ".jinja")


# NOTE(template-dir): keyed on the folders, so a changed MLA_GEN_TEMPLATE_DIR or cache folder takes effect in-process.
@functools.lru_cache(maxsize=8)
def _env_for(directory: Path, compiled: Path) -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(directory)),
                              bytecode_cache=_CompiledTemplates(str(compiled)),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              trim_blocks=True, lstrip_blocks=True, autoescape=False)


def param_fields() -> tuple[str, ...]:
    """Field names of DecodeParams, read from params.h so the launcher cannot drift from it."""
    return _param_fields(templates_dir() / "params.h")


@functools.lru_cache(maxsize=8)
def _param_fields(params_h: Path) -> tuple[str, ...]:
    # NOTE(params): every declarator counts, whatever its type; a field this reader skipped would be
    # silently missing from the launcher.
    text = params_h.read_text()
    start = text.index("struct DecodeParams {") + len("struct DecodeParams {")
    body = re.sub(r"//[^\n]*", "", text[start:text.index("};", start)])
    fields: list[str] = []
    for stmt in filter(None, (s.strip() for s in body.split(";"))):
        decls = stmt.split(",")
        first = decls[0].split("=")[0].split()
        names = [first[-1] if len(first) > 1 else ""] + [d.split("=")[0].strip() for d in decls[1:]]
        for name in (n.lstrip("*&") for n in names):
            if not name.isidentifier():
                raise ValueError(f"{params_h}: cannot read the DecodeParams declaration {stmt!r}")
            fields.append(name)
    return tuple(fields)


# wgmma n values rendered into wgmma_ops.cuh: every multiple of 8 up to 64 (query rows of the narrow
# family, score tiles) and the output-column widths 128 and 256.
WGMMA_NS = tuple(range(8, 65, 8)) + (128, 256)
# Families whose kernels include the rendered wgmma_ops.cuh.
WGMMA_FAMILIES = ("wgmma", "narrow", "seesaw")
# Families that load the cache with TMA: their launch encodes the cache's tensor maps (kernel.cu.jinja).
TMA_FAMILIES = ("seesaw", "narrow")

LAUNCHER_MODULE = "mla_gen_launcher"


def params_hash() -> str:
    """16 hex of sha256 over params.h: names the DecodeParams layout a variant and a launcher share."""
    return hashlib.sha256((templates_dir() / "params.h").read_bytes()).hexdigest()[:16]


# templates/common.cuh KVFormat: how the cache stores a token.
KV_FORMATS = {DType.FP8_E4M3: "kKVFp8Tensor", DType.FP8_DS_MLA: "kKVFp8DsMla"}


def template_context(spec: VariantSpec) -> dict[str, object]:
    t = spec.tile
    # the 16-bit type of the kv tile in shared memory and of the MMAs: the cache's type, or fp16 for an
    # fp8 cache (e4m3 -> f16 is one exact conversion; bf16 queries are converted to fp16 on load)
    tile_dtype = DType.FP16 if spec.kv_dtype.is_fp8 else spec.kv_dtype
    return {
        "generator_version": __version__, "variant_id": spec.variant_id, "params_hash": params_hash(),
        "family": spec.family.value, "arch": spec.arch.nvcc_name, "arch_cc": spec.arch.cc,
        "q_dtype": spec.q_dtype.value, "q_ctype": spec.q_dtype.c_type, "kv_ctype": tile_dtype.c_type,
        "kv_format": KV_FORMATS.get(spec.kv_dtype, "kKV16"),
        "out_ctype": spec.out_dtype.c_type, "num_heads": spec.num_heads, "ckv_dim": spec.ckv_dim,
        "rope_dim": spec.rope_dim, "block_m": t.block_m, "block_n": t.block_n, "stages": t.stages,
        "warps": t.warps, "threads": spec.threads, "smem_bytes": spec.smem_bytes,
        "tma_loads": spec.family.value in TMA_FAMILIES,
        "wgmma_ns": WGMMA_NS, "wgmma_dt": {"bf16": "bf16", "fp16": "f16"}[tile_dtype.value],
    }


# Family headers another family's header includes (seesaw reuses wgmma.cuh's primitives and panels; narrow keeps its
# fp8_e4m3 kernel in a header of its own, and what its two kernels share in a third).
_FAMILY_DEPS = {"seesaw": ("wgmma.cuh", "narrow_tile.cuh", "narrow_e4m3.cuh", "seesaw_e4m3.cuh"),
               "narrow": ("narrow_tile.cuh", "narrow_e4m3.cuh")}


def render_sources(spec: VariantSpec) -> dict[str, str]:
    """File name -> text of every source a variant's build reads (rendered and shared headers)."""
    headers = ["params.h", "common.cuh", "ptx.cuh", *_FAMILY_DEPS.get(spec.family.value, ()),
               f"{spec.family.value}.cuh"]
    if spec.family.value in WGMMA_FAMILIES:
        headers.append("sm90.cuh")
    out = {name: (templates_dir() / name).read_text() for name in headers}
    ctx = template_context(spec)
    if spec.family.value in WGMMA_FAMILIES:
        out["wgmma_ops.cuh"] = _env().get_template("wgmma_ops.cuh.jinja").render(ctx)
    out["kernel.cu"] = _env().get_template("kernel.cu.jinja").render(ctx)
    return out


def render_launcher_sources() -> dict[str, str]:
    """File name -> text of the launcher's sources (the same for every variant)."""
    launcher = _env().get_template("launcher.cpp.jinja").render(
        generator_version=__version__, module_name=LAUNCHER_MODULE, params_hash=params_hash(),
        param_fields=param_fields())
    return {"params.h": (templates_dir() / "params.h").read_text(), "launcher.cpp": launcher}


def render_ninja(spec: VariantSpec, *, nvcc: str, nvcc_flags: list[str], ldflags: list[str], so_name: str) -> str:
    return _env().get_template("build.ninja.jinja").render(
        generator_version=__version__, variant_id=spec.variant_id, nvcc=nvcc, nvcc_flags=" ".join(nvcc_flags),
        ldflags=" ".join(ldflags), so_name=so_name)


def render_launcher_ninja(*, launcher_name: str, cxx: str, cxx_flags: list[str], ldflags: list[str],
                          so_name: str) -> str:
    return _env().get_template("launcher.ninja.jinja").render(
        generator_version=__version__, launcher_name=launcher_name, cxx=cxx, cxx_flags=" ".join(cxx_flags),
        ldflags=" ".join(ldflags), so_name=so_name)
