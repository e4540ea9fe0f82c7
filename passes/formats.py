"""Weight formats: group-wise asymmetric integer codes with a float16 scale and zero, stored as bit planes.

A weight matrix is W [N, K] float32: N output channels, K the reduction dimension (callers transpose an
ONNX MatMul B [K, N] themselves). Format ``q{b}g{g}`` cuts every row into groups of ``g`` consecutive
elements along K and stores, like llama.cpp's Q4_1 (asymmetric min/max):

    codes   uint8   [N, K]     0 <= code < 2**b
    scales  float16 [N, K/g]   one per group
    zeros   float16 [N, K/g]   one per group (an offset, not an integer zero point)

    w ≈ float32(code) * float32(scale) + float32(zero)        (this op order; the kernels match it)

Codes are stored as bit planes of 1, 2, 4 or 8 bits (3 = 2+1, 5 = 4+1, 6 = 4+2): the code's low bits go
to the first plane, its high bits to the next. A plane of width pb is a uint32 array [N, K*pb/32] with

    plane_code[n, k] = (code[n, k] >> shift) & (2**pb - 1)        shift = sum of the earlier planes' widths
    word[n, j]       = sum_i plane_code[n, j*(32/pb) + i] << (pb*i)

so no code straddles a 32-bit word (WGSL has no 64-bit loads). Every stored bit is counted:

    bits per weight = b + (16 + 16) / g                               e.g. q4g128 = 4 + 32/128 = 4.25

and ``storage_bits((N, K)).total == N*K*bpw`` exactly; tests check it against the packed arrays' bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

__all__ = [
    "CLIP_RATIOS",
    "FLOAT16_BPW",
    "PRESETS",
    "QuantizedWeight",
    "StorageBits",
    "WeightFormat",
    "formats_for",
]

FLOAT16_BPW = 16.0
"""Bits per weight of an unquantized float16 tensor, for reports."""

CLIP_RATIOS: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.7, 0.6)
"""Fractions of each group's [min, max] range (shrunk about its midpoint) tried by ``quantize``.
The deep ratios matter at 2 bits (gaussian q2g128: relative error 0.40 with 1.0-0.8, 0.35 with these)."""

_PLANES: dict[int, tuple[int, ...]] = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 8: (8,)}
_GROUP_SIZES = (32, 64, 128)
_DTYPE_BITS = {"float16": 16}
_FLOAT16_MAX = float(np.finfo(np.float16).max)
_BLOCK_ELEMENTS = 1 << 18  # weights per block of rows in quantize's search (1 MiB of float32)


@dataclasses.dataclass(frozen=True)
class StorageBits:
    """Exact number of bits a tensor occupies in a format, itemized."""

    codes: int
    scales: int
    zeros: int
    index: int = 0
    """Stored input-channel indices (split formats, :mod:`.salient`)."""

    @property
    def total(self) -> int:
        return self.codes + self.scales + self.zeros + self.index

    def __add__(self, other: StorageBits) -> StorageBits:
        return StorageBits(self.codes + other.codes, self.scales + other.scales, self.zeros + other.zeros,
                           self.index + other.index)


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    """``bits``-bit codes in groups of ``group_size`` along K with a float16 scale and zero per group.

    Layout and bit count are in the module docstring: bpw = bits + (16 + 16) / group_size.
    """

    bits: int
    group_size: int
    scale_dtype: str = "float16"
    zero_dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.bits not in _PLANES:
            raise ValueError(f"unsupported bits={self.bits!r}: expected one of {sorted(_PLANES)}")
        if self.group_size not in _GROUP_SIZES:
            raise ValueError(
                f"unsupported group_size={self.group_size!r}: expected one of {list(_GROUP_SIZES)}"
            )
        for field, dtype in (("scale_dtype", self.scale_dtype), ("zero_dtype", self.zero_dtype)):
            if dtype not in _DTYPE_BITS:
                raise ValueError(f"unsupported {field}={dtype!r}: expected one of {sorted(_DTYPE_BITS)}")

    # -- derived ---------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return f"q{self.bits}g{self.group_size}"

    @property
    def planes(self) -> tuple[int, ...]:
        """Bit widths of the stored planes, low bits first (3 -> (2, 1), 5 -> (4, 1), 6 -> (4, 2))."""
        return _PLANES[self.bits]

    @property
    def bpw(self) -> float:
        """Bits per weight: bits + (scale bits + zero bits) / group_size."""
        return self.bits + (_DTYPE_BITS[self.scale_dtype] + _DTYPE_BITS[self.zero_dtype]) / self.group_size

    @property
    def max_code(self) -> int:
        return (1 << self.bits) - 1

    # -- size ------------------------------------------------------------------------------------

    def supports(self, shape: Sequence[int]) -> bool:
        """Whether a [N, K] weight fits this format: K must be a multiple of the group size."""
        if len(shape) != 2:
            return False
        n, k = (int(d) for d in shape)
        return n > 0 and k > 0 and k % self.group_size == 0

    def storage_bits(self, shape: Sequence[int]) -> StorageBits:
        """Exact bits of a [N, K] weight: codes N*K*bits, scales and zeros N*(K/g)*16 each."""
        self._check_shape(shape)
        n, k = (int(d) for d in shape)
        groups = n * (k // self.group_size)
        return StorageBits(
            codes=n * k * self.bits,
            scales=groups * _DTYPE_BITS[self.scale_dtype],
            zeros=groups * _DTYPE_BITS[self.zero_dtype],
        )

    def _check_shape(self, shape: Sequence[int]) -> None:
        if not self.supports(shape):
            raise ValueError(
                f"format {self.name} cannot store a weight of shape {tuple(shape)}: expected [N, K] with "
                f"N > 0 and K a positive multiple of {self.group_size}; pick a smaller group size "
                f"(see formats_for) or keep the tensor in float"
            )

    # -- numerics --------------------------------------------------------------------------------

    def quantize(
        self,
        w: np.ndarray,
        importance: np.ndarray | None = None,
        clip_ratios: Sequence[float] = CLIP_RATIOS,
    ) -> QuantizedWeight:
        """Round-to-nearest with a per-group clipping search.

        For each group and each ratio r in ``clip_ratios`` the range [lo, hi] = [min, max] is shrunk
        about its midpoint to r times its width; scale = (hi - lo) / (2**b - 1) and zero = lo are
        rounded to float16 first (zero down, scale up, so the grid still covers [lo, hi]) and the codes
        are clip(round((w - zero16) / scale16), 0, 2**b - 1) in float32. The ratio with the lowest
        squared reconstruction error, weighted per K channel by ``importance`` (default uniform), wins;
        ties keep the earlier ratio. ``clip_ratios=(1.0,)`` is plain min/max.
        """
        w = np.asarray(w)
        if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
            raise ValueError(f"expected a float [N, K] weight, got dtype {w.dtype} shape {w.shape}")
        self._check_shape(w.shape)
        w32 = np.ascontiguousarray(w, dtype=np.float32)
        if not np.isfinite(w32).all():
            raise ValueError("weight has NaN or infinite values; nothing sensible can be quantized")
        ratios = [float(r) for r in clip_ratios]
        if not ratios or not all(0.0 < r <= 1.0 for r in ratios):
            raise ValueError(f"clip_ratios must be a non-empty list of values in (0, 1], got {clip_ratios!r}")
        n, k = w32.shape
        g = self.group_size
        wg = w32.reshape(n, k // g, g)
        imp = None
        if importance is not None:
            imp = np.asarray(importance, dtype=np.float32)
            if imp.shape != (k,) or not np.isfinite(imp).all() or (imp < 0).any():
                raise ValueError(f"importance must be {k} finite non-negative values (one per K channel)")
            imp = imp.reshape(k // g, g)

        lo, hi = wg.min(axis=-1), wg.max(axis=-1)
        peak = max(-float(lo.min()), float(hi.max()))
        if peak > _FLOAT16_MAX:
            raise ValueError(
                f"weight magnitude {peak:g} exceeds the float16 range ({_FLOAT16_MAX:g}) of the zero of "
                f"{self.name}: rescale the tensor (e.g. fold a factor into the next op) or keep it in float"
            )
        codes = np.empty((n, k // g, g), dtype=np.uint8)
        scales = np.empty((n, k // g), dtype=np.float16)
        zeros = np.empty((n, k // g), dtype=np.float16)
        rows = max(1, _BLOCK_ELEMENTS // k)  # blocks of rows that stay in cache through the search
        for r0 in range(0, n, rows):
            block = slice(r0, min(n, r0 + rows))
            found = self._search(wg[block], lo[block], hi[block], imp, ratios)
            codes[block], scales[block], zeros[block] = found
        return QuantizedWeight(self, codes.reshape(n, k), scales, zeros)

    def _search(self, wg, lo, hi, imp, ratios):
        """(codes, scale16, zero16) of grouped w [n, G, g] with the best clip ratio per group."""
        mid, half = 0.5 * lo + 0.5 * hi, 0.5 * hi - 0.5 * lo
        best = None
        for r in ratios:
            scale16, zero16 = self._grid(mid - r * half, mid + r * half)
            scale = scale16.astype(np.float32)
            # w - dequant(w) = scale * (t - code) with t = (w - zero) / scale: fewer passes than dequantizing.
            t = wg - zero16.astype(np.float32)[..., None]
            t /= scale[..., None]
            d = np.rint(t)
            np.clip(d, 0, self.max_code, out=d)
            d -= t
            d *= d
            if imp is not None:
                d *= imp
            err = d.sum(axis=-1) * (scale * scale)
            if best is None:
                best = (err, scale16, zero16)
            else:
                better = err < best[0]
                best = tuple(np.where(better, new, old) for new, old in zip((err, scale16, zero16), best))
        _, scale16, zero16 = best
        return self._codes(wg, scale16, zero16).astype(np.uint8), scale16, zero16

    def _grid(self, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """float16 (scale, zero) whose grid zero + [0, 2**b-1] * scale covers [lo, hi]."""
        with np.errstate(over="ignore"):  # nextafter of ±65504 is evaluated but never selected
            zero16 = lo.astype(np.float16)
            above = zero16.astype(np.float32) > lo
            zero16 = np.where(above, np.nextafter(zero16, np.float16(-np.inf)), zero16)
            top = zero16.astype(np.float32)
            scale16 = ((hi - top) / np.float32(self.max_code)).astype(np.float16)
            short = top + np.float32(self.max_code) * scale16.astype(np.float32) < hi
            scale16 = np.where(short, np.nextafter(scale16, np.float16(np.inf)), scale16)
        # A constant group (hi == lo) or one narrower than float16 resolves gets scale 1: every code is 0.
        scale16 = np.where(scale16 > 0, scale16, np.float16(1.0)).astype(np.float16)
        return scale16, zero16.astype(np.float16)

    def _codes(self, wg: np.ndarray, scale16: np.ndarray, zero16: np.ndarray) -> np.ndarray:
        """float32 codes clip(round((w - zero16) / scale16), 0, 2**b-1) for grouped w [N, G, g]."""
        q = wg - zero16.astype(np.float32)[..., None]
        np.divide(q, scale16.astype(np.float32)[..., None], out=q)
        np.rint(q, out=q)
        np.clip(q, 0, self.max_code, out=q)
        return q

    def dequantize(self, q: QuantizedWeight) -> np.ndarray:
        """float32 [N, K]: float32(code) * float32(scale16) + float32(zero16), per group."""
        if q.format != self:
            raise ValueError(f"cannot dequantize a {q.format.name} weight with format {self.name}")
        n, k = q.codes.shape
        g = self.group_size
        codes = q.codes.reshape(n, k // g, g).astype(np.float32)
        w = codes * q.scales.astype(np.float32)[..., None]
        w += q.zeros.astype(np.float32)[..., None]
        return w.reshape(n, k)

    # -- packing ---------------------------------------------------------------------------------

    def pack(self, codes: np.ndarray) -> list[np.ndarray]:
        """Bit planes of uint8 codes [N, K]: one uint32 array [N, K*pb/32] per plane (module docstring)."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or not np.issubdtype(codes.dtype, np.integer):
            raise ValueError(f"expected integer codes [N, K], got dtype {codes.dtype} shape {codes.shape}")
        self._check_shape(codes.shape)
        if codes.size and (codes.min() < 0 or codes.max() > self.max_code):
            raise ValueError(f"codes of {self.name} must lie in [0, {self.max_code}]")
        c = codes.astype(np.uint32)
        n, k = c.shape
        planes, shift = [], 0
        for pb in self.planes:
            per = 32 // pb
            p = ((c >> shift) & ((1 << pb) - 1)).reshape(n, k // per, per)
            p <<= np.arange(0, 32, pb, dtype=np.uint32)
            # The shifted fields are disjoint bit ranges, so their sum is their bitwise or.
            planes.append(p.sum(axis=-1, dtype=np.uint32))
            shift += pb
        return planes

    def unpack(self, planes: Sequence[np.ndarray], shape: Sequence[int]) -> np.ndarray:
        """uint8 codes [N, K] from the planes written by ``pack``."""
        self._check_shape(shape)
        n, k = (int(d) for d in shape)
        if len(planes) != len(self.planes):
            raise ValueError(f"{self.name} has {len(self.planes)} planes {self.planes}, got {len(planes)}")
        codes = np.zeros((n, k), dtype=np.uint32)
        shift = 0
        for words, pb in zip(planes, self.planes):
            words = np.asarray(words)
            if words.dtype != np.uint32 or words.shape != (n, k * pb // 32):
                raise ValueError(
                    f"plane of {pb} bits of {self.name} for shape {(n, k)} must be uint32 "
                    f"{(n, k * pb // 32)}, got {words.dtype} {words.shape}"
                )
            fields = (words[..., None] >> np.arange(0, 32, pb, dtype=np.uint32)) & np.uint32((1 << pb) - 1)
            codes |= fields.reshape(n, k) << np.uint32(shift)
            shift += pb
        return codes.astype(np.uint8)


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A [N, K] weight in ``format``: uint8 codes [N, K], float16 scales and zeros [N, K/group_size]."""

    format: WeightFormat
    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray

    def __post_init__(self) -> None:
        n, k = self.codes.shape
        groups = (n, k // self.format.group_size)
        if self.codes.dtype != np.uint8 or self.scales.shape != groups or self.zeros.shape != groups:
            raise ValueError(
                f"{self.format.name}: expected uint8 codes [N, K] and float16 scales/zeros {groups}, got "
                f"{self.codes.dtype} {self.codes.shape}, {self.scales.shape}, {self.zeros.shape}"
            )
        if self.scales.dtype != np.float16 or self.zeros.dtype != np.float16:
            raise ValueError(f"{self.format.name}: scales and zeros must be float16")

    def dequantize(self) -> np.ndarray:
        return self.format.dequantize(self)


PRESETS: dict[str, WeightFormat] = {
    "q2g32": WeightFormat(2, 32),
    "q2g64": WeightFormat(2, 64),
    "q2g128": WeightFormat(2, 128),
    "q3g32": WeightFormat(3, 32),
    "q3g64": WeightFormat(3, 64),
    "q3g128": WeightFormat(3, 128),
    "q4g32": WeightFormat(4, 32),
    "q4g64": WeightFormat(4, 64),
    "q4g128": WeightFormat(4, 128),
    "q5g32": WeightFormat(5, 32),
    "q5g64": WeightFormat(5, 64),
    "q5g128": WeightFormat(5, 128),
    "q6g32": WeightFormat(6, 32),
    "q6g64": WeightFormat(6, 64),
    "q6g128": WeightFormat(6, 128),
    "q8g32": WeightFormat(8, 32),
    "q8g64": WeightFormat(8, 64),
    "q8g128": WeightFormat(8, 128),
}
"""Every supported (bits, group size), keyed by name."""


def formats_for(shape: Sequence[int]) -> list[WeightFormat]:
    """The presets that can store a [N, K] weight, cheapest (lowest bpw) first."""
    return sorted((f for f in PRESETS.values() if f.supports(shape)), key=lambda f: (f.bpw, f.bits))
