"""Int8-activation GEMV for CUDA (``dp4a``), with its numpy equivalent.

The float GEMV (:func:`.kernels.gemv`) spends ~3.6 instructions per weight (LOP3, FADD, FFMA).  This
kernel quantizes the activations to int8 as the x86/ARM int8 kernels do and multiplies four codes by
four activations per ``dp4a`` (the llama.cpp MMVQ trick), ~0.6-1.4 instructions per weight.

Activations, per row ``m`` and block of 32 along K (exactly :func:`qcompile.targets.x86.kernels_int8.
quantize_activations`, the ``activation_quantizer`` macro of the CPU kernels; rounding half to even)::

    sx[m, b] = max|x[m, 32b:32b+32]| / 127,   xq[m, k] = round(x[m, k] * (127 / max|...|))   int8

    y[m, n] = sum_b  s[n, g(b)] * sx[m, b] * sum_{k in b} code[n, k] * xq[m, k]
                   + z[n, g(b)] * sx[m, b] * sum_{k in b} xq[m, k]

(numpy: :func:`reference`, the x86 :func:`~qcompile.targets.x86.kernels_int8.reference_int8_matmul`).
The zero-point term sums the quantized activations, like the CPU kernels, so a CUDA artifact matches
the x86 int8 build up to float summation order.

The weights keep the canonical packing (:mod:`qcompile.passes.formats`, no retiling).  A plane of
width ``pb`` holds ``32/pb`` codes a word; ``rotr(w, pb*s - off) & (2**pb - 1) * 0x01010101 << off``
(:func:`lane_extract`) puts codes ``(8/pb)*i + s`` (i = 0..3) of the word in the four byte lanes, already
shifted to the plane's place ``off`` in the code (0, or the first plane's width), so a word costs ``8/pb``
rotate+mask pairs and ``8/pb`` dp4a, and both planes' products go into one int32 sum.

The activations are arranged to match (:func:`x_order`): each lane quantizes the 32 activations of its block itself (from L1/L2, no shared memory, no barrier) and
packs their int8 values with ``__byte_perm`` in the order each plane needs.  8-bit codes (unsigned)
are flipped to signed (``^ 0x80808080``, ``code - 128``) and ``128 * sum xq`` added back.

Launch shape (:class:`Int8GemvConfig`): a block has ``wrows x ksplit`` warps; each warp owns ``rows``
output channels (``rows * wrows`` a block), its lanes walk along K in chunks of ``chunk`` codes (the
``ksplit`` warps of a row group split K), ``unroll`` chunks' loads issued before their math.  With
``prefetch`` the next step's loads (with their scales and zero points) are issued before this step's
math (two register buffers, steps unrolled by two; without, scales and zero points are loaded at use:
mostly L1/L2 hits, a 32-byte sector holds 16 groups).  With
``xsmem`` the block quantizes x once into shared memory (arranged ints, 16-byte conflict-free reads)
behind one barrier, instead of every warp quantizing its chunks in registers.  Warps of
one row group reduce with shuffles, the ``ksplit`` warps through shared memory.  Each row of x is its
own block row (``blockIdx.y``): correct for any M, fast for batch 1-8.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
from tvm.script import tirx as T

if TYPE_CHECKING:
    from qcompile.passes.formats import WeightFormat

__all__ = ["Int8GemvConfig", "gemv_int8", "int8_config", "supports", "x_order", "lane_extract", "reference",
           "emulate", "TUNED", "quantize_x", "xq_width"]

OPAQUE = 8  # relax OpPatternKind.kOpaque
WARP = 32
BLOCK = 32  # activations per int8 scale
XSMEM_LIMIT = 96 << 10  # bytes of arranged activations a block may stage in shared memory (xsmem)
MAGIC = 12582912.0  # 1.5 * 2**23: v + MAGIC has round-half-even(v) in its low mantissa bits (|v| < 2**22)


def supports(bits: int, k: int, group_size: int) -> bool:
    """Any width (2..8), K in whole blocks of 32 (every group size divides into them)."""
    return bits in (2, 3, 4, 5, 6, 8) and k % BLOCK == 0 and group_size % BLOCK == 0


# -- the byte-lane arithmetic, in numpy (tests) and as TIR expressions (the kernel) ----------------


def x_order(pb: int) -> np.ndarray:
    """Activation order of a 32-block for a plane of width ``pb``: int32 ``t`` (of 8) holds in byte ``i``
    activation ``x_order(pb)[4*t + i]``.  Word ``j`` of the block, shift step ``s`` (``t = j*8/pb + s``)
    has codes ``j*32/pb + (8/pb)*i + s`` in its byte lanes."""
    per = 8 // pb
    t = np.arange(8)
    j, s = t // per, t % per
    i = np.arange(4)
    return (j[:, None] * (32 // pb) + per * i[None, :] + s[:, None]).reshape(32)


def lane_extract(word, pb: int, s, off: int):
    """Bytes ``code_plane << off`` of codes ``(8/pb)*i + s`` of ``word`` (numpy uint32 or a TIR uint32):
    ``rotr(word, pb*s - off) & (2**pb - 1) * 0x01010101 << off``.  A rotation (one ``SHF.R.W``) covers
    both directions; the bits it wraps around land outside the mask."""
    mask = ((1 << pb) - 1) * 0x01010101 << off
    rot = (pb * s - off + 32) % 32
    if isinstance(word, np.ndarray):
        rot = np.uint32(rot)
        return ((word >> rot) | (word << ((np.uint32(32) - rot) % np.uint32(32)))) & np.uint32(mask)
    return T.bitwise_and(T.call_pure_extern("uint32", "__funnelshift_r", word, word, T.Cast("uint32", pb * s - off + 32)),
                         T.uint32(mask))


def reference(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, g: int) -> np.ndarray:
    """numpy equivalent of :func:`gemv_int8` on integer ``codes`` [N, K] (the x86 int8 reference)."""
    from qcompile.targets.x86.kernels_int8 import reference_int8_matmul  # noqa: PLC0415

    return reference_int8_matmul(x, codes, scales, zeros, g)


def emulate(fmt: WeightFormat, planes: list[np.ndarray], scales, zeros, x: np.ndarray) -> np.ndarray:
    """The kernel's integer path step by step in numpy (canonical words, arranged activations, byte-lane
    dot products): equal to :func:`reference` (tests check it; it documents the kernel's arithmetic)."""
    from qcompile.targets.x86.kernels_int8 import quantize_activations  # noqa: PLC0415

    xq, sx, _ = quantize_activations(x, BLOCK)
    m, k = xq.shape
    n = planes[0].shape[0]
    g = fmt.group_size
    isum = np.zeros((m, n, k // BLOCK), np.int64)
    off = 0
    for words, pb in zip(planes, fmt.planes):
        wb = words.reshape(n, k // BLOCK, pb)  # a block's pb words
        xa = xq.reshape(m, k // BLOCK, BLOCK)[:, :, x_order(pb)].reshape(m, k // BLOCK, 8, 4).astype(np.int64)
        for j in range(pb):
            for s in range(8 // pb):
                lanes = lane_extract(wb[:, :, j], pb, s, off)  # [n, kb] uint32, 4 byte lanes
                if fmt.bits == 8:
                    lanes = lanes ^ np.uint32(0x80808080)
                b = lanes.view(np.uint8).reshape(n, k // BLOCK, 4).view(np.int8 if fmt.bits == 8 else np.uint8)
                isum += np.einsum("nbi,mbi->mnb", b.astype(np.int64), xa[:, :, j * (8 // pb) + s])
        off += pb
    xsum = xq.reshape(m, k // BLOCK, BLOCK).sum(-1, dtype=np.int64)
    if fmt.bits == 8:
        isum += 128 * xsum[:, None, :]
    gb = np.arange(k // BLOCK) * BLOCK // g
    s32, z32 = scales.astype(np.float32)[:, gb], zeros.astype(np.float32)[:, gb]
    code_term = (isum.astype(np.float32) * sx[:, None, :] * s32[None]).sum(-1)
    zero_term = ((xsum.astype(np.float32) * sx)[:, None, :] * z32[None]).sum(-1)
    return code_term + zero_term


# -- launch shapes ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Int8GemvConfig:
    """Launch shape of :func:`gemv_int8` (module docstring)."""

    rows: int = 8  # output channels per warp (x quantized once per warp and chunk, reused rows times)
    wrows: int = 2  # warps on different rows of a block (they read the same x: L1 hits)
    ksplit: int = 2  # warps of a row group splitting K
    chunk: int = 32  # codes per lane and step (whole 32-blocks); halved until it divides K
    unroll: int = 1  # chunks whose loads are issued before their math
    xsmem: bool = False  # x quantized once per block into shared memory (else by every warp, in registers)
    prefetch: bool = False  # the next step's loads issued before this step's math (two register buffers)
    xpre: bool = False  # x arrives quantized and arranged by :func:`quantize_x` (no per-block quantization)

    @property
    def name(self) -> str:
        return (f"r{self.rows}w{self.wrows}k{self.ksplit}c{self.chunk}u{self.unroll}" + ("s" if self.xsmem else "")
                + ("p" if self.prefetch else "") + ("q" if self.xpre else ""))

    @classmethod
    def parse(cls, name: str) -> Int8GemvConfig:
        import re  # noqa: PLC0415

        got = re.fullmatch(r"r(\d+)w(\d+)k(\d+)c(\d+)u(\d+)(s?)(p?)(q?)", name)
        if got is None:
            raise ValueError(f"not an Int8GemvConfig name: {name!r} (expected like r8w2k2c32u1, r8w2k2c32u1s or "
                             "r8w2k2c32u1sp, r8w1k4c32u1pq)")
        *ints, smem, pre, xq = got.groups()
        return cls(*(int(v) for v in ints), xsmem=smem == "s", prefetch=pre == "p", xpre=xq == "q")


# The measured winner per (bits, shape class) on an H100 (bench/gpu/gemv_sweep.py, bench/results/
# gpu_gemv_sweep_round3.json: its "pick" table, pasted here; 3/square's pick r4w8k1c64u1spl8 (an L2
# prefetch variant, not kept) as r4w8k1c64u1sp, 0.5% slower).  Missing entries take Int8GemvConfig().
TUNED: dict[str, str] = {
    "2/square": "r4w8k1c64u1sp", "3/square": "r4w8k1c64u1sp", "4/square": "r4w8k2c32u1s", "5/square": "r8w1k4c32u1",
    "6/square": "r8w1k4c32u1", "8/square": "r8w1k4c32u1",
    "2/wide_k": "r4w4k2c64u2sp", "3/wide_k": "r4w8k1c64u1sp", "4/wide_k": "r8w1k4c32u1", "5/wide_k": "r8w1k4c32u1",
    "6/wide_k": "r8w1k4c32u1", "8/wide_k": "r8w2k4c32u1",
    "2/tall_n": "r8w4k1c64u1s", "3/tall_n": "r4w8k1c64u1sp", "4/tall_n": "r4w4k2c32u1s", "5/tall_n": "r4w4k2c32u2sp",
    "6/tall_n": "r4w4k2c32u2sp", "8/tall_n": "r4w4k2c32u2sp",
}


def shape_class(n: int, k: int) -> str:
    """The shape classes the tuning table distinguishes: large K (>= 8192), large N (>= 8192), square."""
    if k >= 8192:
        return "wide_k"
    if n >= 8192:
        return "tall_n"
    return "small" if n < 1024 else "square"


def int8_config(n: int, k: int, bits: int) -> Int8GemvConfig:
    """The launch shape: the measured winner of the shape's class (:data:`TUNED`), else the default;
    fewer rows a block when N is smaller than a block's rows."""
    from qcompile.passes.formats import WeightFormat  # noqa: PLC0415

    name = TUNED.get(f"{bits}/{shape_class(n, k)}") or TUNED.get(f"{bits}/square")  # small N: square's, shrunk
    # untuned: 16-byte loads of the first plane (64 codes of a 2-bit plane, 32 of a 4-bit one)
    cfg = Int8GemvConfig.parse(name) if name else Int8GemvConfig(chunk=max(BLOCK, 128 // WeightFormat(bits, 32).planes[0]))
    while cfg.rows * cfg.wrows > max(n, 1) and (cfg.rows > 1 or cfg.wrows > 1):
        cfg = dataclasses.replace(cfg, **({"wrows": cfg.wrows // 2} if cfg.wrows > 1 else {"rows": cfg.rows // 2}))
    return cfg


def _chunk(k: int, want: int) -> int:
    ct = max(BLOCK, want)
    while k % ct:
        ct //= 2
    return ct


# -- the kernel ------------------------------------------------------------------------------------


def _dp4a(a, b, c):
    return T.call_pure_extern("int32", "__dp4a", a, b, c)


def _activation_quantizer(p0: int, p1: int, two: bool):
    """TIR macro ``quantize(xf, bi, u, b, q, mx, sc, isum, xi0, xi1)``: the activations
    ``xf[bi, u, 32b : 32b+32]`` to int8 arranged for the plane widths ``p0`` (``xi0``) and, ``two``, ``p1``
    (``xi1``) (:func:`x_order`); ``sc[1] = sx``, ``sc[2] = sx * sum(xq)``; numpy: :func:`qcompile.targets.
    x86.kernels_int8.quantize_activations` then :func:`x_order`."""

    def order(pb, t, i):
        """activation (within the block) in byte ``i`` of arranged int32 ``t`` (:func:`x_order`)."""
        per = 8 // pb
        return (t // per) * (32 // pb) + per * i + t % per

    def byte(q, idx):
        return T.reinterpret("uint32", q[idx])

    def pack(q, pb, t):
        """int32 of arranged int ``t``: low bytes of the magic floats q[order(pb, t, 0..3)]."""
        lo = T.call_pure_extern("uint32", "__byte_perm", byte(q, order(pb, t, 0)), byte(q, order(pb, t, 1)),
                                T.uint32(0x0040))
        hi = T.call_pure_extern("uint32", "__byte_perm", byte(q, order(pb, t, 2)), byte(q, order(pb, t, 3)),
                                T.uint32(0x0040))
        return T.reinterpret("int32", T.call_pure_extern("uint32", "__byte_perm", lo, hi, T.uint32(0x5410)))

    @T.macro
    def quantize(xf, bi, u, b, q, mx, sc, isum, xi0, xi1):
        """xf[bi, u, 32b : 32b+32] -> xi0 (xi1): int8 activations arranged for plane 0 (1); sc[1] = sx,
        sc[2] = sx * sum(xq).  The x86 activation_quantizer's arithmetic (rounding half to even)."""
        for i in T.unroll(4):
            mx[i] = T.fabs(xf[bi, u, b * BLOCK + i])
        for i0 in T.unroll(BLOCK // 4 - 1):
            for i in T.unroll(4):
                mx[i] = T.max(mx[i], T.fabs(xf[bi, u, b * BLOCK + (i0 + 1) * 4 + i]))
        mx[0] = T.max(T.max(mx[0], mx[1]), T.max(mx[2], mx[3]))
        sc[0] = T.if_then_else(mx[0] > T.float32(0), T.float32(127) / mx[0], T.float32(0))
        sc[1] = mx[0] / T.float32(127)
        for i in T.unroll(BLOCK):  # no contraction into an FFMA: round(fl(x * inv)) as on x86
            q[i] = T.call_pure_extern("float32", "__fadd_rn", T.call_pure_extern(
                "float32", "__fmul_rn", xf[bi, u, b * BLOCK + i], sc[0]), T.float32(MAGIC))
        isum[1] = 0
        for t in T.unroll(8):
            xi0[t] = pack(q, p0, t)
            isum[1] = _dp4a(xi0[t], T.int32(0x01010101), isum[1])
        if two:
            for t in T.unroll(8):
                xi1[t] = pack(q, p1, t)
        sc[2] = T.Cast("float32", isum[1]) * sc[1]

    return quantize


def gemv_int8(fmt: WeightFormat, k: int, n: int, config: Int8GemvConfig | None = None):
    """Scheduled CUDA TIR ``y[M, N] ~= x[M, K] @ dequantize(W)[N, K].T`` with int8 activations, M symbolic.

    Arguments as :func:`.kernels.dequant_matmul`: x (float32 [M, K]), planes (uint32 [N, K*pb/32]; a
    1-plane format passes its plane twice), scales, zeros (float16 [N, K/g]), y (float32 [M, N]).
    numpy: :func:`reference` (module docstring).
    """
    planes, g = tuple(fmt.planes), fmt.group_size
    if not supports(fmt.bits, k, g):
        raise ValueError(f"gemv_int8: {fmt.name} K={k}: K must be a multiple of {BLOCK}")
    cfg = config or int8_config(n, k, fmt.bits)
    rows, wr, ks, un = cfg.rows, cfg.wrows, cfg.ksplit, cfg.unroll
    ct = _chunk(k, cfg.chunk)
    nb = ct // BLOCK  # blocks per chunk
    p0 = planes[0]
    p1 = planes[1] if len(planes) > 1 else planes[0]
    two = len(planes) > 1
    signed8 = fmt.bits == 8
    v0, v1 = nb * p0, nb * p1  # words per row and chunk
    vw0, vw1 = min(v0, 4), min(v1, 4)  # vector width of the loads (16 bytes at most)
    per0, per1 = 8 // p0, 8 // p1
    chunks = k // ct
    lanes = WARP * ks
    steps = (chunks + lanes * un - 1) // (lanes * un)
    rb = rows * wr
    blocks = (n + rb - 1) // rb
    kg = k // g
    kb = k // BLOCK
    w0cols, w1cols = k * p0 // 32, k * p1 // 32
    narr = 2 if two else 1  # activation arrangements (one per plane width)
    xpre = cfg.xpre
    xsmem = cfg.xsmem and not xpre and (narr * k + 8 * kb) <= XSMEM_LIMIT
    xcols, xdtype = (xq_width(k, planes), "int32") if xpre else (k, "float32")
    xsc = narr * kb * 8  # (xpre) where a row's per-block (sx, sx * sum(xq)) start
    fill = (kb + WARP * wr * ks - 1) // (WARP * wr * ks)  # blocks of 32 each thread quantizes (xsmem)
    nsz = 1 if g % ct == 0 else nb  # scales (zero points) a row and chunk: one, or one per block of 32
    nbuf = 2 if cfg.prefetch else 1  # register buffers of a step's loads
    if rows > WARP:
        raise ValueError(f"gemv_int8: rows={rows} > {WARP}")

    quantize = _activation_quantizer(p0, p1, two)

    def lanes_of(word, pb, s, off):
        v = lane_extract(word, pb, s, off)
        if signed8:
            v = T.bitwise_xor(v, T.uint32(0x80808080))
        return T.reinterpret("int32", v)

    @T.macro
    def load_step(st, bi, x, w0, w1, s, z, a0, a1, sr, zr, xf, xr0, xr1, xsr, mb, bx, wy, wk, tx):
        """Step ``st``'s loads into register buffer ``bi``: every row's words of ``un`` chunks (with
        prefetch their scales and zero points; without xsmem the chunks' activations)."""
        for u in T.unroll(un):
            if ((st * un + u) * ks + wk) * WARP + tx < chunks:
                for r in T.unroll(rows):
                    if (bx * wr + wy) * rows + r < n:
                        for j0 in T.unroll(v0 // vw0):
                            for j in T.vectorized(vw0):
                                a0[bi, u, r, j0 * vw0 + j] = w0[(bx * wr + wy) * rows + r,
                                                                (((st * un + u) * ks + wk) * WARP + tx) * v0 + j0 * vw0 + j]
                        if two:
                            for j0 in T.unroll(v1 // vw1):
                                for j in T.vectorized(vw1):
                                    a1[bi, u, r, j0 * vw1 + j] = w1[(bx * wr + wy) * rows + r,
                                                                    (((st * un + u) * ks + wk) * WARP + tx) * v1 + j0 * vw1 + j]
                        if cfg.prefetch:  # (else loaded at use: L1/L2 hits mostly)
                            for b in T.unroll(nsz):
                                sr[bi, u, r, b] = s[(bx * wr + wy) * rows + r,
                                                    ((((st * un + u) * ks + wk) * WARP + tx) * ct + b * BLOCK) // g]
                                zr[bi, u, r, b] = z[(bx * wr + wy) * rows + r,
                                                    ((((st * un + u) * ks + wk) * WARP + tx) * ct + b * BLOCK) // g]
                if xpre:  # the chunk's arranged int8 activations and their (sx, sx * sum(xq))
                    for b in T.unroll(nb):
                        for h in T.unroll(2):
                            for i in T.vectorized(4):
                                xr0[bi, u, b, h * 4 + i] = x[mb, ((((st * un + u) * ks + wk) * WARP + tx) * nb + b) * 8
                                                           + h * 4 + i]
                            if two:
                                for i in T.vectorized(4):
                                    xr1[bi, u, b, h * 4 + i] = x[mb, (kb + (((st * un + u) * ks + wk) * WARP + tx) * nb + b)
                                                               * 8 + h * 4 + i]
                        for i in T.vectorized(2):
                            xsr[bi, u, b, i] = x[mb, xsc + ((((st * un + u) * ks + wk) * WARP + tx) * nb + b) * 2 + i]
                elif not xsmem:
                    for i0 in T.unroll(ct // 4):
                        for i in T.vectorized(4):
                            xf[bi, u, i0 * 4 + i] = x[mb, (((st * un + u) * ks + wk) * WARP + tx) * ct + i0 * 4 + i]

    @T.macro
    def math_step(st, bi, xsh, xss, s, z, a0, a1, sr, zr, xf, xr0, xr1, xsr, q, mx, sc, isum, xi0, xi1, acc, bx, wy, wk, tx):
        """Step ``st``'s dot products from register buffer ``bi`` into ``acc``."""
        for u in T.unroll(un):
            if ((st * un + u) * ks + wk) * WARP + tx < chunks:
                for b in T.unroll(nb):
                    if xsmem:
                        for h in T.unroll(2):
                            for i in T.vectorized(4):
                                xi0[h * 4 + i] = xsh[(h * nb + b) * chunks + ((st * un + u) * ks + wk) * WARP + tx, i]
                            if two:
                                for i in T.vectorized(4):
                                    xi1[h * 4 + i] = xsh[((2 + h) * nb + b) * chunks + ((st * un + u) * ks + wk) * WARP
                                                         + tx, i]
                        sc[1] = xss[0, (((st * un + u) * ks + wk) * WARP + tx) * nb + b]
                        sc[2] = xss[1, (((st * un + u) * ks + wk) * WARP + tx) * nb + b]
                    elif xpre:
                        for t in T.unroll(8):
                            xi0[t] = xr0[bi, u, b, t]
                            if two:
                                xi1[t] = xr1[bi, u, b, t]
                        sc[1] = T.reinterpret("float32", xsr[bi, u, b, 0])
                        sc[2] = T.reinterpret("float32", xsr[bi, u, b, 1])
                    else:
                        quantize(xf, bi, u, b, q, mx, sc, isum, xi0, xi1)
                    if signed8 and (xsmem or xpre):  # sum(xq) for the flipped codes (quantize makes its own)
                        isum[1] = 0
                        for t in T.unroll(8):
                            isum[1] = _dp4a(xi0[t], T.int32(0x01010101), isum[1])
                    for r in T.unroll(rows):
                        if (bx * wr + wy) * rows + r < n:
                            isum[0] = 0
                            if signed8:
                                isum[0] = isum[1] * 128
                            for j in T.unroll(p0):
                                for t in T.unroll(per0):
                                    isum[0] = _dp4a(lanes_of(a0[bi, u, r, b * p0 + j], p0, t, 0), xi0[j * per0 + t], isum[0])
                            if two:
                                for j in T.unroll(p1):
                                    for t in T.unroll(per1):
                                        isum[0] = _dp4a(lanes_of(a1[bi, u, r, b * p1 + j], p1, t, p0), xi1[j * per1 + t],
                                                       isum[0])
                            if cfg.prefetch:
                                acc[r] = acc[r] + T.Cast("float32", sr[bi, u, r, b % nsz]) * (
                                    T.Cast("float32", isum[0]) * sc[1]) + T.Cast("float32", zr[bi, u, r, b % nsz]) * sc[2]
                            else:
                                acc[r] = acc[r] + T.Cast("float32", s[(bx * wr + wy) * rows + r, (
                                    (((st * un + u) * ks + wk) * WARP + tx) * ct + b * BLOCK) // g]) * (
                                    T.Cast("float32", isum[0]) * sc[1]) + T.Cast("float32", z[(bx * wr + wy) * rows + r, (
                                        (((st * un + u) * ks + wk) * WARP + tx) * ct + b * BLOCK) // g]) * sc[2]

    @T.prim_func(private=True)
    def kernel(x_h: T.handle, w0_h: T.handle, w1_h: T.handle, s_h: T.handle, z_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": OPAQUE, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, xcols), xdtype)
        w0 = T.match_buffer(w0_h, (n, w0cols), "uint32")
        w1 = T.match_buffer(w1_h, (n, w1cols), "uint32")
        s = T.match_buffer(s_h, (n, kg), "float16")
        z = T.match_buffer(z_h, (n, kg), "float16")
        y = T.match_buffer(y_h, (m, n), "float32")
        for mb in T.thread_binding(m, thread="blockIdx.y"):
            for bx in T.thread_binding(blocks, thread="blockIdx.x"):
                for wy in T.thread_binding(wr, thread="threadIdx.z"):
                    for wk in T.thread_binding(ks, thread="threadIdx.y"):
                        for tx in T.thread_binding(WARP, thread="threadIdx.x"):
                            red = T.alloc_buffer((wr, ks, rows), "float32", scope="shared")
                            # xsmem: the block's arranged activations [(plane, half, block of chunk) x chunk, 4]
                            # (lanes read consecutive 16 bytes) and per block sx, sx * sum(xq)
                            xsh = T.alloc_buffer((narr * 2 * nb * chunks if xsmem else 1, 4), "int32", scope="shared.dyn")
                            xss = T.alloc_buffer((2, kb if xsmem else 1), "float32", scope="shared.dyn")
                            acc = T.alloc_buffer((rows,), "float32", scope="local")
                            # register buffers of a step's loads (two with prefetch: step st+1 loads into one
                            # while step st's math reads the other)
                            a0 = T.alloc_buffer((nbuf, un, rows, v0), "uint32", scope="local")
                            a1 = T.alloc_buffer((nbuf, un, rows, v1), "uint32", scope="local")
                            sr = T.alloc_buffer((nbuf, un, rows, nsz), "float16", scope="local")  # (prefetch)
                            zr = T.alloc_buffer((nbuf, un, rows, nsz), "float16", scope="local")
                            xf = T.alloc_buffer((1 if xsmem or xpre else nbuf, 1 if xsmem or xpre else un,
                                                 1 if xpre else BLOCK if xsmem else ct), "float32", scope="local")
                            # (xpre) a step's arranged activations and per-block (sx, sx * sum(xq)) bits
                            xr0 = T.alloc_buffer((nbuf, un, nb, 8) if xpre else (1,), "int32", scope="local")
                            xr1 = T.alloc_buffer((nbuf, un, nb, 8) if xpre and two else (1,), "int32", scope="local")
                            xsr = T.alloc_buffer((nbuf, un, nb, 2) if xpre else (1,), "int32", scope="local")
                            q = T.alloc_buffer((BLOCK,), "float32", scope="local")
                            xi0 = T.alloc_buffer((8,), "int32", scope="local")
                            xi1 = T.alloc_buffer((8,), "int32", scope="local")
                            mx = T.alloc_buffer((4,), "float32", scope="local")
                            sc = T.alloc_buffer((3,), "float32", scope="local")  # 127/amax, sx, sx*sum(xq)
                            isum = T.alloc_buffer((2,), "int32", scope="local")
                            if xsmem or cfg.prefetch:  # step 0's loads first (with xsmem: on their way while the
                                # block quantizes x)
                                load_step(0, 0, x, w0, w1, s, z, a0, a1, sr, zr, xf, xr0, xr1, xsr, mb, bx, wy, wk,
                                          tx)
                            if xsmem:  # quantize x once per block (each thread a block of 32 at a time)
                                for it in range(fill):
                                    if (it * wr * ks + wy * ks + wk) * WARP + tx < kb:
                                        for i0 in T.unroll(BLOCK // 4):
                                            for i in T.vectorized(4):
                                                xf[0, 0, i0 * 4 + i] = x[mb, ((it * wr * ks + wy * ks + wk) * WARP + tx) * BLOCK
                                                                         + i0 * 4 + i]
                                        quantize(xf, 0, 0, 0, q, mx, sc, isum, xi0, xi1)
                                        for h in T.unroll(2):
                                            for i in T.vectorized(4):
                                                xsh[(h * nb + ((it * wr * ks + wy * ks + wk) * WARP + tx) % nb) * chunks
                                                    + ((it * wr * ks + wy * ks + wk) * WARP + tx) // nb, i] = xi0[h * 4 + i]
                                            if two:
                                                for i in T.vectorized(4):
                                                    xsh[((2 + h) * nb + ((it * wr * ks + wy * ks + wk) * WARP + tx) % nb)
                                                        * chunks + ((it * wr * ks + wy * ks + wk) * WARP + tx) // nb,
                                                        i] = xi1[h * 4 + i]
                                        xss[0, (it * wr * ks + wy * ks + wk) * WARP + tx] = sc[1]
                                        xss[1, (it * wr * ks + wy * ks + wk) * WARP + tx] = sc[2]
                                T.tvm_storage_sync("shared.dyn")
                            for r in T.unroll(rows):
                                acc[r] = T.float32(0)
                            if cfg.prefetch:
                                for st2 in range((steps + 1) // 2):
                                    for pb in T.unroll(2):  # buffer pb holds step 2*st2 + pb's loads
                                        load_step(st2 * 2 + pb + 1, 1 - pb, x, w0, w1, s, z, a0, a1, sr, zr, xf, xr0, xr1,
                                                  xsr, mb, bx, wy, wk, tx)
                                        math_step(st2 * 2 + pb, pb, xsh, xss, s, z, a0, a1, sr, zr, xf, xr0, xr1, xsr, q,
                                                  mx, sc, isum, xi0, xi1, acc, bx, wy, wk, tx)
                            else:
                                for st in range(steps):
                                    if not xsmem or st > 0:
                                        load_step(st, 0, x, w0, w1, s, z, a0, a1, sr, zr, xf, xr0, xr1, xsr, mb, bx, wy, wk,
                                                  tx)
                                    math_step(st, 0, xsh, xss, s, z, a0, a1, sr, zr, xf, xr0, xr1, xsr, q, mx, sc, isum, xi0,
                                              xi1, acc, bx, wy, wk, tx)
                            for r in T.unroll(rows):
                                for off in T.unroll(5):
                                    acc[r] = acc[r] + T.tvm_warp_shuffle_down(
                                        T.uint32(0xFFFFFFFF), acc[r], T.shift_right(16, off), WARP, WARP)
                            if ks == 1:
                                if tx == 0:
                                    for r in T.unroll(rows):
                                        if (bx * wr + wy) * rows + r < n:
                                            y[mb, (bx * wr + wy) * rows + r] = acc[r]
                            else:
                                if tx == 0:
                                    for r in T.unroll(rows):
                                        red[wy, wk, r] = acc[r]
                                T.tvm_storage_sync("shared")
                                if wk == 0:
                                    if tx < rows:
                                        if (bx * wr + wy) * rows + tx < n:
                                            sc[0] = T.float32(0)
                                            for w in T.unroll(ks):
                                                sc[0] = sc[0] + red[wy, w, tx]
                                            y[mb, (bx * wr + wy) * rows + tx] = sc[0]

    return kernel


def xq_width(k: int, planes) -> int:
    """int32 columns a row of :func:`quantize_x`'s output takes: the arranged activations of each plane
    width (8 ints a block of 32), then (sx, sx * sum(xq)) a block as float bits, padded to 16 bytes."""
    kb = k // BLOCK
    return (2 if len(planes) > 1 else 1) * kb * 8 + (2 * kb + 3) // 4 * 4


def quantize_x(k: int, planes, threads: int = 128):
    """CUDA TIR ``xq[M, xq_width] = quantize_x(x[M, K])``, M symbolic: the activations quantized per block
    of 32 once for a whole GEMV (:class:`Int8GemvConfig` ``xpre``) instead of in each of its blocks; a
    thread a block.  numpy (``planes`` the weight format's plane widths, ``q, sx = quantize_activations(x,
    32)`` of :mod:`qcompile.targets.x86.kernels_int8`, ``kb = K/32``)::

        xq[m, a*kb*8 + 8b : ... + 8] = int8 q[m, 32b + x_order(planes[a])] as 8 little-endian int32
        xq[m, A*kb*8 + 2b], xq[m, A*kb*8 + 2b + 1] = float32 bits of sx[m, b], sx[m, b] * sum(q[m, 32b:32b+32])
    """
    planes = tuple(planes)
    p0, p1, two = planes[0], planes[-1], len(planes) > 1
    if k % BLOCK:
        raise ValueError(f"quantize_x: K={k} must be a multiple of {BLOCK}")
    kb = k // BLOCK
    width = xq_width(k, planes)
    xsc = (2 if two else 1) * kb * 8
    grid = (kb + threads - 1) // threads
    quantize = _activation_quantizer(p0, p1, two)

    @T.prim_func(private=True)
    def kernel(x_h: T.handle, xq_h: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": OPAQUE, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")
        xq = T.match_buffer(xq_h, (m, width), "int32")
        for mb in T.thread_binding(m, thread="blockIdx.y"):
            for bx in T.thread_binding(grid, thread="blockIdx.x"):
                for tx in T.thread_binding(threads, thread="threadIdx.x"):
                    xf = T.alloc_buffer((1, 1, BLOCK), "float32", scope="local")
                    q = T.alloc_buffer((BLOCK,), "float32", scope="local")
                    xi0 = T.alloc_buffer((8,), "int32", scope="local")
                    xi1 = T.alloc_buffer((8,), "int32", scope="local")
                    mx = T.alloc_buffer((4,), "float32", scope="local")
                    sc = T.alloc_buffer((3,), "float32", scope="local")
                    isum = T.alloc_buffer((2,), "int32", scope="local")
                    if bx * threads + tx < kb:
                        for i0 in T.unroll(BLOCK // 4):
                            for i in T.vectorized(4):
                                xf[0, 0, i0 * 4 + i] = x[mb, (bx * threads + tx) * BLOCK + i0 * 4 + i]
                        quantize(xf, 0, 0, 0, q, mx, sc, isum, xi0, xi1)
                        for h in T.unroll(2):
                            for i in T.vectorized(4):
                                xq[mb, (bx * threads + tx) * 8 + h * 4 + i] = xi0[h * 4 + i]
                            if two:
                                for i in T.vectorized(4):
                                    xq[mb, (kb + bx * threads + tx) * 8 + h * 4 + i] = xi1[h * 4 + i]
                        xq[mb, xsc + (bx * threads + tx) * 2] = T.reinterpret("int32", sc[1])
                        xq[mb, xsc + (bx * threads + tx) * 2 + 1] = T.reinterpret("int32", sc[2])

    return kernel
