"""Converters for standard ONNX forms that TVM 0.27's ``from_onnx`` mishandles, met in exported decoders.

torch's exporters compute sequence lengths from the inputs' shapes (``Shape -> Squeeze/Gather -> Add ->
Reshape/Unsqueeze -> Concat``). TVM's converters keep such scalars symbolic (a PrimExpr such as
``past + sequence``) and 1-D shapes as ``ShapeExpr``, but not every converter accepts them. Each class here
handles its form and defers to TVM's converter otherwise.

``Reshape``
  - ``Reshape(scalar, [1] | [-1])`` -> the 1-D shape ``[scalar]`` (TVM's Unsqueeze does the same for
    axis 0); ``Reshape(scalar, [])`` -> the scalar. (torch.onnx dynamo: ``sym_size + sym_size`` reshaped.)
  - a ``-1`` in a symbolic new shape is resolved by cancelling dims: data ``[b, 4, p + s, 16]`` to
    ``[-1, p + s, 16]`` gives ``4 b``. TVM divides the products instead, ``b (p + s) 64 // (16 p + 16 s)``,
    which its simplifier cannot reduce and LLVM codegen then rejects ("Binding of variable rmod ...
    conflicts"). The product of the data dims left after removing each known new dim (equal as
    expressions; integer constants multiply into one factor) is the ``-1``: exact whenever every
    symbolic new dim is found among the data dims, else TVM's form is kept.

:func:`gap_converters` returns them by op type for ``from_onnx``'s convert map.
"""

from __future__ import annotations

import functools
import operator

import numpy as np

__all__ = ["gap_converters", "infer_minus_one"]


def infer_minus_one(data_dims: list, new_dims: list):
    """The dim that ``-1`` in ``new_dims`` stands for, by cancellation (module docstring), or None.

    ``new_dims`` holds exactly one ``-1`` (an int or IntImm) and no zeros; both lists hold ints/PrimExprs.
    """
    from tvm import tirx  # noqa: PLC0415
    from tvm.sym import Analyzer  # noqa: PLC0415

    def const(d):
        return int(d) if isinstance(d, int) else (int(d.value) if isinstance(d, tirx.IntImm) else None)

    data_const, rest = 1, []
    for d in data_dims:
        c = const(d)
        if c is None:
            rest.append(d)
        else:
            data_const *= c
    new_const, analyzer = 1, Analyzer()
    for d in new_dims:
        c = const(d)
        if c == -1:
            continue
        if c is not None:
            new_const *= c
            continue
        match = next((i for i, r in enumerate(rest) if analyzer.can_prove_equal(r, d)), None)
        if match is None:
            return None
        rest.pop(match)
    if new_const == 0 or data_const % new_const:
        return None
    factors = [tirx.IntImm("int64", data_const // new_const), *rest]
    return functools.reduce(operator.mul, factors)


def gap_converters(fe) -> dict[str, type]:
    """Op type -> converter class, built on the ``onnx_frontend`` module ``fe``."""
    import tvm  # noqa: PLC0415
    from tvm import relax, tirx  # noqa: PLC0415

    def dims_of(shape):
        """The new shape as a list of ints / PrimExprs, or None if it is not known at conversion."""
        if isinstance(shape, tvm.ir.GenericConst):
            return [int(v) for v in np.asarray(shape.value.numpy()).reshape(-1)]
        if isinstance(shape, relax.ShapeExpr):
            return list(shape.values)
        return None

    class Reshape(fe.Reshape):
        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            data, shape = inputs[0], fe.get_constant(inputs[1], params)
            new = dims_of(shape)
            if new is not None and tvm.ir.is_prim_expr(data):
                if new == []:
                    return data
                if len(new) == 1 and isinstance(shape, tvm.ir.GenericConst) and new[0] in (1, -1):
                    return relax.ShapeExpr([data])
            out = cls._cancelled(data, new, attr.get("allowzero", 0))
            return out if out is not None else super()._impl_v13(bb, inputs, attr, params)

        @staticmethod
        def _cancelled(data, new, allowzero):
            ty = getattr(data, "ty", None)
            if new is None or not isinstance(ty, relax.TensorType) or not isinstance(ty.shape, relax.ShapeExpr):
                return None
            old = list(ty.shape.values)
            if not allowzero:
                new = [old[i] if isinstance(d, int | tirx.IntImm) and int(d) == 0 else d for i, d in enumerate(new)]
            minus = [i for i, d in enumerate(new) if isinstance(d, int | tirx.IntImm) and int(d) == -1]
            if len(minus) != 1 or all(isinstance(d, int | tirx.IntImm) for d in new + old):
                return None  # nothing symbolic to resolve: TVM's converter is exact
            dim = infer_minus_one(old, new)
            if dim is None:
                return None
            new[minus[0]] = dim
            return relax.op.reshape(data, relax.ShapeExpr([tirx.IntImm("int64", d) if isinstance(d, int) else d
                                                           for d in new]))

    return {"Reshape": Reshape}
