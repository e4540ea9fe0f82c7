"""Split formats: EXL2-style mixed bits within one matrix, salient input channels at a higher width.

A few input channels carry most of a layer's input energy (diag H = Σ x², the same statistic GPTQ's act
order sorts by). A split format ``{lo}+{hi}/{share}`` stores the most energetic ``K/share`` input
channels of W [N, K] in format ``hi`` and the others in ``lo``:

    perm   = argsort(-diag(H))            (stable; ties and dead channels keep their order, dead last)
    W_hi   = W[:, perm[:k_hi]]  in hi     k_hi = K/share rounded to a multiple of both group sizes
    W_lo   = W[:, perm[k_hi:]]  in lo     (its groups run along the sorted order, so channels of
                                           similar energy share a scale: act order's true groups)
    y      = x[..., perm[:k_hi]] @ dequant(W_hi)ᵀ + x[..., perm[k_hi:]] @ dequant(W_lo)ᵀ

The two parts are quantized by one GPTQ sweep in ``perm`` order (salient columns first, their errors
compensated by all the rest). In the graph the input is gathered by the two stored index lists and the
two quantized products are added (:mod:`.quantize`). Every stored bit is counted: both parts' codes,
scales and zeros, and the K indices (int16 where K < 2**15, else int32).

numpy equivalent of ``SplitWeight.dequantize``:

    w = np.empty((N, K), np.float32)
    w[:, perm[:k_hi]] = hi.dequantize();  w[:, perm[k_hi:]] = lo.dequantize()
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from .formats import PRESETS, QuantizedWeight, StorageBits, WeightFormat, formats_for

__all__ = ["SplitFormat", "SplitWeight", "AnyFormat", "split_formats_for", "format_by_name", "salient_order",
           "HI_BITS", "SHARES"]

HI_BITS = {2: 4, 3: 5, 4: 6, 5: 8}
"""The width of the salient part for each low width (two steps up; 5 -> 8)."""

SHARES = (8,)
"""Salient channels are 1/share of K."""


@dataclasses.dataclass(frozen=True)
class SplitFormat:
    """``lo`` for most input channels, ``hi`` for the salient ``1/share`` (module docstring)."""

    lo: WeightFormat
    hi: WeightFormat
    share: int

    @property
    def name(self) -> str:
        return f"{self.lo.name}+{self.hi.name}/{self.share}"

    @property
    def bits(self) -> int:
        """The width of the bulk of the matrix (the report's bits column); storage_bits has the truth."""
        return self.lo.bits

    @property
    def group_size(self) -> int:
        return self.lo.group_size

    def k_hi(self, k: int) -> int:
        """Salient channels of a K-channel input: K/share rounded to a multiple of both group sizes."""
        step = math.lcm(self.lo.group_size, self.hi.group_size)
        return max(step, int(round(k / self.share / step)) * step)

    def supports(self, shape: Sequence[int]) -> bool:
        if len(shape) != 2:
            return False
        n, k = (int(d) for d in shape)
        kh = self.k_hi(k)
        return n > 0 and k - kh > 0 and self.hi.supports((n, kh)) and self.lo.supports((n, k - kh))

    @staticmethod
    def index_dtype(k: int) -> np.dtype:
        return np.dtype(np.int16 if k < 2**15 else np.int32)

    def storage_bits(self, shape: Sequence[int]) -> StorageBits:
        """Both parts' codes, scales and zeros, plus K stored indices."""
        if not self.supports(shape):
            raise ValueError(f"format {self.name} cannot store a weight of shape {tuple(shape)}: K must leave "
                             f"both parts a multiple of their group sizes")
        n, k = (int(d) for d in shape)
        kh = self.k_hi(k)
        index = StorageBits(0, 0, 0, k * self.index_dtype(k).itemsize * 8)
        return self.hi.storage_bits((n, kh)) + self.lo.storage_bits((n, k - kh)) + index

    def quantize(self, w: np.ndarray, importance: np.ndarray | None = None) -> SplitWeight:
        """Round-to-nearest of both parts, salient by ``importance`` (per K channel, e.g. mean x²)."""
        w = np.asarray(w, dtype=np.float32)
        if not self.supports(w.shape):
            self.storage_bits(w.shape)  # raises with the reason
        n, k = w.shape
        imp = np.ones(k) if importance is None else np.asarray(importance, dtype=np.float64)
        perm = salient_order(imp)
        kh = self.k_hi(k)
        hi = self.hi.quantize(w[:, perm[:kh]], importance=imp[perm[:kh]])
        lo = self.lo.quantize(w[:, perm[kh:]], importance=imp[perm[kh:]])
        return SplitWeight(self, perm, hi, lo)


@dataclasses.dataclass(frozen=True)
class SplitWeight:
    """A [N, K] weight in a :class:`SplitFormat`: the permutation and the two quantized parts."""

    format: SplitFormat
    perm: np.ndarray  # [K] input channels, salient first
    hi: QuantizedWeight  # [N, k_hi] over x[..., perm[:k_hi]]
    lo: QuantizedWeight  # [N, K - k_hi] over x[..., perm[k_hi:]]

    def __post_init__(self) -> None:
        k = len(self.perm)
        kh = self.format.k_hi(k)
        if (self.hi.codes.shape[1] != kh or self.lo.codes.shape[1] != k - kh
                or sorted(self.perm.tolist()) != list(range(k))):
            raise ValueError(f"{self.format.name}: perm must be a permutation of K = {k} and the parts "
                             f"[N, {kh}] and [N, {k - kh}], got {self.hi.codes.shape} and {self.lo.codes.shape}")

    @property
    def index_hi(self) -> np.ndarray:
        return self.perm[: self.hi.codes.shape[1]].astype(self.format.index_dtype(len(self.perm)))

    @property
    def index_lo(self) -> np.ndarray:
        return self.perm[self.hi.codes.shape[1]:].astype(self.format.index_dtype(len(self.perm)))

    def dequantize(self) -> np.ndarray:
        n, k = self.hi.codes.shape[0], len(self.perm)
        w = np.empty((n, k), dtype=np.float32)
        kh = self.hi.codes.shape[1]
        w[:, self.perm[:kh]] = self.hi.dequantize()
        w[:, self.perm[kh:]] = self.lo.dequantize()
        return w


AnyFormat = WeightFormat | SplitFormat


def salient_order(importance: np.ndarray) -> np.ndarray:
    """Input channels by decreasing importance (stable: ties keep their order)."""
    return np.argsort(-np.asarray(importance, dtype=np.float64), kind="stable").astype(np.int64)


def split_formats_for(shape: Sequence[int], shares: Sequence[int] = SHARES) -> list[SplitFormat]:
    """Split formats for a [N, K] weight: each fitting low format with its ``HI_BITS`` partner."""
    out = []
    for lo in formats_for(shape):
        if lo.bits not in HI_BITS:
            continue
        hi = WeightFormat(HI_BITS[lo.bits], lo.group_size)
        for share in shares:
            f = SplitFormat(lo, hi, share)
            if f.supports(shape):
                out.append(f)
    return out


def format_by_name(name: str) -> AnyFormat:
    """``q4g64`` or ``q3g64+q5g64/8``."""
    if name in PRESETS:
        return PRESETS[name]
    try:
        parts, share = name.split("/")
        lo, hi = parts.split("+")
        return SplitFormat(PRESETS[lo], PRESETS[hi], int(share))
    except (ValueError, KeyError):
        raise ValueError(f"unknown format {name!r}: expected one of {', '.join(PRESETS)} or LO+HI/SHARE "
                         f"(e.g. q3g64+q5g64/8)") from None
