"""Dequantizing GEMM on tensor cores (TIR, ``mma.sync.m16n8k16`` fp16 x fp16 -> fp32) for batch > 8.

``y[M, N] = x[M, K] @ dequantize(W)[N, K].T`` with the weights in the canonical packing of
:mod:`qcompile.passes.formats` (bit planes of uint32 words [N, K*pb/32], float16 scales and zeros
[N, K/g]; no retiling) and float32 x, y, like :func:`.kernels.gemv`.  Numerics: x and the dequantized
weights are rounded to float16 (round to nearest even), their products accumulated in float32::

    w16 = float16(code * scale + zero)        (one rounding of the exact value: fma.rn.f16x2)
    y   = float32(x).astype(float16) @ w16.T  (products exact in float32, sums in float32)

so against the float32 kernels the relative error is that of fp16 operands (~3e-4 on random data,
:data:`FP16_TOLERANCE` asserted); against :func:`reference` (the same fp16 rounding) only the float32
summation order differs (:data:`EMULATED_TOLERANCE`).

A block computes a ``bm x bn`` tile of y over ``K / ksplit`` (``ksplit > 1``: blocks along K add
their partial tiles into y, zeroed first, with float32 atomics).  Per K step of ``bk`` codes each thread
loads its share of packed words, fp16 scales/zeros and float32 x into registers (the next step's loads
are in flight while the tensor cores work on this one), then writes the step to the other of two
shared-memory buffers as fp16 pairs: x through ``cvt.rn.f16x2.f32``; codes without shifting each one
down: a pair of codes at bits ``p`` and ``p + 16`` of a word (low plane, the high plane's bits moved
next to them) ORed into ``0x64006400`` reads as the half2 ``(1024 + c * 2**P)`` exactly, and two
``fma.rn.f16x2`` give ``c`` and then ``c * scale + zero``.  Pairs hold codes ``(t, t + F/2)`` of a
low-plane word of ``F`` codes, not neighbours: x is staged in the same order along K (a dot product
does not care about the order of K).  Warps then run ``ldmatrix`` + ``mma.sync`` on their
``(bm/wm) x (bn/wn)`` sub-tile.  Shared rows are padded by 16 bytes (conflict-free ``ldmatrix``).

:func:`dispatch` joins the GEMV and GEMM kernels into one PrimFunc that picks by M at run time.
The numpy half (:func:`reference`, :func:`dequantize_pairs`, :func:`pair_plan`) imports without TVM.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from qcompile.passes.formats import WeightFormat

__all__ = ["GemmConfig", "gemm", "gemv_or_gemm", "dequant_matmul_f16", "gemm_config", "gemm_tiers", "fit_config",
           "dispatch", "pair_plan", "dequantize_pairs", "pair_order", "reference", "GEMV_MAX_M", "FP16_TOLERANCE",
           "EMULATED_TOLERANCE"]

OPAQUE = 8  # relax OpPatternKind.kOpaque (as in .kernels)
WARP = 32
CHUNK = 32  # codes per chunk: a whole word of a 1-bit plane; a group (>= 32) never splits a chunk
GEMV_MAX_M = 8  # batch <= 8 keeps the GEMV (weights streamed once per row: fine up to 8 rows)
FP16_TOLERANCE = 2e-3  # ||y - y_fp32|| / ||y_fp32||: fp16 x and weights (measured ~3e-4 on random data)
EMULATED_TOLERANCE = 1e-5  # ||y - reference|| / ||reference||: only the float32 summation order differs
MAGIC = 0x6400  # float16 1024.0: 1024 + v is exact in fp16 for integers v < 1024
MMA = "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"  # D = A (16x16, row) B (16x8, col) + C, fp32 C/D


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tile of :func:`gemm`: ``bm x bn`` outputs per block over K steps of ``bk`` codes; ``wm x wn`` warps
    (each a ``bm/wm x bn/wn`` sub-tile); ``ksplit`` blocks along K (atomics into a zeroed y)."""

    bm: int = 128
    bn: int = 128
    bk: int = 32
    wm: int = 2
    wn: int = 4
    ksplit: int = 1
    depth: int = 1  # K steps whose global loads are in flight at once (register stages)

    def __post_init__(self):
        if self.bm % (16 * self.wm) or self.bn % (16 * self.wn) or self.bk % CHUNK or self.depth < 1:
            raise ValueError(f"{self}: bm/wm and bn/wn must be multiples of 16, bk of {CHUNK}, depth >= 1")

    @property
    def name(self) -> str:
        return f"m{self.bm}n{self.bn}k{self.bk}w{self.wm}x{self.wn}s{self.ksplit}d{self.depth}"


def gemm_config(max_m: int, n: int, k: int) -> GemmConfig:
    """Tile for batches up to ``max_m`` rows (None: any), the best of the H100 sweep over 4096x4096,
    4096x14336 and 14336x4096 at M = 16, 64, 256 (bench/gpu/NOTES.md, bench/results/gpu_gemm_sweep.json).
    Small batches split K across blocks (atomics into y) so that the grid covers the GPU; each weight is
    dequantized once per ``bm`` rows, so bigger batches take taller tiles."""
    if max_m is not None and max_m <= 16:
        cfg = GemmConfig(bm=16, bn=128, bk=128, wm=1, wn=4, ksplit=4, depth=3)
    elif max_m is not None and max_m <= 128:
        cfg = GemmConfig(bm=32, bn=128, bk=128, wm=2, wn=4, ksplit=4, depth=3)
    else:
        cfg = GemmConfig(bm=64, bn=128, bk=64, wm=2, wn=4, ksplit=2, depth=1)
    return fit_config(cfg, k)


def fit_config(cfg: GemmConfig, k: int) -> GemmConfig:
    """``cfg`` with ``bk`` and ``ksplit`` reduced until ``bk * ksplit`` divides K (K is a multiple of 32)."""
    bk, ks = cfg.bk, cfg.ksplit
    while k % (bk * ks):
        if ks > 1:
            ks //= 2
        elif bk > CHUNK:
            bk //= 2
        else:  # pragma: no cover  (K % 32 == 0 always fits)
            raise ValueError(f"gemm: K={k} is not a multiple of {CHUNK}")
    return dataclasses.replace(cfg, bk=bk, ksplit=ks)


def gemm_tiers(n: int, k: int) -> list[tuple[int | None, GemmConfig]]:
    """The GEMM configs :func:`dispatch` picks from: (largest M, config), the last for any M."""
    return [(16, gemm_config(16, n, k)), (128, gemm_config(128, n, k)), (None, gemm_config(None, n, k))]


# ------------------------------------------------------------------------------- the pair plan


@dataclasses.dataclass(frozen=True)
class Pair:
    """Half2 word ``slot`` of a 32-code chunk: codes ``lo`` and ``hi`` (chunk positions).  Low plane: word
    ``word``, fields at bits ``shift + pos`` and ``shift + pos + 16`` (``pos + bits <= 10``); high plane
    (if any): word ``word1``, rotated left by ``d_lo`` / ``d_hi`` bits (negative: right) to ``pos + pb0``."""

    slot: int
    lo: int
    hi: int
    word: int
    shift: int
    pos: int
    word1: int = 0
    d_lo: int = 0
    d_hi: int = 0


def _pair_fields(planes: tuple[int, ...], q):
    """(lo, hi, word, shift, pos, word1, d_lo, d_hi) of pair ``q`` (a Python int, or a TIR expression
    that the kernel's unrolled loops turn into constants): see :class:`Pair`."""
    pb0 = planes[0]
    half = 16 // pb0  # pairs per low-plane word (of 32 / pb0 codes)
    word, t = q // half, q % half
    lo = word * 2 * half + t
    b = pb0 * t
    shift, pos = b // 8 * 8, b % 8
    if len(planes) == 1:
        return lo, lo + half, word, shift, pos, 0, 0, 0
    pb1 = planes[1]
    return (lo, lo + half, word, shift, pos, lo * pb1 // 32, pos + pb0 - lo * pb1 % 32,
            pos + pb0 + 16 - (lo + half) * pb1 % 32)


def pair_plan(planes: tuple[int, ...]) -> list[Pair]:
    """The 16 half2 words of a chunk of 32 codes, for bit planes ``planes`` (low first)."""
    bits = sum(planes)
    out = []
    for q in range(16):
        pair = Pair(q, *_pair_fields(planes, q))
        if pair.pos + bits > 10:
            raise ValueError(f"pair_plan{planes}: code at bit {pair.pos} does not fit 10 mantissa bits")
        if len(planes) > 1 and pair.hi * planes[1] // 32 != pair.word1:
            raise ValueError(f"pair_plan{planes}: a pair's high bits span two words")
        out.append(pair)
    return out


def pair_order(planes: tuple[int, ...]) -> np.ndarray:
    """Chunk positions in shared-memory order: ``[lo0, hi0, lo1, hi1, ...]`` (32 entries)."""
    return np.array([[p.lo, p.hi] for p in pair_plan(planes)]).reshape(-1)


def _mask(pb: int) -> int:
    return (1 << pb) - 1


def _rotl(word: np.ndarray, d: int) -> np.ndarray:
    """``word`` rotated left by ``d`` bits (right for d < 0), as the kernel moves the high plane's bits."""
    return (word << np.uint32(d % 32)) | (word >> np.uint32(-d % 32))


def dequantize_pairs(fmt: WeightFormat, planes: list[np.ndarray], scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
    """numpy emulation of the kernel's dequantization: float16 [N, K] in shared-memory order (per chunk
    of 32 codes, :func:`pair_order`), computed from the packed words as the kernel does (bit tricks, the
    magic 1024, two fp16 FMAs; an FMA of exact values rounds once, as float64 -> float16 does here)."""
    pl = tuple(fmt.planes)
    n, k = planes[0].shape[0], planes[0].shape[1] * 32 // pl[0]
    g = fmt.group_size
    out = np.empty((n, k), np.float16)
    for c0 in range(0, k, CHUNK):
        w0 = planes[0][:, c0 * pl[0] // 32: (c0 + CHUNK) * pl[0] // 32]
        w1 = planes[1][:, c0 * pl[1] // 32: (c0 + CHUNK) * pl[1] // 32] if len(pl) > 1 else None
        s = scales[:, c0 // g].astype(np.float64)
        z = zeros[:, c0 // g].astype(np.float64)
        for p in pair_plan(pl):
            m0 = _mask(pl[0])
            h = (w0[:, p.word] >> np.uint32(p.shift)) & np.uint32((m0 << p.pos) | (m0 << (p.pos + 16)))
            if w1 is not None:
                m1 = _mask(pl[1])
                h |= _rotl(w1[:, p.word1], p.d_lo) & np.uint32(m1 << (p.pos + pl[0]))
                h |= _rotl(w1[:, p.word1], p.d_hi) & np.uint32(m1 << (p.pos + pl[0] + 16))
            h |= np.uint32(MAGIC | MAGIC << 16)
            for lane, col in ((0, 2 * p.slot), (1, 2 * p.slot + 1)):
                v = ((h >> np.uint32(16 * lane)) & np.uint32(0xFFFF)).astype(np.uint16).view(np.float16)
                code = v.astype(np.float64) * 2.0 ** -p.pos - 1024.0 * 2.0 ** -p.pos  # fma #1: exact
                out[:, c0 + col] = (code * s + z).astype(np.float16)  # fma #2: one rounding
    return out


def reference(fmt: WeightFormat, planes: list[np.ndarray], scales: np.ndarray, zeros: np.ndarray,
              x: np.ndarray) -> np.ndarray:
    """numpy equivalent of :func:`gemm` (float64): ``float16(x) @ float16(code * s + z).T``."""
    n = planes[0].shape[0]
    k = planes[0].shape[1] * 32 // fmt.planes[0]
    g = fmt.group_size
    codes = fmt.unpack(planes, (n, k)).astype(np.float64).reshape(n, k // g, g)
    w16 = (codes * scales.astype(np.float64)[..., None] + zeros.astype(np.float64)[..., None]).astype(np.float16)
    return x.astype(np.float16).astype(np.float64) @ w16.reshape(n, k).astype(np.float64).T


# ------------------------------------------------------------------------------------ the kernel


def gemm(fmt: WeightFormat, k: int, n: int, config: GemmConfig | None = None):
    """Scheduled CUDA TIR ``y[M, N] = x[M, K] @ dequantize(W)[N, K].T`` on tensor cores, any M (symbolic).

    Same arguments as :func:`.kernels.gemv` (x float32 [M, K], planes uint32, float16 scales and zeros,
    y float32 [M, N]); numpy equivalent :func:`reference` (fp16 operands, float32 sums; module docstring).
    """
    from tvm.script import tirx as T  # noqa: PLC0415  (this module's numpy half imports without TVM)

    planes, g = tuple(fmt.planes), fmt.group_size
    if k % g or k % CHUNK:
        raise ValueError(f"gemm: K={k} must divide by group {g} and by {CHUNK}")
    cfg = fit_config(config or gemm_config(None, n, k), k)
    bm, bn, bk, wm, wn, ks, depth = cfg.bm, cfg.bn, cfg.bk, cfg.wm, cfg.wn, cfg.ksplit, cfg.depth
    p0 = planes[0]
    p1 = planes[1] if len(planes) > 1 else planes[0]
    two = len(planes) > 1
    plan = pair_plan(planes)
    warps = wm * wn
    threads = warps * WARP
    tm, tn = bm // wm, bn // wn
    mt, nt = tm // 16, tn // 8
    kw = bk // 2 + 4  # shared row: bk fp16 in uint32 pairs + 16 bytes of padding
    kslice = k // ks  # codes per block along K
    steps = kslice // bk
    depth = min(depth, steps)  # no more stages than steps (and TVM 0.27 loses the stage variable if so)
    nchunks, nunits = bn * bk // CHUNK, bm * bk // 16  # weight chunks (32 codes) and x units (16) per step
    cw, cx = -(-nchunks // threads), -(-nunits // threads)
    cpr, upr = bk // CHUNK, bk // 16  # chunks and units per row and step
    v0, v1 = p0, p1  # words of each plane per chunk
    vec0, vec1 = min(v0, 4), min(v1, 4)
    nblocks = -(-n // bn)
    kg = k // g
    m0, m1 = _mask(p0), _mask(p1)
    magic = MAGIC | MAGIC << 16
    # an x unit (16 codes) gives 8 pairs, those of the first 8 slots (the plan repeats every 16 codes)
    if any((p.lo // 16, p.hi // 16, p.slot // 8) != (p.slot // 8,) * 3 or
           (p.lo % 16, p.hi % 16) != (plan[p.slot % 8].lo, plan[p.slot % 8].hi) for p in plan):
        raise ValueError(f"gemm: the pairs of {planes} do not repeat every 16 codes")

    def u32(e):
        return T.Cast("uint32", e)

    def sh(word, d):
        """``word`` rotated left by ``d`` (right for d < 0): bit q lands at q + d, which is all the mask
        after it keeps (no sign test: ``d`` is a constant only once the loops are unrolled)."""
        return T.bitwise_or(T.shift_left(word, u32(T.floormod(d, 32))), T.shift_right(word, u32(T.floormod(-d, 32))))

    def lut(i, table):
        """``table[i]`` (uint32 constants) for an index that the unrolled loops make constant: a chain of
        selects that folds, where a shift of constants would be left for CSE to hoist to the host."""
        out = T.uint32(table[-1])
        for j in range(len(table) - 2, -1, -1):
            out = T.if_then_else(i == j, T.uint32(table[j]), out)
        return out

    def pair_bits(wr0, wr1, sg, c, q):
        """Pair ``q``'s two codes in one uint32 over the magic 1024 (module docstring), chunk ``c`` of
        register stage ``sg``."""
        _, _, word, shift, pos, word1, d_lo, d_hi = _pair_fields(planes, q)
        h = T.bitwise_and(T.shift_right(wr0[sg, c, word], u32(shift)),
                          lut(pos, [(m0 << v) | (m0 << (v + 16)) for v in range(8)]))
        if two:
            h = T.bitwise_or(h, T.bitwise_or(
                T.bitwise_and(sh(wr1[sg, c, word1], d_lo),
                              lut(pos, [(m1 << (v + p0)) & 0xFFFFFFFF for v in range(8)])),
                T.bitwise_and(sh(wr1[sg, c, word1], d_hi),
                              lut(pos, [(m1 << (v + p0 + 16)) & 0xFFFFFFFF for v in range(8)]))))
        return T.bitwise_or(h, T.uint32(magic))

    def pow2_pair(q):
        """half2 (2**-pos, 2**-pos) of pair ``q``: its first FMA's factor."""
        return lut(_pair_fields(planes, q)[4], [(0x3C00 - v * 0x400) * 0x10001 for v in range(8)])

    def offset_pair(q):
        """half2 (-1024 * 2**-pos) twice: its first FMA's addend (fp16 -2**(10 - pos))."""
        return lut(_pair_fields(planes, q)[4], [(0xE400 - v * 0x400) * 0x10001 for v in range(8)])

    def x_lo(q):
        return _pair_fields(planes, q)[0]

    def x_hi(q):
        return _pair_fields(planes, q)[1]

    def half2(v):
        u = T.Cast("uint32", T.reinterpret("uint16", v))
        return T.bitwise_or(u, T.shift_left(u, T.uint32(16)))

    @T.prim_func(private=True)
    def kernel(x_h: T.handle, w0_h: T.handle, w1_h: T.handle, s_h: T.handle, z_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": OPAQUE, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")
        w0 = T.match_buffer(w0_h, (n, k * p0 // 32), "uint32")
        w1 = T.match_buffer(w1_h, (n, k * p1 // 32), "uint32")
        s = T.match_buffer(s_h, (n, kg), "float16")
        z = T.match_buffer(z_h, (n, kg), "float16")
        y = T.match_buffer(y_h, (m, n), "float32")
        if ks > 1:  # the blocks along K add their partial tiles into y
            for r in T.thread_binding(m, thread="blockIdx.x"):
                for t in T.thread_binding(256, thread="threadIdx.x"):
                    for j in range((n + 255) // 256):
                        if j * 256 + t < n:
                            y[r, j * 256 + t] = T.float32(0)
        for mb in T.thread_binding((m + bm - 1) // bm, thread="blockIdx.x"):
            for nb in T.thread_binding(nblocks, thread="blockIdx.y"):
                for kz in T.thread_binding(ks, thread="blockIdx.z"):
                    for wy in T.thread_binding(warps, thread="threadIdx.y"):
                        for tx in T.thread_binding(WARP, thread="threadIdx.x"):
                            # flat: a 2-D buffer would be compacted to the columns used (no padding)
                            a_s = T.alloc_buffer((2 * bm * kw,), "uint32", scope="shared.dyn")
                            b_s = T.alloc_buffer((2 * bn * kw,), "uint32", scope="shared.dyn")
                            xr = T.alloc_buffer((depth, cx, 16), "float32", scope="local")
                            wr0 = T.alloc_buffer((depth, cw, v0), "uint32", scope="local")
                            wr1 = T.alloc_buffer((depth, cw, v1), "uint32", scope="local")
                            sr = T.alloc_buffer((depth, cw), "float16", scope="local")
                            zr = T.alloc_buffer((depth, cw), "float16", scope="local")
                            hx = T.alloc_buffer((8,), "uint32", scope="local")
                            dq = T.alloc_buffer((16,), "uint32", scope="local")
                            af = T.alloc_buffer((mt, 4), "uint32", scope="local")
                            bf = T.alloc_buffer((nt, 2), "uint32", scope="local")
                            acc = T.alloc_buffer((mt, nt, 4), "float32", scope="local")
                            tid = T.meta_var(wy * WARP + tx)
                            k0 = T.meta_var(kz * kslice)  # this block's K range starts here
                            for i in T.unroll(mt):
                                for j in T.unroll(nt):
                                    for e in T.unroll(4):
                                        acc[i, j, e] = T.float32(0)
                            # iteration st: loads of step st, the tensor cores on step st - depth, step st + 1 - depth
                            # into shared memory; a register stage per step in flight (unrolled: constant indices)
                            for st0 in range((steps + depth + depth - 1) // depth):
                                for d in T.unroll(depth):
                                    st = T.meta_var(st0 * depth + d)
                                    if st < steps:  # step st's words, scales, zeros, x into register stage d
                                        for c in T.unroll(cw):
                                            q = T.meta_var(c * threads + tid)  # row q // cpr, chunk q % cpr
                                            row = T.meta_var(T.min(nb * bn + q // cpr, n - 1))
                                            kk0 = T.meta_var(k0 + st * bk + q % cpr * CHUNK)
                                            if q < nchunks:
                                                for i0 in T.unroll(v0 // vec0):
                                                    for i in T.vectorized(vec0):
                                                        wr0[d, c, i0 * vec0 + i] = w0[row, kk0 * p0 // 32
                                                                                      + i0 * vec0 + i]
                                                if two:
                                                    for i0 in T.unroll(v1 // vec1):
                                                        for i in T.vectorized(vec1):
                                                            wr1[d, c, i0 * vec1 + i] = w1[row, kk0 * p1 // 32
                                                                                          + i0 * vec1 + i]
                                                sr[d, c] = s[row, kk0 // g]
                                                zr[d, c] = z[row, kk0 // g]
                                        for c in T.unroll(cx):
                                            q = T.meta_var(c * threads + tid)  # x unit q: row q // upr, 16 codes
                                            xrow = T.meta_var(T.min(T.Cast("int64", mb * bm + q // upr),
                                                                    m - 1))
                                            if q < nunits:
                                                for i0 in T.unroll(4):
                                                    for i in T.vectorized(4):
                                                        xr[d, c, i0 * 4 + i] = x[xrow,
                                                                              k0 + st * bk + q % upr * 16 + i0 * 4 + i]
                                    if st >= depth and st < steps + depth:  # the tensor cores on step st - depth
                                        abase = T.meta_var(((st + depth) % 2 * bm + wy // wn * tm) * kw)
                                        bbase = T.meta_var(((st + depth) % 2 * bn + wy % wn * tn) * kw)
                                        for kk in T.unroll(bk // 16):
                                            for i in T.unroll(mt):
                                                T.evaluate(T.ptx["ldmatrix.sync.aligned.m8n8.x4.shared.b16"](
                                                    af[i, 0], af[i, 1], af[i, 2], af[i, 3],
                                                    T.address_of(a_s[abase + (i * 16 + tx % 16) * kw + kk * 8
                                                                     + tx // 16 * 4])))
                                            for j in T.unroll(nt // 2):
                                                T.evaluate(T.ptx["ldmatrix.sync.aligned.m8n8.x4.shared.b16"](
                                                    bf[2 * j, 0], bf[2 * j, 1], bf[2 * j + 1, 0], bf[2 * j + 1, 1],
                                                    T.address_of(b_s[bbase + (j * 16 + tx % 8 + tx // 16 * 8) * kw
                                                                     + kk * 8 + tx // 8 % 2 * 4])))
                                            for i in T.unroll(mt):
                                                for j in T.unroll(nt):
                                                    T.evaluate(T.ptx[MMA](
                                                        acc[i, j, 0], acc[i, j, 1], acc[i, j, 2], acc[i, j, 3],
                                                        af[i, 0], af[i, 1], af[i, 2], af[i, 3], bf[j, 0], bf[j, 1],
                                                        acc[i, j, 0], acc[i, j, 1], acc[i, j, 2], acc[i, j, 3]))
                                    # step st + 1 - depth (register stage (d + 1) % depth) into shared buffer
                                    # (st + 1 - depth) % 2, as fp16 pairs
                                    if st + 1 >= depth and st + 1 < steps + depth:
                                        for c in T.unroll(cx):
                                            q = T.meta_var(c * threads + tid)
                                            if q < nunits:
                                                for p in T.unroll(8):
                                                    T.evaluate(T.ptx["cvt.rn.f16x2.f32"](
                                                        hx[p], xr[(d + 1) % depth, c, x_hi(p)],
                                                        xr[(d + 1) % depth, c, x_lo(p)]))
                                                for i0 in T.unroll(2):
                                                    for i in T.vectorized(4):
                                                        a_s[((st + 1 + depth) % 2 * bm + q // upr) * kw + q % upr * 8
                                                            + i0 * 4 + i] = hx[i0 * 4 + i]
                                        for c in T.unroll(cw):
                                            q = T.meta_var(c * threads + tid)
                                            if q < nchunks:
                                                for p in T.unroll(16):
                                                    T.evaluate(T.ptx["fma.rn.f16x2"](
                                                        dq[p], pair_bits(wr0, wr1, (d + 1) % depth, c, p), pow2_pair(p),
                                                        offset_pair(p)))
                                                    T.evaluate(T.ptx["fma.rn.f16x2"](
                                                        dq[p], dq[p], half2(sr[(d + 1) % depth, c]),
                                                        half2(zr[(d + 1) % depth, c])))
                                                for i0 in T.unroll(4):
                                                    for i in T.vectorized(4):
                                                        b_s[((st + 1 + depth) % 2 * bn + q // cpr) * kw + q % cpr * 16
                                                            + i0 * 4 + i] = dq[i0 * 4 + i]
                                    T.tvm_storage_sync("shared.dyn")
                            # C fragment e of tile (i, j): row tx // 4 (+ 8 for e >= 2), column 2 * (tx % 4) + e % 2
                            for i in T.unroll(mt):
                                for j in T.unroll(nt):
                                    for e in T.unroll(4):
                                        row = T.meta_var(T.Cast("int64", mb * bm + wy // wn * tm + i * 16 + tx // 4
                                                                + e // 2 * 8))
                                        col = T.meta_var(nb * bn + wy % wn * tn + j * 8 + tx % 4 * 2 + e % 2)
                                        if row < m and col < n:
                                            if ks > 1:
                                                T.evaluate(T.cuda.atomic_add(T.address_of(y[row, col]), acc[i, j, e]))
                                            else:
                                                y[row, col] = acc[i, j, e]

    return kernel


# ---------------------------------------------------------------------------------- the dispatch


def _rows(func):
    """The symbolic M of a kernel (the first dimension of its x)."""
    return func.params[0].ty.shape[0]


def dispatch(tiers: list[tuple[int | None, object]]):
    """One PrimFunc from kernels of the same signature: the first tier whose largest M (None: any)
    admits the run's M runs (the host code branches; each kernel is its own launch).

    ``[(8, gemv), (16, gemm_small), (None, gemm)]`` runs the GEMV for M <= 8, ...
    """
    from tvm import tirx  # noqa: PLC0415

    first = tiers[0][1]
    m = _rows(first)

    def body_of(func):
        """``func``'s body over ``first``'s parameters (its own declared as views of them)."""
        if func.same_as(first):
            return func.body
        binds = [tirx.Bind(_rows(func), m)]
        binds += [tirx.DeclBuffer(p, data=q.data) for p, q in zip(func.params, first.params)]
        return tirx.SeqStmt([*binds, func.body])

    body = body_of(tiers[-1][1])
    for max_m, func in reversed(tiers[:-1]):
        body = tirx.IfThenElse(m <= max_m, body_of(func), body)
    return tirx.PrimFunc(first.params, body, attrs=first.attrs)


def dequant_matmul_f16(fmt: WeightFormat, k: int, n: int):
    """Unscheduled TIR (from TE) with :func:`gemm`'s numerics (x and the dequantized weights in float16,
    float32 sums), M symbolic: for dlight's tensor-core rule (``gpu.Matmul`` -> wmma), to compare."""
    from tvm import te, tirx  # noqa: PLC0415

    from .kernels import te_operands  # noqa: PLC0415

    g = fmt.group_size
    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    m, (x, w0, w1, s, z), code = te_operands(fmt, k, n)
    x16 = te.compute((m, i64(k)), lambda i, j: x[i, j].astype("float16"), name="x16")
    wd = te.compute((i64(n), i64(k)), lambda nn, kk: (code(nn, kk).astype("float32") * s[nn, kk // g].astype("float32")
                                                      + z[nn, kk // g].astype("float32")).astype("float16"),
                    name="dequantize")
    r = te.reduce_axis((i64(0), i64(k)), name="k")
    y = te.compute((m, i64(n)), lambda i, j: te.sum(x16[i, r].astype("float32") * wd[j, r].astype("float32"), axis=r),
                   name="matmul")
    return te.create_prim_func([x, w0, w1, s, z, y]).without_attr("global_symbol").with_attr("op_pattern", OPAQUE)


def gemv_or_gemm(gemv_func, fmt: WeightFormat, k: int, n: int):
    """The quantized matmul kernel of the CUDA target: ``gemv_func`` (same signature) for M <= 8, the
    tensor-core GEMM tiers of :func:`gemm_tiers` above (:func:`dispatch`)."""
    tiers = [(GEMV_MAX_M, gemv_func)] + [(max_m, gemm(fmt, k, n, cfg)) for max_m, cfg in gemm_tiers(n, k)]
    return dispatch(tiers)
