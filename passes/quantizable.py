"""Which weights get quantized, and how each is viewed as a [N, K] matrix.

Policy, in order (each rule logs why at DEBUG):
1. eligibility: an initializer that is MatMul's B (rank 2), Gemm's B (transA=0, alpha=1), or a 2-D
   Conv's weight with group=1, used by exactly one node, float, with at least ``min_weights`` elements;
2. shape fallback: some format must support its [N, K] view (K divisible by a group size), else it
   stays float and is reported as such.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .formats import formats_for

__all__ = ["QuantTarget", "find_quantizable", "DEFAULT_MIN_WEIGHTS"]

log = logging.getLogger(__name__)

DEFAULT_MIN_WEIGHTS = 16384
"""Below this many elements a weight stays float: too small to matter for size, often sensitive."""

_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


@dataclass(frozen=True)
class QuantTarget:
    """A weight to quantize: initializer ``name`` consumed by ``node`` (op ``op``).

    ``transpose``: the [N, K] view is ``W.T`` (MatMul/Gemm with B as [K, N]); Conv weights are
    reshaped [Cout, Cin*kh*kw].
    """

    name: str
    node: str
    op: str
    onnx_shape: tuple[int, ...]
    transpose: bool

    @property
    def shape(self) -> tuple[int, int]:
        """The [N, K] view's shape."""
        if self.op == "Conv":
            return self.onnx_shape[0], int(np.prod(self.onnx_shape[1:]))
        k, n = self.onnx_shape if self.transpose else self.onnx_shape[::-1]
        return n, k

    @property
    def n_weights(self) -> int:
        return int(np.prod(self.onnx_shape))

    def matrix(self, array: np.ndarray) -> np.ndarray:
        """The initializer's value as a float32 [N, K] matrix."""
        a = np.asarray(array, dtype=np.float32)
        if self.op == "Conv":
            return np.ascontiguousarray(a.reshape(a.shape[0], -1))
        return np.ascontiguousarray(a.T if self.transpose else a)

    def onnx_array(self, matrix: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`matrix`: a [N, K] matrix in the initializer's own layout (float32)."""
        m = np.asarray(matrix, dtype=np.float32)
        if m.shape != self.shape:
            raise ValueError(f"{self.name}: expected a [N, K] = {self.shape} matrix, got {m.shape}")
        if self.op == "Conv":
            return np.ascontiguousarray(m.reshape(self.onnx_shape))
        return np.ascontiguousarray(m.T if self.transpose else m)


def node_attr(node: ir.Node, name: str, default):
    """The value of attribute ``name`` of ``node``, or ``default``."""
    a = node.attributes.get(name)
    return default if a is None else a.value


def _weight_slot(node: ir.Node) -> tuple[int, bool] | None:
    """(input index of the weight, transpose) if this node's op can take a quantized weight."""
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "MatMul":
        return 1, True
    if node.op_type == "Gemm":
        if node_attr(node, "transA", 0) != 0 or node_attr(node, "alpha", 1.0) != 1.0:
            log.debug("%s: Gemm with transA/alpha stays float", node.name)
            return None
        if len(node.inputs) > 2 and node.inputs[2] is not None and node_attr(node, "beta", 1.0) != 1.0:
            log.debug("%s: Gemm with beta != 1 stays float", node.name)
            return None
        return 1, not node_attr(node, "transB", 0)
    if node.op_type == "Conv":
        if node_attr(node, "group", 1) != 1:
            log.debug("%s: grouped/depthwise Conv stays float", node.name)
            return None
        if node_attr(node, "auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
            log.debug("%s: Conv with auto_pad stays float", node.name)
            return None
        return 1, False
    return None


def find_quantizable(model: ir.Model, min_weights: int = DEFAULT_MIN_WEIGHTS) -> list[QuantTarget]:
    """Every weight of ``model`` that will be quantized, in graph order."""
    found: list[QuantTarget] = []
    for node in model.graph:
        slot = _weight_slot(node)
        if slot is None or len(node.inputs) <= slot[0]:
            continue
        value = node.inputs[slot[0]]
        if value is None or value.const_value is None or not value.is_initializer():
            log.debug("%s: weight is not an initializer", node.name)
            continue
        shape = tuple(int(d) for d in value.const_value.shape)
        want_rank = 4 if node.op_type == "Conv" else 2
        if len(shape) != want_rank:
            log.debug("%s: weight %s has rank %d (need %d)", node.name, value.name, len(shape), want_rank)
            continue
        if value.const_value.dtype not in _FLOATS:
            continue
        if len(value.uses()) != 1 or value.is_graph_output():
            log.debug("%s: weight %s is shared; stays float", node.name, value.name)
            continue
        target = QuantTarget(value.name, node.name or node.op_type, node.op_type, shape, slot[1])
        if target.n_weights < min_weights:
            log.debug("%s: %s has %d < %d weights; stays float", node.name, value.name,
                      target.n_weights, min_weights)
            continue
        if not formats_for(target.shape):
            log.debug("%s: no format fits [N, K] = %s; stays float", node.name, target.shape)
            continue
        found.append(target)
    log.info("%d quantizable weights, %d parameters", len(found), sum(t.n_weights for t in found))
    return found
