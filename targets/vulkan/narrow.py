"""int64 and bool tensors as int32 in ``main``, before legalization, for WGSL (no 64- or 8-bit types).

TVM's ``ForceNarrowIndexToInt32`` narrows index arithmetic but refuses int64 buffers, and ONNX models
carry int64 data: token ids, position ids, attention masks, gather indices normalized against shapes.
This pass rebuilds ``main`` so that no int64 tensor reaches a kernel boundary:

- int64 parameters (model inputs) become int32: the runtime narrows the caller's arrays on upload
  (values must fit) and widens int64 outputs on download;
- int64 constants become int32 constants (values must fit);
- a call whose result is an int64 tensor is followed by ``astype(int32)`` that replaces it everywhere:
  the int64 value lives only inside the kernel that FuseOps makes of the pair;
- ``shape_to_tensor`` (a VM builtin, no kernel) becomes an int32 constant, or a small kernel taking the
  symbolic dims as scalars;
- bool results are held as int32 the same way, and cast back to bool in front of each consumer (the cast
  fuses into the consumer's kernel);
- an int32 tensor going to an operator that needs int64 (``tensor_to_shape``) is cast back.
"""

from __future__ import annotations

import logging

import numpy as np

__all__ = ["narrow_int64"]

log = logging.getLogger(__name__)

_NEEDS_INT64 = {"relax.tensor_to_shape"}
# views and data movement: the int32 holding a bool goes through them (its cast goes to a computing consumer)
_VIEWS = ("relax.reshape", "relax.expand_dims", "relax.squeeze", "relax.flatten", "relax.take",
          "relax.strided_slice", "relax.permute_dims", "relax.broadcast_to", "relax.tile", "relax.repeat")


def _is_int64_tensor(ty) -> bool:
    return type(ty).__name__ == "TensorType" and str(ty.dtype) in _NARROWED


_NARROWED = ("int64", "bool")  # kept as int32 between kernels (WGSL storage has neither 64- nor 8-bit types)


def narrow_int64(mod):
    """``mod`` with ``main`` rebuilt without int64 tensors (module docstring)."""
    import tvm  # noqa: PLC0415
    from tvm import relax  # noqa: PLC0415

    main = mod["main"]
    if not _has_int64(main):
        return mod
    bb = relax.BlockBuilder()
    remap: dict = {}
    was_bool: set = set()  # int32 vars holding a bool tensor
    params = []
    for p in main.params:
        ty = p.ty
        new = relax.Var(str(p.name), relax.TensorType(ty.shape, "int32") if _is_int64_tensor(ty) else ty)
        remap[p] = new
        params.append(new)
        if type(ty).__name__ == "TensorType" and str(ty.dtype) == "bool":
            was_bool.add(new)
    narrowed = 0

    def arg(a, op_name: str):
        if isinstance(a, relax.Var):
            a = remap.get(a, a)
            if op_name in _NEEDS_INT64 and type(a.ty).__name__ == "TensorType" and str(a.ty.dtype) == "int32":
                return bb.emit(relax.op.astype(a, "int64"))
            if a in was_bool and op_name not in ("", "relax.astype", *_VIEWS):  # fuses into the consumer's kernel
                return bb.emit(relax.op.astype(a, "bool"))
            return a
        if isinstance(a, tvm.ir.GenericConst) and str(a.value.dtype) == "bool" and op_name:
            return bb.emit(relax.op.astype(relax.const(a.value.numpy().astype(np.int32), "int32"), "bool"))
        if isinstance(a, tvm.ir.GenericConst) and str(a.value.dtype) == "int64":
            v = a.value.numpy()
            if v.size and (v.min() < np.iinfo(np.int32).min or v.max() > np.iinfo(np.int32).max):
                raise ValueError(f"an int64 constant of main does not fit in int32 ({v.min()}..{v.max()})")
            return relax.const(v.astype(np.int32), "int32")
        if isinstance(a, relax.Tuple):
            return relax.Tuple([arg(f, op_name) for f in a.fields])
        return a

    def value(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op) and e.op.name == "relax.shape_to_tensor":
            return _shape_tensor(bb, e.args[0])
        if isinstance(e, relax.Call):
            name = e.op.name if isinstance(e.op, tvm.ir.Op) else ""
            return relax.Call(e.op, [arg(a, name) for a in e.args], e.attrs, e.ty_args)
        if isinstance(e, relax.TupleGetItem):
            return relax.TupleGetItem(arg(e.tuple_value, ""), e.index)
        return arg(e, "")

    with bb.function("main", params, attrs={k: main.attrs[k] for k in main.attrs.keys()}):
        body = main.body
        out = None
        for block in body.blocks:
            dataflow = isinstance(block, relax.DataflowBlock)
            ctx = bb.dataflow() if dataflow else _Null()
            with ctx:
                for b in block.bindings:
                    if not isinstance(b, relax.VarBinding):
                        raise NotImplementedError(f"narrow_int64: binding {type(b).__name__} in main")
                    is_output = dataflow and not isinstance(b.var, relax.DataflowVar)
                    v = bb.normalize(value(b.value))
                    boolean = type(v.ty).__name__ == "TensorType" and str(v.ty.dtype) == "bool" or (
                        isinstance(b.value, relax.Call) and isinstance(b.value.op, tvm.ir.Op)
                        and b.value.op.name in _VIEWS and remap.get(b.value.args[0]) in was_bool)
                    if _is_int64_tensor(v.ty):
                        v = bb.emit(v)
                        v = relax.op.astype(v, "int32")
                        narrowed += 1
                    new = bb.emit_output(v) if is_output else bb.emit(v)
                    remap[b.var] = new
                    if boolean:
                        was_bool.add(new)
        out = arg(body.body, "")
        bb.emit_func_output(out)
    result = bb.get()
    for gv, func in mod.functions.items():
        if gv.name_hint != "main":
            result[gv] = func
    if mod.attrs:
        result = result.with_attrs(mod.attrs)
    log.info("int64/bool -> int32 for WGSL: %d results narrowed in main", narrowed)
    return result


def _shape_tensor(bb, shape):
    """int32 [n] tensor of a shape's values: a constant, or a kernel of the symbolic dims (tir_vars)."""
    from tvm import relax, te, tirx  # noqa: PLC0415

    dims = list(shape.values) if isinstance(shape, relax.ShapeExpr) else list(shape.ty.values)
    if all(type(d).__name__ == "IntImm" for d in dims):
        return relax.const(np.array([int(d) for d in dims], np.int32), "int32")
    params = [tirx.Var(f"d{i}", "int64") for i in range(len(dims))]

    def pick(i):
        out = tirx.Cast("int32", params[-1])
        for j in range(len(params) - 2, -1, -1):
            out = tirx.Select(i == j, tirx.Cast("int32", params[j]), out)
        return out

    out = te.compute((tirx.const(len(dims), "int64"),), pick, name="shape")
    # call_tir passes its arguments (the dims) first, then the output
    func = te.create_prim_func([*params, out]).without_attr("global_symbol").with_attr("op_pattern", 8)
    gv = bb.add_func(func, f"shape_to_tensor{len(dims)}")
    return relax.call_tir(gv, relax.Tuple(dims), relax.TensorType([len(dims)], "int32"))


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _has_int64(func) -> bool:
    from tvm import relax  # noqa: PLC0415

    found = [False]

    def visit(e):
        ty = getattr(e, "ty", None)
        if isinstance(e, relax.Var) and ty is not None and _is_int64_tensor(ty):
            found[0] = True

    relax.analysis.post_order_visit(func, visit)
    return found[0]
