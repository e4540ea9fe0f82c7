"""Errors the runtime raises; the compiler's user errors derive from :class:`QCompileError` too."""

__all__ = ["QCompileError", "ArtifactError"]


class QCompileError(Exception):
    """A problem with the user's input (model, flag, artifact): the CLI exits with status 2."""


class ArtifactError(QCompileError):
    """An artifact that is missing, damaged, from another version or for another target."""
