"""Calibration: activation statistics of every quantizable weight's input (DESIGN §2, "Calibrate").

onnxruntime runs the *float* model on calibration samples with each target's activation (input 0 of
its node: MatMul/Gemm ``A``, Conv ``X``) added as a graph output. For a weight viewed as [N, K]
(:meth:`QuantTarget.matrix`) the activation is viewed as rows ``x`` of length K:

- MatMul / Gemm (transA=0): ``x = A.reshape(-1, K)``;
- Conv (2-D, group=1): ``x`` are the im2col patches, ``K = Cin*kh*kw`` in the weight's (ci, r, s)
  order, so that ``Conv(X, W)`` at an output position is ``W.reshape(N, -1) @ patch``.

Over all rows of all samples (streamed: one sample's activations in memory at a time) we accumulate

    H       = Σ xᵀx           float64 [K, K]  the Gram matrix of GPTQ (output error = tr(ΔW H ΔWᵀ))
    sq      = Σ x² / rows     float64 [K]     per-input-channel mean square (llama.cpp imatrix)
    absmean = Σ |x| / rows    float64 [K]     per-input-channel mean magnitude (AWQ scales)

This module writes data and never rewrites the model (STYLE §3). Targets that read the same
activation the same way (q/k/v projections) share one set of arrays; they are read-only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from numpy.lib.stride_tricks import sliding_window_view

from .quantizable import QuantTarget

__all__ = [
    "TensorStats",
    "CalibrationStats",
    "CalibrationError",
    "model_hash",
    "calibrate",
    "MAX_CONV_ROWS",
    "STATS_FORMAT",
]

log = logging.getLogger(__name__)

STATS_FORMAT = 1
"""Version of the stats file layout; bumped when :meth:`CalibrationStats.save` changes."""

MAX_CONV_ROWS = 4096
"""Per sample and Conv target, at most this many im2col rows (evenly strided output positions)."""

_CHUNK_ROWS = 4096  # rows per float32 xᵀx product before it is added to the float64 sum


class CalibrationError(ValueError):
    """Calibration cannot run on these inputs, or a stats file does not fit the model."""


@dataclass
class TensorStats:
    """Input statistics of one quantizable weight ``name`` (K = its [N, K] view's columns)."""

    name: str
    k: int
    rows: int
    H: np.ndarray  # noqa: N815 - the name used by GPTQ
    sq: np.ndarray
    absmean: np.ndarray
    activation: str = ""
    """The ONNX value the rows came from (shared by targets that read the same input)."""


@dataclass
class CalibrationStats:
    """Statistics for every calibrated target of one model, keyed by weight (initializer) name."""

    model_hash: str
    n_samples: int
    tensors: dict[str, TensorStats] = field(default_factory=dict)

    def save(self, path: str | Path) -> Path:
        """Write one ``.npz`` atomically (temporary file in the same folder, then ``os.replace``).

        Arrays shared between targets are stored once. Nothing is pickled.
        """
        path = Path(path)
        arrays: dict[str, np.ndarray] = {}
        groups: dict[int, int] = {}  # id(H) -> group index
        entries = []
        for t in self.tensors.values():
            g = groups.setdefault(id(t.H), len(groups))
            if f"g{g}.H" not in arrays:
                arrays.update({f"g{g}.H": t.H, f"g{g}.sq": t.sq, f"g{g}.absmean": t.absmean})
            entries.append({"name": t.name, "k": t.k, "rows": t.rows, "activation": t.activation, "group": g})
        meta = {"format": STATS_FORMAT, "model_hash": self.model_hash, "n_samples": self.n_samples,
                "tensors": entries}
        arrays["meta"] = np.array(json.dumps(meta))
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path, model_hash: str | None = None) -> CalibrationStats:
        """Read a file written by :meth:`save`; with ``model_hash``, refuse stats of another model."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                meta = json.loads(str(z["meta"]))
                arrays = {k: z[k] for k in z.files if k != "meta"}
        except (OSError, KeyError, ValueError) as e:
            raise CalibrationError(f"{path}: not a qcompile calibration stats file ({e})") from e
        if meta.get("format") != STATS_FORMAT:
            raise CalibrationError(f"{path}: stats file format {meta.get('format')!r}, expected {STATS_FORMAT}; "
                                   "delete it to recalibrate")
        if model_hash is not None and meta["model_hash"] != model_hash:
            raise CalibrationError(
                f"{path}: calibration stats are for another model (hash {meta['model_hash']}, this model is "
                f"{model_hash}); delete the file or pass a new path to recalibrate")
        tensors = {}
        for e in meta["tensors"]:
            g = e["group"]
            h, sq, am = arrays[f"g{g}.H"], arrays[f"g{g}.sq"], arrays[f"g{g}.absmean"]
            for a in (h, sq, am):
                a.flags.writeable = False
            tensors[e["name"]] = TensorStats(e["name"], e["k"], e["rows"], h, sq, am, e["activation"])
        return cls(meta["model_hash"], meta["n_samples"], tensors)


def model_hash(model: onnx.ModelProto) -> str:
    """A short, deterministic sha256 of the graph: nodes, inputs, outputs and initializer values.

    Hashed piece by piece (no whole-model serialization); ``value_info`` (shape inference's output)
    and metadata are left out, so the hash names the computation, not how it was annotated.
    """
    h = hashlib.sha256()
    g = model.graph
    for part in (g.input, g.output, g.node, g.sparse_initializer):
        h.update(len(part).to_bytes(8, "little"))
        for item in part:
            h.update(item.SerializeToString(deterministic=True))
    for init in g.initializer:
        h.update(init.name.encode() + b"\0")
        h.update(onnx.numpy_helper.to_array(init).tobytes())
        h.update(f"{init.data_type}:{tuple(init.dims)}".encode())
    for o in sorted((o.domain, o.version) for o in model.opset_import):
        h.update(f"{o[0]}:{o[1]};".encode())
    return h.hexdigest()[:16]


# -- how each target turns its activation into rows ------------------------------------------------


@dataclass(frozen=True)
class _Reader:
    """How rows are read from one activation value; targets with equal readers share statistics."""

    activation: str
    k: int
    conv: tuple | None = None  # (kernel (kh, kw), strides, pads (t, l, b, r), dilations)

    def rows(self, x: np.ndarray, max_rows: int) -> np.ndarray:
        if self.conv is None:
            if x.shape[-1] != self.k:
                raise CalibrationError(f"activation {self.activation!r} has shape {x.shape}; "
                                       f"expected a last dimension of K={self.k}")
            return x.reshape(-1, self.k)
        return im2col(x, *self.conv, max_rows=max_rows)


def im2col(x: np.ndarray, kernel, strides, pads, dilations, max_rows: int | None = None) -> np.ndarray:
    """The 2-D convolution patches of ``x`` [B, C, H, W] as rows [P, C*kh*kw] in (c, r, s) order.

    ``pads`` is ONNX order (top, left, bottom, right). With ``max_rows``, at most that many output
    positions are kept, evenly strided over (batch, y, x) in row-major order.
    """
    if x.ndim != 4:
        raise CalibrationError(f"Conv input has shape {x.shape}; only 2-D convolutions (rank-4 input) are supported")
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = kernel, strides, pads, dilations
    xp = np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))
    win = sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # [B, C, Ho, Wo, kh, kw], a view
    b, c, ho, wo = win.shape[:4]
    win = win.transpose(0, 2, 3, 1, 4, 5)  # [B, Ho, Wo, C, kh, kw]
    n = b * ho * wo
    if max_rows is not None and n > max_rows:
        step = -(-n // max_rows)
        bi, yi, xi = np.unravel_index(np.arange(0, n, step), (b, ho, wo))
        return win[bi, yi, xi].reshape(-1, c * kh * kw)
    return win.reshape(n, c * kh * kw)


def _reader(node: onnx.NodeProto, t: QuantTarget) -> _Reader:
    k = t.shape[1]
    if t.op in ("MatMul", "Gemm"):
        if t.op == "Gemm" and any(a.name == "transA" and a.i != 0 for a in node.attribute):
            raise CalibrationError(f"{node.name}: Gemm with transA=1 is not calibrated (weight {t.name})")
        return _Reader(node.input[0], k)
    if t.op == "Conv":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("group", 1) != 1 or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise CalibrationError(f"{node.name}: Conv with group != 1 or auto_pad is not calibrated "
                                   f"(weight {t.name}; expected group=1, auto_pad=NOTSET)")
        kernel = tuple(attrs.get("kernel_shape", t.onnx_shape[2:]))
        geometry = (kernel, tuple(attrs.get("strides", (1, 1))), tuple(attrs.get("pads", (0, 0, 0, 0))),
                    tuple(attrs.get("dilations", (1, 1))))
        if any(len(g) != n for g, n in zip(geometry, (2, 2, 4, 2))):
            raise CalibrationError(f"{node.name}: Conv attributes {geometry} are not those of a 2-D convolution")
        return _Reader(node.input[0], k, geometry)
    raise CalibrationError(f"{t.name}: op {t.op!r} cannot be calibrated (expected MatMul, Gemm or Conv)")


def _consumers(model: onnx.ModelProto, targets: list[QuantTarget]) -> dict[str, onnx.NodeProto]:
    """Target name -> the node that reads it as its weight (input 1)."""
    wanted = {t.name for t in targets}
    found = {n.input[1]: n for n in model.graph.node if len(n.input) > 1 and n.input[1] in wanted}
    missing = sorted(wanted - found.keys())
    if missing:
        raise CalibrationError(f"{len(missing)} targets are not the weight input of any node in the model: "
                               f"{', '.join(missing[:5])}{'…' if len(missing) > 5 else ''}")
    return found


class _Accumulator:
    """Σ xᵀx, Σ x² and Σ |x| over rows, summed in float64.

    Each product xᵀx is taken in float32 over a block of at least ``cap`` rows (rows of small samples
    are buffered until then): one [K, K] float64 addition per sample would cost more than the product
    itself for a 128-token sample with K = 4096. The buffer is at most 1/8 of H's memory.
    """

    def __init__(self, k: int):
        self.H = np.zeros((k, k), np.float64)
        self.sq = np.zeros(k, np.float64)
        self.absum = np.zeros(k, np.float64)
        self.rows = 0
        self.cap = min(_CHUNK_ROWS, max(256, k // 4))
        self.buf = np.empty((self.cap, k), np.float32)
        self.held = 0

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        self.rows += x.shape[0]
        i = 0
        while i < x.shape[0]:
            if self.held == 0 and x.shape[0] - i >= self.cap:  # a whole block: no copy
                block = x[i:i + _CHUNK_ROWS]
                self._sum(block)
                i += block.shape[0]
                continue
            take = min(self.cap - self.held, x.shape[0] - i)
            self.buf[self.held:self.held + take] = x[i:i + take]
            self.held += take
            i += take
            if self.held == self.cap:
                self.flush()

    def flush(self) -> None:
        if self.held:
            self._sum(self.buf[:self.held])
            self.held = 0

    def _sum(self, c: np.ndarray) -> None:
        self.H += c.T @ c  # float32 product (BLAS syrk), summed in float64
        self.sq += np.einsum("rk,rk->k", c, c, dtype=np.float64)
        self.absum += np.abs(c).sum(axis=0, dtype=np.float64)


# -- the run ----------------------------------------------------------------------------------------


def _session(model: onnx.ModelProto, fetch: list[str]) -> ort.InferenceSession:
    """An onnxruntime session on ``model`` with ``fetch`` added as outputs (the model is restored)."""
    typed = {v.name: v for v in (*model.graph.value_info, *model.graph.output)}
    n_out = len(model.graph.output)
    for name in fetch:  # untyped outputs are fine for onnxruntime; typed when shape inference knew them
        model.graph.output.append(typed[name] if name in typed else onnx.ValueInfoProto(name=name))
    try:
        data = model.SerializeToString()
    finally:
        del model.graph.output[n_out:]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def calibrate(
    model: onnx.ModelProto,
    targets: list[QuantTarget],
    samples: Iterable[Mapping[str, np.ndarray]],
    progress: Callable[[int], None] | None = None,
    max_conv_rows: int = MAX_CONV_ROWS,
) -> CalibrationStats:
    """Run the float ``model`` on ``samples`` (feeds by input name) and gather each target's input stats.

    ``progress(i)`` is called after the i-th sample. The model is not modified.
    """
    t0 = time.perf_counter()
    mhash = model_hash(model)
    nodes = _consumers(model, targets)
    readers = {t.name: _reader(nodes[t.name], t) for t in targets}
    acc = {r: _Accumulator(r.k) for r in dict.fromkeys(readers.values())}
    graph_inputs = [i.name for i in model.graph.input]
    inits = {i.name for i in model.graph.initializer}
    acts = list(dict.fromkeys(r.activation for r in acc))
    from_feed = [a for a in acts if a in graph_inputs]
    const = [a for a in acts if a in inits]
    if const:
        raise CalibrationError(f"the inputs {const} of quantizable weights are constants (initializers), not "
                               "activations; fold those nodes first or leave their weights out of the targets")
    existing = {o.name for o in model.graph.output}
    fetch = [a for a in acts if a not in from_feed]
    sess = _session(model, [a for a in fetch if a not in existing])
    required = [i.name for i in sess.get_inputs()]

    n = 0
    for feed in samples:
        missing = [name for name in required if name not in feed]
        extra = [name for name in feed if name not in required]
        if missing or extra:
            raise CalibrationError(f"calibration sample {n}: model inputs are {required}; "
                                   f"missing {missing}, unknown {extra}")
        values = dict(zip(fetch, sess.run(fetch, dict(feed)))) if fetch else {}
        values.update({a: np.asarray(feed[a]) for a in from_feed})
        for r, a in acc.items():
            a.add(r.rows(values[r.activation], max_conv_rows))
        n += 1
        if progress:
            progress(n)
    if n == 0:
        raise CalibrationError("no calibration samples were given")

    shared = {}
    for r, a in acc.items():
        a.flush()
        rows = max(a.rows, 1)
        arrays = (a.H, a.sq / rows, a.absum / rows)
        for arr in arrays:
            arr.flags.writeable = False
        shared[r] = (a.rows, *arrays)
    stats = CalibrationStats(mhash, n, {
        t.name: TensorStats(t.name, readers[t.name].k, *shared[readers[t.name]], readers[t.name].activation)
        for t in targets
    })
    log.info("calibrated %d weights (%d distinct activations) on %d samples, %d rows in %.1f s",
             len(targets), len(acc), n, sum(a.rows for a in acc.values()), time.perf_counter() - t0)
    return stats
