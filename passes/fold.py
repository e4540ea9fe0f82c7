"""Constant folding, including shape arithmetic on the static dims of dynamically shaped tensors.

Exporters (onnx2torch, tf2onnx, torch) compute padding and reshape targets at run time::

    pads = Concat(Unsqueeze((Gather(Shape(x), 2) + k - 1) // s ...), ...)   ->   Pad(x, pads)

TVM's ``from_onnx`` needs such inputs as constants ("Dynamic pads are not supported yet").  When the
gathered dims of ``x`` are static (only the batch is symbolic), ``Gather(Shape(x), i)`` is a constant;
:class:`FoldShapeGathersPass` replaces it by one and onnxscript's constant folder evaluates the rest.
Folding a Pad's pads gives its output a static shape, which can make further gathers static: the
caller iterates with shape inference (:func:`fold_constants`).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

__all__ = ["FoldShapeGathersPass", "fold_constants"]

log = logging.getLogger(__name__)

MAX_ROUNDS = 4
"""Fold / infer-shapes rounds; each round can make one more level of shape arithmetic static."""


class FoldShapeGathersPass(ir.passes.InPlacePass):
    """``Gather(Shape(x), idx, axis=0)`` with constant ``idx`` and static ``x.shape[idx]`` -> a constant."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        folded = 0
        for node in list(model.graph):
            if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
                continue
            value = self._static_dims(node)
            if value is None:
                continue
            out = node.outputs[0]
            name = f"{out.name}.folded"
            const = ir.Value(name=name, shape=ir.Shape(value.shape), type=ir.TensorType(ir.DataType.INT64),
                             const_value=ir.tensor(value, name=name))
            model.graph.register_initializer(const)
            ir.convenience.replace_all_uses_with(out, const, replace_graph_outputs=False)
            folded += 1
        log.debug("folded %d Gather(Shape) nodes", folded)
        return ir.passes.PassResult(model, modified=bool(folded))

    @staticmethod
    def _static_dims(node: ir.Node) -> np.ndarray | None:
        attr = node.attributes.get("axis")
        if attr is not None and attr.value != 0:
            return None
        src = node.inputs[0].producer() if node.inputs[0] is not None else None
        if src is None or src.op_type != "Shape" or src.domain not in ("", "ai.onnx") or src.attributes:
            return None  # Shape with start/end: left to the generic folder
        shape = src.inputs[0].shape
        idx = ir.convenience.get_const_tensor(node.inputs[1]) if node.inputs[1] is not None else None
        if shape is None or idx is None or node.outputs[0].is_graph_output():
            return None
        idx = idx.numpy().astype(np.int64)
        rank = len(shape)
        if np.any((idx < -rank) | (idx >= rank)):
            return None
        dims = [shape[int(i)] for i in (idx % rank).reshape(-1)]
        if not all(isinstance(d, int) for d in dims):
            return None
        return np.array(dims, dtype=np.int64).reshape(idx.shape)


def _force_small_constant_of_shape(node: ir.Node) -> bool | None:
    # onnxscript keeps ConstantOfShape by default (it can make large tensors); its output-size limit
    # still applies, and a constant Pad or Reshape input is what TVM needs.
    return True if node.op_type == "ConstantOfShape" and node.domain in ("", "ai.onnx") else None


def fold_constants(model: ir.Model) -> bool:
    """Fold constant subgraphs of ``model`` in place, shape arithmetic on static dims included.

    Returns whether anything changed.  Shapes are re-inferred between rounds.
    """
    from onnxscript import optimizer  # noqa: PLC0415

    changed = False
    for _ in range(MAX_ROUNDS):
        ir.passes.common.ShapeInferencePass()(model)
        gathers = FoldShapeGathersPass()(model).modified
        folded = optimizer.fold_constants(model, should_fold=_force_small_constant_of_shape).modified
        ir.passes.common.RemoveUnusedNodesPass()(model)
        if not (gathers or folded):
            break
        changed = True
    log.info("constant folding %s the model", "changed" if changed else "did not change")
    return changed
