"""Uniform round-to-nearest at qcompile's formats: every block linear in one format, no calibration.

For each format name, every block linear's torch weight [out, in] = W [N, K] becomes
``PRESETS[name].quantize(W).dequantize()`` (min/max per group along K with the format's clip search),
the model is evaluated in torch, and the float weights are put back. A format whose group size does not
divide K (q4g128 on the 576-wide rows of SmolLM2) falls back, for those tensors only, to the same bits
with the largest group size that does; the row's note and bpw say so.

q4g32 is the model's own grid: SmolLM2's package ships Q4_1 (4-bit min/max in groups of 32), so q4g32
reconstructs the float weights almost exactly; it is a check, not a result.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from qcompile.passes.formats import PRESETS, WeightFormat

from .bits import BitCount, block_linears
from .context import Context, Row
from .metrics import torch_logits_fn

__all__ = ["FORMATS", "QUICK_FORMATS", "rtn_rows"]

log = logging.getLogger(__name__)

FORMATS = ("q2g64", "q3g64", "q4g128", "q4g64", "q4g32", "q5g64", "q6g64", "q8g64")
QUICK_FORMATS = ("q3g64", "q4g64")


def _format_for(name: str, k: int) -> WeightFormat:
    fmt = PRESETS[name]
    if fmt.supports((1, k)):
        return fmt
    fits = [f for f in PRESETS.values() if f.bits == fmt.bits and f.supports((1, k))]
    if not fits:
        raise ValueError(f"no {fmt.bits}-bit format stores rows of {k}")
    return max(fits, key=lambda f: f.group_size)


def rtn_rows(ctx: Context) -> list[Row]:
    import torch

    linears = block_linears(ctx.model)
    originals = {name: m.weight.detach().clone() for name, m in linears.items()}
    rows = []
    try:
        for name in QUICK_FORMATS if ctx.quick else FORMATS:
            t0 = time.perf_counter()
            parts = []
            fallbacks = set()
            for lname, module in linears.items():
                w = originals[lname].numpy()
                fmt = _format_for(name, w.shape[1])
                if fmt.name != name:
                    fallbacks.add(fmt.name)
                q = fmt.quantize(w)
                module.weight.data = torch.from_numpy(np.ascontiguousarray(fmt.dequantize(q)))
                parts.append((fmt.name, fmt.storage_bits(w.shape).total, w.size))
            count = BitCount.total(parts)
            metrics = ctx.evaluator.evaluate(torch_logits_fn(ctx.model))
            note = "RTN + per-group clip search (WeightFormat.quantize); " + count.describe()
            if fallbacks:
                note += f"; {name} cannot store rows of 576, so those tensors use {', '.join(sorted(fallbacks))}"
            rows.append(Row.of(f"rtn {name}", count.bpw, metrics, note, time.perf_counter() - t0))
            log.info("rtn %s: %s", name, rows[-1])
    finally:
        for lname, module in linears.items():
            module.weight.data = originals[lname]
    return rows
