"""The CUDA target: NVIDIA GPUs, compiled ahead of time (nvcc on the build machine, SASS + PTX embedded in
``module.so``); our dequantizing GEMV kernels for the quantized matmuls (int8 activations and ``dp4a``
where the x86 int8 build quantizes activations too), dlight schedules for the rest.

``--target cuda`` is ``cuda:sm_90`` (H100); ``cuda:sm_80`` (A100), ``cuda:sm_89`` (L4, RTX 40xx),
``cuda:sm_90`` or a TVM target JSON ``{"kind": "cuda", "arch": "sm_XX", ...}``.
"""

from __future__ import annotations

from ..base import TargetSpec

__all__ = ["resolve", "make_backend", "CudaTarget", "PRESETS", "DEFAULT_ARCH"]

DEFAULT_ARCH = "sm_90"
PRESETS = ("sm_80", "sm_86", "sm_89", "sm_90")
"""Architectures ``--target cuda:<arch>`` accepts (the GEMV kernels need warp shuffles and 16-byte loads:
any of these; others through a TVM target JSON)."""


def _spec(tjson: dict) -> TargetSpec:
    return TargetSpec("cuda", tjson, "cuda", str(tjson["arch"]))


def resolve(text: str, tvm_json: dict | None) -> TargetSpec:
    """``cuda`` / ``cuda:sm_XX`` or a ``{"kind": "cuda", ...}`` JSON (see :mod:`qcompile.targets`)."""
    from qcompile.runtime.errors import QCompileError  # noqa: PLC0415

    if tvm_json is not None:
        arch = str(tvm_json.get("arch", DEFAULT_ARCH))
        if not arch.startswith("sm_") or not arch[3:].isdigit():
            raise QCompileError(f"--target {tvm_json}: \"arch\" must be sm_XX (e.g. sm_90), found {arch!r}")
        return _spec({**tvm_json, "arch": arch})
    _, _, preset = text.partition(":")
    arch = preset or DEFAULT_ARCH
    if arch not in PRESETS:
        raise QCompileError(f"--target {text!r}: unknown CUDA architecture {arch!r}; expected one of "
                            f"{list(PRESETS)} or a TVM target JSON {{\"kind\":\"cuda\",\"arch\":\"sm_XX\"}}")
    return _spec({"kind": "cuda", "arch": arch})


def make_backend(spec: TargetSpec, options) -> "CudaTarget":
    return CudaTarget(spec, int8_dot=options.int8_dot)


class CudaTarget:
    """Capabilities and build steps of the CUDA target."""

    name = "cuda"
    supports_formats = "all"
    decoder_fusion = False  # the fused decoder ops have CPU kernels only: the unfused graph goes to dlight
    attention_fusion = False
    tunable = False

    def __init__(self, spec: TargetSpec, int8_dot: bool = True):
        from .build import BuiltSources  # noqa: PLC0415

        self.spec = spec
        self.int8_dot = int8_dot  # int8 activations (dp4a) where the x86 int8 build has them
        self.built = BuiltSources()  # the CUDA C++ compiled by the last build (tests, reports)

    def lower(self, model):
        """Quantized ONNX ModelProto -> :class:`~qcompile.targets.x86.lower.LoweredModel`."""
        from .lower import lower_to_relax  # noqa: PLC0415

        return lower_to_relax(model, int8_dot=self.int8_dot)

    def manifest_kernels(self, lowered) -> dict:
        """What the manifest says about the kernels (``manifest["kernels"]``)."""
        return {"int8_dot": self.int8_dot, "quantized_matmuls": lowered.kernels, "param_layouts": lowered.layouts,
                "device_code": "fatbin (nvcc, SASS sm_{0} + PTX compute_{0})".format(self.spec.tvm["arch"][3:])}

    def add_decoder_functions(self, mod, vocab: int, num_inputs: int):
        """A decoder's module with ``greedy`` (the token chosen on the GPU, :mod:`.sampling`) and the
        decode step (:mod:`qcompile.targets.decode_step`: static parts replayed as CUDA graphs), and the
        manifest keys that say so."""
        from ..decode_step import DECODE_STEP, add_decode_step  # noqa: PLC0415
        from .sampling import add_greedy  # noqa: PLC0415

        mod, binding = add_decode_step(add_greedy(mod, vocab), num_inputs)
        return mod, ({"decode_step": {"function": DECODE_STEP, "dims": binding, "cuda_graphs": True}}
                     if binding else {})

    def build(self, mod, out_path: str) -> None:
        from .build import build_library  # noqa: PLC0415

        self.built.sources.clear()
        build_library(mod, self.spec.tvm, out_path, self.built)
