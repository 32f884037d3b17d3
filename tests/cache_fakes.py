"""Hand-made cache entries for CLI and cache-fault tests (real builds are in test_build_cache.py)."""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

from generator.cache import SCHEMA

ID = "mla_decode_h16_c256_r32_bf16_bf16_simt_m16n32s1w4_sm90a"


def fake_meta(so: Path, suffix: str, age_days: float = 0.0) -> dict[str, Any]:
    """A meta.json of the shape build writes, for an entry whose .so is `so`."""
    stamp = time.time() - age_days * 86400
    return {"schema": SCHEMA, "kind": "variant", "name": ID, "variant_id": ID, "key": suffix * 5,
            "spec": {}, "launcher": {"params_hash": "0" * 16, "built_with": "launcher_x"}, "ptxas": [],
            "flags": {}, "toolchain": {}, "sources_sha256": "0" * 64,
            "so": {"file": so.name, "sha256": hashlib.sha256(so.read_bytes()).hexdigest(), "size": so.stat().st_size},
            "build_seconds": 1.5, "created": stamp, "last_used": stamp}


def fake_entry(root: Path, suffix: str, *, meta: bool = True, age_days: float = 0.0) -> Path:
    """An entry folder whose .so is not a real shared object (checksums match; loading fails)."""
    entry = root / "sm90a" / f"{ID}-{suffix}"
    entry.mkdir(parents=True)
    so = entry / f"{ID}.so"
    so.write_bytes(b"not an ELF file")
    if meta:
        (entry / "meta.json").write_text(json.dumps(fake_meta(so, suffix, age_days)))
    return entry
