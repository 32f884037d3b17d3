"""compile_commands.json for clangd over emitted sources, read back from their build.ninja files.

Each compile edge (`build X.o: RULE SRC` whose rule compiles with `-c $in`) becomes one entry. C++
entries keep the command as written; nvcc entries are restated for clang's CUDA mode (clangd parses
with clang): `-x cuda --cuda-gpu-arch=sm_90a` for nvcc's -gencode, -Xcompiler's host flags unwrapped,
nvcc-only flags (--ptxas-options, -lineinfo, --expt-relaxed-constexpr, dependency files) dropped.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

_VAR = re.compile(r"\$(\w+|\{\w+\})")
_NVCC_ONLY = ("--ptxas-options", "-lineinfo", "--expt-relaxed-constexpr", "--expt-extended-lambda", "-MD", "-MF")


def _expand(text: str, scope: dict[str, str]) -> str:
    return _VAR.sub(lambda m: scope.get(m.group(1).strip("{}"), ""), text)


def _parse(ninja: str) -> tuple[dict[str, str], dict[str, str], list[tuple[str, str, list[str]]]]:
    """Top-level variables, rule commands, and (output, rule, inputs) of each build edge."""
    variables: dict[str, str] = {}
    rules: dict[str, str] = {}
    edges: list[tuple[str, str, list[str]]] = []
    rule = None
    for line in ninja.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line.startswith((" ", "\t")):
            key, _, value = line.strip().partition("=")
            if rule is not None and key.strip() == "command":
                rules[rule] = value.strip()
            continue
        rule = None
        if line.startswith("rule "):
            rule = line.split()[1]
        elif line.startswith("build "):
            outs, _, rest = line[len("build "):].partition(":")
            parts = rest.split("|")[0].split()
            edges.append((outs.strip(), parts[0], parts[1:]))
        elif "=" in line and not line.startswith(("default ", "subninja ", "include ")):
            key, _, value = line.partition("=")
            variables[key.strip()] = _expand(value.strip(), variables)
    return variables, rules, edges


def _clang_cuda(args: list[str], nvcc: str) -> list[str]:
    """An nvcc compile line as clang's CUDA mode reads it."""
    out = ["clang++", "-x", "cuda"]
    cuda_home = Path(nvcc).resolve().parent.parent
    if (cuda_home / "include" / "cuda.h").is_file():
        out.append(f"--cuda-path={cuda_home}")
    i = 1
    while i < len(args):
        a = args[i]
        if a.startswith(("-gencode=", "--generate-code=")) or a == "-gencode":
            spec = a.split("=", 1)[1] if "=" in a else args[i + 1]
            i += 0 if "=" in a else 1
            m = re.search(r"code=(sm_\w+)", spec)
            if m:
                out.append(f"--cuda-gpu-arch={m.group(1)}")
        elif a == "-Xcompiler":
            out.extend(args[i + 1].split(","))
            i += 1
        elif a.startswith(_NVCC_ONLY):
            if a in ("-MF",):
                i += 1
        else:
            out.append(a)
        i += 1
    return out


def commands(folder: Path) -> list[dict]:
    """The compile entries of folder/build.ninja (absolute paths)."""
    folder = Path(folder).resolve()
    variables, rules, edges = _parse((folder / "build.ninja").read_text())
    entries = []
    for output, rule, inputs in edges:
        command = rules.get(rule, "")
        if "-c $in" not in command or len(inputs) != 1:
            continue  # a link or another step: nothing for clangd
        scope = {**variables, "in": inputs[0], "out": output}
        args = shlex.split(_expand(command, scope))
        if inputs[0].endswith(".cu"):
            args = _clang_cuda(args, args[0])
        else:
            args = [a for i, a in enumerate(args) if a != "-MD" and a != "-MF" and (i == 0 or args[i - 1] != "-MF")]
        args = [f"-I{folder}" if a == "-I." else a for a in args]
        entries.append({"directory": str(folder), "file": str(folder / inputs[0]), "arguments": args,
                        "output": str(folder / output)})
    return entries


def write(out: Path, folders: list[Path]) -> Path:
    """OUT/compile_commands.json over every folder's build.ninja; returns its path."""
    entries = [e for folder in folders for e in commands(folder)]
    path = Path(out) / "compile_commands.json"
    path.write_text(json.dumps(entries, indent=2) + "\n")
    return path
