"""Load an ONNX model and check that every op can be compiled, listing all problems at once.

A decoder LLM given as a GGUF file or a Hugging Face folder is first built as ONNX by
:mod:`qcompile.compiler.frontends`; the checks are the same.

A model over protobuf's 2 GB (saved with external data) cannot be serialized in one piece, which
onnx's checker and shape inference do: it is checked from its file, and shapes are inferred on a copy
whose large initializers hold no data (shape inference reads their dims only).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import onnx
import onnx_ir as ir

from qcompile.passes.fold import fold_constants
from qcompile.runtime.errors import QCompileError

__all__ = ["load_onnx", "ModelError"]

log = logging.getLogger(__name__)


class ModelError(QCompileError):
    """The input model cannot be read or compiled."""


def _supported_ops() -> set[str]:
    from tvm.relax.frontend.onnx import onnx_frontend as fe  # noqa: PLC0415

    return set(fe._get_convert_map()) | {"Constant", "If"}  # noqa: SLF001


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """Read ``path`` (external data too), infer shapes, and validate ops and inputs.

    ``path`` may also be an LLM source (a ``.gguf`` file, or a folder with ``config.json`` and
    safetensors): its ONNX decoder is built in memory, then checked like a file.
    """
    from .frontends import is_llm_source, load_llm  # noqa: PLC0415 - they import ModelError from here

    path = Path(path)
    if is_llm_source(path):
        model = load_llm(path)
    else:
        model = _read_onnx(path)
    if not model.graph.node:
        raise ModelError(f"{path}: the ONNX graph has no nodes (is this an ONNX model?)")
    large = _is_large(model)
    if large:
        log.info("%s: over protobuf's 2 GB: checked from its file, shapes inferred without the weights' data", path)
    try:
        onnx.checker.check_model(str(path) if large else model)
    except onnx.checker.ValidationError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{path}: invalid ONNX model: {first}") from e
    try:
        model = _infer_shapes(model, large)
    except Exception as e:  # noqa: BLE001
        log.warning("%s: shape inference failed (%s); continuing without it", path, e)
    _drop_initializer_inputs(model)
    model = _fold_constants(model)
    _check_ops(path, model)
    _check_inputs(path, model)
    for i, node in enumerate(model.graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
    return model


def _read_onnx(path: Path) -> onnx.ModelProto:
    if path.is_dir():
        raise ModelError(f"{path}: a folder, but not an LLM source (expected config.json and .safetensors "
                         "weights in it); give an .onnx file, a .gguf file or a Hugging Face folder")
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    try:
        return onnx.load(str(path))
    except Exception as e:  # noqa: BLE001 - protobuf raises many kinds
        raise ModelError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from e


def _fold_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """Fold shape arithmetic and constant subgraphs: TVM needs e.g. Pad's pads as constants."""
    ir_model = ir.from_proto(model)
    if not fold_constants(ir_model):
        return model
    folded = ir.to_proto(ir_model)
    return _infer_shapes(folded, _is_large(folded))


PROTOBUF_LIMIT = 2**31
LARGE_INITIALIZER = 1 << 20  # bytes: initializers whose data shape inference goes without (large models)


def _is_large(model: onnx.ModelProto) -> bool:
    try:
        return model.ByteSize() >= PROTOBUF_LIMIT
    except Exception:  # noqa: BLE001  (upb refuses to size a message over 2 GB: EncodeError)
        return True


def _infer_shapes(model: onnx.ModelProto, large: bool) -> onnx.ModelProto:
    """onnx shape inference; for a ``large`` model on a copy whose initializers over LARGE_INITIALIZER
    bytes are dims-only stubs (external data nobody reads), the inferred types copied back."""
    if not large:
        return onnx.shape_inference.infer_shapes(model)
    stubs = []
    for init in model.graph.initializer:
        if init.ByteSize() < LARGE_INITIALIZER:
            stubs.append(init)
            continue
        stub = onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims,
                                data_location=onnx.TensorProto.EXTERNAL)
        stub.external_data.add(key="location", value="shape-inference-stub")
        stubs.append(stub)
    g = model.graph
    light = onnx.helper.make_model(
        onnx.helper.make_graph(g.node, g.name, g.input, g.output, stubs, value_info=g.value_info),
        opset_imports=model.opset_import, ir_version=model.ir_version)
    inferred = onnx.shape_inference.infer_shapes(light).graph
    del g.value_info[:]
    g.value_info.extend(inferred.value_info)
    del g.output[:]
    g.output.extend(inferred.output)
    return model


def _check_ops(path: Path, model: onnx.ModelProto) -> None:
    supported = _supported_ops()
    bad: dict[str, list[str]] = defaultdict(list)
    for i, node in enumerate(model.graph.node):
        if node.domain not in ("", "ai.onnx") or node.op_type not in supported:
            op = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
            bad[op].append(node.name or f"#{i}")
    if bad:
        items = "; ".join(f"{op} (nodes {', '.join(names[:3])}{'…' if len(names) > 3 else ''})"
                          for op, names in sorted(bad.items()))
        raise ModelError(
            f"{path}: {sum(map(len, bad.values()))} nodes use operators qcompile cannot compile: {items}. "
            "Export the model with standard ONNX operators (opset 13-21)."
        )


def _drop_initializer_inputs(model: onnx.ModelProto) -> None:
    """Older exporters list initializers as graph inputs too; they are constants to us."""
    inits = {i.name for i in model.graph.initializer}
    keep = [i for i in model.graph.input if i.name not in inits]
    if len(keep) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(keep)


def _check_inputs(path: Path, model: onnx.ModelProto) -> None:
    inits = {i.name for i in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        if not inp.type.HasField("tensor_type"):
            raise ModelError(f"{path}: input {inp.name!r} is not a tensor (found {inp.type}); only tensor inputs are supported")
