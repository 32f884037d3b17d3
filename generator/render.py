"""Jinja2 rendering: a VariantSpec -> the source files of its build (StrictUndefined: a missing
parameter is an error, never an empty string)."""
from __future__ import annotations

import functools
import re
from pathlib import Path

import jinja2

from generator import __version__
from generator.spec import VariantSpec


def templates_dir() -> Path:
    """templates/ beside the package in a checkout; generator/templates in an installed wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "templates", here.parent / "templates"):
        if (candidate / "kernel.cu.jinja").is_file():
            return candidate
    raise FileNotFoundError(f"mla-gen templates not found beside {here}")


@functools.lru_cache(maxsize=1)
def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(str(templates_dir())),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True,
                              trim_blocks=True, lstrip_blocks=True, autoescape=False)


@functools.lru_cache(maxsize=1)
def param_fields() -> tuple[str, ...]:
    """Field names of DecodeParams, read from params.h so the binding cannot drift from it."""
    text = (templates_dir() / "params.h").read_text()
    body = text[text.index("struct DecodeParams {"):text.index("};", text.index("struct DecodeParams {"))]
    fields: list[str] = []
    for line in body.splitlines():
        line = line.split("//")[0].strip()
        m = re.match(r"(?:u?int(?:32|64)_t|float)\s+(.+);", line)
        if m:
            fields += [part.split("=")[0].strip() for part in m.group(1).split(",")]
    return tuple(fields)


def module_name(spec: VariantSpec) -> str:
    return spec.variant_id


def template_context(spec: VariantSpec) -> dict[str, object]:
    t = spec.tile
    return {
        "generator_version": __version__, "variant_id": spec.variant_id, "module_name": module_name(spec),
        "family": spec.family.value, "arch": spec.arch.nvcc_name, "q_dtype": spec.q_dtype.value,
        "q_ctype": spec.q_dtype.c_type, "kv_ctype": spec.kv_dtype.c_type, "out_ctype": spec.out_dtype.c_type,
        "num_heads": spec.num_heads, "ckv_dim": spec.ckv_dim, "rope_dim": spec.rope_dim,
        "block_m": t.block_m, "block_n": t.block_n, "stages": t.stages, "warps": t.warps,
        "smem_bytes": spec.smem_bytes, "param_fields": param_fields(),
    }


def render_sources(spec: VariantSpec) -> dict[str, str]:
    """File name -> text of every source a variant's build reads (rendered and shared headers)."""
    env, ctx = _env(), template_context(spec)
    headers = ["params.h", "common.cuh", f"{spec.family.value}.cuh"]
    out = {name: (templates_dir() / name).read_text() for name in headers}
    out["kernel.cu"] = env.get_template("kernel.cu.jinja").render(ctx)
    out["binding.cpp"] = env.get_template("binding.cpp.jinja").render(ctx)
    return out


def render_ninja(spec: VariantSpec, *, nvcc: str, cxx: str, nvcc_flags: list[str], cxx_flags: list[str],
                 ldflags: list[str], so_name: str) -> str:
    return _env().get_template("build.ninja.jinja").render(
        generator_version=__version__, variant_id=spec.variant_id, nvcc=nvcc, cxx=cxx,
        nvcc_flags=" ".join(nvcc_flags), cxx_flags=" ".join(cxx_flags), ldflags=" ".join(ldflags),
        so_name=so_name)
