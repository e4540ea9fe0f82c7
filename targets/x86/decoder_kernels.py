"""Kernels of the fused decoder ops for CPUs (TIR): RMSNorm (with or without the residual add before
it), rotary embedding, gated activations.

Each ``qcompile`` op of :mod:`qcompile.passes.fuse_decoder` becomes one ``call_tir`` of one of these
kernels instead of the 5-10 small TVM kernels of its unfused form.  Rows (the leading dims, batch·seq,
are symbolic) are independent: a kernel runs its rows in parallel when there is enough work to pay for
waking the thread pool (:data:`PARALLEL_MIN_ELEMENTS`) and serially otherwise (a decode step has one
row), and vectorizes along the row.  Float32 in and out; the reductions accumulate in float32 over
:data:`LANES` partial sums.
"""

from __future__ import annotations

import numpy as np
from tvm.script import tirx as T

from .kernels import OPAQUE

__all__ = [
    "ACTIVATIONS",
    "add_rms_norm",
    "LANES",
    "PARALLEL_MIN_ELEMENTS",
    "gated_act",
    "reference_add_rms_norm",
    "reference_gated_act",
    "reference_rms_norm",
    "reference_rotary",
    "rms_norm",
    "rotary",
]

LANES = 8  # float32 lanes of an AVX2 register: partial sums of a row reduction, elementwise vector width
PARALLEL_MIN_ELEMENTS = 1 << 14
"""A kernel touching fewer elements than this runs serially (a parallel launch costs microseconds)."""

ACTIVATIONS = ("silu", "gelu_tanh", "gelu")


def _width(n: int) -> int:
    """The vector width for a row of ``n`` floats: LANES when it divides ``n``, else the largest power of 2."""
    for v in (LANES, 4, 2):
        if n % v == 0:
            return v
    return 1


# -- RMSNorm --------------------------------------------------------------------------------------------


def reference_rms_norm(x: np.ndarray, gamma: np.ndarray, eps: float) -> np.ndarray:
    """numpy equivalent of :func:`rms_norm` (any leading dims)."""
    x = x.astype(np.float32)
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(eps)) * gamma


def rms_norm(d: int, eps: float):
    """TIR kernel ``y[M, d] = x / sqrt(mean(x², -1) + eps) · gamma`` for a symbolic M.

    Arguments: x (float32 [M, d]), gamma (float32 [d]), y.  numpy: :func:`reference_rms_norm`.
    """
    v = _width(d)
    nv = d // v
    inv_d = 1.0 / d

    @T.macro
    def row(x, g, y, r):
        acc = T.alloc_buffer((v,), "float32", scope="local")
        total = T.alloc_buffer((1,), "float32", scope="local")
        for lane in T.vectorized(v):
            acc[lane] = T.float32(0)
        for j in range(nv):
            for lane in T.vectorized(v):
                acc[lane] = acc[lane] + x[r, j * v + lane] * x[r, j * v + lane]
        total[0] = T.float32(0)
        for lane in range(v):
            total[0] = total[0] + acc[lane]
        total[0] = T.float32(1) / T.sqrt(total[0] * T.float32(inv_d) + T.float32(eps))
        for j in range(nv):
            for lane in T.vectorized(v):
                y[r, j * v + lane] = x[r, j * v + lane] * total[0] * g[j * v + lane]

    @T.prim_func(private=True)
    def kernel(x_h: T.handle, g_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": OPAQUE, "tirx.is_scheduled": True})
        m = T.int64()
        x = T.match_buffer(x_h, (m, d), "float32")
        g = T.match_buffer(g_h, (d,), "float32")
        y = T.match_buffer(y_h, (m, d), "float32")
        if m * d >= PARALLEL_MIN_ELEMENTS:
            for r in T.parallel(m):
                row(x, g, y, r)
        else:
            for r in range(m):
                row(x, g, y, r)

    return kernel


def reference_add_rms_norm(a: np.ndarray, b: np.ndarray, gamma: np.ndarray, eps: float):
    """numpy equivalent of :func:`add_rms_norm`: (rms_norm(a + b), a + b)."""
    s = a.astype(np.float32) + b.astype(np.float32)
    return reference_rms_norm(s, gamma, eps), s


def add_rms_norm(d: int, eps: float):
    """TIR kernel ``s = a + b; y = s / sqrt(mean(s², -1) + eps) · gamma`` for a symbolic M (the residual
    add of a decoder layer folded into the norm that reads it).

    Arguments: a, b (float32 [M, d]), gamma (float32 [d]), y, s (float32 [M, d]).
    numpy: :func:`reference_add_rms_norm`.
    """
    v = _width(d)
    nv = d // v
    inv_d = 1.0 / d

    @T.macro
    def row(a, b, g, y, s, r):
        acc = T.alloc_buffer((v,), "float32", scope="local")
        total = T.alloc_buffer((1,), "float32", scope="local")
        for lane in T.vectorized(v):
            acc[lane] = T.float32(0)
        for j in range(nv):
            for lane in T.vectorized(v):
                s[r, j * v + lane] = a[r, j * v + lane] + b[r, j * v + lane]
                acc[lane] = acc[lane] + s[r, j * v + lane] * s[r, j * v + lane]
        total[0] = T.float32(0)
        for lane in range(v):
            total[0] = total[0] + acc[lane]
        total[0] = T.float32(1) / T.sqrt(total[0] * T.float32(inv_d) + T.float32(eps))
        for j in range(nv):
            for lane in T.vectorized(v):
                y[r, j * v + lane] = s[r, j * v + lane] * total[0] * g[j * v + lane]

    @T.prim_func(private=True)
    def kernel(a_h: T.handle, b_h: T.handle, g_h: T.handle, y_h: T.handle, s_h: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": OPAQUE, "tirx.is_scheduled": True})
        m = T.int64()
        a = T.match_buffer(a_h, (m, d), "float32")
        b = T.match_buffer(b_h, (m, d), "float32")
        g = T.match_buffer(g_h, (d,), "float32")
        y = T.match_buffer(y_h, (m, d), "float32")
        s = T.match_buffer(s_h, (m, d), "float32")
        if m * d >= PARALLEL_MIN_ELEMENTS:
            for r in T.parallel(m):
                row(a, b, g, y, s, r)
        else:
            for r in range(m):
                row(a, b, g, y, s, r)

    return kernel


# -- rotary embedding -------------------------------------------------------------------------------------


def reference_rotary(x: np.ndarray, cos: np.ndarray, sin: np.ndarray, seq_major: bool = False) -> np.ndarray:
    """numpy equivalent of :func:`rotary`: ``x·cos + rotate_half(x)·sin``, rotate_half([a, b]) = [-b, a].

    ``x`` is [B, H, S, d], or [B, S, H, d] when ``seq_major``; ``cos``/``sin`` are [Bc, S, d] (Bc = 1 or B).
    The result is [B, H, S, d] either way.
    """
    if seq_major:
        x = x.transpose(0, 2, 1, 3)
    h = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def rotary(d: int, seq_major: bool = False):
    """TIR kernel of the non-interleaved ("rotate_half") rotary embedding, for symbolic B, H, S, Bc.

    Arguments: x (float32 [B, H, S, d], or [B, S, H, d] when ``seq_major``: the heads not yet
    transposed), cos and sin (float32 [Bc, S, d] with Bc = 1 or B), y (float32 [B, H, S, d])::

        y[..., :d/2] = x[..., :d/2]·cos[..., :d/2] - x[..., d/2:]·sin[..., :d/2]
        y[..., d/2:] = x[..., d/2:]·cos[..., d/2:] + x[..., :d/2]·sin[..., d/2:]

    numpy: :func:`reference_rotary`.
    """
    if d % 2:
        raise ValueError(f"rotary: head dim {d} must be even")
    half = d // 2
    v = _width(half)
    nv = half // v

    @T.macro
    def one(x, c, s, y, b, hh, t):
        cb = T.min(b, c.shape[0] - 1)  # Bc = 1 broadcasts over the batch
        for j in range(nv):
            for lane in T.vectorized(v):
                lo = T.meta_var(j * v + lane)
                if seq_major:
                    y[b, hh, t, lo] = x[b, t, hh, lo] * c[cb, t, lo] - x[b, t, hh, lo + half] * s[cb, t, lo]
                    y[b, hh, t, lo + half] = (x[b, t, hh, lo + half] * c[cb, t, lo + half]
                                              + x[b, t, hh, lo] * s[cb, t, lo + half])
                else:
                    y[b, hh, t, lo] = x[b, hh, t, lo] * c[cb, t, lo] - x[b, hh, t, lo + half] * s[cb, t, lo]
                    y[b, hh, t, lo + half] = (x[b, hh, t, lo + half] * c[cb, t, lo + half]
                                              + x[b, hh, t, lo] * s[cb, t, lo + half])

    @T.prim_func(private=True)
    def kernel(x_h: T.handle, c_h: T.handle, s_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": OPAQUE, "tirx.is_scheduled": True})
        bsz, heads, seq, bc = T.int64(), T.int64(), T.int64(), T.int64()
        x = T.match_buffer(x_h, (bsz, seq, heads, d) if seq_major else (bsz, heads, seq, d), "float32")
        c = T.match_buffer(c_h, (bc, seq, d), "float32")
        s = T.match_buffer(s_h, (bc, seq, d), "float32")
        y = T.match_buffer(y_h, (bsz, heads, seq, d), "float32")
        if bsz * seq * (heads * d) >= PARALLEL_MIN_ELEMENTS:
            for row in T.parallel(bsz * heads * seq):
                one(x, c, s, y, row // (heads * seq), row // seq % heads, row % seq)
        else:
            for b, hh, t in T.grid(bsz, heads, seq):
                one(x, c, s, y, b, hh, t)

    return kernel


# -- gated activations -------------------------------------------------------------------------------------


def _act(name: str, g):
    """act(g) as a TIR expression (TVM expands exp/tanh/erf inline, so it vectorizes)."""
    if name == "silu":
        return g / (T.float32(1) + T.exp(-g))
    if name == "gelu_tanh":
        inner = T.float32(np.sqrt(2 / np.pi)) * (g + T.float32(0.044715) * g * g * g)
        return T.float32(0.5) * g * (T.float32(1) + T.tanh(inner))
    if name == "gelu":
        return T.float32(0.5) * g * (T.float32(1) + T.erf(g * T.float32(1 / np.sqrt(2))))
    raise ValueError(f"gated activation {name!r}: expected one of {ACTIVATIONS}")


def reference_gated_act(gate: np.ndarray, up: np.ndarray, activation: str) -> np.ndarray:
    """numpy equivalent of :func:`gated_act` (computed in float64, returned as float32)."""
    g = gate.astype(np.float64)
    if activation == "silu":
        a = g / (1 + np.exp(-g))
    elif activation == "gelu_tanh":
        a = 0.5 * g * (1 + np.tanh(np.sqrt(2 / np.pi) * (g + 0.044715 * g**3)))
    elif activation == "gelu":
        from math import erf  # noqa: PLC0415

        a = 0.5 * g * (1 + np.vectorize(erf)(g / np.sqrt(2)))
    else:
        raise ValueError(f"gated activation {activation!r}: expected one of {ACTIVATIONS}")
    return (a * up).astype(np.float32)


def gated_act(n: int, activation: str):
    """TIR kernel ``y[M, n] = act(gate) · up`` (SwiGLU: silu; GeGLU: gelu_tanh or gelu) for a symbolic M.

    silu(g) = g/(1 + e^-g); gelu_tanh(g) = g/2·(1 + tanh(√(2/π)(g + 0.044715g³)));
    gelu(g) = g/2·(1 + erf(g/√2)).
    Arguments: gate, up (float32 [M, n]), y.  numpy: :func:`reference_gated_act`.
    """
    _act(activation, T.float32(0))  # validates the name
    v = _width(n)
    nv = n // v

    @T.macro
    def row(gate, up, y, r):
        for j in range(nv):
            for lane in T.vectorized(v):
                y[r, j * v + lane] = _act(activation, gate[r, j * v + lane]) * up[r, j * v + lane]

    @T.prim_func(private=True)
    def kernel(g_h: T.handle, u_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": OPAQUE, "tirx.is_scheduled": True})
        m = T.int64()
        gate = T.match_buffer(g_h, (m, n), "float32")
        up = T.match_buffer(u_h, (m, n), "float32")
        y = T.match_buffer(y_h, (m, n), "float32")
        if m * n >= PARALLEL_MIN_ELEMENTS:
            for r in T.parallel(m):
                row(gate, up, y, r)
        else:
            for r in range(m):
                row(gate, up, y, r)

    return kernel
