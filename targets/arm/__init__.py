"""The ARM target: aarch64 CPUs via LLVM, cross-compiled here with ``aarch64-linux-gnu-g++``.

``--target arm:<cpu>`` picks a preset (:data:`PRESETS`): LLVM's ``mcpu``, the ``mattr`` features we
rely on, and the Linux ``/proc/cpuinfo`` "Features" names the runtime checks before loading the
library.  Quantized matmuls run on the integer dot-product kernels (:mod:`.kernels_dot`, ``sdot``)
where the CPU has ``dotprod``, on the float dequantizing kernels of the x86 target otherwise; the rest
of the lowering (decoder and attention fusions, TVM's own ops) is the x86 target's plain TIR.
"""

from __future__ import annotations

from dataclasses import dataclass

from qcompile.runtime.errors import QCompileError

from ..base import TargetSpec

__all__ = ["PRESETS", "Preset", "resolve", "make_backend", "ArmTarget", "TRIPLE", "CROSS_CXX"]

TRIPLE = "aarch64-linux-gnu"
CROSS_CXX = "aarch64-linux-gnu-g++"  # Debian g++-aarch64-linux-gnu

# LLVM feature -> the Linux hwcap name in /proc/cpuinfo "Features"
_LINUX_FLAG = {"neon": "asimd", "dotprod": "asimddp", "i8mm": "i8mm", "sve": "sve", "sve2": "sve2"}


@dataclass(frozen=True)
class Preset:
    """An ARM CPU: LLVM's ``mcpu`` and the ISA extensions (LLVM names) generated code may use."""

    mcpu: str
    features: tuple[str, ...]

    @property
    def mattr(self) -> list[str]:
        return [f"+{f}" for f in self.features]

    @property
    def cpu_flags(self) -> tuple[str, ...]:
        return tuple(_LINUX_FLAG[f] for f in self.features)


# What each CPU has (Arm's TRMs; tests/test_arm_target.py checks every entry against LLVM's CPU model)
PRESETS: dict[str, Preset] = {
    "generic": Preset("generic", ("neon",)),
    "cortex-a53": Preset("cortex-a53", ("neon",)),
    "cortex-a72": Preset("cortex-a72", ("neon",)),  # Raspberry Pi 4
    "cortex-a55": Preset("cortex-a55", ("neon", "dotprod")),
    "cortex-a76": Preset("cortex-a76", ("neon", "dotprod")),  # Raspberry Pi 5
    "neoverse-n1": Preset("neoverse-n1", ("neon", "dotprod")),  # AWS Graviton2, Ampere Altra
    "neoverse-v1": Preset("neoverse-v1", ("neon", "dotprod", "i8mm", "sve")),  # AWS Graviton3
    "neoverse-n2": Preset("neoverse-n2", ("neon", "dotprod", "i8mm", "sve", "sve2")),
    "neoverse-v2": Preset("neoverse-v2", ("neon", "dotprod", "i8mm", "sve", "sve2")),  # Graviton4, Grace
}
DEFAULT_PRESET = "generic"


def _spec(tjson: dict, flags: tuple[str, ...]) -> TargetSpec:
    return TargetSpec("arm", tjson, "cpu", "aarch64", flags)


def resolve(text: str, tvm_json: dict | None) -> TargetSpec:
    """``arm`` / ``arm:<preset>`` (:data:`PRESETS`) or a ``{"kind":"llvm","mtriple":"aarch64-...",...}`` JSON."""
    if tvm_json is not None:
        # what LLVM's CPU model plus mattr enables is what the code may use: the runtime checks all of it
        return _spec(dict(tvm_json), tuple(_LINUX_FLAG[f] for f in llvm_features(tvm_json)))
    name = text.split(":", 1)[1] if ":" in text else DEFAULT_PRESET
    preset = PRESETS.get(name)
    if preset is None:
        raise QCompileError(f"--target {text!r}: unknown ARM CPU {name!r}; presets: {sorted(PRESETS)} "
                            f"(or give a TVM target JSON with \"mtriple\": \"{TRIPLE}\" and your \"mcpu\")")
    tjson = {"kind": "llvm", "mtriple": TRIPLE, "mcpu": preset.mcpu, "mattr": preset.mattr}
    return _spec(tjson, preset.cpu_flags)


def make_backend(spec: TargetSpec, options) -> "ArmTarget":
    return ArmTarget(spec, int8_dot=options.int8_dot, tuning_db=options.tuning_db)


def llvm_features(tjson: dict) -> tuple[str, ...]:
    """The tracked ISA extensions (LLVM names, those of :data:`_LINUX_FLAG`) of the target's CPU: its
    mcpu plus mattr, as LLVM sees them."""
    import tvm  # noqa: PLC0415
    from tvm.target import codegen  # noqa: PLC0415

    target = tvm.target.Target(tjson)
    return tuple(f for f in _LINUX_FLAG if codegen.target_has_features(f, target))


def has_dotprod(tjson: dict) -> bool:
    """Whether the target's CPU has the dot-product extension (``sdot``)."""
    return "dotprod" in llvm_features(tjson)


class ArmTarget:
    """Capabilities and build steps of the ARM target."""

    name = "arm"
    supports_formats = "all"
    decoder_fusion = True  # the x86 target's decoder kernels are plain TIR: they build for aarch64 as they are
    attention_fusion = True

    def __init__(self, spec: TargetSpec, int8_dot: bool = True, tuning_db=None):
        self.spec = spec
        self.tuning_db = tuning_db  # kernel knob records (targets/kernel_tuning.py) for this target, if any
        # sdot kernels where the CPU has dotprod; int8_dot=False (or no dotprod) keeps the float kernels
        self.int8_dot = int8_dot and has_dotprod(spec.tvm)

    def lower(self, model):
        """Quantized ONNX ModelProto -> :class:`qcompile.targets.x86.lower.LoweredModel`."""
        from ..kernel_tuning import load_schedules  # noqa: PLC0415
        from ..x86.lower import lower_to_relax  # noqa: PLC0415
        from . import kernels_dot  # noqa: PLC0415

        return lower_to_relax(model, int8_dot=self.int8_dot, dot_kernels=kernels_dot,
                              kernel_schedules=load_schedules(self.tuning_db, self.spec.tvm))

    def manifest_kernels(self, lowered) -> dict:
        """What the manifest says about the kernels (``manifest["kernels"]``)."""
        return {"int8_dot": self.int8_dot, "dot_instruction": "sdot" if self.int8_dot else None,
                "quantized_matmuls": lowered.kernels, "param_layouts": lowered.layouts}

    def build(self, mod, out_path: str) -> None:
        from .build import build_library  # noqa: PLC0415

        build_library(mod, self.spec.tvm, out_path)
