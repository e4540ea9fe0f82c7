"""Lower qcompile's quantized ONNX IR to a Relax module for NVIDIA GPUs.

The converters are the x86 target's (:mod:`qcompile.targets.x86.lower`): standard ops through TVM's
``from_onnx`` (dlight schedules them at build), ``qcompile::QMatMul`` / ``QConv`` as ``call_tir`` of
:func:`.kernels_int8.gemv_int8` (int8 activations, ``dp4a``) wherever the x86 int8 build quantizes
activations too (``int8_dot``, :func:`qcompile.targets.x86.kernels_int8.supports`: 2-6 bits, N a multiple
of 8), else of :func:`.kernels.gemv` (float activations); both hand-scheduled, batch 1-8 at full speed;
for M > 8 the same call runs the tensor-core dequant-GEMM of :mod:`.gemm` (fp16 x and weights, fp32
sums; one PrimFunc that branches on M at run time, :func:`.gemm.gemv_or_gemm`).  With
``scheduled=False``, of the unscheduled :func:`.kernels.dequant_matmul` that dlight schedules (any GPU
target: the WebGPU target lowers through the same definition).  Packed weights keep the canonical
packing of :mod:`qcompile.passes.formats`; they and the large float initializers become parameters of
``main`` (after the model's inputs), passed as one tuple like the CPU targets'.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import onnx
from onnx import numpy_helper

from qcompile.passes import qops
from qcompile.passes.formats import WeightFormat

from ..x86 import kernels_int8 as x86_int8
from ..x86 import lower as x86_lower
from . import gemm, kernels, kernels_int8

__all__ = ["lower_to_relax", "GpuEmitter", "gemv_kernel", "uses_int8", "split_params"]

log = logging.getLogger(__name__)


def uses_int8(fmt: WeightFormat, k: int, n: int, int8_dot: bool = True) -> bool:
    """Whether a quantized matmul runs on the int8-activation GEMV: exactly where the x86 int8 build
    quantizes activations too (:func:`qcompile.targets.x86.kernels_int8.supports`), so the builds match."""
    return int8_dot and x86_int8.supports(fmt.bits, k, n, fmt.group_size)


def gemv_kernel(fmt: WeightFormat, k: int, n: int, int8_dot: bool = True) -> tuple[str, object]:
    """(kind, TIR) of the scheduled GEMV of a quantized matmul: ``gemv_int8`` (:func:`uses_int8`) or
    ``gemv`` (float activations)."""
    if uses_int8(fmt, k, n, int8_dot):
        return "gemv_int8", kernels_int8.gemv_int8(fmt, k, n)
    return "gemv", kernels.gemv(fmt, k, n)


class GpuEmitter:
    """Kernel emitter for the x86 converters with GPU kernels (canonical packing, no retiling)."""

    def __init__(self, scheduled: bool = True, int8_dot: bool = True):
        self.scheduled = scheduled
        self.int8_dot = int8_dot
        self.cache: dict[tuple, object] = {}
        self.counts: dict[str, int] = {}

    def kernel(self, bb, key: tuple, make):
        if key[0] == "im2col":  # the x86 im2col carries a CPU schedule: dlight schedules this one
            make = lambda: kernels.im2col(*key[1:4], key[4:6], key[6:8], key[8:12], key[12:14])  # noqa: E731
        elif key[0] not in ("qmatmul", "gemv", "gemv_i8"):
            raise NotImplementedError(f"the CUDA target has no kernel for {key[0]} (compile with --no-fuse)")
        if key not in self.cache:
            self.cache[key] = bb.add_func(make(), "_".join(str(p) for p in key))
        return self.cache[key]

    def qmatmul2d(self, bb, x2, m, planes, s, z, fmt: WeightFormat, k: int, n: int):
        from tvm import relax  # noqa: PLC0415

        if self.scheduled:
            kind = "gemv_int8" if uses_int8(fmt, k, n, self.int8_dot) else "gemv"
            key = ("gemv_i8" if kind == "gemv_int8" else "gemv", fmt.name, k, n)
            gv = self.kernel(bb, key, lambda: gemm.gemv_or_gemm(gemv_kernel(fmt, k, n, self.int8_dot)[1], fmt, k, n))
        else:
            kind = "dequant_matmul"
            gv = self.kernel(bb, ("qmatmul", fmt.name, k, n), lambda: kernels.dequant_matmul(fmt, k, n))
        self.counts[kind] = self.counts.get(kind, 0) + 1
        w0 = planes[0]
        w1 = planes[1] if planes[1] is not None else w0
        return bb.emit(relax.call_tir(gv, [x2, w0, w1, s, z], relax.TensorType([m, n], "float32")))


def split_params(model: onnx.ModelProto):
    """Move packed and large float initializers to graph inputs (canonical packing, no retiling): (model,
    their names, name -> array, the names of packed weights).  Shared with the Vulkan target."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    packed = {name for node in graph.node if node.domain == qops.DOMAIN for name in node.input[1:5] if name}
    names, params, keep = [], {}, []
    for init in graph.initializer:
        big_float = init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and \
            int(np.prod(init.dims)) >= x86_lower.PARAM_MIN_ELEMENTS
        if init.name not in packed and not big_float:
            keep.append(init)
            continue
        arr = np.ascontiguousarray(numpy_helper.to_array(init))
        names.append(init.name)
        params[init.name] = arr
        graph.input.append(onnx.helper.make_tensor_value_info(
            init.name, onnx.helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape)))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return model, names, params, packed


def lower_to_relax(model: onnx.ModelProto, scheduled: bool = True, int8_dot: bool = True) -> x86_lower.LoweredModel:
    """Quantized ONNX -> Relax IRModule whose ``main`` takes (inputs..., (params...)); ``int8_dot=False``
    keeps every quantized matmul on float activations."""
    from tvm import relax  # noqa: PLC0415
    from tvm.relax.frontend.onnx import from_onnx  # noqa: PLC0415

    num_inputs = len(model.graph.input)
    split, names, params, packed = split_params(model)
    emitter = GpuEmitter(scheduled, int8_dot)
    with x86_lower._our_converters(emitter), warnings.catch_warnings():  # noqa: SLF001
        warnings.simplefilter("ignore")  # our custom-domain nodes make onnx.checker complain
        mod = from_onnx(split, keep_params_in_input=False)
    mod["main"] = mod["main"].with_attr("num_input", num_inputs)
    mod = relax.transform.RemoveRedundantReshape()(mod)
    mod = relax.transform.DeadCodeElimination()(mod)
    mod = relax.transform.BundleModelParams("params")(mod)  # one tuple argument (manifest params_as_tuple)
    layouts = {name: "canonical" for name in names if name in packed}
    log.info("lowered to Relax for CUDA: %d functions, %d params; quantized matmul kernels %s",
             len(mod.functions), len(names), emitter.counts)
    return x86_lower.LoweredModel(mod, names, params, num_inputs, dict(emitter.counts), layouts)
