"""Lower qcompile's quantized ONNX IR to a Relax module for CPUs.

Standard ops go through TVM's ``from_onnx``; ``qcompile::QMatMul`` and ``qcompile::QConv`` are
converted here into ``call_tir`` of our kernels (:mod:`.kernels`), with the packed weights retiled into
the kernels' layout.  Packed weights and large float initializers become parameters of ``main``
(after the model's inputs), stored in ``params.safetensors``; small constants stay in the module.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from qcompile.passes import qops
from qcompile.passes.formats import WeightFormat

from . import attention_kernels, decoder_kernels, kernels, kernels_int8
from .onnx_gaps import gap_converters

__all__ = ["lower_to_relax", "LoweredModel", "QuantKernel", "PARAM_MIN_ELEMENTS"]

log = logging.getLogger(__name__)

PARAM_MIN_ELEMENTS = 256
"""Float initializers at least this large are parameters (params.safetensors), smaller ones constants."""


@dataclass
class QuantKernel:
    """One distinct quantized matmul kernel of a lowered model, with what tuning needs to rebuild it."""

    name: str  # its function in the module: qmatmul_i8_q4g32_576_1536 (kind, format, K, N)
    space: object  # the kernel family's knobs (qcompile.targets.knobs.KnobSpace)
    make: Callable  # make(config dict | None) -> the PrimFunc with that config
    k: int
    n: int
    calls: int = 0
    rows: set = field(default_factory=set)  # M of its calls: ints, None for a symbolic M (a decoder's tokens)
    config: dict | None = None  # the tuned config it was built with (None: no record, the defaults)


@dataclass
class LoweredModel:
    mod: object  # tvm.IRModule
    param_names: list[str]
    params: dict[str, np.ndarray]
    num_inputs: int
    kernels: dict[str, int] = field(default_factory=dict)  # quantized matmuls per kernel kind
    layouts: dict[str, str] = field(default_factory=dict)  # packed param -> its layout (see _retile)
    quant_kernels: dict[str, QuantKernel] = field(default_factory=dict)  # by function name

    @property
    def tuned_kernels(self) -> dict[str, dict]:
        """Kernels built with a config from a tuning database: name -> config."""
        return {name: q.config for name, q in self.quant_kernels.items() if q.config is not None}


def _int8_dot(enabled: bool, fmt: WeightFormat, k: int, n: int, dot=kernels_int8) -> bool:
    """Whether a quantized matmul runs on the int8 dot-product kernel (:mod:`.kernels_int8`, or the
    target's ``dot`` kernels): the one decision behind both the weight layout (:func:`_retile`) and the
    kernel (:meth:`_Emitter.qmatmul2d`)."""
    return enabled and dot.supports(fmt.bits, k, n, fmt.group_size)


def _retile(graph: onnx.GraphProto, int8_dot: bool, dot=kernels_int8) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Packed initializers of our ops in the layout of the kernel each op runs on, keyed by name, and
    each one's layout name: ``tiled{t}`` (:func:`.kernels.tile_planes`, :func:`.kernels.tile_groups`) or
    ``dot8`` (:func:`.kernels_int8.dot_planes`, groups tiled by 8)."""
    inits = {t.name: t for t in graph.initializer}
    out: dict[str, np.ndarray] = {}
    layouts: dict[str, str] = {}
    for node in graph.node:
        if node.domain != qops.DOMAIN or node.op_type not in (qops.QMATMUL, qops.QCONV):
            continue
        attrs = {a.name: a.i for a in node.attribute if a.name in ("bits", "group_size", "K", "N")}
        words = [numpy_helper.to_array(inits[name]) for name in node.input[1:3] if name]
        fmt = WeightFormat(attrs["bits"], attrs["group_size"])
        if _int8_dot(int8_dot, fmt, attrs["K"], attrs["N"], dot):
            t, layout = dot.TILE, "dot8"
            planes = dot.dot_planes(words, fmt.planes, attrs["K"])
        else:
            t = kernels.tile_for(attrs["N"])
            layout = f"tiled{t}"
            planes = kernels.tile_planes(words, t)
        for name, plane in zip((n for n in node.input[1:3] if n), planes):
            out[name] = plane
        for name in node.input[3:5]:
            out[name] = kernels.tile_groups(numpy_helper.to_array(inits[name]), t)
        layouts.update({name: layout for name in node.input[1:5] if name})
    return out, layouts


def _split_params(model: onnx.ModelProto, int8_dot: bool, dot=kernels_int8):
    """Move packed and large float initializers to graph inputs; return the new model, the param names,
    the params and the packed params' layouts (:func:`_retile`)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    packed, layouts = _retile(graph, int8_dot, dot)
    names, params, keep = [], {}, []
    for init in graph.initializer:
        if init.name in packed:
            arr = packed[init.name]
        elif init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and \
                int(np.prod(init.dims)) >= PARAM_MIN_ELEMENTS:
            arr = numpy_helper.to_array(init)
        else:
            keep.append(init)
            continue
        names.append(init.name)
        params[init.name] = np.ascontiguousarray(arr)
        graph.input.append(onnx.helper.make_tensor_value_info(
            init.name, onnx.helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape)))
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return model, names, params, layouts


def _prod(dims):
    return functools.reduce(operator.mul, dims, 1)


class _Emitter:
    """Emits our kernels into a BlockBuilder, each distinct kernel once; quantized matmuls with the
    config ``schedules`` gives their name (tuning records), else their defaults."""

    def __init__(self, int8_dot: bool = False, dot=kernels_int8, schedules: dict[str, dict] | None = None):
        self.cache: dict[tuple, object] = {}
        self.int8_dot = int8_dot
        self.dot = dot
        self.counts: dict[str, int] = {}
        self.schedules = schedules or {}
        self.quant: dict[str, QuantKernel] = {}

    def kernel(self, bb, key: tuple, make):
        if key not in self.cache:
            self.cache[key] = bb.add_func(make(), "_".join(str(p) for p in key))
        return self.cache[key]

    def qmatmul2d(self, bb, x2, m, planes, s, z, fmt: WeightFormat, k: int, n: int):
        from tvm import relax  # noqa: PLC0415

        from tvm import tirx  # noqa: PLC0415

        if _int8_dot(self.int8_dot, fmt, k, n, self.dot):
            kind, key, space = "int8_dot", ("qmatmul_i8", fmt.name, k, n), self.dot.SCHEDULE

            def make(config=None):
                return self.dot.int8_matmul(fmt.planes, fmt.group_size, k, n, config)
        else:
            kind, key, space = "float", ("qmatmul", fmt.name, k, n), kernels.SCHEDULE

            def make(config=None):
                return kernels.dequant_matmul(fmt, k, n, schedule=config)
        name = "_".join(str(p) for p in key)
        if name not in self.quant:
            config = self.schedules.get(name)
            if config is not None and not space.applies(space.resolve(config), k, n):
                log.warning("%s: tuned config %s does not apply to this kernel; defaults used", name, config)
                config = None
            self.quant[name] = QuantKernel(name, space, make, k, n, config=config)
        q = self.quant[name]
        gv = self.kernel(bb, key, lambda: make(q.config))
        q.calls += 1
        q.rows.add(int(m) if isinstance(m, (int, tirx.IntImm)) else None)
        self.counts[kind] = self.counts.get(kind, 0) + 1
        w0 = planes[0]
        w1 = planes[1] if planes[1] is not None else w0
        return bb.emit(relax.call_tir(gv, [x2, w0, w1, s, z], relax.TensorType([m, n], "float32")))


_EMITTER: _Emitter | None = None


def _as_f32(bb, x):
    from tvm import relax  # noqa: PLC0415

    dtype = str(x.ty.dtype)
    return (x, dtype) if dtype == "float32" else (bb.emit(relax.op.astype(x, "float32")), dtype)


def _back(bb, y, dtype):
    from tvm import relax  # noqa: PLC0415

    return y if dtype == "float32" else bb.emit(relax.op.astype(y, dtype))


def _ints(attr, name):
    return [int(v) for v in attr[name]]


def _convert_qmatmul(bb, inputs, attr, params):
    from tvm import relax  # noqa: PLC0415

    fmt = WeightFormat(int(attr["bits"]), int(attr["group_size"]))
    k, n = int(attr["K"]), int(attr["N"])
    x, dtype = _as_f32(bb, inputs[0])
    shape = list(x.ty.shape.values)
    lead = shape[:-1]
    m = _prod(lead) if lead else 1
    x2 = x if len(shape) == 2 else bb.emit(relax.op.reshape(x, [m, k]))
    y = _EMITTER.qmatmul2d(bb, x2, m, inputs[1:3], inputs[3], inputs[4], fmt, k, n)
    if len(shape) != 2:
        y = bb.emit(relax.op.reshape(y, [*lead, n]) if lead else relax.op.reshape(y, [n]))
    return _back(bb, y, dtype)


def _convert_qconv(bb, inputs, attr, params):
    from tvm import relax, tirx  # noqa: PLC0415

    fmt = WeightFormat(int(attr["bits"]), int(attr["group_size"]))
    k, n = int(attr["K"]), int(attr["N"])
    ks, st, pads, dil = (_ints(attr, a) for a in ("kernel_shape", "strides", "pads", "dilations"))
    if len(ks) != 2:
        raise NotImplementedError(f"QConv: only 2-D convolutions are lowered (kernel {ks})")
    x, dtype = _as_f32(bb, inputs[0])
    b, c, h, w = x.ty.shape.values
    if not all(isinstance(v, tirx.IntImm) for v in (c, h, w)):
        raise NotImplementedError("QConv: channels and spatial dims must be static")
    c, h, w = int(c), int(h), int(w)
    oh = (h + pads[0] + pads[2] - dil[0] * (ks[0] - 1) - 1) // st[0] + 1
    ow = (w + pads[1] + pads[3] - dil[1] * (ks[1] - 1) - 1) // st[1] + 1
    rows = b * oh * ow
    if ks == [1, 1] and st == [1, 1] and pads == [0, 0, 0, 0]:
        cols = bb.emit(relax.op.reshape(bb.emit(relax.op.permute_dims(x, [0, 2, 3, 1])), [rows, c]))
    else:
        key = ("im2col", c, h, w, *ks, *st, *pads, *dil)
        gv = _EMITTER.kernel(bb, key, lambda: kernels.im2col(c, h, w, ks, st, pads, dil))
        cols = bb.emit(relax.call_tir(gv, [x], relax.TensorType([rows, k], "float32")))
    y = _EMITTER.qmatmul2d(bb, cols, rows, inputs[1:3], inputs[3], inputs[4], fmt, k, n)
    y = bb.emit(relax.op.permute_dims(bb.emit(relax.op.reshape(y, [b, oh, ow, n])), [0, 3, 1, 2]))
    bias = inputs[5] if len(inputs) > 5 else None
    if bias is not None:
        y = bb.emit(relax.op.add(y, relax.op.reshape(relax.op.astype(bias, "float32"), [1, n, 1, 1])))
    return _back(bb, y, dtype)


def _convert_attention(bb, inputs, attr, params):
    """``qcompile::CausalAttention`` -> ``call_tir`` of :func:`.attention_kernels.attention`."""
    from tvm import relax  # noqa: PLC0415

    h, kv, scale = int(attr["num_heads"]), int(attr["num_kv_heads"]), float(attr["scale"])
    cached = len(inputs) > 5 and inputs[5] is not None
    masked = len(inputs) > 6 and inputs[6] is not None
    q = inputs[0]
    d = int(q.ty.shape.values[3])
    key = ("attention", h, kv, d, "cache" if cached else "past", "masked" if masked else "causal",
           f"{scale:.9g}".replace(".", "p").replace("-", "m"))
    gv = _EMITTER.kernel(bb, key, lambda: attention_kernels.attention(h, kv, d, scale, cached, masked))
    args = list(inputs[:5]) + ([inputs[5]] if cached else [])
    if masked:
        km = inputs[6]
        args.append(km if str(km.ty.dtype) == "int64" else bb.emit(relax.op.astype(km, "int64")))
    return bb.emit(relax.call_tir(gv, args, relax.TensorType(q.ty.shape, "float32")))


def _convert_cache_update(bb, inputs, attr, params):
    """``qcompile::CacheUpdate`` -> :func:`.attention_kernels.cache_update` in place (``call_tir_inplace``):
    the cache is a graph input that nothing reads after its update (:mod:`qcompile.passes.fuse_attention`)."""
    from tvm import relax  # noqa: PLC0415

    cache, new, past = inputs
    kv, d = (int(cache.ty.shape.values[i]) for i in (1, 3))
    gv = _EMITTER.kernel(bb, ("cache_update", kv, d), lambda: attention_kernels.cache_update(kv, d))
    return bb.emit(relax.call_tir_inplace(gv, [cache, new, past], [0], relax.TensorType(cache.ty.shape, "float32")))


def _rows(bb, x):
    """x [..., n] as [m, n] (m the product of the leading dims) and a function undoing that reshape."""
    from tvm import relax  # noqa: PLC0415

    shape = list(x.ty.shape.values)
    if len(shape) == 2:
        return x, lambda y: y
    m = _prod(shape[:-1])
    return bb.emit(relax.op.reshape(x, [m, shape[-1]])), lambda y: bb.emit(relax.op.reshape(y, shape))


def _name(value: float) -> str:
    return f"{value:.9g}".replace(".", "p").replace("-", "m").replace("+", "")


def _convert_rms_norm(bb, inputs, attr, params):
    """``qcompile::RMSNorm`` -> :func:`.decoder_kernels.rms_norm` over the rows of x."""
    from tvm import relax  # noqa: PLC0415

    eps = float(attr.get("epsilon", 1e-5))
    x, dtype = _as_f32(bb, inputs[0])
    gamma, _ = _as_f32(bb, inputs[1])
    d = int(x.ty.shape.values[-1])
    x2, back = _rows(bb, x)
    gv = _EMITTER.kernel(bb, ("rms_norm", d, _name(eps)), lambda: decoder_kernels.rms_norm(d, eps))
    return _back(bb, back(bb.emit(relax.call_tir(gv, [x2, gamma], x2.ty))), dtype)


def _convert_add_rms_norm(bb, inputs, attr, params):
    """``qcompile::AddRMSNorm`` -> :func:`.decoder_kernels.add_rms_norm`: (norm of the sum, the sum)."""
    from tvm import relax  # noqa: PLC0415

    eps = float(attr.get("epsilon", 1e-5))
    (a, dtype), (b, _), (gamma, _) = (_as_f32(bb, x) for x in inputs[:3])
    d = int(a.ty.shape.values[-1])
    a2, back = _rows(bb, a)
    b2, _ = _rows(bb, b)
    gv = _EMITTER.kernel(bb, ("add_rms_norm", d, _name(eps)), lambda: decoder_kernels.add_rms_norm(d, eps))
    out = bb.emit(relax.call_tir(gv, [a2, b2, gamma], [a2.ty, a2.ty]))
    return relax.Tuple([_back(bb, back(bb.emit(relax.TupleGetItem(out, i))), dtype) for i in range(2)])


def _convert_rotary(bb, inputs, attr, params):
    """``qcompile::Rotary`` -> :func:`.decoder_kernels.rotary`, cos/sin viewed as [B|1, S, d]."""
    from tvm import relax  # noqa: PLC0415

    axis = int(attr.get("heads_axis", 1))
    x = inputs[0]
    b, *mid, d = x.ty.shape.values
    heads, seq = (mid[0], mid[1]) if axis == 1 else (mid[1], mid[0])
    d = int(d)
    tables = []
    for t in inputs[1:3]:
        dims = list(t.ty.shape.values)
        if len(dims) != 3:
            dims = [1, *dims] if len(dims) == 2 else [dims[0], *dims[2:]]
            t = bb.emit(relax.op.reshape(t, dims))
        tables.append(t)
    gv = _EMITTER.kernel(bb, ("rotary", d, axis), lambda: decoder_kernels.rotary(d, axis == 2))
    return bb.emit(relax.call_tir(gv, [x, *tables], relax.TensorType([b, heads, seq, d], "float32")))


def _convert_gated_act(bb, inputs, attr, params):
    """``qcompile::GatedAct`` -> :func:`.decoder_kernels.gated_act` over the rows of gate and up."""
    from tvm import relax  # noqa: PLC0415

    act = attr["activation"]
    act = act.decode() if isinstance(act, bytes) else str(act)
    gate, dtype = _as_f32(bb, inputs[0])
    up, _ = _as_f32(bb, inputs[1])
    n = int(gate.ty.shape.values[-1])
    gate2, back = _rows(bb, gate)
    up2, _ = _rows(bb, up)
    gv = _EMITTER.kernel(bb, ("gated_act", act, n), lambda: decoder_kernels.gated_act(n, act))
    return _back(bb, back(bb.emit(relax.call_tir(gv, [gate2, up2], gate2.ty))), dtype)


def _symbolic_range(fe, inputs, params):
    """``Range(start, limit, delta)`` with a constant integer delta, a symbolic limit (a dim such as
    ``sequence``) and a constant or symbolic start (optimum's ``arange(past, past + sequence)``) as
    ``arange(start, limit, delta)``: the length stays an expression of the input dims.  TVM's converter
    computes the length as a tensor and binds a new data-dependent var to it (``range_len_0``), which
    ``FuseOps`` cannot fuse across (VMShapeLower then fails: "has not been computed").  Returns ``None``
    when this does not apply.
    """
    import tvm  # noqa: PLC0415
    from tvm import relax  # noqa: PLC0415

    def symbolic(x):
        return tvm.ir.is_prim_expr(x) and str(getattr(x, "dtype", None) or x.ty) == "int64"

    start, limit, delta = (fe.get_constant(x, params) for x in inputs)
    if not symbolic(limit):
        return None
    consts = [c.value.numpy() for c in (start, delta) if isinstance(c, tvm.ir.GenericConst)]
    if symbolic(start):  # arange(past, past + sequence): optimum's cache_position
        consts.insert(0, np.array(0, np.int64))
    if len(consts) != 2 or any(c.size != 1 or c.dtype not in (np.int32, np.int64) for c in consts):
        return None
    start_v, delta_v = (int(c.reshape(())) for c in consts)
    if delta_v <= 0:
        return None
    return relax.op.arange(start if symbolic(start) else start_v, limit, delta_v, str(consts[0].dtype))


@contextlib.contextmanager
def _our_converters(emitter: _Emitter):
    """Make ``from_onnx`` convert qcompile's ops (it has no hook for custom domains but its map),
    and symbolic-length ``Range`` (:func:`_symbolic_range`); our kernels go through ``emitter``."""
    global _EMITTER  # noqa: PLW0603
    from tvm.relax.frontend.onnx import onnx_frontend as fe  # noqa: PLC0415

    class QMatMul(fe.OnnxOpConverter):
        _impl_v1 = staticmethod(_convert_qmatmul)

    class QConv(fe.OnnxOpConverter):
        _impl_v1 = staticmethod(_convert_qconv)

    class CausalAttention(fe.OnnxOpConverter):
        _impl_v1 = staticmethod(_convert_attention)

    class CacheUpdate(fe.OnnxOpConverter):
        _impl_v1 = staticmethod(_convert_cache_update)

    class RMSNorm(fe.OnnxOpConverter):
        _impl_v1 = staticmethod(_convert_rms_norm)

    class AddRMSNorm(fe.OnnxOpConverter):
        _impl_v1 = staticmethod(_convert_add_rms_norm)

    class Rotary(fe.OnnxOpConverter):
        _impl_v1 = staticmethod(_convert_rotary)

    class GatedAct(fe.OnnxOpConverter):
        _impl_v1 = staticmethod(_convert_gated_act)

    class Range(fe.Range):
        @classmethod
        def _impl_v12(cls, bb, inputs, attr, params):
            out = _symbolic_range(fe, inputs, params)
            return out if out is not None else super()._impl_v12(bb, inputs, attr, params)

    original = fe._get_convert_map  # noqa: SLF001

    def patched():
        table = original()
        table[qops.QMATMUL] = QMatMul
        table[qops.QCONV] = QConv
        table[qops.ATTENTION] = CausalAttention
        table[qops.CACHE_UPDATE] = CacheUpdate
        table[qops.RMSNORM] = RMSNorm
        table[qops.ADD_RMSNORM] = AddRMSNorm
        table[qops.ROTARY] = Rotary
        table[qops.GATED_ACT] = GatedAct
        table["Range"] = Range
        table.update(gap_converters(fe))
        return table

    _EMITTER = emitter
    fe._get_convert_map = patched  # noqa: SLF001
    try:
        yield
    finally:
        fe._get_convert_map = original  # noqa: SLF001
        _EMITTER = None


def lower_to_relax(model: onnx.ModelProto, int8_dot: bool = False, dot_kernels=None,
                   kernel_schedules: dict[str, dict] | None = None) -> LoweredModel:
    """Quantized ONNX -> Relax IRModule whose ``main`` takes (inputs..., params...).

    ``int8_dot``: quantized matmuls whose format allows it run on the int8 dot-product kernels
    (:mod:`.kernels_int8`, activations quantized to int8 per block of 32); the others, and all of
    them when False, on the float dequantizing kernels (:mod:`.kernels`).
    ``dot_kernels``: the module providing the int8 kernels (``TILE``, ``supports``, ``dot_planes``,
    ``int8_matmul``), :mod:`.kernels_int8` by default; the ARM target passes its ``sdot`` kernels.
    ``kernel_schedules``: kernel name -> knob config (``qcompile tune``'s records, :mod:`qcompile.targets.kernel_tuning`).
    """
    from tvm import relax  # noqa: PLC0415
    from tvm.relax.frontend.onnx import from_onnx  # noqa: PLC0415

    num_inputs = len(model.graph.input)
    dot = dot_kernels or kernels_int8
    split, names, params, layouts = _split_params(model, int8_dot, dot)
    # our custom-domain nodes make onnx.checker complain inside from_onnx; that is expected
    import warnings  # noqa: PLC0415

    emitter = _Emitter(int8_dot, dot, kernel_schedules)
    with _our_converters(emitter), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = from_onnx(split, keep_params_in_input=False)
    # the params are trusted (the runtime loads them from the hashed artifact): with "num_input" the VM
    # checks only the model's inputs on each call, not ~760 param tensors (measured: 570 -> 110 us a call)
    mod["main"] = mod["main"].with_attr("num_input", num_inputs)
    # our kernels take row views ([m, n]): the reshapes around them cancel in chains (~1 us a reshape a
    # call in the VM, ~30 a decoder layer before this)
    mod = relax.transform.RemoveRedundantReshape()(mod)
    mod = relax.transform.DeadCodeElimination()(mod)
    # and they travel as one tuple argument: one FFI argument instead of ~760 a call (110 -> 5 us)
    mod = relax.transform.BundleModelParams("params")(mod)
    log.info("lowered to Relax: %d functions, %d params; quantized matmul kernels %s",
             len(mod.functions), len(names), emitter.counts)
    return LoweredModel(mod, names, params, num_inputs, dict(emitter.counts), layouts, dict(emitter.quant))
