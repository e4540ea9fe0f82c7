"""qcompile runtime: load a compiled ``.qcm`` artifact and run it with the TVM runtime only."""

from .errors import ArtifactError, QCompileError
from .session import NodeArg, Session, load

__all__ = ["load", "Session", "NodeArg", "QCompileError", "ArtifactError"]
