"""Unscheduled TIR kernels for the Vulkan (WebGPU) target, scheduled by dlight, with numpy equivalents.

The weights stay in the canonical packing of :mod:`qcompile.passes.formats` (no retiling): per bit plane
of width ``pb`` a uint32 array [N, K*pb/32], code ``k`` of a row at bit ``pb*k % 32`` of word
``pb*k // 32``; float16 scales and zeros [N, K/g].  Only 32-bit integer ops: WGSL has no 64-bit ints.

The same definition as the CUDA target's ``dequant_matmul`` (same arguments): to be merged into one
generic GPU kernel module.

:func:`gemv` is the same function scheduled by hand for small M (decode steps), for what TVM's WebGPU
codegen can express: no warp shuffles (the reduction goes through workgroup memory), 32-bit integers.
A workgroup owns ``rows`` output channels; its ``threads`` invocations split K in chunks of 32 codes
(one group's worth at most: ``pb`` consecutive words of a ``pb``-bit plane, read together), each chunk's
32 x values loaded once and reused by the rows.  A code becomes a float without a conversion
instruction: ``bitcast<f32>(code | 0x4B000000) - 2**23 == code`` (codes < 2**23); single-plane codes are
masked where they lie in their word's lower or upper 16 bits (``inplace``: the float is ``code * 2**pos``
and x is pre-scaled by ``2**-pos``, exact), so a code costs a mask-or, a subtraction and an FMA::

    y[m, n] = sum_chunks  s[n, g(c)] * sum_{k in c} code[n, k] * x[m, k]  +  z[n, g(c)] * sum_{k in c} x[m, k]
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from qcompile.passes.formats import WeightFormat

__all__ = ["dequant_matmul", "gemv", "GemvConfig", "TUNED", "im2col", "reference_matmul", "QMATMUL_ATTR"]

OPAQUE = 8  # relax OpPatternKind.kOpaque: FuseOps leaves the kernel alone (FuseTIR cannot merge its buffers)
QMATMUL_ATTR = "qcompile.qmatmul"  # PrimFunc attribute [format name, K, N] of a quantized matmul kernel
CHUNK = 32  # codes per chunk of :func:`gemv` (format groups are multiples of it)


def reference_matmul(x: np.ndarray, w_deq: np.ndarray) -> np.ndarray:
    """numpy equivalent of :func:`dequant_matmul`: ``x[M, K] @ w_deq[N, K].T`` in float32."""
    return x.astype(np.float32) @ w_deq.T


def dequant_matmul(fmt: WeightFormat, k: int, n: int, m: int | None = None):
    """Unscheduled TIR (from TE) ``y[M, N] = x[M, K] @ dequantize(W)[N, K].T`` for M = ``m``, or a
    symbolic M when ``m`` is None (a static M = 1 gets dlight's GEMV schedule, a symbolic one its matmul).

    Arguments: x (float32 [M, K]), planes (uint32 [N, K*pb/32] each; a 1-plane format passes its plane
    twice), scales, zeros (float16 [N, K/g]), y (float32 [M, N]).

    numpy: ``y = x @ fmt.dequantize(q).T`` where per group ``w = float32(code) * float32(s) + float32(z)``
    and ``code = sum_p ((plane_p[n, k*pb_p // 32] >> (k*pb_p % 32)) & (2**pb_p - 1)) << shift_p``.
    """
    from tvm import te, tirx  # noqa: PLC0415

    planes, g = tuple(fmt.planes), fmt.group_size
    if k % g or k % 32:
        raise ValueError(f"dequant_matmul: K={k} must divide by the group {g} and by 32")
    i64 = lambda v: tirx.const(v, "int64")  # noqa: E731  (one index type: dlight's layout maps require it)
    m = tirx.Var("m", "int64") if m is None else i64(m)
    x = te.placeholder((m, i64(k)), "float32", name="x")
    p0, p1 = planes[0], planes[-1]
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

    wd = te.compute((i64(n), i64(k)), lambda nn, kk: code(nn, kk).astype("float32") * s[nn, kk // g].astype("float32")
                    + z[nn, kk // g].astype("float32"), name="dequantize")
    r = te.reduce_axis((i64(0), i64(k)), name="k")
    y = te.compute((m, i64(n)), lambda i, j: te.sum(x[i, r] * wd[j, r], axis=r), name="matmul")
    return te.create_prim_func([x, w0, w1, s, z, y]).without_attr("global_symbol").with_attr("op_pattern", OPAQUE)


class GemvConfig:
    """Launch shape and code path of :func:`gemv`.

    ``rows`` output channels per workgroup of ``threads`` invocations; ``smem_x``: each step's x staged in
    workgroup memory by coalesced loads (an invocation's own 32 values are 128 contiguous bytes: read
    directly, a warp's load touches 32 cache lines); ``split_reduce``: the partial sums reduced in two
    passes over workgroup memory (3 barriers) instead of a tree (TVM's ThreadSync puts a barrier after
    every row of every level there: 6 x 8 at 64 threads and 8 rows); ``inplace``: single-plane codes
    masked where they lie (no shift; x pre-scaled by the code's 2**-bit position); ``early``: a step's
    weights loaded before its x is staged (their latency overlaps the staging).  :data:`TUNED` holds
    the configs :func:`gemv` uses by default."""

    def __init__(self, rows: int = 8, threads: int = 64, smem_x: bool = True, split_reduce: bool = False,
                 inplace: bool = False, early: bool = False):
        if threads & (threads - 1) or threads < rows or threads % rows:
            raise ValueError(f"gemv: threads={threads} must be a power of two and a multiple of rows={rows}")
        self.rows, self.threads, self.smem_x = rows, threads, bool(smem_x)
        self.split_reduce, self.inplace, self.early = bool(split_reduce), bool(inplace), bool(early)

    def __repr__(self) -> str:
        return (f"GemvConfig(rows={self.rows}, threads={self.threads}, smem_x={self.smem_x}, "
                f"split_reduce={self.split_reduce}, inplace={self.inplace}, early={self.early})")


# The default config per code width (None: any other width), from bench/results/gpu_vulkan_gemv_round2.json
# (H100, NVIDIA Vulkan; kernels timed in turns, ratios to the old default per turn): 8 bits lose with
# ``early`` (0.98 against 0.84 of the old time at 4096x4096).  bench/gpu/NOTES.md has the steps.
TUNED = {None: GemvConfig(split_reduce=True, inplace=True, early=True),
         8: GemvConfig(split_reduce=True, inplace=True)}


def weight_loader(rows: int, threads: int, chunks: int, n: int, v0: int, v1: int, two: bool):
    """TIR macro ``load_weights(a0, a1, w0, w1, st, nb, tx)`` of the GEMVs (:func:`gemv`,
    :func:`.kernels_int8.gemv_int8`): invocation ``tx`` of workgroup ``nb`` loads, at step ``st``, the
    ``v0`` (``v1``) words of its chunk of each of the workgroup's ``rows`` rows of plane 0 (1) into
    registers ``a0`` (``a1``), in vectors of up to 4 words (WGSL's widest); numpy:
    ``a0[r] = w0[nb*rows + r, c*v0:(c+1)*v0]`` for ``c = st*threads + tx < chunks``, rows below ``n``."""
    from tvm.script import tirx as T  # noqa: PLC0415

    q0, q1 = min(v0, 4), min(v1, 4)  # words per vector load

    @T.macro
    def load_weights(a0, a1, w0, w1, st, nb, tx):
        if st * threads + tx < chunks:
            for r in T.unroll(rows):
                if nb * rows + r < n:
                    for j0 in T.unroll(v0 // q0):
                        for j1 in T.vectorized(q0):
                            a0[r, j0 * q0 + j1] = w0[nb * rows + r, (st * threads + tx) * v0 + j0 * q0 + j1]
                    if two:
                        for j0 in T.unroll(v1 // q1):
                            for j1 in T.vectorized(q1):
                                a1[r, j0 * q1 + j1] = w1[nb * rows + r, (st * threads + tx) * v1 + j0 * q1 + j1]

    return load_weights


def gemv(fmt: WeightFormat, k: int, n: int, config: GemvConfig | None = None):
    """Scheduled WebGPU TIR ``y[M, N] = x[M, K] @ dequantize(W)[N, K].T``, M symbolic (one workgroup row
    per row of x: for small M).  Same arguments and numpy equivalent as :func:`dequant_matmul`; see the
    module docstring for the schedule."""
    from tvm.script import tirx as T  # noqa: PLC0415

    planes, g = tuple(fmt.planes), fmt.group_size
    if k % g or g % CHUNK:
        raise ValueError(f"gemv: K={k} must divide by the group {g}, a multiple of {CHUNK}")
    cfg = config or TUNED.get(fmt.bits, TUNED[None])
    rows, threads, smem_x = cfg.rows, cfg.threads, cfg.smem_x
    span = threads * CHUNK  # x values a step covers
    pad = CHUNK + 1  # x in workgroup memory: an invocation's chunk at tx * 33 (no bank conflicts)
    two = len(planes) > 1
    inplace = cfg.inplace and not two
    p0, p1 = planes[0], planes[-1]
    v0, v1 = CHUNK * p0 // 32, CHUNK * p1 // 32  # words of each plane per chunk
    chunks = k // CHUNK
    steps = (chunks + threads - 1) // threads
    blocks = (n + rows - 1) // rows
    kg = k // g
    levels = threads.bit_length() - 1
    parts = threads // rows  # split_reduce: invocations summing one row's partial sums

    def position(i):
        """In-place codes: bit position of code ``i`` (an unrolled loop variable) in its word's lower or
        upper half (the upper half shifted down 16 first; widths 2, 4 and 8 divide 16)."""
        return (i * p0) % 16

    def code(a0, a1, r, i):
        """Code ``i`` of the chunk (words in ``a0``/``a1``) as float32, exactly (in place: the code times
        2**position(i))."""
        word = a0[r, (i * p0) // 32]
        if inplace:
            word = T.shift_right(word, T.Cast("uint32", (i * p0) % 32 // 16 * 16))
            c = T.bitwise_and(word, T.shift_left(T.uint32((1 << p0) - 1), T.Cast("uint32", position(i))))
            return T.reinterpret("float32", T.bitwise_or(c, T.uint32(0x4B000000))) - T.float32(8388608.0)
        c = T.bitwise_and(T.shift_right(word, T.Cast("uint32", (i * p0) % 32)), T.uint32((1 << p0) - 1))
        if two:
            hi = T.bitwise_and(T.shift_right(a1[r, (i * p1) // 32], T.Cast("uint32", (i * p1) % 32)),
                               T.uint32((1 << p1) - 1))
            c = T.bitwise_or(c, T.shift_left(hi, T.uint32(p0)))
        return T.reinterpret("float32", T.bitwise_or(c, T.uint32(0x4B000000))) - T.float32(8388608.0)

    def xscale(i):
        """2**-position(i) (exact), as float32 bits."""
        return T.reinterpret("float32", T.shift_left(T.Cast("uint32", 127 - position(i)), T.uint32(23)))

    load_weights = weight_loader(rows, threads, chunks, n, v0, v1, two)

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
                for tx in T.thread_binding(threads, thread="threadIdx.x"):
                    red = T.alloc_buffer((2, rows, threads), "float32", scope="shared")
                    red2 = T.alloc_buffer((threads,), "float32", scope="shared")
                    xsh = T.alloc_buffer((threads * pad if smem_x else 1,), "float32", scope="shared")
                    acc = T.alloc_buffer((rows,), "float32", scope="local")
                    xv = T.alloc_buffer((CHUNK,), "float32", scope="local")
                    a0 = T.alloc_buffer((rows, v0), "uint32", scope="local")
                    a1 = T.alloc_buffer((rows, v1), "uint32", scope="local")
                    xs = T.alloc_buffer((1,), "float32", scope="local")
                    dot = T.alloc_buffer((2,), "float32", scope="local")
                    for r in T.unroll(rows):
                        acc[r] = T.float32(0)
                    for st in range(steps):
                        if cfg.early:
                            load_weights(a0, a1, w0, w1, st, nb, tx)
                        if smem_x:
                            T.tvm_storage_sync("shared")  # the last step's reads are done
                            for i in T.unroll(CHUNK):
                                if st * span + i * threads + tx < k:
                                    xsh[(i * threads + tx) // CHUNK * pad + (i * threads + tx) % CHUNK] = x[
                                        mb, st * span + i * threads + tx]
                            T.tvm_storage_sync("shared")
                        if not cfg.early:
                            load_weights(a0, a1, w0, w1, st, nb, tx)
                        if st * threads + tx < chunks:
                            if smem_x:
                                for i in T.unroll(CHUNK):
                                    xv[i] = xsh[tx * pad + i]
                            else:
                                for i0 in T.unroll(CHUNK // 4):
                                    for i1 in T.vectorized(4):
                                        xv[i0 * 4 + i1] = x[mb, (st * threads + tx) * CHUNK + i0 * 4 + i1]
                            xs[0] = T.float32(0)
                            for i in T.unroll(CHUNK):
                                xs[0] = xs[0] + xv[i]
                            if inplace:
                                for i in T.unroll(CHUNK):
                                    xv[i] = xv[i] * xscale(i)
                            for r in T.unroll(rows):
                                if nb * rows + r < n:
                                    dot[0] = T.float32(0)
                                    dot[1] = T.float32(0)
                                    for i in T.unroll(CHUNK):
                                        dot[i % 2] = dot[i % 2] + code(a0, a1, r, i) * xv[i]
                                    acc[r] = acc[r] + T.Cast("float32", s[nb * rows + r, (st * threads + tx) * CHUNK // g]) \
                                        * (dot[0] + dot[1]) + T.Cast(
                                            "float32", z[nb * rows + r, (st * threads + tx) * CHUNK // g]) * xs[0]
                    if cfg.split_reduce:
                        # row r's partial sums at red[0, r, :]; invocation tx sums ``rows`` of row tx // parts
                        # (every parts-th from tx % parts), then tx < rows sums its row's ``parts`` of those
                        T.tvm_storage_sync("shared")
                        for r in T.unroll(rows):
                            red[0, r, tx] = acc[r]
                        T.tvm_storage_sync("shared")
                        xs[0] = T.float32(0)
                        for j in T.unroll(rows):
                            xs[0] = xs[0] + red[0, tx // parts, j * parts + tx % parts]
                        red2[tx] = xs[0]
                        T.tvm_storage_sync("shared")
                        if tx < rows:
                            if nb * rows + tx < n:
                                xs[0] = T.float32(0)
                                for j in T.unroll(parts):
                                    xs[0] = xs[0] + red2[tx * parts + j]
                                y[mb, nb * rows + tx] = xs[0]
                    else:
                        # tree reduction ping-ponging between two halves of ``red`` (no conditional writes:
                        # a barrier may not sit under a condition); entries [r, tx >= half] are don't-cares
                        for r in T.unroll(rows):
                            red[0, r, tx] = acc[r]
                        T.tvm_storage_sync("shared")
                        for lv in T.unroll(levels):
                            for r in T.unroll(rows):
                                red[(lv + 1) % 2, r, tx] = red[lv % 2, r, tx] + red[
                                    lv % 2, r, (tx + T.shift_right(threads, lv + 1)) % threads]
                            T.tvm_storage_sync("shared")
                        if tx < rows:
                            if nb * rows + tx < n:
                                y[mb, nb * rows + tx] = red[levels % 2, tx, 0]

    return kernel


def im2col(c: int, h: int, w: int, ks, st, pads, dil):
    """:func:`qcompile.targets.x86.kernels.im2col_unscheduled` (NCHW image -> patch rows; dlight schedules it)."""
    from ..x86.kernels import im2col_unscheduled  # noqa: PLC0415

    return im2col_unscheduled(c, h, w, ks, st, pads, dil)
