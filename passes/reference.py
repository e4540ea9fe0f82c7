"""Decode qcompile's quantized IR back into a float ONNX model (the numpy reference of every kernel).

Each ``qcompile::QMatMul`` becomes ``MatMul(X, B)`` with ``B = dequantize(W).T`` and each ``QConv`` a
``Conv`` with ``dequantize(W).reshape(N, C, kh, kw)``: onnxruntime then computes exactly what the compiled
module computes (up to float32 summation order).  Used by tests, by ``--emit-onnx``-style interop and by
the quality benchmark to score the stored weights with a reference executor.
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

from . import qops
from .formats import QuantizedWeight, WeightFormat

__all__ = ["decode_to_float"]


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def decode_to_float(qmodel: onnx.ModelProto) -> onnx.ModelProto:
    """A float copy of ``qmodel`` with every qcompile op replaced by its standard equivalent."""
    model = onnx.ModelProto.FromString(qmodel.SerializeToString())
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    used_by_q: set[str] = set()
    nodes = []
    for node in graph.node:
        if node.domain != qops.DOMAIN:
            nodes.append(node)
            continue
        a = _attrs(node)
        fmt = WeightFormat(int(a["bits"]), int(a["group_size"]))
        n, k = int(a["N"]), int(a["K"])
        planes = [numpy_helper.to_array(inits[name]) for name in node.input[1:3] if name]
        scales, zeros = (numpy_helper.to_array(inits[name]) for name in node.input[3:5])
        codes = fmt.unpack(planes, (n, k))
        w = QuantizedWeight(fmt, codes, scales, zeros).dequantize()
        used_by_q.update(x for x in node.input[1:5] if x)
        wname = f"{node.name or node.output[0]}.decoded"
        if node.op_type == qops.QMATMUL:
            graph.initializer.append(numpy_helper.from_array(w.T.copy(), wname))
            nodes.append(helper.make_node("MatMul", [node.input[0], wname], list(node.output), name=node.name))
        elif node.op_type == qops.QCONV:
            c = k // (a["kernel_shape"][0] * a["kernel_shape"][1])
            graph.initializer.append(numpy_helper.from_array(
                w.reshape(n, c, *a["kernel_shape"]).copy(), wname))
            bias = [node.input[5]] if len(node.input) > 5 and node.input[5] else []
            nodes.append(helper.make_node("Conv", [node.input[0], wname, *bias], list(node.output), name=node.name,
                                          kernel_shape=a["kernel_shape"], strides=a["strides"], pads=a["pads"],
                                          dilations=a["dilations"]))
        else:
            raise ValueError(f"{node.name}: unknown qcompile op {node.op_type}")
    del graph.node[:]
    graph.node.extend(nodes)
    keep = [t for t in graph.initializer if t.name not in used_by_q]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    del model.opset_import[:]
    model.opset_import.extend([o for o in qmodel.opset_import if o.domain != qops.DOMAIN])
    return model
