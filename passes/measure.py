"""Measure each quantizable tensor's error in every format that fits it (the allocator's input).

Two measures, the better one that the available data allows:

- **Calibrated** (``stats`` given): quantize with GPTQ using the layer's input Gram matrix H = XᵀX and
  record the H-weighted relative output error ``tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)`` = ||X ΔWᵀ||² / ||X Wᵀ||²:
  exactly the relative squared error of the layer's output on the calibration data, with no model run
  (GPTQ minimizes this very quantity, so the measurement scores what quantization will deliver).
  Its blind spot is how much each layer's error matters downstream (errors amplified or damped through
  attention, the residual stream and the head). EXL2 measures whole-block output error for that; we go
  to the model's output instead: :mod:`.sensitivity` probes each weight once and the allocator weighs
  this table's errors by the measured output divergence per unit of layer error. The per-format table
  itself stays layer-local, so it costs no model runs (18-30 formats x every tensor).
- **Uncalibrated**: round-to-nearest with the format's clip search and the relative weight error
  ``||ΔW||² / ||W||²`` — what H = I would give.

With calibration, MatMul/Gemm weights are also measured in the split formats of :mod:`.salient`
(the most energetic 1/8 of the input channels two bit widths higher, EXL2-style).

Rows are measured on a deterministic sample of up to ``rows`` output channels: GPTQ treats rows
independently given H, so the sample's error is an unbiased estimate of the whole tensor's.  The table
is plain data (JSON) so a new ``--bpw`` re-runs only allocation (like EXL2's measurement.json).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from .allocate import Candidate, TensorChoices
from .calibrate import CalibrationStats
from .formats import QuantizedWeight, formats_for
from .gptq import gptq_quantize, gptq_quantize_parts, h_error
from .keyed import load_keyed, save_keyed
from .quantizable import QuantTarget
from .quantize import Quantizer, rtn_quantizer
from .salient import AnyFormat, SplitFormat, SplitWeight, salient_order, split_formats_for

__all__ = ["measure", "measure_rtn", "make_quantizer", "error_measure_name",
           "save_table", "load_table", "MEASURE_ROWS"]

log = logging.getLogger(__name__)

MEASURE_ROWS = 256
TABLE_FORMAT = 1

def error_measure_name(stats: CalibrationStats | None, gptq: bool) -> str:
    if stats is None:
        return "RTN relative weight error ||dW||^2/||W||^2"
    return f"{'GPTQ' if gptq else 'RTN'} H-weighted relative output error tr(dW H dW^T)/tr(W H W^T)"


def make_quantizer(stats: CalibrationStats | None, gptq: bool = True) -> Quantizer:
    """The quantizer of a run: GPTQ on the calibration H where there is one, else RTN.

    Split formats (:mod:`.salient`) are swept by GPTQ in salient order: W and H permuted once per H.
    """
    permuted: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # (H, perm, H[perm][:, perm]), by identity

    def by_salience(ts) -> tuple[np.ndarray, np.ndarray]:
        for h, perm, hp in permuted:
            if h is ts.H:
                return perm, hp
        perm = salient_order(ts.sq)
        hp = np.ascontiguousarray(ts.H[np.ix_(perm, perm)])
        hp.flags.writeable = False  # read-only: GPTQ may cache its factorization by identity
        permuted.insert(0, (ts.H, perm, hp))
        del permuted[2:]
        return perm, hp

    def quantize(t: QuantTarget, fmt: AnyFormat, w: np.ndarray) -> tuple[QuantizedWeight | SplitWeight, float]:
        ts = stats.tensors.get(t.name) if stats is not None else None
        if ts is None:
            return rtn_quantizer(t, fmt, w)
        if isinstance(fmt, SplitFormat):
            if gptq:
                perm, hp = by_salience(ts)
                kh = fmt.k_hi(w.shape[1])
                hi, lo = gptq_quantize_parts(w[:, perm], hp, [(fmt.hi, kh), (fmt.lo, w.shape[1] - kh)])
                q = SplitWeight(fmt, perm, hi, lo)
            else:
                q = fmt.quantize(w, importance=ts.sq)
        else:
            q = gptq_quantize(w, ts.H, fmt) if gptq else fmt.quantize(w, importance=ts.sq)
        return q, h_error(w, q.dequantize(), ts.H)

    return quantize


def _sample_rows(w: np.ndarray, rows: int) -> np.ndarray:
    n = w.shape[0]
    return w[np.unique(np.linspace(0, n - 1, min(rows, n)).astype(np.int64))]


def measure(
    targets: Sequence[QuantTarget],
    weights: Callable[[QuantTarget], np.ndarray],
    quantizer: Quantizer,
    rows: int = MEASURE_ROWS,
    progress: Callable[[int], None] | None = None,
    salient: Callable[[QuantTarget], bool] = lambda t: False,
) -> list[TensorChoices]:
    """One :class:`TensorChoices` per target: exact storage bits and measured error of each format.

    ``salient(t)``: whether target t also gets the split formats (salient channels at more bits).
    """
    out = []
    for i, t in enumerate(targets):
        sample = _sample_rows(weights(t), rows)
        fmts: list[AnyFormat] = list(formats_for(t.shape))
        if salient(t) and t.op != "Conv":
            fmts += split_formats_for(t.shape)
        cands = tuple(Candidate(fmt.name, fmt.storage_bits(t.shape).total, quantizer(t, fmt, sample)[1])
                      for fmt in fmts)
        out.append(TensorChoices(t.name, t.n_weights, cands))
        if progress:
            progress(i + 1)
    log.info("measured %d tensors x %d formats", len(out), max((len(c.candidates) for c in out), default=0))
    return out


def measure_rtn(targets, weights, rows: int = 128, progress=None) -> list[TensorChoices]:
    """Uncalibrated measurement (RTN, relative weight error)."""
    return measure(targets, weights, make_quantizer(None), rows=rows, progress=progress)


def save_table(path: str | Path, key: dict, tensors: list[TensorChoices]) -> None:
    """Write the measurement table (JSON, atomically); ``key`` says what it was measured on."""
    save_keyed(path, TABLE_FORMAT, key, [
        {"name": t.name, "n_weights": t.n_weights,
         "candidates": [{"format": c.format_name, "bits": c.bits, "error": c.error} for c in t.candidates]}
        for t in tensors])


def load_table(path: str | Path, key: dict) -> list[TensorChoices] | None:
    """The table at ``path`` if it was measured with the same ``key``, else None."""
    rows = load_keyed(path, TABLE_FORMAT, key)
    if rows is None:
        return None
    return [TensorChoices(t["name"], t["n_weights"], tuple(Candidate(c["format"], c["bits"], c["error"])
                                                            for c in t["candidates"]))
            for t in rows]
