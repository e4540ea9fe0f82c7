"""qcompile runtime: load a compiled ``.qcm`` artifact and run it with the TVM runtime only."""

from pathlib import Path

from .errors import ArtifactError, QCompileError
from .manifest import read_manifest
from .session import NodeArg, Session


def load(path: str | Path):
    """Load the artifact at ``path`` (a ``.qcm`` directory) for its device: a :class:`Session` for
    "cpu", a :class:`qcompile.runtime.vulkan.Session` (wgpu) for "vulkan"."""
    if read_manifest(path)["target"].get("device") == "vulkan":
        from . import vulkan  # noqa: PLC0415  (imports wgpu)

        return vulkan.Session(path)
    return Session(path)

__all__ = ["load", "Session", "NodeArg", "QCompileError", "ArtifactError"]
