"""Apply an allocation: replace each quantized weight by packed initializers and a qcompile op.

MatMul(X, B)           -> QMatMul(X, W0, W1?, scales, zeros)
Gemm(X, B, C?)         -> QMatMul(...) then Add(C)        (transA=0, alpha=1, beta=1 only)
Conv(X, W, B?)         -> QConv(X, W0, W1?, scales, zeros, B?)

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
from .formats import QuantizedWeight, StorageBits, WeightFormat
from .quantizable import QuantTarget, node_attr as _attr

Quantizer = Callable[[QuantTarget, WeightFormat, np.ndarray], tuple[QuantizedWeight, float]]

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
    format: WeightFormat
    storage: StorageBits
    initializers: tuple[str, ...]
    rel_error: float
    """The error of the stored weight in the run's error measure (see :mod:`.measure`)."""


def rtn_quantizer(t: QuantTarget, fmt: WeightFormat, w: np.ndarray) -> tuple[QuantizedWeight, float]:
    """Round-to-nearest (the format's clip search); error = relative weight error ||dW||^2 / ||W||^2."""
    q = fmt.quantize(w)
    err = float(np.sum((w.astype(np.float64) - q.dequantize()) ** 2))
    return q, err / max(float(np.sum(w.astype(np.float64) ** 2)), 1e-30)


class QuantizePass(ir.passes.InPlacePass):
    """Quantize the planned weights of a model in place (one op rewrite per weight)."""

    def __init__(
        self,
        targets: list[QuantTarget],
        plan: Mapping[str, WeightFormat],
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

    def _rewrite(self, graph: ir.Graph, node: ir.Node, t: QuantTarget, fmt: WeightFormat) -> None:
        wvalue = node.inputs[1]
        w = t.matrix(wvalue.const_value.numpy())
        q, err = self.quantizer(t, fmt, w)
        if self.keep_dequantized:
            self.dequantized[t.name] = q.dequantize()
        arrays = {f"{t.name}.q{i}": p for i, p in enumerate(fmt.pack(q.codes))}
        arrays[f"{t.name}.scales"] = q.scales
        arrays[f"{t.name}.zeros"] = q.zeros
        values = {}
        for name, a in arrays.items():
            v = ir.Value(name=name, const_value=ir.tensor(a, name=name))
            graph.register_initializer(v)
            values[name] = v
        planes = [values[f"{t.name}.q{i}"] for i in range(len(fmt.planes))]
        qin = [planes[0], planes[1] if len(planes) > 1 else None,
               values[f"{t.name}.scales"], values[f"{t.name}.zeros"]]
        n, k = t.shape
        attrs = {"bits": fmt.bits, "group_size": fmt.group_size, "N": n, "K": k}
        x = node.inputs[0]
        if t.op == "Conv":
            kshape = list(t.onnx_shape[2:])
            rank = len(kshape)
            conv = {
                "kernel_shape": kshape,
                "strides": list(_attr(node, "strides", [1] * rank)),
                "pads": list(_attr(node, "pads", [0] * 2 * rank)),
                "dilations": list(_attr(node, "dilations", [1] * rank)),
            }
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            new = [ir.node(qops.QCONV, [x, *qin, bias], {**attrs, **conv}, domain=qops.DOMAIN,
                           name=node.name, outputs=None, num_outputs=1)]
        else:
            mm = ir.node(qops.QMATMUL, [x, *qin], attrs, domain=qops.DOMAIN, name=node.name, num_outputs=1)
            new = [mm]
            bias = node.inputs[2] if t.op == "Gemm" and len(node.inputs) > 2 else None
            if bias is not None:
                new.append(ir.node("Add", [mm.outputs[0], bias], name=f"{node.name}.bias", num_outputs=1))
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

