"""Integer dot-product matmul kernels for aarch64 (NEON ``sdot``), with their numpy equivalents.

The same math and the same weight layout as the x86 int8 kernels (:mod:`qcompile.targets.x86.kernels_int8`:
activations quantized to int8 per block of 32 along K, weight codes kept as bytes, the "dot8" layout of
8-output tiles and 4-k sub-blocks), so an ARM artifact's params are byte for byte those of an x86 one and
the two builds compute the same integer sums.  Only the instruction differs: ``sdot`` (Armv8.2 dotprod)
multiplies four int8 pairs per int32 lane and adds them to the lane::

    sdot(acc int32x4, a int8x16, b int8x16)[i] = acc[i] + sum_{j<4} a[4i+j] * b[4i+j]

A 32-byte sub-block vector of the dot8 layout (byte ``4*o + j`` = output o, k = 4*sb + j) is two
``int8x16`` halves, outputs 0-3 and 4-7; the four activations of the sub-block, broadcast to the four
lanes, are the other operand.  Weight codes are unsigned but at most ``2^6 - 1 = 63``, so they are valid
signed bytes; the int32 lanes never overflow (32 * 63 * 127 per block), so unlike ``vpmaddubsw`` there is
no int16 stage.  Per output (numpy, :func:`reference_int8_matmul`), with the activations' block scales
``sx`` and the zero-point sums ``xs[m, gi] = sum_{b in gi} sx[m, b] * sum_{k in b} xq[m, k]`` of the x86
kernels (the activation step below is theirs, line for line)::

    y[m, n] = sum_gi  s[n, gi] * sum_{b in gi} sx[m, b] * sum_{k in b} code[n, k] * xq[m, k]
                    + z[n, gi] * xs[m, gi]

Where the CPU has no dotprod the ARM target keeps the float kernels (:mod:`qcompile.targets.x86.kernels`).
"""

from __future__ import annotations

from tvm.script import tirx as T

from ..knobs import KnobSpace
from ..x86.kernels import OPAQUE
from ..x86.kernels_int8 import (MAX_BITS, TILE, activation_quantizer, codes_from_dot, dot_planes,
                                quantize_activations, reference_int8_matmul, supports)

__all__ = ["TILE", "MAX_BITS", "supports", "dot_planes", "codes_from_dot", "quantize_activations",
           "reference_int8_matmul", "int8_matmul", "INSTRUCTION", "SCHEDULE"]

INSTRUCTION = "sdot"
ROW_BLOCK = 4  # rows sharing one decoded weight sub-block in the GEMM path (the default of the knob)

SCHEDULE = KnobSpace(
    "qmatmul_i8", {"row_block": (ROW_BLOCK, 2, 8)},
    doc={"row_block": "rows sharing one decoded weight sub-block in the GEMM path (M >= row_block); the GEMV "
                      "path takes the rows below it"})
"""The knobs of :func:`int8_matmul` (:mod:`qcompile.targets.knobs`): the default is the kernel as it was."""


def int8_matmul(plane_bits: tuple[int, ...], g: int, k: int, n: int, schedule: dict | None = None):
    """TIR kernel ``y[M, N] = x[M, K] @ dequantize(W)[N, K].T`` with int8 activations and ``sdot``.

    Arguments: x (float32 [M, K]), one dot8-layout plane per ``plane_bits`` (the second repeated for a
    single-plane format), scales, zeros ([N/8, K/g, 8] float16), y.  M is symbolic.
    numpy: :func:`reference_int8_matmul` (``xq, sx, xs = quantize_activations(x, g)``, then the sum above).
    ``schedule``: knob values (:data:`SCHEDULE`; the defaults where missing).
    """
    bits = sum(plane_bits)
    if not supports(bits, k, n, g):
        raise ValueError(f"int8_matmul (sdot): {bits}-bit K={k} N={n} g={g} is not supported")
    return _kernel(tuple(plane_bits), g, k, n, SCHEDULE.resolve(schedule)["row_block"])


def _decode(planes: tuple[int, ...]):
    """``code(ws, nt, kb, sb, h)``: int8x16 codes of sub-block ``sb`` of block ``kb``, outputs 4h..4h+3 of tile ``nt``."""

    def code(ws, nt, kb, sb, h):
        expr = None
        shift = 0
        for w, pb in zip(ws, planes):
            fpb = 8 // pb
            vec = w.vload([nt, kb, (sb // fpb) * 32 + 16 * h], "uint8x16")
            part = T.bitwise_and(T.shift_right(vec, T.broadcast(T.Cast("uint8", (sb % fpb) * pb), 16)),
                                 T.broadcast(T.uint8((1 << pb) - 1), 16))
            if shift:
                part = T.shift_left(part, T.broadcast(T.uint8(shift), 16))
            expr = part if expr is None else T.bitwise_or(expr, part)
            shift += pb
        return T.reinterpret("int8x16", expr)

    return code


def _xb(xq, r, kb, sb):
    """Four int8 activations xq[r, 32kb+4sb : +4] broadcast to the four int32 lanes, as int8x16."""
    four = T.reinterpret("int32", xq.vload([r, kb * 32 + sb * 4], "int8x4"))
    return T.reinterpret("int8x16", T.broadcast(four, 4))


def _sdot(acc, a, b):
    return T.call_llvm_pure_intrin("int32x4", "llvm.aarch64.neon.sdot", acc, a, b)


def _kernel(planes: tuple[int, ...], g: int, k: int, n: int, rb: int = ROW_BLOCK):
    code = _decode(planes)
    nt_, kb_, kg, bpg = n // TILE, k // 32, k // g, g // 32
    p0 = planes[0]
    p1 = planes[1] if len(planes) > 1 else planes[0]
    two = len(planes) > 1

    quantize_row = activation_quantizer(kg, bpg)  # the x86 kernels' own activation step

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
        for nt in T.parallel(nt_):
            if m < rb:
                for r in range(m):
                    acc = T.alloc_buffer((TILE,), "float32", scope="global")
                    gacc = T.alloc_buffer((TILE,), "float32", scope="global")
                    i32 = T.alloc_buffer((TILE,), "int32", scope="global")
                    acc[T.ramp(0, 1, 8)] = T.broadcast(T.float32(0), 8)
                    for gi in range(kg):
                        gacc[T.ramp(0, 1, 8)] = T.broadcast(T.float32(0), 8)
                        for bb in range(bpg):
                            i32[T.ramp(0, 1, 8)] = T.broadcast(T.int32(0), 8)
                            for sb in T.unroll(8):
                                for h in T.unroll(2):
                                    i32[T.ramp(4 * h, 1, 4)] = _sdot(i32[T.ramp(4 * h, 1, 4)],
                                                                     code(ws, nt, gi * bpg + bb, sb, h),
                                                                     _xb(xq, r, gi * bpg + bb, sb))
                            gacc[T.ramp(0, 1, 8)] = gacc[T.ramp(0, 1, 8)] + T.Cast("float32x8", i32[T.ramp(0, 1, 8)]) * T.broadcast(
                                sx[r, gi * bpg + bb], 8)
                        acc[T.ramp(0, 1, 8)] = acc[T.ramp(0, 1, 8)] + T.Cast("float32x8", s[nt, gi, T.ramp(0, 1, 8)]) * gacc[T.ramp(0, 1, 8)] + T.Cast(
                            "float32x8", z[nt, gi, T.ramp(0, 1, 8)]) * T.broadcast(xs[r, gi], 8)
                    y[r, T.ramp(nt * TILE, 1, 8)] = acc[T.ramp(0, 1, 8)]
            else:
                # GEMM: each sub-block's codes are decoded once for a block of ROW_BLOCK rows
                acc = T.alloc_buffer((rb, TILE), "float32", scope="global")
                gacc = T.alloc_buffer((rb, TILE), "float32", scope="global")
                i32 = T.alloc_buffer((rb, TILE), "int32", scope="global")
                cw = T.alloc_buffer((32,), "int8", scope="global")
                for mb in range((m + rb - 1) // rb):
                    for rr in T.unroll(rb):
                        acc[rr, T.ramp(0, 1, 8)] = T.broadcast(T.float32(0), 8)
                    for gi in range(kg):
                        for rr in T.unroll(rb):
                            gacc[rr, T.ramp(0, 1, 8)] = T.broadcast(T.float32(0), 8)
                        for bb in range(bpg):
                            for rr in T.unroll(rb):
                                i32[rr, T.ramp(0, 1, 8)] = T.broadcast(T.int32(0), 8)
                            for sb in T.unroll(8):
                                for h in T.unroll(2):
                                    cw[T.ramp(16 * h, 1, 16)] = code(ws, nt, gi * bpg + bb, sb, h)
                                for rr in T.unroll(rb):
                                    for h in T.unroll(2):
                                        i32[rr, T.ramp(4 * h, 1, 4)] = _sdot(
                                            i32[rr, T.ramp(4 * h, 1, 4)], cw[T.ramp(16 * h, 1, 16)],
                                            _xb(xq, T.min(mb * rb + rr, m - 1), gi * bpg + bb, sb))
                            for rr in T.unroll(rb):
                                gacc[rr, T.ramp(0, 1, 8)] = gacc[rr, T.ramp(0, 1, 8)] + T.Cast("float32x8", i32[rr, T.ramp(0, 1, 8)]) * T.broadcast(
                                    sx[T.min(mb * rb + rr, m - 1), gi * bpg + bb], 8)
                        for rr in T.unroll(rb):
                            acc[rr, T.ramp(0, 1, 8)] = acc[rr, T.ramp(0, 1, 8)] + T.Cast("float32x8", s[nt, gi, T.ramp(0, 1, 8)]) * gacc[rr, T.ramp(0, 1, 8)] + T.Cast(
                                "float32x8", z[nt, gi, T.ramp(0, 1, 8)]) * T.broadcast(xs[T.min(mb * rb + rr, m - 1), gi], 8)
                    for rr in range(rb):
                        if mb * rb + rr < m:
                            y[mb * rb + rr, T.ramp(nt * TILE, 1, 8)] = acc[rr, T.ramp(0, 1, 8)]

    return kernel
