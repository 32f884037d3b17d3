"""The CUDA toolchain: find nvcc, fingerprint it, and give the flags of a build.

nvcc is looked for in MLA_GEN_NVCC, CUDA_HOME (or CUDA_PATH), PATH, /usr/local/cuda and the pip
packages nvidia-cuda-nvcc & co., in that order. `pip install "mla-gen[cuda]"` brings the CUDA 13
wheels (nvcc, crt, cccl, runtime, nvvm), which lay out one toolkit in site-packages/nvidia/cu13/
(bin/nvcc, include/, lib/libcudart_static.a, nvvm/bin/cicc; bin/nvcc.profile points nvcc at them),
so a machine with no system toolkit builds with them. Its version text is memoised per binary (path, size,
mtime) under the cache root, so a warm-cache load never runs nvcc.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

from generator import __version__, env
from generator.errors import ToolchainError
from generator.spec import Arch

INSTALL_HINT = ("install the CUDA toolkit (https://developer.nvidia.com/cuda-downloads) and set CUDA_HOME, "
                "or `pip install \"mla-gen[cuda]\"` (nvcc and the CUDA headers from the package index), "
                "or point MLA_GEN_NVCC at an nvcc binary")
SYSTEM_CUDA = Path("/usr/local/cuda")  # the system toolkit's usual home (tests point it elsewhere)


@dataclasses.dataclass(frozen=True)
class Toolchain:
    nvcc: Path
    nvcc_version: str        # e.g. "13.0.88"
    nvcc_version_text: str   # the full `nvcc --version` output
    cxx: Path
    cxx_version_text: str
    python_include: Path
    pybind11_include: Path
    pybind11_version: str
    ext_suffix: str          # the Python ABI the launcher is built for, e.g. ".cpython-312-x86_64-linux-gnu.so"

    @property
    def cuda_home(self) -> Path:
        return self.nvcc.resolve().parent.parent

    def fingerprint(self) -> dict[str, str]:
        """Everything about the toolchain that changes a variant's binary (part of its cache key): no
        Python version, since a variant is a plain shared object."""
        return {"nvcc": self.nvcc_version_text.strip(), "cxx": self.cxx_version_text.strip(),
                "generator": __version__}

    def launcher_fingerprint(self) -> dict[str, str]:
        """Everything about the toolchain that changes the launcher's binary: the Python ABI included."""
        return {"cxx": self.cxx_version_text.strip(), "generator": __version__, "ext_suffix": self.ext_suffix,
                "pybind11": self.pybind11_version}

    def nvcc_flags(self, arch: Arch) -> list[str]:
        return ["-std=c++17", "-O3", arch.gencode, "--ptxas-options=-v", "-lineinfo", "-Xcompiler", "-fPIC",
                "-Xcompiler", "-fvisibility=hidden", "-Xcompiler", "-Wall", "--expt-relaxed-constexpr", "-I."]

    def link_flags(self) -> list[str]:
        # NOTE(cudart): static cudart keeps the variant free of a libcudart.so search path (streams and
        # pointers are driver objects shared with torch's own runtime in the same process), and
        # --exclude-libs keeps its symbols out of the variant's exports: only the C entry points show.
        return ["-shared", "-cudart", "static", "-Xlinker", "--exclude-libs,ALL"]

    def launcher_cxx_flags(self) -> list[str]:
        return ["-std=c++17", "-O2", "-fPIC", "-fvisibility=hidden", "-Wall", "-I.",
                f"-isystem{self.pybind11_include}", f"-isystem{self.python_include}"]

    def launcher_link_flags(self) -> list[str]:
        return ["-shared", "-ldl"]


def _candidates() -> list[Path]:
    out: list[Path] = []
    if env.cuda_home():
        out.append(Path(env.cuda_home()) / "bin" / "nvcc")
    on_path = shutil.which("nvcc")
    if on_path:
        out.append(Path(on_path))
    out.append(SYSTEM_CUDA / "bin" / "nvcc")
    spec = importlib.util.find_spec("nvidia")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            out.extend(sorted(Path(loc).glob("cu*/bin/nvcc"), reverse=True))  # cu13 before cu12
            out.append(Path(loc) / "cuda_nvcc" / "bin" / "nvcc")
    return out


def find_nvcc() -> Path:
    """MLA_GEN_NVCC if set (ToolchainError naming it when it is no executable file: never another nvcc
    in its place), else the first nvcc that exists; ToolchainError with install advice when none does."""
    override = env.nvcc_override()
    if override:
        path = Path(override).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise ToolchainError(f"MLA_GEN_NVCC={override}: expected an executable nvcc file, "
                                 f"{'found no such file' if not path.exists() else 'it is not one'}; "
                                 f"fix it or unset MLA_GEN_NVCC to search CUDA_HOME and PATH")
        return path
    for path in _candidates():
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise ToolchainError(f"no nvcc found (looked in MLA_GEN_NVCC, CUDA_HOME, PATH, /usr/local/cuda, "
                         f"the pip CUDA wheels); {INSTALL_HINT}")


def _memo_path(binary: Path) -> Path | None:
    try:
        st = binary.stat()
    except OSError:
        return None
    key = hashlib.sha256(f"{binary.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return env.cache_dir() / ".toolchain" / f"{binary.name}-{key}.json"


def _version_text(binary: Path) -> str:
    """`binary --version`, memoised on disk per binary identity; the memo is skipped if unwritable."""
    memo = _memo_path(binary)
    if memo is not None:
        try:
            return json.loads(memo.read_text())["version_text"]
        except (OSError, ValueError, KeyError):
            pass
    try:
        proc = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ToolchainError(f"{binary} --version failed: {e}; {INSTALL_HINT}") from None
    if proc.returncode != 0:
        raise ToolchainError(f"{binary} --version exited {proc.returncode}: {proc.stderr.strip()}")
    text = proc.stdout
    if memo is not None:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps({"binary": str(binary), "version_text": text}))
            os.replace(tmp, memo)
        except OSError:
            pass  # a read-only cache still works; the next process asks nvcc again
    return text


def _find_cxx() -> Path:
    for name in (os.environ.get("CXX", ""), "c++", "g++", "clang++"):
        found = shutil.which(name) if name else None
        if found:
            return Path(found)
    raise ToolchainError("no host C++ compiler (c++, g++ or clang++) on PATH; install build-essential or set CXX")


@functools.lru_cache(maxsize=None)
def _discover(nvcc: Path) -> Toolchain:
    text = _version_text(nvcc)
    m = re.search(r"release \S+, V(\d+\.\d+\.\d+)", text)
    if not m:
        raise ToolchainError(f"{nvcc} --version printed no release line:\n{text}")
    cxx = _find_cxx()
    try:
        import pybind11
    except ImportError:
        raise ToolchainError("pybind11 is not installed; `pip install pybind11`") from None
    py_inc = Path(sysconfig.get_paths()["include"])
    if not (py_inc / "Python.h").is_file():
        raise ToolchainError(f"Python.h not found in {py_inc}; install the Python development headers "
                             f"(e.g. apt install python{sys.version_info.major}.{sys.version_info.minor}-dev)")
    return Toolchain(nvcc=nvcc, nvcc_version=m.group(1), nvcc_version_text=text, cxx=cxx,
                     cxx_version_text=(_version_text(cxx).splitlines() or [""])[0],
                     python_include=py_inc, pybind11_include=Path(pybind11.get_include()),
                     pybind11_version=pybind11.__version__,
                     ext_suffix=sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def toolchain() -> Toolchain:
    """The toolchain of this machine (memoised per process). Raises ToolchainError."""
    return _discover(find_nvcc())
