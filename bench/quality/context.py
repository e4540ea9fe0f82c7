"""What every method of the quality benchmark gets: the float model, the fixed tokens, the scorer."""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

import numpy as np

from .bits import block_linears
from .metrics import Evaluator, Metrics

__all__ = ["Context", "Row"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Row:
    """One result row. ``bpw`` counts the block linears only (see ``bits``); ``note`` says anything a
    reader needs to compare the row fairly (fallback formats, what stays float)."""

    method: str
    bpw: float
    kld: float
    ppl: float
    note: str = ""
    seconds: float = 0.0

    @classmethod
    def of(cls, method: str, bpw: float, metrics: Metrics, note: str = "", seconds: float | None = None) -> Row:
        """A row from measured metrics; ``seconds`` is the method's whole time (default: scoring only)."""
        seconds = metrics.seconds if seconds is None else seconds
        return cls(method, round(float(bpw), 4), float(metrics.kld), float(metrics.ppl), note, round(seconds, 1))


@dataclasses.dataclass
class Context:
    """Inputs shared by all methods of one run.

    model:        float32 transformers model (methods that change its weights must restore them)
    model_dir:    its HF folder (safetensors + tokenizer), for methods that convert it themselves
    evaluator:    ``evaluator.evaluate(logits_fn) -> Metrics`` on the fixed evaluation windows
    calibration:  int64 [n, L] calibration windows (disjoint from the evaluation text)
    workdir:      a cache folder for converted / quantized models of this run's settings
    threads:      CPU threads a method may use
    skipped:      settings a method could not measure, with the reason (``skip``)
    """

    model: object
    model_dir: Path
    evaluator: Evaluator
    calibration: np.ndarray
    workdir: Path
    threads: int
    quick: bool = False
    skipped: list[dict] = dataclasses.field(default_factory=list)

    def skip(self, method: str, reason: str) -> None:
        """Record a setting that could not be measured (it appears in the JSON's ``skipped``)."""
        log.warning("skipped %s: %s", method, reason)
        self.skipped.append({"method": method, "reason": reason})

    @functools.cached_property
    def linear_weight_count(self) -> int:
        """Number of weights counted by bpw (210 block linears)."""
        return sum(m.weight.numel() for m in block_linears(self.model).values())

    @functools.cached_property
    def float_onnx(self) -> Path:
        """The float model as ONNX (input_ids [1, L] -> logits [1, L, V], no KV cache), exported once."""
        from .ort import export_onnx

        return export_onnx(self.model, self.workdir / "float.onnx")
