"""The x86 target: host CPU via LLVM (AVX2 / AVX-512), our dequant kernels, TVM for the rest."""

from __future__ import annotations

import platform
from pathlib import Path

from ..base import TargetSpec

__all__ = ["host_target", "target_from_json", "X86Target", "resolve", "make_backend"]

# ISA extensions recorded in the manifest when compiling for the host's own mcpu
_TRACKED_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl",
                  "avx512_vnni", "avx_vnni")


def _host_flags() -> tuple[str, ...]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                have = set(line.split(":", 1)[1].split())
                return tuple(f for f in _TRACKED_FLAGS if f in have)
    except OSError:
        pass
    return ()


def host_target() -> TargetSpec:
    """The host CPU as TVM detects it (``Target.from_device(tvm.cpu())``)."""
    import tvm  # noqa: PLC0415

    detected = tvm.target.Target.from_device(tvm.cpu())
    tjson = {"kind": "llvm", "mcpu": str(detected.attrs.get("mcpu", "generic"))}
    return TargetSpec("x86", tjson, "cpu", platform.machine().lower(), _host_flags())


def target_from_json(tjson: dict) -> TargetSpec:
    """A user-given ``{"kind": "llvm", ...}`` target; host flags are recorded only for the host's mcpu."""
    host = host_target()
    flags = host.cpu_flags if tjson.get("mcpu") in (None, host.tvm["mcpu"]) else ()
    return TargetSpec("x86", dict(tjson), "cpu", platform.machine().lower(), flags)


def _has_features(tjson: dict, features: str) -> bool:
    """Whether LLVM's CPU for the target has the ISA ``features`` (e.g. "avx2")."""
    import tvm  # noqa: PLC0415
    from tvm.target import codegen  # noqa: PLC0415

    return bool(codegen.target_has_features(features, tvm.target.Target(tjson)))


def resolve(text: str, tvm_json: dict | None) -> TargetSpec:
    """``x86`` (the host CPU) or a ``{"kind": "llvm", ...}`` JSON (see :mod:`qcompile.targets`)."""
    from qcompile.runtime.errors import QCompileError  # noqa: PLC0415

    if tvm_json is not None:
        return target_from_json(tvm_json)
    if text != "x86":
        raise QCompileError(f"--target {text!r}: x86 takes no preset (it compiles for this host's CPU); "
                            f"give a TVM target JSON such as {{\"kind\":\"llvm\",\"mcpu\":\"skylake\"}} for another CPU")
    return host_target()


def make_backend(spec: TargetSpec, options) -> "X86Target":
    return X86Target(spec, int8_dot=options.int8_dot, tuning_db=options.tuning_db)


class X86Target:
    """Capabilities and build steps of the x86 target."""

    name = "x86"
    vector_lanes_f32 = 16  # output tile of the dequant kernels (2 x AVX2 or 1 x AVX-512 register)
    supports_formats = "all"
    decoder_fusion = True  # lowers qcompile::RMSNorm, AddRMSNorm, Rotary, GatedAct (passes/fuse_decoder.py)
    attention_fusion = True  # lowers qcompile::CausalAttention and CacheUpdate (passes/fuse_attention.py)

    tunable = True  # MetaSchedule tunes the legalized ops (qcompile tune; targets/tuning.py) and our
    # quantized matmuls' knobs are measured (targets/kernel_tuning.py)

    def __init__(self, spec: TargetSpec, int8_dot: bool = True, tuning_db=None):
        self.spec = spec
        self.tuning_db = tuning_db  # a `qcompile tune --db` folder whose records the build applies
        self.tuned_functions: list[str] | None = None  # set by build() when tuning_db is given
        # int8 dot-product kernels (vpmaddubsw) where the CPU has AVX2; int8_dot=False keeps float kernels
        self.int8_dot = int8_dot and _has_features(spec.tvm, "avx2")

    def lower(self, model):
        """Quantized ONNX ModelProto -> :class:`.lower.LoweredModel`; quantized matmuls with a record in the
        tuning database get its knob config (:mod:`qcompile.targets.kernel_tuning`)."""
        from ..kernel_tuning import load_schedules  # noqa: PLC0415
        from .lower import lower_to_relax  # noqa: PLC0415

        return lower_to_relax(model, int8_dot=self.int8_dot,
                              kernel_schedules=load_schedules(self.tuning_db, self.spec.tvm))

    def manifest_kernels(self, lowered) -> dict:
        """What the manifest says about the kernels (``manifest["kernels"]``)."""
        return {"int8_dot": self.int8_dot, "quantized_matmuls": lowered.kernels, "param_layouts": lowered.layouts}

    def build(self, mod, out_path: str) -> None:
        """Build ``module.so``; with a tuning database, ``tuned_functions`` names those given a tuned schedule."""
        from .build import build_library  # noqa: PLC0415

        self.tuned_functions = build_library(mod, self.spec.tvm, out_path, tuning_db=self.tuning_db)

    def prepare_for_tuning(self, mod, target):
        """``mod`` after the build's passes up to scheduling: the PrimFuncs MetaSchedule tunes."""
        import tvm  # noqa: PLC0415

        from .build import pre_schedule_passes  # noqa: PLC0415

        with target:  # on a copy: a pass may edit a module nobody else holds in place
            return tvm.transform.Sequential(pre_schedule_passes(target))(_copy(mod))

    def default_schedule_of(self, func, target):
        """The ``s_tir.Schedule`` (with its trace) the default rules give one PrimFunc, or None."""
        from .schedule import default_rules  # noqa: PLC0415

        for rule in default_rules():
            space = rule.apply(func, target, False)
            if space is not None:
                return space if not isinstance(space, list) else space[0]
        return None

    def default_schedule(self, mod):
        """``mod`` (PrimFuncs) with the schedules a build gives functions that have no tuning record."""
        from .schedule import default_schedule_pass  # noqa: PLC0415

        return default_schedule_pass()(_copy(mod))  # dlight replaces the functions of the module it gets


def _copy(mod):
    import tvm  # noqa: PLC0415

    return tvm.IRModule(dict(mod.functions), attrs=mod.attrs)
