"""Code generation targets: one module per target family (x86 today)."""

from __future__ import annotations

from qcompile.runtime.errors import QCompileError

from .base import TargetSpec, parse_target_json

__all__ = ["resolve_target", "TargetSpec"]

KNOWN = ("x86",)


def resolve_target(text: str) -> TargetSpec:
    """``x86`` (the host CPU as TVM detects it) or a TVM target JSON such as ``{"kind":"llvm",...}``."""
    from . import x86  # noqa: PLC0415

    if text == "x86":
        return x86.host_target()
    if text.lstrip().startswith("{"):
        tvm_json = parse_target_json(text)
        if tvm_json["kind"] == "llvm" and "aarch64" not in str(tvm_json.get("mtriple", "")):
            return x86.target_from_json(tvm_json)
        raise QCompileError(f"--target {text}: kind {tvm_json['kind']!r} is not supported yet (supported: x86 / llvm)")
    raise QCompileError(f"--target {text!r}: unknown target; expected one of {list(KNOWN)} or a TVM target JSON")
