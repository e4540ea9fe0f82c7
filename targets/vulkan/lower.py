"""Lower qcompile's quantized ONNX IR to a Relax module for GPUs through WebGPU (WGSL).

The converters are the x86 target's (:mod:`qcompile.targets.x86.lower`): standard ops through TVM's
``from_onnx``, ``qcompile::QMatMul`` / ``QConv`` as ``call_tir`` of a kernel that this module supplies
(:mod:`.kernels`: unscheduled TIR that dlight schedules).  Packed weights keep the canonical packing of
:mod:`qcompile.passes.formats`; they and the large float initializers become parameters of ``main``
(after the model's inputs), one argument each.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx

from qcompile.passes.formats import WeightFormat

from ..x86 import lower as x86_lower
from . import kernels
from .narrow import narrow_int64

__all__ = ["lower_to_relax"]

log = logging.getLogger(__name__)


class _GpuEmitter:
    """The x86 converters' kernel emitter with GPU kernels: the canonical packing, dlight schedules."""

    def __init__(self):
        self.cache: dict[tuple, object] = {}
        self.counts: dict[str, int] = {}

    def kernel(self, bb, key: tuple, make):
        if key[0] == "im2col":  # the x86 im2col carries a CPU schedule: use the unscheduled one
            make = lambda: kernels.im2col(*key[1:4], key[4:6], key[6:8], key[8:12], key[12:14])  # noqa: E731
        elif key[0] != "qmatmul":
            raise NotImplementedError(f"the vulkan target has no kernel for {key[0]} (compile with --no-fuse)")
        if key not in self.cache:
            self.cache[key] = bb.add_func(make(), "_".join(str(p) for p in key))
        return self.cache[key]

    def qmatmul2d(self, bb, x2, m, planes, s, z, fmt: WeightFormat, k: int, n: int):
        from tvm import relax  # noqa: PLC0415

        static_m = int(m) if isinstance(m, int) or type(m).__name__ == "IntImm" else None
        key = ("qmatmul", fmt.name, k, n) + ((f"m{static_m}",) if static_m is not None else ())
        # tagged with its format and shape: the decode-step plan swaps in the GEMV kernel (build.py)
        gv = self.kernel(bb, key, lambda: kernels.dequant_matmul(fmt, k, n, static_m).with_attr(
            kernels.QMATMUL_ATTR, [fmt.name, k, n]))
        self.counts["dequant_matmul"] = self.counts.get("dequant_matmul", 0) + 1
        w0 = planes[0]
        w1 = planes[1] if planes[1] is not None else w0
        return bb.emit(relax.call_tir(gv, [x2, w0, w1, s, z], relax.TensorType([m, n], "float32")))


def lower_to_relax(model: onnx.ModelProto) -> x86_lower.LoweredModel:
    """Quantized ONNX -> Relax IRModule whose ``main`` takes (inputs..., params...)."""
    from tvm import relax  # noqa: PLC0415
    from tvm.relax.frontend.onnx import from_onnx  # noqa: PLC0415

    from ..cuda.lower import split_params  # noqa: PLC0415  (the same parameters as the CUDA target)

    num_inputs = len(model.graph.input)
    split, names, params, _ = split_params(model)
    emitter = _GpuEmitter()
    with x86_lower._our_converters(emitter), warnings.catch_warnings():  # noqa: SLF001
        warnings.simplefilter("ignore")  # our custom-domain nodes make onnx.checker complain
        mod = from_onnx(split, keep_params_in_input=False)
    mod["main"] = mod["main"].with_attr("num_input", num_inputs)
    mod = narrow_int64(mod)  # WGSL has no 64-bit integers
    mod = relax.transform.RemoveRedundantReshape()(mod)
    mod = relax.transform.DeadCodeElimination()(mod)
    layouts = {name: "canonical" for name in names if params[name].dtype == np.uint32}
    log.info("lowered to Relax for WebGPU: %d functions, %d params; quantized matmul kernels %s",
             len(mod.functions), len(names), emitter.counts)
    return x86_lower.LoweredModel(mod, names, params, num_inputs, dict(emitter.counts), layouts)
