"""The manifest of a compiled artifact (DESIGN.md §3): I/O, target, per-tensor storage, the bpw report."""

from __future__ import annotations

import numpy as np
import onnx

from qcompile.passes.quantize import QuantRecord

__all__ = ["build_manifest"]


def _value_info(v: onnx.ValueInfoProto) -> dict:
    tt = v.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    return {"name": v.name, "dtype": str(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)), "shape": dims}


def build_manifest(proto, spec, opts, records: list[QuantRecord], targets, lowered, float_weights: bool, *,
              heads: set[str], candidates: dict, error_measure: str) -> dict:
    import tvm  # noqa: PLC0415

    from qcompile.compiler import __version__  # noqa: PLC0415

    body = [r for r in records if r.name not in heads]
    head = [r for r in records if r.name in heads]
    qbits = sum(r.storage.total for r in body)
    qweights = sum(int(np.prod(r.onnx_shape)) for r in body)
    if float_weights:
        fbits = sum(t.n_weights * 32 for t in targets)
        achieved = 32.0 if targets else 0.0
        qbits, qweights = fbits, sum(t.n_weights for t in targets)
    else:
        achieved = qbits / qweights if qweights else 0.0
    param_bits = sum(a.nbytes * 8 for a in lowered.params.values())
    n_params = sum(int(np.prod(r.onnx_shape)) for r in records) + sum(
        a.size for n, a in lowered.params.items() if not any(n in r.initializers for r in records))
    return {
        "qcompile_version": __version__,
        "tvm_version": tvm.__version__,
        "model": {"producer": proto.producer_name, "opset": max((o.version for o in proto.opset_import
                                                                  if o.domain in ("", "ai.onnx")), default=0)},
        "target": spec.to_manifest(),
        "inputs": [_value_info(v) for v in proto.graph.input],
        "outputs": [_value_info(v) for v in proto.graph.output],
        "params": lowered.param_names,
        "params_as_tuple": True,  # main(inputs..., (params...)): see targets/x86/lower.py
        "bpw": {
            "target": opts.bpw,
            "achieved": achieved,
            "float_weights": float_weights,
            "quantized_weights": qweights,
            "storage_bits": qbits,
            "file_bits_per_param": param_bits / n_params if n_params else 0.0,
            "head": {"tensors": [r.name for r in head], "weights": sum(int(np.prod(r.onnx_shape)) for r in head),
                     "storage_bits": sum(r.storage.total for r in head)},
        },
        "error_measure": error_measure,
        "tensors": [
            {
                "name": r.name,
                "op": r.op,
                "onnx_shape": list(r.onnx_shape),
                "shape": list(r.shape),
                "onnx_layout": r.onnx_layout,
                "format": r.format.name,
                "bits": r.format.bits,
                "group_size": r.format.group_size,
                "storage_bits": {"codes": r.storage.codes, "scales": r.storage.scales,
                                 "zeros": r.storage.zeros, "index": r.storage.index,
                                 "total": r.storage.total},
                "params": list(r.initializers),
                "rel_error": r.rel_error,
                "head": r.name in heads,
                "candidates": candidates.get(r.name, []),
            }
            for r in records
        ],
    }
