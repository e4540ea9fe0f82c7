"""onnxruntime's MatMulNBits quantizer on an ONNX export of the float model, evaluated in onnxruntime.

Export: ``torch.onnx.export`` (TorchScript exporter, ``dynamo=False``, opset 17) of ``input_ids [1, L]
-> logits [1, L, V]``, full sequence, no KV cache. The head (tied to the embedding) reads its weight
through an ``Identity`` node, so no quantizer sees a constant there and every method keeps it float;
ORT's constant folding removes the Identity at load.

Quantizers (``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer``), 4 bits,
asymmetric, block sizes 128 and 32 along K (K = 576 is padded to whole blocks by ORT, and the padding is
counted):

    ort default   DefaultWeightOnlyQuantConfig: ORT's own blockwise min/max quantization (C++)
    ort rtn       RTNWeightOnlyQuantConfig (neural-compressor RTN)
    ort gptq      GPTQWeightOnlyQuantConfig on the calibration windows (neural-compressor GPTQ)
    ort hqq       HQQWeightOnlyQuantConfig (half-quadratic; float32 scales and zero points)

MatMulNBits runs with accuracy_level 0 (float activations), so rows measure the weights only.
Scales (and HQQ's zero points) are float32, the float model's dtype; K = 576 rows are padded to 640 at
block 128, so "4-bit" costs 4.64 (default) to 4.88 (HQQ) bpw there.

Known failure: neural-compressor's RTN and GPTQ pack the 4-bit zero points of consecutive blocks across
rows, which breaks (ValueError) when a column has an odd number of blocks (K = 576 at block 128); those
settings are listed as skipped.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from .bits import onnx_bits
from .context import Context, Row

__all__ = ["ALGORITHMS", "BLOCK_SIZES", "export_onnx", "ort_rows", "session_logits_fn"]

log = logging.getLogger(__name__)

ALGORITHMS = ("default", "rtn", "gptq", "hqq")
BLOCK_SIZES = (128, 32)
OPSET = 17
GPTQ_WINDOWS = 1
"""Calibration windows given to GPTQ. neural-compressor's GPTQ runs the whole model once per window for
each of the ~200 distinct MatMul inputs: 8 windows of 256 tokens took 26 minutes on 2 shared cores."""


def export_onnx(model, path: Path, length: int = 8) -> Path:
    """Export ``model`` (input_ids [1, L] -> logits [1, L, V]) to ``path`` once; returns ``path``."""
    import onnx
    import torch

    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)

    class Logits(torch.nn.Module):
        def __init__(self, lm):
            super().__init__()
            self.lm = lm

        def forward(self, input_ids):
            # An explicit all-ones mask skips transformers' packed-sequence detection (aten::diff,
            # which the TorchScript exporter cannot export).
            mask = torch.ones_like(input_ids)
            return self.lm(input_ids=input_ids, attention_mask=mask, use_cache=False).logits

    t0 = time.perf_counter()
    tmp = path.with_suffix(".tmp.onnx")
    ids = torch.zeros((1, length), dtype=torch.int64)
    torch.onnx.export(
        Logits(model), (ids,), str(tmp), input_names=["input_ids"], output_names=["logits"],
        dynamic_axes={"input_ids": {1: "sequence"}, "logits": {1: "sequence"}},
        opset_version=OPSET, dynamo=False, do_constant_folding=True,
    )
    proto = onnx.load(str(tmp))
    _hide_head_weight(proto)
    onnx.save(proto, str(tmp))
    tmp.rename(path)
    log.info("exported %s in %.1f s", path, time.perf_counter() - t0)
    return path


def _hide_head_weight(proto) -> None:
    """Route the head MatMul's weight (the [H, V] initializer) through an Identity node."""
    from onnx import helper, numpy_helper

    vocab = proto.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    inits = {t.name: t for t in proto.graph.initializer}
    heads = [n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in inits
             and numpy_helper.to_array(inits[n.input[1]]).shape[-1] == vocab]
    if len(heads) != 1:
        raise RuntimeError(f"expected one head MatMul with a [H, {vocab}] initializer, found {len(heads)}")
    head = heads[0]
    hidden = head.input[1] + "_float_head"
    proto.graph.node.insert(0, helper.make_node("Identity", [head.input[1]], [hidden], name="keep_head_float"))
    head.input[1] = hidden


def session_logits_fn(path_or_proto, threads: int):
    """A LogitsFn running an ONNX model (input_ids [1, L] -> logits [1, L, V]) in onnxruntime."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    src = path_or_proto if isinstance(path_or_proto, (str, Path)) else path_or_proto.SerializeToString()
    sess = ort.InferenceSession(str(src) if isinstance(src, Path) else src, opts,
                                providers=["CPUExecutionProvider"])

    def logits(ids: np.ndarray) -> np.ndarray:
        return sess.run(["logits"], {"input_ids": np.asarray(ids, dtype=np.int64)[None]})[0][0]

    return logits


class _Windows:
    """CalibrationDataReader over calibration windows (deep-copied by the GPTQ driver, so re-iterable)."""

    def __init__(self, windows: np.ndarray):
        self.windows = windows
        self.i = 0

    def get_next(self):
        if self.i >= len(self.windows):
            return None
        self.i += 1
        return {"input_ids": self.windows[self.i - 1][None]}

    def __iter__(self):
        return iter({"input_ids": w[None]} for w in self.windows)

    def rewind(self):
        self.i = 0


def _config(algorithm: str, block: int, calibration: np.ndarray):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    if algorithm == "default":
        return mnb.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=False, bits=4)
    if algorithm == "rtn":
        return mnb.RTNWeightOnlyQuantConfig()
    if algorithm == "gptq":
        return mnb.GPTQWeightOnlyQuantConfig(calibration_data_reader=_Windows(calibration), block_size=128,
                                             percdamp=0.01, actorder=False, mse=False, perchannel=True)
    if algorithm == "hqq":
        return mnb.HQQWeightOnlyQuantConfig(block_size=block, bits=4)
    raise ValueError(f"unknown onnxruntime algorithm {algorithm!r}: expected one of {ALGORITHMS}")


def quantize(float_onnx: Path, algorithm: str, block: int, calibration: np.ndarray):
    """The float ONNX model quantized by MatMulNBitsQuantizer (4 bits, asymmetric, ``block``).

    Cached beside ``float_onnx`` (GPTQ's file names its calibration shape): GPTQ and HQQ take minutes.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    tag = f"-cal{calibration.shape[0]}x{calibration.shape[1]}" if algorithm == "gptq" else ""
    cached = float_onnx.with_name(f"ort-{algorithm}-b{block}{tag}.onnx")
    if cached.is_file():
        return onnx.load(str(cached))
    quantizer = MatMulNBitsQuantizer(onnx.load(str(float_onnx)), bits=4, block_size=block, is_symmetric=False,
                                     algo_config=_config(algorithm, block, calibration))
    quantizer.process()
    proto = quantizer.model.model
    tmp = cached.with_suffix(".tmp.onnx")
    onnx.save(proto, str(tmp))
    tmp.rename(cached)
    return proto


def ort_rows(ctx: Context) -> list[Row]:
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per node
    rows = []
    calibration = ctx.calibration[:GPTQ_WINDOWS]
    algorithms = ("default", "hqq") if ctx.quick else ALGORITHMS
    for block in (128,) if ctx.quick else BLOCK_SIZES:
        for algorithm in algorithms:
            t0 = time.perf_counter()
            method = f"ort {algorithm} b{block}"
            try:
                proto = quantize(ctx.float_onnx, algorithm, block, calibration)
            except ValueError as e:
                # neural-compressor's RTN/GPTQ pack 4-bit zero points across rows: an odd number of
                # blocks per column (K=576, block 128 -> 5) fails to reshape
                ctx.skip(method, f"{type(e).__name__} in onnxruntime's quantizer: {e}")
                continue
            count = onnx_bits(proto, ctx.linear_weight_count)
            metrics = ctx.evaluator.evaluate(session_logits_fn(proto, ctx.threads))
            note = f"onnxruntime MatMulNBits, 4-bit asymmetric, block {block}, accuracy_level 0; {count.describe()}"
            if algorithm == "gptq":
                note += f"; GPTQ on {len(calibration)} calibration windows"
            rows.append(Row.of(method, count.bpw, metrics, note, time.perf_counter() - t0))
            log.info("%s: %s", method, rows[-1])
    return rows
