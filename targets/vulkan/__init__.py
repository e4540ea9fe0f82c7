"""The Vulkan target: WGSL kernels from TVM's webgpu codegen and a call plan, run by wgpu on Vulkan.

This TVM wheel has no SPIR-V codegen, so kernels are built for ``{"kind": "webgpu"}`` (dlight
schedules) and the artifact holds ``kernels.wgsl`` + ``plan.json`` (:mod:`.build`) instead of a
``module.so``; ``qcompile.runtime.vulkan`` executes the plan with wgpu-native on its Vulkan backend.
"""

from __future__ import annotations

from pathlib import Path

from ..base import TargetSpec

__all__ = ["VulkanTarget", "resolve", "make_backend"]

TVM_TARGET = {"kind": "webgpu"}


def resolve(text: str, tvm_json: dict | None) -> TargetSpec:
    """``vulkan`` (or a ``{"kind": "webgpu"}`` / ``{"kind": "vulkan"}`` JSON): WGSL run through wgpu."""
    from qcompile.runtime.errors import QCompileError  # noqa: PLC0415

    if tvm_json is not None and tvm_json.get("kind") not in ("webgpu", "vulkan"):
        raise QCompileError(f"--target {text!r}: the vulkan target builds WGSL kernels: its TVM target is "
                            f"{TVM_TARGET}")
    if tvm_json is None and text != "vulkan":
        raise QCompileError(f"--target {text!r}: vulkan takes no preset (the kernels run on any Vulkan device)")
    return TargetSpec("vulkan", dict(TVM_TARGET), "vulkan", "any")


def make_backend(spec: TargetSpec, options) -> "VulkanTarget":
    return VulkanTarget(spec, int8_dot=options.int8_dot)


class VulkanTarget:
    """Capabilities and build steps of the Vulkan target."""

    name = "vulkan"
    decoder_fusion = False  # no WGSL kernels yet for qcompile::RMSNorm/Rotary/GatedAct
    attention_fusion = False  # nor for CausalAttention/CacheUpdate: the unfused graph is lowered

    def __init__(self, spec: TargetSpec, int8_dot: bool = True):
        self.spec = spec
        self.int8_dot = int8_dot  # decode steps: int8 activations where the x86 int8 build has them
        self._signature: tuple[list[str], int] | None = None
        self._kernels: dict = {}

    def lower(self, model):
        """Quantized ONNX ModelProto -> :class:`qcompile.targets.x86.lower.LoweredModel` (GPU kernels)."""
        from .lower import lower_to_relax  # noqa: PLC0415

        lowered = lower_to_relax(model)
        self._signature = (list(lowered.param_names), lowered.num_inputs)
        return lowered

    def manifest_kernels(self, lowered) -> dict:
        """What the manifest says about the kernels; ``decode_step_gemv`` (the GEMV kinds of a KV-cache
        model's decode-step variant: ``gemv_int8`` / ``gemv``) is filled in by :meth:`build`."""
        self._kernels = {"int8_dot": self.int8_dot, "quantized_matmuls": lowered.kernels,
                         "param_layouts": lowered.layouts}
        return self._kernels

    def build(self, mod, out_path: str) -> list[str]:
        """Write kernels.wgsl + plan.json (+ constants.safetensors) beside ``out_path``; return their names."""
        from .build import build_plan  # noqa: PLC0415

        if self._signature is None:
            raise RuntimeError("VulkanTarget.build: lower() first (the plan needs the parameter order)")
        names, num_inputs = self._signature
        counts: dict[str, int] = {}
        files = build_plan(mod, names, num_inputs, Path(out_path).parent, self.int8_dot, counts)
        if counts:
            self._kernels["decode_step_gemv"] = counts
        return files
