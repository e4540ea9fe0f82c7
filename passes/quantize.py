"""Apply an allocation: replace each quantized weight by packed initializers and a qcompile op.

MatMul(X, B)           -> QMatMul(X, W0, W1?, scales, zeros)
Gemm(X, B, C?)         -> QMatMul(...) then Add(C)        (transA=0, alpha=1, beta=1 only)
Conv(X, W, B?)         -> QConv(X, W0, W1?, scales, zeros, B?)
MatMul/Gemm in a split format (:mod:`.salient`):
                       -> QMatMul(Gather(X, Cast(hi.index), axis=-1), hi...)
                          + QMatMul(Gather(X, Cast(lo.index), axis=-1), lo...)   [then Add(C)]

The packed initializers use the canonical packing of :mod:`.formats`; every stored bit is recorded
per tensor in :attr:`QuantizePass.records`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from . import qops
from .formats import QuantizedWeight, StorageBits
from .salient import AnyFormat, SplitWeight
from .quantizable import QuantTarget, node_attr as _attr

Quantizer = Callable[[QuantTarget, AnyFormat, np.ndarray], tuple[QuantizedWeight | SplitWeight, float]]

__all__ = ["QuantizePass", "QuantRecord", "Quantizer", "rtn_quantizer"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class QuantRecord:
    """What was stored for one weight: format, [N, K] view, itemized bits, initializer names."""

    name: str
    op: str
    onnx_shape: tuple[int, ...]
    shape: tuple[int, int]
    onnx_layout: str  # how the ONNX weight maps to [N, K]: "KN" (transposed), "NK", or "conv"
    format: AnyFormat
    storage: StorageBits
    initializers: tuple[str, ...]
    rel_error: float
    """The error of the stored weight in the run's error measure (see :mod:`.measure`)."""


def rtn_quantizer(t: QuantTarget, fmt: AnyFormat, w: np.ndarray) -> tuple[QuantizedWeight | SplitWeight, float]:
    """Round-to-nearest (the format's clip search); error = relative weight error ||dW||^2 / ||W||^2."""
    q = fmt.quantize(w)
    err = float(np.sum((w.astype(np.float64) - q.dequantize()) ** 2))
    return q, err / max(float(np.sum(w.astype(np.float64) ** 2)), 1e-30)


class QuantizePass(ir.passes.InPlacePass):
    """Quantize the planned weights of a model in place (one op rewrite per weight)."""

    def __init__(
        self,
        targets: list[QuantTarget],
        plan: Mapping[str, AnyFormat],
        quantizer: Quantizer | None = None,
        keep_dequantized: bool = False,
        progress: Callable[[int], None] | None = None,
    ):
        super().__init__()
        self.targets = [t for t in targets if t.name in plan]
        self.plan = plan
        self.quantizer = quantizer or rtn_quantizer
        self.keep_dequantized = keep_dequantized
        self.progress = progress
        self.records: list[QuantRecord] = []
        self.dequantized: dict[str, np.ndarray] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for i, t in enumerate(self.targets):
            node = graph.initializers[t.name].uses()[0].node  # eligibility guarantees one use
            self._rewrite(graph, node, t, self.plan[t.name])
            if self.progress:
                self.progress(i + 1)
        if self.targets:
            model.opset_imports[qops.DOMAIN] = qops.OPSET
        log.info("quantized %d weights (%d parameters)", len(self.records),
                 sum(int(np.prod(r.onnx_shape)) for r in self.records))
        return ir.passes.PassResult(model, modified=bool(self.targets))

    def _rewrite(self, graph: ir.Graph, node: ir.Node, t: QuantTarget, fmt: AnyFormat) -> None:
        wvalue = node.inputs[1]
        w = t.matrix(wvalue.const_value.numpy())
        q, err = self.quantizer(t, fmt, w)
        if self.keep_dequantized:
            self.dequantized[t.name] = q.dequantize()
        arrays: dict[str, np.ndarray] = {}

        def constant(name: str, a: np.ndarray) -> ir.Value:
            arrays[name] = a
            v = ir.Value(name=name, const_value=ir.tensor(a, name=name))
            graph.register_initializer(v)
            return v

        def packed(prefix: str, qw: QuantizedWeight) -> list[ir.Value | None]:
            planes = [constant(f"{prefix}.q{i}", p) for i, p in enumerate(qw.format.pack(qw.codes))]
            return [planes[0], planes[1] if len(planes) > 1 else None,
                    constant(f"{prefix}.scales", qw.scales), constant(f"{prefix}.zeros", qw.zeros)]

        def qmatmul(x: ir.Value, qw: QuantizedWeight, name: str) -> ir.Node:
            n, k = qw.codes.shape
            attrs = {"bits": qw.format.bits, "group_size": qw.format.group_size, "N": n, "K": k}
            return ir.node(qops.QMATMUL, [x, *packed(name, qw)], attrs, domain=qops.DOMAIN, name=name,
                           num_outputs=1)

        x = node.inputs[0]
        if t.op == "Conv":
            if isinstance(q, SplitWeight):
                raise ValueError(f"{t.name}: split formats are for MatMul/Gemm weights, not Conv")
            kshape = list(t.onnx_shape[2:])
            rank = len(kshape)
            n, k = t.shape
            attrs = {"bits": fmt.bits, "group_size": fmt.group_size, "N": n, "K": k,
                     "kernel_shape": kshape,
                     "strides": list(_attr(node, "strides", [1] * rank)),
                     "pads": list(_attr(node, "pads", [0] * 2 * rank)),
                     "dilations": list(_attr(node, "dilations", [1] * rank))}
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            new = [ir.node(qops.QCONV, [x, *packed(t.name, q), bias], attrs, domain=qops.DOMAIN,
                           name=node.name, num_outputs=1)]
        elif isinstance(q, SplitWeight):
            new = []
            parts = []
            for part, qw, idx in (("hi", q.hi, q.index_hi), ("lo", q.lo, q.index_lo)):
                index = constant(f"{t.name}.{part}.index", idx)
                cast = ir.node("Cast", [index], {"to": ir.DataType.INT32}, name=f"{node.name}.{part}.index",
                               num_outputs=1)
                gather = ir.node("Gather", [x, cast.outputs[0]], {"axis": -1}, name=f"{node.name}.{part}.gather",
                                 num_outputs=1)
                mm = qmatmul(gather.outputs[0], qw, f"{t.name}.{part}")
                mm.name = f"{node.name}.{part}"
                new += [cast, gather, mm]
                parts.append(mm.outputs[0])
            new.append(ir.node("Add", parts, name=f"{node.name}.sum", num_outputs=1))
        else:
            mm = qmatmul(x, q, t.name)
            mm.name = node.name
            new = [mm]
        bias = node.inputs[2] if t.op == "Gemm" and len(node.inputs) > 2 else None
        if bias is not None:
            new.append(ir.node("Add", [new[-1].outputs[0], bias], name=f"{node.name}.bias", num_outputs=1))
        ir.convenience.replace_nodes_and_values(graph, node, [node], new, list(node.outputs),
                                                [new[-1].outputs[0]])
        if not wvalue.uses():
            graph.initializers.pop(wvalue.name, None)
        storage = fmt.storage_bits(t.shape)
        stored = sum(a.nbytes * 8 for a in arrays.values())
        if stored != storage.total:
            raise AssertionError(f"{t.name}: stored {stored} bits, format says {storage.total}")
        layout = "conv" if t.op == "Conv" else ("KN" if t.transpose else "NK")
        self.records.append(QuantRecord(t.name, t.op, t.onnx_shape, t.shape, layout, fmt, storage,
                                        tuple(arrays), err))
