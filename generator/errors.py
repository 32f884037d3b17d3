"""The exception hierarchy: every error mla-gen raises on purpose is an MlaGenError."""
from __future__ import annotations

from pathlib import Path


class MlaGenError(Exception):
    """Base of mla-gen's own errors."""


class SpecError(MlaGenError, ValueError):
    """A variant description is invalid; the message names the field, value and allowed range."""


class ToolchainError(MlaGenError):
    """No usable CUDA compiler or host toolchain."""


class CacheError(MlaGenError):
    """The binary cache cannot be used (unwritable, corrupt beyond repair)."""


class MissingJITCacheError(CacheError):
    """JIT is disabled (MLA_GEN_DISABLE_JIT) and the variant is not in the cache."""

    def __init__(self, variant_id: str, root: Path):
        super().__init__(f"{variant_id}: not in the cache at {root} and MLA_GEN_DISABLE_JIT is set; "
                         f"build it ahead of time with `python -m generator build`")
        self.variant_id = variant_id


class BuildError(MlaGenError):
    """A variant failed to compile; carries the first compiler errors and the log path."""

    def __init__(self, variant_id: str, message: str, log_path: Path | None):
        where = f"\nfull log: {log_path}" if log_path else ""
        super().__init__(f"{variant_id}: build failed\n{message}{where}")
        self.variant_id = variant_id
        self.compiler_message = message
        self.log_path = log_path
