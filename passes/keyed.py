"""Keyed JSON files in the work directory: a pass's measured data plus the key it was measured with.

A file is reused only when its format version and key equal the caller's (anything else: None, and
the caller measures again). Written atomically (a temporary file in the same folder, then
``os.replace``), so an interrupted run never leaves a half-written table.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

__all__ = ["save_keyed", "load_keyed"]


def save_keyed(path: str | Path, version: int, key: dict, rows: list) -> None:
    """Write ``{"format": version, "key": key, "tensors": rows}`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"format": version, "key": key, "tensors": rows}, f)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_keyed(path: str | Path, version: int, key: dict) -> list | None:
    """The rows saved at ``path`` with this ``version`` and ``key``, else None."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if doc.get("format") != version or doc.get("key") != key:
        return None
    return doc["tensors"]
