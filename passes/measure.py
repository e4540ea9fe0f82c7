"""Measure each quantizable tensor's error in every format that fits it (the allocator's input).

The error here is the weight-space proxy ||W - Q(W)||_F^2 / ||W||_F^2, measured on up to
``rows`` evenly spaced output rows (the format's error is per-group, so a row sample is an unbiased
estimate of the whole tensor's).  It is what a calibration-free compile can know; the calibrated
H-weighted output error replaces it when activation statistics exist.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from .allocate import Candidate, TensorChoices
from .formats import formats_for
from .quantizable import QuantTarget

__all__ = ["measure_rtn"]

log = logging.getLogger(__name__)


def measure_rtn(
    targets: Sequence[QuantTarget],
    weights: Callable[[QuantTarget], np.ndarray],
    rows: int = 128,
    progress: Callable[[int], None] | None = None,
) -> list[TensorChoices]:
    """One :class:`TensorChoices` per target: exact storage bits and RTN error of each format.

    ``weights(target)`` returns the target's [N, K] float32 matrix.
    """
    out = []
    for i, t in enumerate(targets):
        w = weights(t)
        n = w.shape[0]
        sample = w[np.unique(np.linspace(0, n - 1, min(rows, n)).astype(np.int64))]
        norm = float(np.sum(sample.astype(np.float64) ** 2)) or 1.0
        cands = []
        for fmt in formats_for(t.shape):
            deq = fmt.quantize(sample).dequantize()
            err = float(np.sum((sample.astype(np.float64) - deq) ** 2)) / norm
            cands.append(Candidate(fmt.name, fmt.storage_bits(t.shape).total, err))
        out.append(TensorChoices(t.name, t.n_weights, tuple(cands)))
        if progress:
            progress(i + 1)
    log.info("measured %d tensors x %d formats", len(out), max((len(c.candidates) for c in out), default=0))
    return out
