"""Calibration text a decoder LLM writes itself (``--calib self``; the CLI's default for decoders).

Why. Without calibration data the compiler can only weigh each layer's relative weight error alike:
no activation statistics for GPTQ/AWQ, no measured sensitivity for the allocator. On SmolLM2-135M at
4.25 bpw that costs a KL divergence of ~0.6 from the float model against ~0.13 calibrated, and greedy
text that loops. Data-free quantization work (LLM-QAT, Liu et al. 2023) showed that text sampled from
the float model itself calibrates nearly as well as real text: it is in the model's own distribution.

How. onnxruntime runs the float decoder on a batch of ``n`` sequences with its KV cache:

    ids[:, 0] ~ U{0 .. vocab-1}                         (a random first token per sequence, seeded)
    ids[:, t] ~ top_p(softmax(logits[:, t-1] / temperature))          t = 1 .. length-1

Every model input besides ``input_ids`` and the cache is filled as for text (attention_mask ones,
position_ids past..past+seq-1). The result is int64 ids [n, length], fed to calibration like a .npz
of token ids. Deterministic for a seed.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import onnx
import onnxruntime as ort

from qcompile.runtime.errors import QCompileError

__all__ = ["is_decoder", "generate_ids", "TEMPERATURE", "TOP_P"]

log = logging.getLogger(__name__)

TEMPERATURE = 1.0
TOP_P = 0.95
_PAST = re.compile(r"^past(_key_values)?[._]")


def _past_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in inits and _PAST.match(i.name)]


def is_decoder(model: onnx.ModelProto) -> bool:
    """A decoder LLM with a KV cache: inputs ``input_ids`` and ``past*``, first output the logits."""
    names = {i.name for i in model.graph.input}
    return "input_ids" in names and bool(_past_inputs(model)) and len(model.graph.output) > 1


def _dims(vi: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]


def _present_name(past: str, outputs: list[str], index: int) -> str:
    for candidate in (past.replace("past_key_values", "present"), past.replace("past", "present")):
        if candidate in outputs:
            return candidate
    return outputs[1 + index]  # the exporters' order: logits, then the presents as the pasts


def _nucleus(logits: np.ndarray, rng: np.random.Generator, temperature: float, top_p: float) -> np.ndarray:
    """One token per row of ``logits`` [batch, vocab] (module doc)."""
    z = logits.astype(np.float64) / temperature
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    order = np.argsort(-p, axis=1)
    sorted_p = np.take_along_axis(p, order, axis=1)
    cum = np.cumsum(sorted_p, axis=1)
    keep = cum - sorted_p < top_p  # the shortest prefix reaching top_p (the first token always)
    sorted_p = np.where(keep, sorted_p, 0.0)
    cum = np.cumsum(sorted_p, axis=1)
    u = rng.random((len(p), 1)) * cum[:, -1:]
    pick = np.minimum((cum <= u).sum(axis=1), p.shape[1] - 1)
    return order[np.arange(len(p)), pick]


def _int_type(arg) -> type:
    return np.int32 if arg.type == "tensor(int32)" else np.int64


def generate_ids(model: onnx.ModelProto, n: int, length: int, seed: int = 0,
                 temperature: float = TEMPERATURE, top_p: float = TOP_P) -> np.ndarray:
    """int64 [n, length] token ids sampled from the float decoder ``model`` (module doc)."""
    if not is_decoder(model):
        raise QCompileError(f"{model.graph.name or 'the model'}: --calib self needs a decoder LLM with inputs "
                            f"input_ids and past_key_values.* (found {[i.name for i in model.graph.input]})")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs()]
    pasts = [vi for vi in _past_inputs(model)]
    present = {vi.name: _present_name(vi.name, outputs, i) for i, vi in enumerate(pasts)}
    vocab = sess.get_outputs()[0].shape[-1]
    if not isinstance(vocab, int):
        raise QCompileError("--calib self: the logits output has no static vocabulary size")
    rng = np.random.default_rng(seed)
    ids = np.zeros((n, length), np.int64)
    ids[:, 0] = rng.integers(0, vocab, n)
    cache = {}
    for vi in pasts:
        dims = _dims(vi)
        if any(d is None for d in (dims[1], dims[3])):
            raise QCompileError(f"--calib self: past input {vi.name} has symbolic dims {dims} besides batch and past")
        cache[vi.name] = np.zeros((n, dims[1], 0, dims[3]), np.float32)
    for t in range(length - 1):
        feed = {"input_ids": ids[:, t:t + 1], **cache}
        if "attention_mask" in inputs:
            feed["attention_mask"] = np.ones((n, t + 1), _int_type(inputs["attention_mask"]))
        if "position_ids" in inputs:
            feed["position_ids"] = np.full((n, 1), t, _int_type(inputs["position_ids"]))
        outs = dict(zip(outputs, sess.run(None, feed)))
        cache = {name: outs[present[name]] for name in cache}
        ids[:, t + 1] = _nucleus(outs[outputs[0]][:, -1], rng, temperature, top_p)
    log.info("self-generated calibration text: %d sequences of %d tokens (temperature %.2g, top-p %.2g)",
             n, length, temperature, top_p)
    return ids
