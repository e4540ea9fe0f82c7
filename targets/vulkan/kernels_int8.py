"""Int8-activation GEMV for the Vulkan target (WGSL ``dot4I8Packed``), with its numpy equivalent.

The float GEMV (:func:`.kernels.gemv`) spends a mask-or, a subtraction and an FMA per weight.  This
kernel quantizes the activations to int8 as the x86 and CUDA int8 kernels do and multiplies four codes
by four activations per ``dot4I8Packed`` (WGSL's packed 4x8-bit integer dot product; NVIDIA: ``IDP4A``).

Activations, per row ``m`` and block of 32 along K (exactly :func:`qcompile.targets.x86.kernels_int8.
quantize_activations`; rounding half to even)::

    sx[m, b] = max|x[m, 32b:32b+32]| / 127,   xq[m, k] = round(x[m, k] * (127 / max|...|))   int8

    y[m, n] = sum_b  s[n, g(b)] * sx[m, b] * sum_{k in b} code[n, k] * xq[m, k]
                   + z[n, g(b)] * sx[m, b] * sum_{k in b} xq[m, k]

numpy: :func:`reference` (the x86 ``reference_int8_matmul``, which the CUDA int8 GEMV also matches).

Schedule: that of :func:`.kernels.gemv` (a workgroup of ``threads`` invocations owns ``rows`` output
channels; each step stages ``threads`` blocks of x in workgroup memory by coalesced loads, invocation
``tx`` takes block ``tx``, partial sums reduced through workgroup memory in two passes).  An invocation
quantizes its block itself from workgroup memory: ``127 / amax`` and ``amax / 127`` correctly rounded
(one Newton step and an FMA correction: WGSL's division may be 2.5 ulp off), each value's int8 byte
taken from ``x * inv + 12800000`` (the float's low mantissa byte, :data:`MAGIC`; a ``min(., 127)`` between the
product and the sum keeps the driver from contracting them into one FMA, which rounds differently),
four bytes packed into a u32 in the order of :func:`qcompile.targets.cuda.kernels_int8.x_order` (one
arrangement per plane width).  A code word then needs no rotation: ``(word >> (pb*s - off)) & mask``
(or ``<<`` when negative) puts codes ``(8/pb)*i + s`` in byte ``i``, already shifted to the plane's
place ``off`` in the code (:func:`qcompile.targets.cuda.kernels_int8.lane_extract` without the wrap),
and both planes' products go into one int32 sum.  8-bit codes (unsigned) are flipped to signed
(``^ 0x80808080``) and ``128 * sum xq`` added back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from qcompile.passes.formats import WeightFormat

__all__ = ["Int8GemvConfig", "gemv_int8", "supports", "reference", "TUNED", "tuned_config"]

OPAQUE = 8  # relax OpPatternKind.kOpaque
BLOCK = 32  # activations per int8 scale: one chunk of an invocation
MAGIC = 12800000.0  # 50000 * 256 in [2**23, 2**24): v + MAGIC (ulp 1) has round-half-even(v) in its low byte
# (|v| <= 128); 1.5 * 2**23 would do too, but TVM prints WGSL floats to 7 digits: 1.258291e+07 (!= 1.5 * 2**23)


def supports(bits: int, k: int, group_size: int) -> bool:
    """The CUDA int8 GEMV's condition (:func:`qcompile.targets.cuda.kernels_int8.supports`): any width 2..8,
    K and the group in whole blocks of 32."""
    from qcompile.targets.cuda.kernels_int8 import supports as cuda_supports  # noqa: PLC0415

    return cuda_supports(bits, k, group_size)


def reference(x: np.ndarray, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, g: int) -> np.ndarray:
    """numpy equivalent of :func:`gemv_int8` on integer ``codes`` [N, K] (the x86 int8 reference)."""
    from qcompile.targets.cuda.kernels_int8 import reference as cuda_reference  # noqa: PLC0415

    return cuda_reference(x, codes, scales, zeros, g)


class Int8GemvConfig:
    """Launch shape of :func:`gemv_int8`: ``rows`` output channels per workgroup of ``threads``
    invocations (x is quantized once per workgroup and step: more rows share it); ``early``: a step's
    weights loaded before its x is staged."""

    def __init__(self, rows: int = 8, threads: int = 64, early: bool = True):
        if threads & (threads - 1) or threads < rows or threads % rows:
            raise ValueError(f"gemv_int8: threads={threads} must be a power of two and a multiple of rows={rows}")
        self.rows, self.threads, self.early = rows, threads, bool(early)

    @property
    def name(self) -> str:
        return f"r{self.rows}t{self.threads}" + ("e" if self.early else "")

    def __repr__(self) -> str:
        return f"Int8GemvConfig(rows={self.rows}, threads={self.threads}, early={self.early})"


# The default config per code width (None: any other width), from bench/results/gpu_vulkan_int8.json (H100,
# NVIDIA Vulkan, SM clock 1980 MHz, kernels of a shape timed in turns): r8t64 beat r16t64, r8t128 and r16t128
# at 4096x14336 (by 15-70%), within 10% of the best elsewhere; loading a step's weights before staging x
# (``early``) pays for the two-plane widths 3, 5, 6 (4-7%), not at 2 and 4 bits (3-8% slower).  8 bits:
# not measured (the x86 int8 build does not cover them, so no model uses them).
# Square shapes (N and K below 8192, the CUDA table's "square" class) take 16 rows x 128 invocations, no
# ``early``: bench/results/gpu_vulkan_int8_square.json (4096x4096, 4 turns): 5-15% faster than r8t64 at
# every width (2 bits 6.9 vs 7.3 us, 5 bits 8.2 vs 9.7 us).
TUNED = {None: Int8GemvConfig(early=True), 2: Int8GemvConfig(early=False), 4: Int8GemvConfig(early=False),
         "square": Int8GemvConfig(rows=16, threads=128, early=False)}


def tuned_config(bits: int, n: int, k: int) -> Int8GemvConfig:
    """The default launch shape for a width and shape (:data:`TUNED`)."""
    from qcompile.targets.cuda.kernels_int8 import shape_class  # noqa: PLC0415

    if shape_class(n, k) == "square":
        return TUNED["square"]
    return TUNED.get(bits, TUNED[None])


def gemv_int8(fmt: WeightFormat, k: int, n: int, config: Int8GemvConfig | None = None):
    """Scheduled WebGPU TIR ``y[M, N] ~= x[M, K] @ dequantize(W)[N, K].T`` with int8 activations, M symbolic.

    Arguments as :func:`.kernels.dequant_matmul`: x (float32 [M, K]), planes (uint32 [N, K*pb/32]; a
    1-plane format passes its plane twice), scales, zeros (float16 [N, K/g]), y (float32 [M, N]).
    numpy: :func:`reference` (module docstring).
    """
    from tvm.script import tirx as T  # noqa: PLC0415

    from .kernels import weight_loader  # noqa: PLC0415

    planes, g = tuple(fmt.planes), fmt.group_size
    if not supports(fmt.bits, k, g):
        raise ValueError(f"gemv_int8: {fmt.name} K={k}: K and the group {g} must be multiples of {BLOCK}")
    cfg = config or tuned_config(fmt.bits, n, k)
    rows, threads = cfg.rows, cfg.threads
    span = threads * BLOCK  # x values a step covers
    pad = BLOCK + 1  # x in workgroup memory: an invocation's block at tx * 33 (no bank conflicts)
    two = len(planes) > 1
    signed8 = fmt.bits == 8
    p0, p1 = planes[0], planes[-1]
    v0, v1 = p0, p1  # words of each plane per block of 32 codes
    chunks = k // BLOCK
    steps = (chunks + threads - 1) // threads
    blocks = (n + rows - 1) // rows
    kg = k // g
    parts = threads // rows  # invocations summing one row's partial sums

    def lanes(word, pb, sh, off):
        """Codes ``(8/pb)*i + s`` of ``word`` in byte ``i``, at bit ``off`` of it (u32), for ``sh = pb*s - off``
        (``left``: shifted left by ``-sh``)."""
        mask = T.uint32(((1 << pb) - 1) * 0x01010101 << off)
        v = T.bitwise_and(T.shift_right(word, T.Cast("uint32", sh)), mask)
        return T.bitwise_xor(v, T.uint32(0x80808080)) if signed8 else v

    def lanes_left(word, pb, sh, off):
        mask = T.uint32(((1 << pb) - 1) * 0x01010101 << off)
        return T.bitwise_and(T.shift_left(word, T.Cast("uint32", sh)), mask)

    def dot4(a, b):
        return T.call_pure_extern("int32", "dot4I8Packed", a, b)

    def fma(a, b, c):
        return T.call_pure_extern("float32", "fma", a, b, c)

    def byte(xv, sc, i, j):
        """int8 of activation ``i`` (its magic float's low byte) at byte ``j`` of a u32."""
        q = T.reinterpret("uint32", T.min(xv[i] * sc[0], T.float32(127)) + T.float32(MAGIC))
        q = T.bitwise_and(q, T.uint32(0xFF))
        return T.shift_left(q, T.uint32(8 * j)) if j else q

    def order(pb, t, i):
        """Activation (within the block) in byte ``i`` of arranged word ``t``: ``x_order(pb)[4*t + i]``."""
        per = 8 // pb
        return (t // per) * (32 // pb) + per * i + t % per

    def pack(xv, sc, pb, t):
        return T.bitwise_or(T.bitwise_or(byte(xv, sc, order(pb, t, 0), 0), byte(xv, sc, order(pb, t, 1), 1)),
                            T.bitwise_or(byte(xv, sc, order(pb, t, 2), 2), byte(xv, sc, order(pb, t, 3), 3)))

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
                    red = T.alloc_buffer((rows, threads), "float32", scope="shared")
                    red2 = T.alloc_buffer((threads,), "float32", scope="shared")
                    xsh = T.alloc_buffer((threads * pad,), "float32", scope="shared")
                    acc = T.alloc_buffer((rows,), "float32", scope="local")
                    xv = T.alloc_buffer((BLOCK,), "float32", scope="local")
                    xw0 = T.alloc_buffer((8,), "uint32", scope="local")  # xq arranged for plane 0 (1)
                    xw1 = T.alloc_buffer((8,), "uint32", scope="local")
                    a0 = T.alloc_buffer((rows, v0), "uint32", scope="local")
                    a1 = T.alloc_buffer((rows, v1), "uint32", scope="local")
                    sc = T.alloc_buffer((6,), "float32", scope="local")  # 127/amax, sx, sx*sum(xq), amax, 1/amax, tmp
                    isum = T.alloc_buffer((2,), "int32", scope="local")  # a row's dot, sum(xq)
                    for r in T.unroll(rows):
                        acc[r] = T.float32(0)
                    for st in range(steps):
                        if cfg.early:
                            load_weights(a0, a1, w0, w1, st, nb, tx)
                        T.tvm_storage_sync("shared")  # the last step's reads are done
                        for i in T.unroll(BLOCK):
                            if st * span + i * threads + tx < k:
                                xsh[(i * threads + tx) // BLOCK * pad + (i * threads + tx) % BLOCK] = x[
                                    mb, st * span + i * threads + tx]
                        T.tvm_storage_sync("shared")
                        if not cfg.early:
                            load_weights(a0, a1, w0, w1, st, nb, tx)
                        if st * threads + tx < chunks:
                            for i in T.unroll(BLOCK):
                                xv[i] = xsh[tx * pad + i]
                            sc[3] = T.fabs(xv[0])
                            for i in T.unroll(BLOCK - 1):
                                sc[3] = T.max(sc[3], T.fabs(xv[i + 1]))
                            # 1/amax (a Newton step from WGSL's division), then 127/amax and amax/127 correctly
                            # rounded by one FMA correction each (Markstein)
                            sc[4] = T.float32(1) / T.max(sc[3], T.float32(1e-30))
                            sc[4] = fma(fma(-sc[3], sc[4], T.float32(1)), sc[4], sc[4])
                            sc[5] = T.float32(127) * sc[4]
                            sc[0] = T.if_then_else(sc[3] > T.float32(0), fma(
                                fma(-sc[5], sc[3], T.float32(127)), sc[4], sc[5]), T.float32(0))
                            sc[5] = sc[3] * T.float32(1.0 / 127)
                            sc[1] = fma(fma(-sc[5], T.float32(127), sc[3]), T.float32(1.0 / 127), sc[5])
                            isum[1] = 0
                            for t in T.unroll(8):
                                xw0[t] = pack(xv, sc, p0, t)
                                isum[1] = isum[1] + dot4(xw0[t], T.uint32(0x01010101))
                            if two:
                                for t in T.unroll(8):
                                    xw1[t] = pack(xv, sc, p1, t)
                            sc[2] = T.Cast("float32", isum[1]) * sc[1]
                            for r in T.unroll(rows):
                                if nb * rows + r < n:
                                    isum[0] = isum[1] * 128 if signed8 else 0
                                    for j in T.unroll(v0):
                                        for t in T.unroll(8 // p0):
                                            isum[0] = isum[0] + dot4(lanes(a0[r, j], p0, p0 * t, 0), xw0[j * (8 // p0) + t])
                                    if two:  # codes at bit p0 of the bytes: s < p0/p1 shift left, the rest right
                                        for j in T.unroll(v1):
                                            for t in T.unroll(p0 // p1):
                                                isum[0] = isum[0] + dot4(lanes_left(a1[r, j], p1, p0 - p1 * t, p0),
                                                                         xw1[j * (8 // p1) + t])
                                            for t in T.unroll(8 // p1 - p0 // p1):
                                                isum[0] = isum[0] + dot4(lanes(a1[r, j], p1, p1 * t, p0),
                                                                         xw1[j * (8 // p1) + p0 // p1 + t])
                                    acc[r] = acc[r] + T.Cast("float32", s[nb * rows + r, (st * threads + tx) * BLOCK // g]) \
                                        * (T.Cast("float32", isum[0]) * sc[1]) + T.Cast(
                                            "float32", z[nb * rows + r, (st * threads + tx) * BLOCK // g]) * sc[2]
                    # row r's partial sums at red[r, :]; invocation tx sums ``rows`` of row tx // parts (every
                    # parts-th from tx % parts), then tx < rows sums its row's ``parts`` of those
                    T.tvm_storage_sync("shared")
                    for r in T.unroll(rows):
                        red[r, tx] = acc[r]
                    T.tvm_storage_sync("shared")
                    sc[5] = T.float32(0)
                    for j in T.unroll(rows):
                        sc[5] = sc[5] + red[tx // parts, j * parts + tx % parts]
                    red2[tx] = sc[5]
                    T.tvm_storage_sync("shared")
                    if tx < rows:
                        if nb * rows + tx < n:
                            sc[5] = T.float32(0)
                            for j in T.unroll(parts):
                                sc[5] = sc[5] + red2[tx * parts + j]
                            y[mb, nb * rows + tx] = sc[5]

    return kernel
