"""Dequantizing matmul kernels for CPUs (TIR), with their numpy equivalents.

Weight layout (the "tiled" layout of a :class:`~qcompile.passes.formats.WeightFormat`): the canonical
packing of a [N, K] code matrix is, per bit plane of width ``pb``, uint32 words [N, K*pb/32] with code
``k`` of a word at bits ``pb*(k % (32/pb))``.  For the CPU the words are tiled over ``T`` consecutive
output channels so that one SIMD load yields the same word of ``T`` outputs::

    tiled[p][nt, w, t] = canonical[p][nt*T + t, w]          shape [N/T, K*pb/32, T]
    scales/zeros:        s[nt, kg, t] = scale[nt*T + t, kg]  shape [N/T, K/g, T]  (float16)

so the kernels vectorize over outputs (no horizontal sums) and dequantization happens in registers:
for batch 1 the group's integer codes are accumulated against x, then scaled once per group::

    y[m, n] = sum_g  s[n, g] * sum_{k in g} code[n, k] * x[m, k]  +  z[n, g] * sum_{k in g} x[m, k]

and for larger batches each (g x T) weight tile is dequantized into a stack buffer (L1) and reused
for a block of rows.  No float copy of the weight ever exists in memory.
"""

from __future__ import annotations

import numpy as np
from tvm.script import tirx as T

from typing import TYPE_CHECKING

from ..knobs import KnobSpace

if TYPE_CHECKING:
    from qcompile.passes.formats import WeightFormat

__all__ = ["tile_for", "dequant_matmul", "im2col", "tile_planes", "tile_groups", "reference_matmul", "SCHEDULE"]

ROW_BLOCK = 4  # rows of x per register block in the GEMM path
ACCS = 4  # independent accumulators in the GEMV path (hides FMA latency)
PANEL_K = 512  # K extent of the dequantized weight panel in the GEMM path (t*512*4 B in L1/L2)
NESTS = ("fused", "split")  # loop nests over the tiles (the knob "nest", below)
OPAQUE = 8  # relax OpPatternKind.kOpaque: our kernels are called as they are, never fused
# Scratch buffers are allocated with scope="global": TVM 0.27 makes a constant-size "global" buffer under
# 1 KiB a stack alloca, but sends every "local" one through TVMBackendAllocWorkspace/FreeWorkspace on
# each loop iteration that declares it (measured: 2x on a 576x1536 GEMV).


SCHEDULE = KnobSpace(
    "qmatmul",
    {"nest": NESTS, "accs": (ACCS, 2, 8), "row_block": (ROW_BLOCK, 2, 8), "panel_k": (PANEL_K, 256, 1024)},
    # a panel bound that gives the default's panel (a small K) is the default kernel again (judged for groups of
    # 32: the knob space sees K and N only)
    applies=lambda config, k, n, g=32: config["panel_k"] == PANEL_K or
    _panel(g, k, config["panel_k"]) != _panel(g, k, PANEL_K),
    # (a serial GEMV loop was a third nest: 2-4x faster alone at M=1 on this loaded 2-core machine, but the
    # decoder's decode step went 6.2 -> 7.7 ms with it: the thread pool's cost is not the kernel's alone)
    doc={"nest": "fused: one parallel loop over tiles, the GEMV/GEMM choice inside it; split: the choice "
                 "outside, each path its own parallel loop",
         "accs": "independent accumulators in the GEMV path (M < row_block): FMA latency vs registers",
         "row_block": "rows of x per register block in the GEMM path (M >= row_block)",
         "panel_k": "largest K extent of the dequantized weight panel in the GEMM path (whole groups)"})
"""The knobs of :func:`dequant_matmul` (:mod:`qcompile.targets.knobs`): the default is the kernel as it was.
The output tile ``t`` is not a knob: it fixes the weights' layout (:func:`tile_planes`)."""


def tile_for(n: int) -> int:
    """Largest output tile (SIMD lanes over outputs) that divides ``n``."""
    for t in (16, 8, 4, 2, 1):
        if n % t == 0:
            return t
    return 1


def tile_planes(planes: list[np.ndarray], t: int) -> list[np.ndarray]:
    """Canonical [N, W] word planes -> tiled [N/t, W, t] (a permutation of the same words)."""
    out = []
    for p in planes:
        n, w = p.shape
        out.append(np.ascontiguousarray(p.reshape(n // t, t, w).transpose(0, 2, 1)))
    return out


def tile_groups(a: np.ndarray, t: int) -> np.ndarray:
    """Per-group [N, G] scales or zeros -> tiled [N/t, G, t]."""
    n, g = a.shape
    return np.ascontiguousarray(a.reshape(n // t, t, g).transpose(0, 2, 1))


def reference_matmul(x: np.ndarray, w_deq: np.ndarray) -> np.ndarray:
    """numpy equivalent of :func:`dequant_matmul`: ``x[M, K] @ w_deq[N, K].T``."""
    return x.astype(np.float32) @ w_deq.T


def dequant_matmul(fmt: WeightFormat, k: int, n: int, t: int | None = None, schedule: dict | None = None):
    """TIR kernel ``y[M, N] = x[M, K] @ dequantize(W)[N, K].T`` for a symbolic M.

    Arguments: x (float32 [M, K]), one tiled word plane per ``fmt.planes``, scales, zeros, y.
    ``schedule``: knob values (:data:`SCHEDULE`; the defaults where missing).
    numpy: ``y = x @ fmt.dequantize(q).T`` (see :func:`reference_matmul`).
    """
    t = t or tile_for(n)
    g = fmt.group_size
    if k % g or n % t:
        raise ValueError(f"dequant_matmul: K={k} must divide by group {g} and N={n} by tile {t}")
    config = SCHEDULE.resolve(schedule)
    return _matmul_kernel(tuple(fmt.planes), g, k, n, t, config["accs"], config["row_block"], config["panel_k"],
                          config["nest"])


def _decoder(planes: tuple[int, ...]):
    """Build ``code(ws, nt, word_base, i, tt)``: the i-th code of a 32-code block as an int32 expr.

    ``word_base`` is the block's first k divided by 32; plane ``p`` of width ``pb`` holds ``pb`` words
    per block, the code's bits ``[shift_p, shift_p + pb)`` at bit ``(i*pb) % 32`` of word ``(i*pb)//32``.
    """

    def code(ws, nt, kblock, i, tt):
        expr = None
        shift = 0
        for w, pb in zip(ws, planes):
            part = T.bitwise_and(
                T.shift_right(w[nt, kblock * pb + (i * pb) // 32, tt], T.uint32((i * pb) % 32)),
                T.uint32((1 << pb) - 1),
            )
            if shift:
                part = T.shift_left(part, T.uint32(shift))
            expr = part if expr is None else T.bitwise_or(expr, part)
            shift += pb
        # small non-negative value: int32 -> float32 is one instruction on AVX2, uint32 is not
        return T.Cast("int32", expr)

    return code


def _pairwise_sum(terms: list):
    """``(a + b) + (c + d)``: the accumulators summed as a balanced tree."""
    while len(terms) > 1:
        terms = [terms[i] + terms[i + 1] if i + 1 < len(terms) else terms[i] for i in range(0, len(terms), 2)]
    return terms[0]


def _panel(g: int, k: int, panel_k: int) -> int:
    """The GEMM path's panel: the most whole groups of ``g`` that divide K and fit ``panel_k``."""
    kg = k // g
    return g * max([1] + [d for d in range(1, kg + 1) if kg % d == 0 and g * d <= panel_k])


def _matmul_kernel(planes: tuple[int, ...], g: int, k: int, n: int, t: int, accs: int = ACCS, rb: int = ROW_BLOCK,
                   panel_k: int = PANEL_K, nest: str = NESTS[0]):
    code = _decoder(planes)
    kg, nt_, kb_ = k // g, n // t, g // 32
    kc_ = _panel(g, k, panel_k)
    p0 = planes[0]
    p1 = planes[1] if len(planes) > 1 else planes[0]
    two = len(planes) > 1

    @T.macro
    def gemv(nt, m, x, ws, s, z, y, xsum):
        for r in range(m):
            acc = T.alloc_buffer((t,), "float32", scope="global")
            part = T.alloc_buffer((accs, t), "float32", scope="global")
            for tt in T.vectorized(t):
                acc[tt] = T.float32(0)
            for gi in range(kg):
                for a in T.unroll(accs):
                    for tt in T.vectorized(t):
                        part[a, tt] = T.float32(0)
                for kb in range(kb_):
                    for i in T.unroll(32):
                        for tt in T.vectorized(t):
                            part[i % accs, tt] = part[i % accs, tt] + T.Cast(
                                "float32", code(ws, nt, gi * kb_ + kb, i, tt)
                            ) * x[r, gi * g + kb * 32 + i]
                for tt in T.vectorized(t):
                    acc[tt] = (
                        acc[tt]
                        + T.Cast("float32", s[nt, gi, tt])
                        * _pairwise_sum([part[a, tt] for a in range(accs)])
                        + T.Cast("float32", z[nt, gi, tt]) * xsum[r, gi]
                    )
            for tt in T.vectorized(t):
                y[r, nt * t + tt] = acc[tt]

    @T.macro
    def gemm(nt, m, x, ws, s, z, y):
        # GEMM: dequantize a [KC, t] panel of the tile once (L1), reuse it for every row block
        wd = T.alloc_buffer((kc_, t), "float32", scope="global")
        acc = T.alloc_buffer((rb, t), "float32", scope="global")
        for kc in range(k // kc_):
            for gl in range(kc_ // g):
                for kb in range(kb_):
                    for i in T.unroll(32):
                        for tt in T.vectorized(t):
                            wd[gl * g + kb * 32 + i, tt] = T.Cast(
                                "float32", code(ws, nt, (kc * kc_ + gl * g) // 32 + kb, i, tt)
                            ) * T.Cast("float32", s[nt, kc * (kc_ // g) + gl, tt]) + T.Cast(
                                "float32", z[nt, kc * (kc_ // g) + gl, tt]
                            )
            for mb in range((m + rb - 1) // rb):
                for rr in T.unroll(rb):
                    for tt in T.vectorized(t):
                        acc[rr, tt] = T.float32(0)
                for kk in range(kc_):
                    for rr in T.unroll(rb):
                        for tt in T.vectorized(t):
                            acc[rr, tt] = acc[rr, tt] + x[T.min(mb * rb + rr, m - 1), kc * kc_ + kk] * wd[kk, tt]
                for rr in range(rb):
                    if mb * rb + rr < m:
                        if kc == 0:
                            for tt in T.vectorized(t):
                                y[mb * rb + rr, nt * t + tt] = acc[rr, tt]
                        else:
                            for tt in T.vectorized(t):
                                y[mb * rb + rr, nt * t + tt] = y[mb * rb + rr, nt * t + tt] + acc[rr, tt]

    @T.prim_func(private=True)
    def kernel(x_h: T.handle, w0_h: T.handle, w1_h: T.handle, s_h: T.handle, z_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": OPAQUE, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, k), "float32")
        w0 = T.match_buffer(w0_h, (nt_, k * p0 // 32, t), "uint32")
        w1 = T.match_buffer(w1_h, (nt_, k * p1 // 32, t), "uint32")
        s = T.match_buffer(s_h, (nt_, kg, t), "float16")
        z = T.match_buffer(z_h, (nt_, kg, t), "float16")
        y = T.match_buffer(y_h, (m, n), "float32")
        ws = T.meta_var((w0, w1) if two else (w0,))
        xsum = T.alloc_buffer((rb, kg), "float32")
        if m < rb:
            for r, gi in T.grid(m, kg):
                xsum[r, gi] = T.float32(0)
                for kk in range(g):
                    xsum[r, gi] = xsum[r, gi] + x[r, gi * g + kk]
        if nest == "fused":  # the default (Python conditions: one of the loop nests is generated)
            for nt in T.parallel(nt_):
                if m < rb:
                    gemv(nt, m, x, ws, s, z, y, xsum)
                else:
                    gemm(nt, m, x, ws, s, z, y)
        elif m < rb:
            for nt in T.parallel(nt_):
                gemv(nt, m, x, ws, s, z, y, xsum)
        else:
            for nt in T.parallel(nt_):
                gemm(nt, m, x, ws, s, z, y)

    return kernel


def im2col_unscheduled(c: int, h: int, w: int, ks, st, pads, dil):
    """Unscheduled TIR (from TE): NCHW image -> patch rows for a convolution as a matmul (the GPU targets
    take it as it is, for dlight; :func:`im2col` schedules it for the CPU).

    numpy: ``cols[b*OH*OW + oh*OW + ow, ci*KH*KW + r*KW + s] = xpad[b, ci, oh*SH + r*DH, ow*SW + s*DW]``
    where ``xpad`` is x zero-padded by ``pads`` (top, left, bottom, right); the column order is ONNX's
    weight order, so ``cols @ W.reshape(N, -1).T`` is the convolution.
    """
    from tvm import te, tirx  # noqa: PLC0415

    kh, kw = ks
    sh, sw = st
    ph, pw = pads[0], pads[1]
    dh, dw = dil
    oh = (h + pads[0] + pads[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (w + pads[1] + pads[3] - dw * (kw - 1) - 1) // sw + 1
    b = tirx.Var("b", "int64")
    x = te.placeholder((b, c, h, w), "float32", name="x")

    def patch(row, col):
        bo, o = row // ow, row % ow
        ih = (bo % oh) * sh - ph + (col // kw % kh) * dh
        iw = o * sw - pw + (col % kw) * dw
        inside = tirx.all(ih >= 0, ih < h, iw >= 0, iw < w)
        return tirx.if_then_else(inside, x[bo // oh, col // (kh * kw), ih, iw], tirx.const(0, "float32"))

    cols = te.compute((b * oh * ow, c * kh * kw), patch, name="cols")
    return te.create_prim_func([x, cols]).without_attr("global_symbol")


def im2col(c: int, h: int, w: int, ks, st, pads, dil):
    """TIR kernel: :func:`im2col_unscheduled` with its rows parallel (same numpy equivalent)."""
    from tvm import s_tir  # noqa: PLC0415

    func = im2col_unscheduled(c, h, w, ks, st, pads, dil)
    sch = s_tir.Schedule(func)
    row, col = sch.get_loops(sch.get_sblock("cols"))
    sch.parallel(row)
    func = sch.mod["main"].without_attr("global_symbol")
    return func.with_attr("op_pattern", OPAQUE).with_attr("tirx.is_scheduled", True)
