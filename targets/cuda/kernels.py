"""Dequantizing matmul kernels for GPUs (TIR), with their numpy equivalents.

The weights stay in the canonical packing of :mod:`qcompile.passes.formats` (no retiling): per bit plane
of width ``pb`` a uint32 array [N, K*pb/32], code ``k`` of a row at bit ``pb*k % 32`` of word
``pb*k // 32``; float16 scales and zeros [N, K/g].  A row's words are contiguous, so lanes of a warp
walking along K read consecutive 16-byte vectors.

Two kernels compute ``y[M, N] = x[M, K] @ dequantize(W)[N, K].T`` (float32 x and y):

- :func:`dequant_matmul` — the unscheduled definition (a dequantize block feeding a matmul block),
  target-generic: dlight (``s_tir.dlight.gpu``) schedules it for CUDA, WebGPU, ...;
- :func:`gemv` — a hand-scheduled CUDA kernel for small M (decode).  A block owns ``rows`` output
  channels at a time (``groups`` such row groups in turn); its ``ksplit`` warps split K, each lane takes
  a chunk of ``CT`` consecutive codes per step (one 16-byte load of the first plane per row; x from
  registers, reused by the rows, staged once per block in shared memory for large K or N).  The group's
  integer codes are accumulated against x and scaled once per group::

      y[m, n] = sum_g  s[n, g] * sum_{k in g} code[n, k] * x[m, k]  +  z[n, g] * sum_{k in g} x[m, k]

  A code is never shifted down to bit 0: code ``c`` at bit ``p`` of its word (``p + width <= 23``; the
  word's high codes after one right shift) is ``bits_as_float(0x4B000000 | (word & mask << p)) - 2**23
  = c * 2**p`` exactly (one LOP3, one FADD); products are accumulated per ``p`` and scaled by ``2**-p``
  once per chunk.  Warps reduce with shuffles, the block through shared memory.  Each row of x is its
  own block row (``blockIdx.y``): M > 1 re-reads the weights (from L2 when they fit), so this kernel
  is for batch 1-8; it is correct for any M.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from tvm.script import tirx as T

from ..x86.kernels import im2col_unscheduled as im2col  # dlight schedules it

if TYPE_CHECKING:
    from qcompile.passes.formats import WeightFormat

__all__ = ["dequant_matmul", "gemv", "gemv_config", "chunk_codes", "im2col", "reference_matmul", "GemvConfig",
           "SMEM_X_LIMIT"]

OPAQUE = 8  # relax OpPatternKind.kOpaque: our kernels are called as they are, never fused
WARP = 32


def reference_matmul(x: np.ndarray, w_deq: np.ndarray) -> np.ndarray:
    """numpy equivalent of both kernels: ``x[M, K] @ w_deq[N, K].T`` in float32."""
    return x.astype(np.float32) @ w_deq.T


def te_operands(fmt: WeightFormat, k: int, n: int, rows: int | None = None):
    """The TE placeholders of a quantized matmul (x, w0, w1, s, z; M symbolic or ``rows``) and
    ``code(n, k)``: the integer code of W[n, k] from its planes (canonical packing)."""
    from tvm import te, tirx  # noqa: PLC0415

    planes, g = fmt.planes, fmt.group_size
    # every dim int64, like the symbolic M that Relax passes: dlight's Matmul rule rejects index maps
    # that mix int32 and int64 ("Buffer index 512 has dtype int32 ... int64", TVM 0.27)
    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    m = tirx.Var("m", "int64") if rows is None else i64(rows)
    p0 = planes[0]
    p1 = planes[1] if len(planes) > 1 else planes[0]
    x = te.placeholder((m, i64(k)), "float32", name="x")
    w0 = te.placeholder((i64(n), i64(k * p0 // 32)), "uint32", name="w0")
    w1 = te.placeholder((i64(n), i64(k * p1 // 32)), "uint32", name="w1")
    s = te.placeholder((i64(n), i64(k // g)), "float16", name="s")
    z = te.placeholder((i64(n), i64(k // g)), "float16", name="z")
    ws = (w0, w1)[: len(planes)]

    def code(nn, kk):
        expr, shift = None, 0
        for w, pb in zip(ws, planes):
            word = w[nn, kk * pb // 32]
            part = (word >> ((kk * pb) % 32).astype("uint32")) & tirx.const((1 << pb) - 1, "uint32")
            if shift:
                part = part << tirx.const(shift, "uint32")
            expr = part if expr is None else expr | part
            shift += pb
        return expr

    return m, (x, w0, w1, s, z), code


def dequant_matmul(fmt: WeightFormat, k: int, n: int, rows: int | None = None):
    """Unscheduled TIR (from TE) ``y[M, N] = x[M, K] @ dequantize(W)[N, K].T``, M symbolic (or ``rows``).

    Arguments: x (float32 [M, K]), planes (uint32 [N, K*pb/32] each; a 1-plane format passes its plane
    twice), scales, zeros (float16 [N, K/g]), y (float32 [M, N]).  numpy: ``x @ fmt.dequantize(q).T``.
    """
    from tvm import te, tirx  # noqa: PLC0415

    g = fmt.group_size
    if k % g:
        raise ValueError(f"dequant_matmul: K={k} must divide by group {g}")
    i64 = lambda v: tirx.IntImm("int64", v)  # noqa: E731
    m, (x, w0, w1, s, z), code = te_operands(fmt, k, n, rows)
    wd = te.compute((i64(n), i64(k)), lambda nn, kk: code(nn, kk).astype("float32") * s[nn, kk // g].astype("float32")
                    + z[nn, kk // g].astype("float32"), name="dequantize")
    r = te.reduce_axis((i64(0), i64(k)), name="k")
    y = te.compute((m, i64(n)), lambda i, j: te.sum(x[i, r] * wd[j, r], axis=r), name="matmul")
    # opaque: FuseOps would fuse the epilogue (bias, activation) into it and FuseTIR then fails on the
    # symbolic-M buffers ("Inconsistent buffers matmul and lv mapped to the same relax var", TVM 0.27)
    return te.create_prim_func([x, w0, w1, s, z, y]).without_attr("global_symbol").with_attr("op_pattern", OPAQUE)


class GemvConfig:
    """Launch shape of :func:`gemv`: ``rows`` output channels at a time per block, whose ``ksplit`` warps
    split K; ``groups`` such row groups per block, x staged once per block in shared memory if ``smem``."""

    def __init__(self, rows: int = 8, ksplit: int = 4, groups: int = 1, smem: bool = False, prefetch: bool = False):
        self.rows, self.ksplit, self.groups, self.smem = rows, ksplit, groups, bool(smem)
        self.prefetch = bool(prefetch)  # load the next step's words before this step's math (registers x2)

    def __repr__(self) -> str:
        return (f"GemvConfig(rows={self.rows}, ksplit={self.ksplit}, groups={self.groups}, smem={self.smem}, "
                f"prefetch={self.prefetch})")


SMEM_X_LIMIT = 96 << 10  # bytes of x staged in shared memory at most (sm_89 allows 99 KB a block)


def gemv_config(n: int, k: int, planes: tuple[int, ...] = (4,)) -> GemvConfig:
    """The launch shape, from timings of 8 shapes at 2 and 4 bits on an H100 (bench/gpu/gpu_check.py):

    8 rows at a time (x reused 8 times from registers), 4 warps along K; for K >= 8192, 8 warps along K
    and 2 row groups a block with x staged in shared memory (x read from L2 once per 16 rows instead of
    once per 8); for N >= 8192, 2 row groups with x in shared memory.  Fewer rows for small N.  Software
    prefetch of the next step's words (``prefetch``) measured within noise of none: off.
    """
    smem_ok = (k + k // chunk_codes(planes, k) * 4) * 4 <= SMEM_X_LIMIT
    if k >= 8192 and n >= 1024 and smem_ok and planes != (8,):  # 8 bits: 27.0 us without, 29.6 with
        return GemvConfig(rows=8, ksplit=8, groups=2, smem=True)
    if n >= 8192 and smem_ok:
        return GemvConfig(rows=8, ksplit=4, groups=2, smem=True)
    if planes == (8,) and n >= 1024 and k >= n:  # bench/results/gpu_gemv_sweep.json: 4096x14336 25.8 us vs 27.5
        return GemvConfig(rows=4, ksplit=4)
    return GemvConfig(rows=8 if n >= 4096 else 4 if n >= 1024 else 2 if n >= 256 else 1, ksplit=4)


def chunk_codes(planes: tuple[int, ...], k: int) -> int:
    """Codes per lane and step: one 16-byte load of the first plane, halved until it divides K."""
    ct = 128 // planes[0]
    while k % ct:
        ct //= 2
    if ct * min(planes) % 32:
        raise ValueError(f"gemv: K={k} is not a multiple of 32 codes")
    return ct


EXP_BITS = 23  # float32 mantissa bits: a code c placed at bit p < 23 - width reads as 2**23 + c * 2**p


def gemv(fmt: WeightFormat, k: int, n: int, config: GemvConfig | None = None):
    """Scheduled CUDA TIR ``y[M, N] = x[M, K] @ dequantize(W)[N, K].T`` for small (symbolic) M.

    Same arguments and numpy equivalent as :func:`dequant_matmul`; see the module docstring.  Codes are
    never shifted down: code ``c`` at bit ``p`` of a word (``p + width <= 23``, else of the word shifted
    right once) becomes ``bits_as_float(0x4B000000 | (word & mask << p)) - 2**23 = c * 2**p`` (one LOP3,
    one FADD), accumulated per ``p`` and scaled by ``2**-p`` once per chunk.
    """
    planes, g = tuple(fmt.planes), fmt.group_size
    cfg = config or gemv_config(n, k, planes)
    if k % g:
        raise ValueError(f"gemv: K={k} must divide by group {g}")
    ct = chunk_codes(planes, k)
    rows, ks = cfg.rows, cfg.ksplit
    p0 = planes[0]
    p1 = planes[1] if len(planes) > 1 else planes[0]
    two = len(planes) > 1
    v0, v1 = ct * p0 // 32, ct * p1 // 32  # words of each plane per lane and step
    chunks = k // ct
    lanes = WARP * ks
    steps = (chunks + lanes - 1) // lanes
    sub = max(1, ct // g)  # groups a chunk spans
    cs = min(ct, g)  # codes per group within a chunk
    xv4 = ct // 4
    groups, smem, prefetch = cfg.groups, cfg.smem, cfg.prefetch
    blocks = (n + rows * groups - 1) // (rows * groups)
    kg = k // g
    xpad = k + (k // ct) * 4  # x in shared memory: 4 floats of padding per chunk (16-byte loads, no conflicts)
    fill = (k // 4 + lanes - 1) // lanes  # float4 copies per thread to stage x
    # accumulators per bit position: positions are multiples of the plane's width below bit 23
    shifts = [-(-(32 - EXP_BITS) // pb) * pb for pb in planes]  # a word's high codes: shifted right once
    nslots = [(EXP_BITS - pb) // pb + 1 for pb in planes]
    n1 = nslots[1] if two else 1

    def value(a, r, plane, i):
        """``c * 2**pos`` (float32, exact) for code ``i`` of the chunk in ``plane`` (words in registers ``a``)."""
        pb = planes[plane]
        bit = (i * pb) % 32
        shift = T.if_then_else(bit + pb <= EXP_BITS, 0, shifts[plane])
        src = T.shift_right(a[r, (i * pb) // 32], T.Cast("uint32", shift))
        mask = T.shift_left(T.uint32((1 << pb) - 1), T.Cast("uint32", bit - shift))
        return T.reinterpret("float32", T.bitwise_or(T.bitwise_and(src, mask), T.uint32(0x4B000000))) \
            - T.float32(8388608.0)

    def slot(plane, i):
        """Accumulator of code ``i``: its bit position over the plane width."""
        pb = planes[plane]
        bit = (i * pb) % 32
        return (bit - T.if_then_else(bit + pb <= EXP_BITS, 0, shifts[plane])) // pb

    def pow2(e):
        """2.0**e as float32 (exact), for an integer expression ``e`` in [-126, 127]."""
        return T.reinterpret("float32", T.Cast("uint32", (e + 127) * (1 << 23)))

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
        for mb in T.thread_binding(m, thread="blockIdx.y"):
            for nb in T.thread_binding(blocks, thread="blockIdx.x"):
                for wy in T.thread_binding(ks, thread="threadIdx.y"):
                    for tx in T.thread_binding(WARP, thread="threadIdx.x"):
                        red = T.alloc_buffer((groups, ks, rows), "float32", scope="shared")
                        xsh = T.alloc_buffer((xpad if smem else 4,), "float32", scope="shared.dyn")
                        acc = T.alloc_buffer((rows,), "float32", scope="local")
                        xv = T.alloc_buffer((ct,), "float32", scope="local")
                        xs = T.alloc_buffer((sub,), "float32", scope="local")
                        a0 = T.alloc_buffer((rows, v0), "uint32", scope="local")
                        a1 = T.alloc_buffer((rows, v1), "uint32", scope="local")
                        b0 = T.alloc_buffer((rows, v0 if prefetch else 1), "uint32", scope="local")
                        b1 = T.alloc_buffer((rows, v1 if prefetch else 1), "uint32", scope="local")
                        q0 = T.alloc_buffer((nslots[0],), "float32", scope="local")
                        q1 = T.alloc_buffer((n1,), "float32", scope="local")
                        part = T.alloc_buffer((1,), "float32", scope="local")
                        if smem:
                            for it in range(fill):
                                if (it * ks + wy) * WARP + tx < k // 4:
                                    for i1 in T.vectorized(4):
                                        xsh[((it * ks + wy) * WARP + tx) * 4 + ((it * ks + wy) * WARP + tx) * 4 // ct * 4
                                            + i1] = x[mb, ((it * ks + wy) * WARP + tx) * 4 + i1]
                            T.tvm_storage_sync("shared.dyn")
                        for gr in range(groups):
                            for r in T.unroll(rows):
                                acc[r] = T.float32(0)
                            if prefetch:
                                if wy * WARP + tx < chunks:
                                    for r in T.unroll(rows):
                                        if (nb * groups + gr) * rows + r < n:
                                            for j in T.vectorized(v0):
                                                b0[r, j] = w0[(nb * groups + gr) * rows + r, (wy * WARP + tx) * v0 + j]
                                            if two:
                                                for j in T.vectorized(v1):
                                                    b1[r, j] = w1[(nb * groups + gr) * rows + r, (wy * WARP + tx) * v1 + j]
                            for st in range(steps):
                                if (st * ks + wy) * WARP + tx < chunks:
                                    for i0 in T.unroll(xv4):
                                        for i1 in T.vectorized(4):
                                            if smem:
                                                xv[i0 * 4 + i1] = xsh[((st * ks + wy) * WARP + tx) * (ct + 4) + i0 * 4 + i1]
                                            else:
                                                xv[i0 * 4 + i1] = x[mb, ((st * ks + wy) * WARP + tx) * ct + i0 * 4 + i1]
                                    if prefetch:  # this step's words arrived during the last step's math
                                        for r in T.unroll(rows):
                                            for j in T.unroll(v0):
                                                a0[r, j] = b0[r, j]
                                            if two:
                                                for j in T.unroll(v1):
                                                    a1[r, j] = b1[r, j]
                                        if ((st + 1) * ks + wy) * WARP + tx < chunks:
                                            for r in T.unroll(rows):
                                                if (nb * groups + gr) * rows + r < n:
                                                    for j in T.vectorized(v0):
                                                        b0[r, j] = w0[(nb * groups + gr) * rows + r,
                                                                      (((st + 1) * ks + wy) * WARP + tx) * v0 + j]
                                                    if two:
                                                        for j in T.vectorized(v1):
                                                            b1[r, j] = w1[(nb * groups + gr) * rows + r,
                                                                          (((st + 1) * ks + wy) * WARP + tx) * v1 + j]
                                    else:
                                        for r in T.unroll(rows):
                                            if (nb * groups + gr) * rows + r < n:
                                                for j in T.vectorized(v0):
                                                    a0[r, j] = w0[(nb * groups + gr) * rows + r,
                                                                  ((st * ks + wy) * WARP + tx) * v0 + j]
                                                if two:
                                                    for j in T.vectorized(v1):
                                                        a1[r, j] = w1[(nb * groups + gr) * rows + r,
                                                                      ((st * ks + wy) * WARP + tx) * v1 + j]
                                    for sg in T.unroll(sub):
                                        xs[sg] = T.float32(0)
                                        for i in T.unroll(cs):
                                            xs[sg] = xs[sg] + xv[sg * cs + i]
                                    for r in T.unroll(rows):
                                        if (nb * groups + gr) * rows + r < n:
                                            for sg in T.unroll(sub):
                                                for j in T.unroll(nslots[0]):
                                                    q0[j] = T.float32(0)
                                                for j in T.unroll(n1):
                                                    q1[j] = T.float32(0)
                                                for i in T.unroll(cs):
                                                    q0[slot(0, sg * cs + i)] = q0[slot(0, sg * cs + i)] + value(
                                                        a0, r, 0, sg * cs + i) * xv[sg * cs + i]
                                                    if two:
                                                        q1[slot(1, sg * cs + i)] = q1[slot(1, sg * cs + i)] + value(
                                                            a1, r, 1, sg * cs + i) * xv[sg * cs + i]
                                                part[0] = T.float32(0)
                                                for j in T.unroll(nslots[0]):
                                                    part[0] = part[0] + q0[j] * pow2(-j * p0)
                                                if two:
                                                    for j in T.unroll(n1):
                                                        part[0] = part[0] + q1[j] * pow2(p0 - j * p1)
                                                acc[r] = acc[r] + T.Cast("float32", s[
                                                    (nb * groups + gr) * rows + r,
                                                    (((st * ks + wy) * WARP + tx) * ct + sg * cs) // g]) * part[0] + T.Cast(
                                                    "float32", z[(nb * groups + gr) * rows + r,
                                                                 (((st * ks + wy) * WARP + tx) * ct + sg * cs) // g]) * xs[sg]
                            for r in T.unroll(rows):
                                for off in T.unroll(5):
                                    acc[r] = acc[r] + T.tvm_warp_shuffle_down(
                                        T.uint32(0xFFFFFFFF), acc[r], T.shift_right(16, off), WARP, WARP)
                                if tx == 0:
                                    red[gr, wy, r] = acc[r]
                        T.tvm_storage_sync("shared")
                        for o in range((groups * rows + lanes - 1) // lanes):
                            if (o * ks + wy) * WARP + tx < groups * rows:
                                if nb * groups * rows + (o * ks + wy) * WARP + tx < n:
                                    part[0] = T.float32(0)
                                    for w in T.unroll(ks):
                                        part[0] = part[0] + red[((o * ks + wy) * WARP + tx) // rows, w,
                                                                ((o * ks + wy) * WARP + tx) % rows]
                                    y[mb, nb * groups * rows + (o * ks + wy) * WARP + tx] = part[0]

    return kernel
