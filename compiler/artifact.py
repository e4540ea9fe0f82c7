"""Write a ``.qcm`` artifact atomically: build into a temporary sibling directory, then rename."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from qcompile.runtime.manifest import FORMAT_VERSION, MANIFEST, MODULE, PARAMS, sha256_file

__all__ = ["write_artifact"]

log = logging.getLogger(__name__)


def write_artifact(
    out: str | Path,
    manifest: dict,
    params: dict[str, np.ndarray],
    build_module: Callable[[str], list[str] | None],
    extra: dict[str, Callable[[dict], str]] | None = None,
) -> Path:
    """Create ``out`` with module.so (written by ``build_module(path)``), params and manifest.

    A target whose artifact holds other files (Vulkan: kernels.wgsl + plan.json) writes them beside
    ``path`` instead and returns their names.

    ``extra`` maps more file names to functions rendering them from the manifest.  Nothing appears at
    ``out`` unless every step succeeds; an existing artifact there is replaced.
    """
    from safetensors.numpy import save_file  # noqa: PLC0415

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        built = build_module(str(tmp / MODULE))
        save_file({k: np.ascontiguousarray(v) for k, v in params.items()}, str(tmp / PARAMS))
        manifest = dict(manifest, format_version=FORMAT_VERSION)
        names = [*(built or [MODULE]), PARAMS]
        for name, render in (extra or {}).items():  # derived text files (report.html): hashed too
            (tmp / name).write_text(render(manifest))
            names.append(name)
        manifest["files"] = {name: sha256_file(tmp / name) for name in names}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s", out)
    return out

