"""What every target offers the compiler: capabilities, a parsed TVM target, lowering and building."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from qcompile.runtime.errors import QCompileError

__all__ = ["TargetSpec", "parse_target_json"]


@dataclass(frozen=True)
class TargetSpec:
    """A resolved compilation target.

    ``name`` is qcompile's target family (``x86``), ``tvm`` the TVM target as a JSON dict,
    ``device`` the runtime device kind, ``arch`` the machine it runs on, ``cpu_flags`` the ISA
    extensions the generated code may use (the runtime refuses a CPU lacking one).
    """

    name: str
    tvm: dict
    device: str
    arch: str
    cpu_flags: tuple[str, ...] = field(default_factory=tuple)

    def to_manifest(self) -> dict:
        return {"name": self.name, "tvm": self.tvm, "device": self.device, "arch": self.arch,
                "cpu_flags": list(self.cpu_flags)}


def parse_target_json(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise QCompileError(f"--target {text!r}: not a target name (x86) nor a TVM target JSON ({e.msg})") from e
    if not isinstance(value, dict) or "kind" not in value:
        raise QCompileError(f"--target {text!r}: a TVM target JSON must be an object with a \"kind\" key")
    return value
