"""Integer dot-product matmul kernels for x86 (AVX2 ``vpmaddubsw``), with their numpy equivalents.

The float kernels of :mod:`.kernels` turn every weight code into a float before the multiply: shift,
mask, convert, FMA per code and lane.  These kernels keep the weight codes as unsigned bytes and
quantize the activations to signed bytes, so one ``vpmaddubsw`` multiplies 32 code/activation pairs
and adds neighbours (the trick behind llama.cpp's ``Q4_0 x Q8_0`` and onnxruntime's
``accuracy_level=4``).

Activations (per row ``m``, per block of 32 along K)::

    sx[m, b]  = max|x[m, 32b:32b+32]| / 127
    xq[m, k]  = round(x[m, k] / sx[m, k // 32])            int8 in [-127, 127]
    xs[m, gi] = sum_{b in gi} sx[m, b] * sum_{k in b} xq[m, k]   float (the zero-point term)

and the output, with the weight's per-group scale ``s`` and zero ``z`` (``w = s*code + z``)::

    y[m, n] = sum_gi  s[n, gi] * sum_{b in gi} sx[m, b] * sum_{k in b} code[n, k] * xq[m, k]
                    + z[n, gi] * xs[m, gi]

The zero-point term sums the same quantized activations as the code term (as llama.cpp's ``Q8_1``
does), so the activations' rounding error multiplies ``w = s*code + z`` itself: with the exact float
sum instead it would multiply ``w - z = s*code``, which for unsigned codes is about twice as large
(four times the squared error: measured, KL 0.026 -> see ``bench/results/int8_cost.json``).

The integer sums are exact: ``vpmaddubsw`` gives int16 sums of two products, which are added in int16
only as long as they cannot overflow (``CHUNK``), then widened with ``vpmaddwd`` into int32.  Codes
must fit ``2 * (2^bits - 1) * 127 <= 32767``: bits <= 6 (8-bit weights stay on the float kernels).

Weight layout ("dot" layout), per bit plane of width ``pb`` of the format: tiles of 8 outputs (one
int32 lane each), blocks of 32 k, and in each block 8 sub-blocks of 4 consecutive k.  A 32-byte
vector holds one sub-block for the 8 outputs (byte ``4*o + j`` = output o, k = 4*sb + j) in a field of
``pb`` bits; ``8/pb`` sub-blocks share a vector at shifts ``0, pb, 2pb, ...``::

    dot[p][nt, kb, 32*v + 4*o + j]  |=  field_p(code[8nt + o, 32kb + 4sb + j]) << (pb * (sb % (8/pb)))
        with v = sb // (8/pb);   shape [N/8, K/32, 32*pb]  (uint8)
    scales/zeros: tiled by 8 outputs, [N/8, K/g, 8] (float16) as in :func:`.kernels.tile_groups`

so a 4-bit block costs two loads, four shift/mask ops, eight ``vpmaddubsw`` and one ``vpmaddwd``
per 256 multiply-adds.
"""

from __future__ import annotations

import numpy as np
from tvm.script import tirx as T

from ..knobs import KnobSpace
from .kernels import OPAQUE

__all__ = ["TILE", "MAX_BITS", "SCHEDULE", "supports", "dot_planes", "codes_from_dot", "quantize_activations",
           "reference_int8_matmul", "int8_matmul", "activation_quantizer"]

TILE = 8  # outputs per tile: the int32 lanes of one AVX2 register
MAX_BITS = 6
ROW_BLOCK = 4  # rows sharing one decoded weight sub-block in the GEMM path (the default of the knob)
NESTS = ("fused", "split")  # loop nests over the tiles (the knob "nest", below)

SCHEDULE = KnobSpace(
    "qmatmul_i8",
    {"nest": NESTS, "tiles": (1, 2, 4), "row_block": (ROW_BLOCK, 2, 8)},
    applies=lambda config, k, n: (n // TILE) % config["tiles"] == 0,
    # (a serial GEMV loop was a third nest: 2-4x faster alone at M=1 on this loaded 2-core machine, but the
    # decoder's decode step went 6.2 -> 7.7 ms with it: the thread pool's cost is not the kernel's alone)
    doc={"nest": "fused: one parallel loop over tiles, the GEMV/GEMM choice inside it; split: the choice "
                 "outside, each path its own parallel loop",
         "tiles": "output tiles of 8 one parallel task computes; in the GEMV path (M < row_block) side by "
                  "side, one activation broadcast feeding `tiles` vpmaddubsw",
         "row_block": "rows sharing one decoded weight sub-block in the GEMM path (M >= row_block); the GEMV "
                      "path takes the rows below it"})
"""The knobs of :func:`int8_matmul` (:mod:`qcompile.targets.knobs`): the default is the kernel as it was."""


def supports(bits: int, k: int, n: int, group_size: int) -> bool:
    """Whether the int8 kernel applies: bits <= 6, N a multiple of the tile, groups of whole 32-blocks."""
    return bits <= MAX_BITS and n % TILE == 0 and k % 32 == 0 and group_size % 32 == 0


def _chunk(bits: int) -> int:
    """Sub-blocks whose int16 partial sums can be added before widening (each lane: 2 products each)."""
    per = 2 * ((1 << bits) - 1) * 127
    return max(c for c in (1, 2, 4, 8) if c * per <= 32767)


def _fields(words: np.ndarray, pb: int, k: int) -> np.ndarray:
    """Canonical uint32 words [N, K*pb/32] -> the plane's fields as uint8 [N, K]."""
    per = 32 // pb
    shifts = (np.arange(per, dtype=np.uint32) * pb).astype(np.uint32)
    f = (words[:, :, None] >> shifts) & np.uint32((1 << pb) - 1)
    return f.reshape(words.shape[0], -1)[:, :k].astype(np.uint8)


def dot_planes(planes: list[np.ndarray], plane_bits: tuple[int, ...], k: int) -> list[np.ndarray]:
    """Canonical word planes -> the dot layout above (one uint8 array per plane)."""
    out = []
    for words, pb in zip(planes, plane_bits):
        f = _fields(words, pb, k)
        n = f.shape[0]
        fpb = 8 // pb
        # k = 32kb + 4sb + j with sb = v*fpb + fi  ->  [nt, o, kb, v, fi, j]
        f6 = f.reshape(n // TILE, TILE, k // 32, pb, fpb, 4).astype(np.uint16)
        f6 = f6.transpose(0, 2, 3, 1, 5, 4)  # [nt, kb, v, o, j, fi]
        shifts = (np.arange(fpb, dtype=np.uint16) * pb)
        packed = (f6 << shifts).sum(axis=-1).astype(np.uint8)  # fields are disjoint bit ranges
        out.append(np.ascontiguousarray(packed.reshape(n // TILE, k // 32, 32 * pb)))
    return out


def codes_from_dot(planes: list[np.ndarray], plane_bits: tuple[int, ...], n: int, k: int) -> np.ndarray:
    """The inverse of :func:`dot_planes` composed with packing: integer codes uint8 [N, K]."""
    codes = np.zeros((n // TILE, k // 32, 8, TILE, 4), np.uint8)  # [nt, kb, sb, o, j]
    shift = 0
    for plane, pb in zip(planes, plane_bits):
        fpb = 8 // pb
        v = plane.reshape(n // TILE, k // 32, pb, 1, TILE, 4)
        f = (v >> (np.arange(fpb, dtype=np.uint8) * pb)[:, None, None]) & np.uint8((1 << pb) - 1)  # [.., v, fi, o, j]
        codes |= (f.reshape(n // TILE, k // 32, 8, TILE, 4) << shift).astype(np.uint8)
        shift += pb
    return np.ascontiguousarray(codes.transpose(0, 3, 1, 2, 4).reshape(n, k))


def quantize_activations(x: np.ndarray, g: int):
    """numpy equivalent of the kernels' activation step: (xq int8 [M, K], sx [M, K/32], xs [M, K/g])."""
    x = x.astype(np.float32)
    m, k = x.shape
    xb = x.reshape(m, k // 32, 32)
    amax = np.abs(xb).max(axis=-1)
    sx = (amax / np.float32(127)).astype(np.float32)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.round(xb * inv[..., None]).astype(np.int8).reshape(m, k)
    block_sums = xq.reshape(m, k // 32, 32).sum(axis=-1, dtype=np.int32).astype(np.float32) * sx
    xs = block_sums.reshape(m, k // g, g // 32).sum(axis=-1, dtype=np.float32)
    return xq, sx, xs


def reference_int8_matmul(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray,
                          g: int) -> np.ndarray:
    """numpy equivalent of :func:`int8_matmul` on integer ``codes`` [N, K] and float [N, K/g] s, z."""
    xq, sx, xs = quantize_activations(x, g)
    m, k = xq.shape
    n = codes.shape[0]
    dots = np.einsum("mbk,nbk->mnb", xq.reshape(m, k // 32, 32).astype(np.int64),
                     codes.reshape(n, k // 32, 32).astype(np.int64)).astype(np.float32)
    per_block = dots * sx[:, None, :]  # [M, N, K/32]
    per_group = per_block.reshape(m, n, k // g, g // 32).sum(axis=-1)
    s = scales.astype(np.float32)
    z = zeros.astype(np.float32)
    return (per_group * s[None]).sum(-1) + xs @ z.T


def int8_matmul(plane_bits: tuple[int, ...], g: int, k: int, n: int, schedule: dict | None = None):
    """TIR kernel ``y[M, N] = x[M, K] @ dequantize(W)[N, K].T`` with int8 activations (module docstring).

    Arguments: x (float32 [M, K]), one dot-layout plane per ``plane_bits`` (the second repeated for a
    single-plane format), scales, zeros ([N/8, K/g, 8] float16), y.  M is symbolic.
    ``schedule``: knob values (:data:`SCHEDULE`; the defaults where missing).
    numpy: :func:`reference_int8_matmul`.
    """
    bits = sum(plane_bits)
    if not supports(bits, k, n, g):
        raise ValueError(f"int8_matmul: {bits}-bit K={k} N={n} g={g} is not supported")
    config = SCHEDULE.resolve(schedule)
    if not SCHEDULE.applies(config, k, n):
        raise ValueError(f"int8_matmul: schedule {config} does not apply to N={n} (tiles must divide N/{TILE})")
    return _kernel(tuple(plane_bits), g, k, n, config["tiles"], config["row_block"], config["nest"])


def _decode(planes: tuple[int, ...]):
    """``code(ws, nt, kb, sb)``: uint8x32 codes of sub-block ``sb`` of block ``kb`` for tile ``nt``."""

    def code(ws, nt, kb, sb):
        expr = None
        shift = 0
        for w, pb in zip(ws, planes):
            fpb = 8 // pb
            vec = w.vload([nt, kb, (sb // fpb) * 32], "uint8x32")
            part = T.bitwise_and(T.shift_right(vec, T.broadcast(T.Cast("uint8", (sb % fpb) * pb), 32)),
                                 T.broadcast(T.uint8((1 << pb) - 1), 32))
            if shift:
                part = T.shift_left(part, T.broadcast(T.uint8(shift), 32))
            expr = part if expr is None else T.bitwise_or(expr, part)
            shift += pb
        return expr

    return code


def _xb(xq, r, kb, sb):
    """Four int8 activations xq[r, 32kb+4sb : +4] broadcast to all 8 int32 lanes, as int8x32."""
    four = T.reinterpret("int32", xq.vload([r, kb * 32 + sb * 4], "int8x4"))
    return T.reinterpret("int8x32", T.broadcast(four, 8))


def _madd(code, xb):
    return T.call_llvm_pure_intrin("int16x16", "llvm.x86.avx2.pmadd.ub.sw", code, xb)


def _widen(s16):
    return T.call_llvm_pure_intrin("int32x8", "llvm.x86.avx2.pmadd.wd", s16, T.broadcast(T.int16(1), 16))


def activation_quantizer(kg: int, bpg: int):
    """The kernels' activation step as a TIR macro ``quantize_row(x, xq, sx, xs, r)`` for row ``r``: groups
    of ``bpg`` blocks of 32, ``kg`` groups (numpy: :func:`quantize_activations`). Shared by every int8
    dot-product kernel (x86 here, ARM's sdot kernels) so that all quantize activations alike."""

    @T.macro
    def quantize_row(x, xq, sx, xs, r):
        for gi in range(kg):
            tot = T.alloc_buffer((1,), "float32", scope="global")
            tot[0] = T.float32(0)
            for bb in range(bpg):
                amax = T.alloc_buffer((1,), "float32", scope="global")
                isum = T.alloc_buffer((1,), "int32", scope="global")
                amax[0] = T.float32(0)
                isum[0] = 0
                for kk in range(32):
                    amax[0] = T.max(amax[0], T.fabs(x[r, (gi * bpg + bb) * 32 + kk]))
                sx[r, gi * bpg + bb] = amax[0] / T.float32(127)
                for kk in range(32):
                    xq[r, (gi * bpg + bb) * 32 + kk] = T.Cast("int8", T.round(T.if_then_else(
                        amax[0] > T.float32(0),
                        x[r, (gi * bpg + bb) * 32 + kk] * (T.float32(127) / amax[0]), T.float32(0))))
                    isum[0] = isum[0] + T.Cast("int32", xq[r, (gi * bpg + bb) * 32 + kk])
                tot[0] = tot[0] + T.Cast("float32", isum[0]) * sx[r, gi * bpg + bb]
            xs[r, gi] = tot[0]

    return quantize_row


def _kernel(planes: tuple[int, ...], g: int, k: int, n: int, nti: int = 1, rb: int = ROW_BLOCK,
            nest: str = NESTS[0]):
    code = _decode(planes)
    nt_, kb_, kg, bpg = n // TILE, k // 32, k // g, g // 32
    ch = _chunk(sum(planes))
    nch = 8 // ch
    p0 = planes[0]
    p1 = planes[1] if len(planes) > 1 else planes[0]
    two = len(planes) > 1

    quantize_row = activation_quantizer(kg, bpg)

    @T.macro
    def gemv(nt, m, ws, xq, sx, xs, s, z, y):
        for r in range(m):
            acc = T.alloc_buffer((TILE,), "float32", scope="global")
            gacc = T.alloc_buffer((TILE,), "float32", scope="global")
            i32 = T.alloc_buffer((TILE,), "int32", scope="global")
            s16 = T.alloc_buffer((16,), "int16", scope="global")
            acc[T.ramp(0, 1, 8)] = T.broadcast(T.float32(0), 8)
            for gi in range(kg):
                gacc[T.ramp(0, 1, 8)] = T.broadcast(T.float32(0), 8)
                for bb in range(bpg):
                    i32[T.ramp(0, 1, 8)] = T.broadcast(T.int32(0), 8)
                    for c in T.unroll(nch):
                        s16[T.ramp(0, 1, 16)] = T.broadcast(T.int16(0), 16)
                        for u in T.unroll(ch):
                            s16[T.ramp(0, 1, 16)] = s16[T.ramp(0, 1, 16)] + _madd(code(ws, nt, gi * bpg + bb, c * ch + u),
                                                        _xb(xq, r, gi * bpg + bb, c * ch + u))
                        i32[T.ramp(0, 1, 8)] = i32[T.ramp(0, 1, 8)] + _widen(s16[T.ramp(0, 1, 16)])
                    gacc[T.ramp(0, 1, 8)] = gacc[T.ramp(0, 1, 8)] + T.Cast("float32x8", i32[T.ramp(0, 1, 8)]) * T.broadcast(
                        sx[r, gi * bpg + bb], 8)
                acc[T.ramp(0, 1, 8)] = acc[T.ramp(0, 1, 8)] + T.Cast("float32x8", s[nt, gi, T.ramp(0, 1, 8)]) * gacc[T.ramp(0, 1, 8)] + T.Cast(
                    "float32x8", z[nt, gi, T.ramp(0, 1, 8)]) * T.broadcast(xs[r, gi], 8)
            y[r, T.ramp(nt * TILE, 1, 8)] = acc[T.ramp(0, 1, 8)]

    @T.macro
    def gemv_interleaved(ntp, m, ws, xq, sx, xs, s, z, y):
        # tiles ntp*nti ... +nti-1 side by side: one activation broadcast feeds nti vpmaddubsw (more
        # independent chains, fewer activation loads)
        for r in range(m):
            acc = T.alloc_buffer((nti, TILE), "float32", scope="global")
            gacc = T.alloc_buffer((nti, TILE), "float32", scope="global")
            i32 = T.alloc_buffer((nti, TILE), "int32", scope="global")
            s16 = T.alloc_buffer((nti, 16), "int16", scope="global")
            for tt in T.unroll(nti):
                acc[tt, T.ramp(0, 1, 8)] = T.broadcast(T.float32(0), 8)
            for gi in range(kg):
                for tt in T.unroll(nti):
                    gacc[tt, T.ramp(0, 1, 8)] = T.broadcast(T.float32(0), 8)
                for bb in range(bpg):
                    for tt in T.unroll(nti):
                        i32[tt, T.ramp(0, 1, 8)] = T.broadcast(T.int32(0), 8)
                    for c in T.unroll(nch):
                        for tt in T.unroll(nti):
                            s16[tt, T.ramp(0, 1, 16)] = T.broadcast(T.int16(0), 16)
                        for u in T.unroll(ch):
                            for tt in T.unroll(nti):
                                s16[tt, T.ramp(0, 1, 16)] = s16[tt, T.ramp(0, 1, 16)] + _madd(
                                    code(ws, ntp * nti + tt, gi * bpg + bb, c * ch + u),
                                    _xb(xq, r, gi * bpg + bb, c * ch + u))
                        for tt in T.unroll(nti):
                            i32[tt, T.ramp(0, 1, 8)] = i32[tt, T.ramp(0, 1, 8)] + _widen(s16[tt, T.ramp(0, 1, 16)])
                    for tt in T.unroll(nti):
                        gacc[tt, T.ramp(0, 1, 8)] = gacc[tt, T.ramp(0, 1, 8)] + T.Cast(
                            "float32x8", i32[tt, T.ramp(0, 1, 8)]) * T.broadcast(sx[r, gi * bpg + bb], 8)
                for tt in T.unroll(nti):
                    acc[tt, T.ramp(0, 1, 8)] = acc[tt, T.ramp(0, 1, 8)] + T.Cast(
                        "float32x8", s[ntp * nti + tt, gi, T.ramp(0, 1, 8)]) * gacc[tt, T.ramp(0, 1, 8)] + T.Cast(
                        "float32x8", z[ntp * nti + tt, gi, T.ramp(0, 1, 8)]) * T.broadcast(xs[r, gi], 8)
            for tt in T.unroll(nti):
                y[r, T.ramp((ntp * nti + tt) * TILE, 1, 8)] = acc[tt, T.ramp(0, 1, 8)]

    @T.macro
    def gemm(nt, m, ws, xq, sx, xs, s, z, y):
        # GEMM: each sub-block's codes are decoded once for a block of rb rows
        acc = T.alloc_buffer((rb, TILE), "float32", scope="global")
        gacc = T.alloc_buffer((rb, TILE), "float32", scope="global")
        i32 = T.alloc_buffer((rb, TILE), "int32", scope="global")
        s16 = T.alloc_buffer((rb, 16), "int16", scope="global")
        cw = T.alloc_buffer((32,), "uint8", scope="global")
        for mb in range((m + rb - 1) // rb):
            for rr in T.unroll(rb):
                acc[rr, T.ramp(0, 1, 8)] = T.broadcast(T.float32(0), 8)
            for gi in range(kg):
                for rr in T.unroll(rb):
                    gacc[rr, T.ramp(0, 1, 8)] = T.broadcast(T.float32(0), 8)
                for bb in range(bpg):
                    for rr in T.unroll(rb):
                        i32[rr, T.ramp(0, 1, 8)] = T.broadcast(T.int32(0), 8)
                    for c in T.unroll(nch):
                        for rr in T.unroll(rb):
                            s16[rr, T.ramp(0, 1, 16)] = T.broadcast(T.int16(0), 16)
                        for u in T.unroll(ch):
                            cw[T.ramp(0, 1, 32)] = code(ws, nt, gi * bpg + bb, c * ch + u)
                            for rr in T.unroll(rb):
                                s16[rr, T.ramp(0, 1, 16)] = s16[rr, T.ramp(0, 1, 16)] + _madd(
                                    cw[T.ramp(0, 1, 32)],
                                    _xb(xq, T.min(mb * rb + rr, m - 1), gi * bpg + bb, c * ch + u))
                        for rr in T.unroll(rb):
                            i32[rr, T.ramp(0, 1, 8)] = i32[rr, T.ramp(0, 1, 8)] + _widen(s16[rr, T.ramp(0, 1, 16)])
                    for rr in T.unroll(rb):
                        gacc[rr, T.ramp(0, 1, 8)] = gacc[rr, T.ramp(0, 1, 8)] + T.Cast("float32x8", i32[rr, T.ramp(0, 1, 8)]) * T.broadcast(
                            sx[T.min(mb * rb + rr, m - 1), gi * bpg + bb], 8)
                for rr in T.unroll(rb):
                    acc[rr, T.ramp(0, 1, 8)] = acc[rr, T.ramp(0, 1, 8)] + T.Cast("float32x8", s[nt, gi, T.ramp(0, 1, 8)]) * gacc[rr, T.ramp(0, 1, 8)] + T.Cast(
                        "float32x8", z[nt, gi, T.ramp(0, 1, 8)]) * T.broadcast(xs[T.min(mb * rb + rr, m - 1), gi], 8)
            for rr in range(rb):
                if mb * rb + rr < m:
                    y[mb * rb + rr, T.ramp(nt * TILE, 1, 8)] = acc[rr, T.ramp(0, 1, 8)]

    @T.prim_func(private=True)
    def kernel(x_h: T.handle, w0_h: T.handle, w1_h: T.handle, s_h: T.handle, z_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": OPAQUE, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")
        w0 = T.match_buffer(w0_h, (nt_, kb_, 32 * p0), "uint8")
        w1 = T.match_buffer(w1_h, (nt_, kb_, 32 * p1), "uint8")
        s = T.match_buffer(s_h, (nt_, kg, TILE), "float16")
        z = T.match_buffer(z_h, (nt_, kg, TILE), "float16")
        y = T.match_buffer(y_h, (m, n), "float32")
        ws = T.meta_var((w0, w1) if two else (w0,))
        xq = T.alloc_buffer((m, k), "int8")
        sx = T.alloc_buffer((m, kb_), "float32")
        xs = T.alloc_buffer((m, kg), "float32")
        if m < rb:
            for r in range(m):
                quantize_row(x, xq, sx, xs, r)
        else:
            for r in T.parallel(m):
                quantize_row(x, xq, sx, xs, r)
        if nest == "fused" and nti == 1:  # the default (Python conditions: one loop nest is generated)
            for nt in T.parallel(nt_):
                if m < rb:
                    gemv(nt, m, ws, xq, sx, xs, s, z, y)
                else:
                    gemm(nt, m, ws, xq, sx, xs, s, z, y)
        elif nest == "fused":
            for ntp in T.parallel(nt_ // nti):
                if m < rb:
                    gemv_interleaved(ntp, m, ws, xq, sx, xs, s, z, y)
                else:
                    for tt in range(nti):
                        gemm(ntp * nti + tt, m, ws, xq, sx, xs, s, z, y)
        elif m < rb:
            for ntp in T.parallel(nt_ // nti):
                if nti == 1:
                    gemv(ntp, m, ws, xq, sx, xs, s, z, y)
                else:
                    gemv_interleaved(ntp, m, ws, xq, sx, xs, s, z, y)
        else:
            for ntp in T.parallel(nt_ // nti):
                for tt in range(nti):
                    gemm(ntp * nti + tt, m, ws, xq, sx, xs, s, z, y)

    return kernel
