"""Perplexity and KL divergence to the float model, on the same tokens for every method.

For a window of token ids t[0..L-1], a method gives logits z [L, V]; position i predicts t[i+1], so the
L-1 positions 0..L-2 are scored:

    lp_m  = log_softmax(z[i])                           the method's next-token log-probabilities
    nll   = -lp_m[t[i+1]]                               ppl = exp(mean nll over all scored positions)
    kld   = sum_v p_f[v] * (lp_f[v] - lp_m[v])          KL(p_float || p_method), averaged likewise

``lp_f`` comes from the float torch model, computed once and cached on disk as float16 [n, L-1, V]
(0.8 GB for 16 x 512). float16 rounds the log-probabilities slightly, so they are renormalized in float32
on load, and KL is summed in float64; the float model scored against its own cache measures the floor
this leaves (about 3e-7).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["Evaluator", "LogitsFn", "Metrics", "torch_logits_fn"]

log = logging.getLogger(__name__)

LogitsFn = Callable[[np.ndarray], np.ndarray]
"""window token ids int64 [L] -> logits float32 [L, V]."""


@dataclasses.dataclass(frozen=True)
class Metrics:
    ppl: float
    kld: float
    seconds: float


def torch_logits_fn(model) -> LogitsFn:
    """A LogitsFn running a transformers causal LM on one window (no KV cache)."""
    import torch

    def logits(ids: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            out = model(input_ids=torch.from_numpy(np.asarray(ids, dtype=np.int64))[None], use_cache=False)
        return out.logits[0].float().numpy()

    return logits


class Evaluator:
    """Scores LogitsFns on fixed windows against the float model's cached log-probabilities."""

    def __init__(self, windows: np.ndarray, reference: Path):
        self.windows = np.asarray(windows, dtype=np.int64)
        self.reference = Path(reference)
        self._lp = np.load(self.reference, mmap_mode="r")
        n, length = self.windows.shape
        if self._lp.shape[:2] != (n, length - 1):
            raise ValueError(f"reference {reference} has shape {self._lp.shape}, windows are {self.windows.shape}")

    @classmethod
    def build(cls, windows: np.ndarray, float_logits: LogitsFn, cache: Path, key: str) -> Evaluator:
        """Evaluator whose reference is ``float_logits`` on ``windows``, cached under ``cache``.

        The file name hashes ``key`` (the model's identity) and the window ids, so a change of either
        computes a new reference.
        """
        windows = np.asarray(windows, dtype=np.int64)
        digest = hashlib.sha256(key.encode() + windows.tobytes()).hexdigest()[:16]
        path = Path(cache) / f"reference-{windows.shape[0]}x{windows.shape[1]}-{digest}.npy"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            t0 = time.perf_counter()
            tmp = path.with_suffix(".tmp.npy")
            out = None
            for i, ids in enumerate(windows):
                lp = _log_softmax(float_logits(ids)[:-1])
                if out is None:
                    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16,
                                                    shape=(len(windows), windows.shape[1] - 1, lp.shape[-1]))
                out[i] = lp.astype(np.float16)
            out.flush()
            del out
            tmp.rename(path)
            log.info("float reference %s: %.1f s", path.name, time.perf_counter() - t0)
        return cls(windows, path)

    @property
    def tokens(self) -> int:
        """Number of scored positions (n * (L - 1))."""
        return self.windows.shape[0] * (self.windows.shape[1] - 1)

    def evaluate(self, logits_fn: LogitsFn) -> Metrics:
        """(ppl, kld) of ``logits_fn`` over all windows; see the module docstring."""
        import torch

        t0 = time.perf_counter()
        nll_sum = kld_sum = 0.0
        for i, ids in enumerate(self.windows):
            z = np.asarray(logits_fn(ids), dtype=np.float32)
            if z.shape != (len(ids), self._lp.shape[-1]):
                raise ValueError(f"logits_fn returned {z.shape}, expected {(len(ids), self._lp.shape[-1])}")
            # float64: in float32 the KL of two near-identical distributions over 49k tokens rounds to
            # about -1e-5, far below its true floor (3e-7 here)
            lp_m = torch.log_softmax(torch.from_numpy(z[:-1]).double(), dim=-1)
            lp_f = torch.from_numpy(np.array(self._lp[i], dtype=np.float64))  # a copy: the memmap is read-only
            lp_f -= torch.logsumexp(lp_f, dim=-1, keepdim=True)
            target = torch.from_numpy(ids[1:])
            nll_sum += float(-lp_m.gather(1, target[:, None]).sum())
            kld_sum += float((lp_f.exp() * (lp_f - lp_m)).sum())
        n = self.tokens
        return Metrics(ppl=math.exp(nll_sum / n), kld=kld_sum / n, seconds=time.perf_counter() - t0)

    def describe(self) -> dict:
        n, length = self.windows.shape
        return {"windows": int(n), "window_tokens": int(length), "scored_tokens": self.tokens,
                "tokens_sha256": hashlib.sha256(self.windows.tobytes()).hexdigest()[:16],
                "reference": self.reference.name}


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float32, copy=False)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))
