"""Code generation targets: one subpackage per target family.

Each family module (``qcompile.targets.<family>``) offers two functions:

    resolve(text: str, tvm_json: dict | None) -> TargetSpec
        ``text`` is what follows ``--target`` (``x86``, ``arm:cortex-a76``, ``cuda:sm_89``...), or the
        family's own name when the user gave a TVM target JSON (then ``tvm_json`` is that dict);
    make_backend(spec: TargetSpec, options: BackendOptions) -> a backend with
        ``name``, ``decoder_fusion`` (lowers qcompile::RMSNorm/... ops), ``attention_fusion``
        (lowers CausalAttention/CacheUpdate), ``lower(qproto) -> LoweredModel``,
        ``build(mod, out_path)`` and ``manifest_kernels(lowered) -> dict``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from qcompile.runtime.errors import QCompileError

from .base import TargetSpec, parse_target_json

__all__ = ["resolve_target", "make_backend", "BackendOptions", "TargetSpec", "FAMILIES"]

FAMILIES = ("x86", "arm", "cuda", "vulkan")


@dataclass(frozen=True)
class BackendOptions:
    """Compile options a backend may honour (the others ignore them)."""

    int8_dot: bool = True  # int8-activation dot-product kernels where the target has them
    tuning_db: str | None = None  # `qcompile tune --db` folder: tuned schedules applied at build (x86)


def _family_module(family: str):
    try:
        return importlib.import_module(f"qcompile.targets.{family}")
    except ModuleNotFoundError as e:
        if e.name == f"qcompile.targets.{family}":
            raise QCompileError(f"--target {family}: this target is not available in this build") from e
        raise


def _family_of_json(tvm_json: dict) -> str:
    kind = tvm_json["kind"]
    if kind == "llvm":
        triple = str(tvm_json.get("mtriple", ""))
        return "arm" if triple.startswith(("aarch64", "arm64")) else "x86"
    if kind in ("cuda", "vulkan"):
        return kind
    if kind == "webgpu":
        return "vulkan"
    raise QCompileError(f"--target: TVM target kind {kind!r} is not supported (supported: llvm, cuda, vulkan)")


def resolve_target(text: str) -> TargetSpec:
    """``x86`` / ``arm[:cpu]`` / ``cuda[:sm_XX]`` / ``vulkan``, or a TVM target JSON such as ``{"kind":"llvm",...}``."""
    if text.lstrip().startswith("{"):
        tvm_json = parse_target_json(text)
        return _family_module(_family_of_json(tvm_json)).resolve(_family_of_json(tvm_json), tvm_json)
    family = text.split(":", 1)[0]
    if family not in FAMILIES:
        raise QCompileError(f"--target {text!r}: unknown target; expected one of {list(FAMILIES)} "
                            f"(with an optional ':preset', e.g. arm:cortex-a76, cuda:sm_90) or a TVM target JSON")
    return _family_module(family).resolve(text, None)


def make_backend(spec: TargetSpec, options: BackendOptions | None = None):
    """The backend (lowering + build) of ``spec``'s family."""
    return _family_module(spec.name).make_backend(spec, options or BackendOptions())
