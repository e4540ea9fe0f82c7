"""Decoder attention kernels for CPUs (TIR), with their numpy equivalents.

Two kernels serve ``qcompile::Attention`` and ``qcompile::CacheUpdate`` (:mod:`qcompile.passes.qops`):

* :func:`attention` reads the keys/values of the ``P`` cached positions from a cache buffer
  ``[B, KV, C, D]`` (``C >= P``: a preallocated buffer, or exactly the past tensor) and those of the
  ``S`` new positions from the new tensors ``[B, KV, S, D]``, so it needs no concatenated copy. Query
  row ``i`` (absolute position ``P + i``) sees keys ``0 .. P + i`` (the causal mask, computed from
  indices); query head ``h`` reads key/value head ``h // (H / KV)`` (GQA by index, no expanded copy).
  The softmax is computed online (running max ``m``, running sum ``l``, rescaled accumulator), so a row
  needs no score buffer and never overflows. Rows (batch × head × query) run in parallel; the dot
  products and the accumulator are vectorized over ``D``.
* :func:`cache_update` writes the new keys (or values) into a cache buffer at ``[P, P + S)``, in place
  (lowered with ``call_tir_inplace``: the buffer is the kernel's only output).

``P`` is bound from the length of a ``past`` marker tensor (an int64 vector whose values are not read)
or, without a cache, from the past tensor's own length: seq, past, capacity and batch stay symbolic.
"""

from __future__ import annotations

import math

import numpy as np
from tvm.script import tirx as T

from .kernels import OPAQUE

__all__ = ["LANES", "attention", "cache_update", "reference_attention", "reference_cache_update"]

LANES = 8  # float32 lanes of an AVX2 register: partial sums of the q·k dot products


def reference_attention(q, k, v, k_past, v_past, past_len: int | None = None, scale: float | None = None,
                        key_mask=None):
    """numpy equivalent of :func:`attention` (float64 inside, float32 result); a query row that sees no
    key (all masked) gives zeros."""
    b, h, s, d = q.shape
    kv = k.shape[1]
    p = k_past.shape[2] if past_len is None else past_len
    scale = d ** -0.5 if scale is None else scale
    keys = np.concatenate([k_past[:, :, :p], k], axis=2).astype(np.float64)
    values = np.concatenate([v_past[:, :, :p], v], axis=2).astype(np.float64)
    keys, values = np.repeat(keys, h // kv, axis=1), np.repeat(values, h // kv, axis=1)
    scores = q.astype(np.float64) @ keys.transpose(0, 1, 3, 2) * scale
    visible = np.arange(p + s)[None, :] <= (p + np.arange(s))[:, None]
    if key_mask is not None:
        visible = visible & (key_mask[:, None, None, :] != 0)
    scores = np.where(visible, scores, -np.inf)
    top = scores.max(-1, keepdims=True)
    probs = np.exp(scores - np.where(np.isfinite(top), top, 0))
    total = probs.sum(-1, keepdims=True)
    return (probs @ values / np.where(total > 0, total, 1)).astype(np.float32)


def reference_cache_update(cache, new, past_len: int):
    """numpy equivalent of :func:`cache_update` (returns the updated copy)."""
    out = cache.copy()
    out[:, :, past_len:past_len + new.shape[2]] = new
    return out


def attention(num_heads: int, num_kv_heads: int, head_dim: int, scale: float, cached: bool,
              key_mask: bool = False):
    """TIR kernel ``y[B, H, S, D] = softmax(q·kᵀ·scale + causal) · v`` over past and new keys.

    Arguments: q [B, H, S, D], k and v [B, KV, S, D] (the new positions), k_past and v_past
    [B, KV, C, D], then (``cached``) a ``past`` marker [P] (P <= C cached positions) — without it
    P = C —, then (``key_mask``) an int64 key mask [B, P + S] (0: a padding key no query sees), and the
    output y. numpy: :func:`reference_attention`.
    """
    h_, kv_, d_ = num_heads, num_kv_heads, head_dim
    if h_ % kv_:
        raise ValueError(f"attention: {h_} heads are not a multiple of {kv_} key/value heads")
    group = h_ // kv_
    lanes = math.gcd(d_, LANES)
    chunks = d_ // lanes
    scale = float(scale)
    make = {(True, False): _attention_cached, (False, False): _attention_past,
            (True, True): _attention_cached_masked, (False, True): _attention_past_masked}[cached, key_mask]
    return make(h_, kv_, d_, group, lanes, chunks, scale)


def _row_macro(d_: int, group: int, lanes: int, chunks: int, scale: float, masked: bool = False):
    """The body of one query row, as a TIR macro (expanded into the kernel that calls it); ``masked``:
    keys with ``km[b, j] == 0`` are skipped."""

    @T.macro
    def key_step(q, k, v, kp, vp, bi, hi, i, p, j, kh, m, l, sc, acc, part):
        for ll in T.vectorized(lanes):
            part[ll] = T.float32(0)
        if j < p:
            for c in range(chunks):
                for ll in T.vectorized(lanes):
                    part[ll] = part[ll] + q[bi, hi, i, c * lanes + ll] * kp[bi, kh, j, c * lanes + ll]
        else:
            for c in range(chunks):
                for ll in T.vectorized(lanes):
                    part[ll] = part[ll] + q[bi, hi, i, c * lanes + ll] * k[bi, kh, j - p, c * lanes + ll]
        sc[0] = T.float32(0)
        for ll in range(lanes):
            sc[0] = sc[0] + part[ll]
        sc[0] = sc[0] * T.float32(scale)
        if sc[0] > m[0]:
            # the new maximum: rescale what was accumulated under the old one
            part[0] = T.exp(m[0] - sc[0])
            l[0] = l[0] * part[0]
            for dd in T.vectorized(d_):
                acc[dd] = acc[dd] * part[0]
            m[0] = sc[0]
        sc[0] = T.exp(sc[0] - m[0])
        l[0] = l[0] + sc[0]
        if j < p:
            for dd in T.vectorized(d_):
                acc[dd] = acc[dd] + sc[0] * vp[bi, kh, j, dd]
        else:
            for dd in T.vectorized(d_):
                acc[dd] = acc[dd] + sc[0] * v[bi, kh, j - p, dd]

    @T.macro
    def attend_row(q, k, v, kp, vp, km, y, bi, hi, i, p):
        # running max m, running sum l, accumulator acc[D] (rescaled when the max grows)
        m = T.alloc_buffer((1,), "float32", scope="local")
        l = T.alloc_buffer((1,), "float32", scope="local")
        sc = T.alloc_buffer((1,), "float32", scope="local")
        acc = T.alloc_buffer((d_,), "float32", scope="local")
        part = T.alloc_buffer((lanes,), "float32", scope="local")
        m[0] = T.float32(-3.4028234663852886e38)
        l[0] = T.float32(0)
        for dd in T.vectorized(d_):
            acc[dd] = T.float32(0)
        kh = hi // group
        for j in range(p + i + 1):
            if masked:
                if km[bi, j] != 0:
                    key_step(q, k, v, kp, vp, bi, hi, i, p, j, kh, m, l, sc, acc, part)
            else:
                key_step(q, k, v, kp, vp, bi, hi, i, p, j, kh, m, l, sc, acc, part)
        sc[0] = T.if_then_else(l[0] > T.float32(0), T.float32(1) / l[0], T.float32(0))  # no visible key: 0
        for dd in T.vectorized(d_):
            y[bi, hi, i, dd] = acc[dd] * sc[0]

    return attend_row


def _attention_cached(h_, kv_, d_, group, lanes, chunks, scale):
    attend_row = _row_macro(d_, group, lanes, chunks, scale)

    @T.prim_func(private=True)
    def kernel(q_h: T.handle, k_h: T.handle, v_h: T.handle, kp_h: T.handle, vp_h: T.handle,
               past_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": OPAQUE, "tirx.is_scheduled": True})
        b, s, c, p = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (b, h_, s, d_), "float32")
        k = T.match_buffer(k_h, (b, kv_, s, d_), "float32")
        v = T.match_buffer(v_h, (b, kv_, s, d_), "float32")
        kp = T.match_buffer(kp_h, (b, kv_, c, d_), "float32")
        vp = T.match_buffer(vp_h, (b, kv_, c, d_), "float32")
        T.match_buffer(past_h, (p,), "int64")
        y = T.match_buffer(y_h, (b, h_, s, d_), "float32")
        for r in T.parallel(b * h_ * s):
            bi = r // (h_ * s)
            hi = r // s % h_
            i = r % s
            attend_row(q, k, v, kp, vp, None, y, bi, hi, i, p)

    return kernel


def _attention_past(h_, kv_, d_, group, lanes, chunks, scale):
    attend_row = _row_macro(d_, group, lanes, chunks, scale)

    @T.prim_func(private=True)
    def kernel(q_h: T.handle, k_h: T.handle, v_h: T.handle, kp_h: T.handle, vp_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": OPAQUE, "tirx.is_scheduled": True})
        b, s, p = T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (b, h_, s, d_), "float32")
        k = T.match_buffer(k_h, (b, kv_, s, d_), "float32")
        v = T.match_buffer(v_h, (b, kv_, s, d_), "float32")
        kp = T.match_buffer(kp_h, (b, kv_, p, d_), "float32")
        vp = T.match_buffer(vp_h, (b, kv_, p, d_), "float32")
        y = T.match_buffer(y_h, (b, h_, s, d_), "float32")
        for r in T.parallel(b * h_ * s):
            bi = r // (h_ * s)
            hi = r // s % h_
            i = r % s
            attend_row(q, k, v, kp, vp, None, y, bi, hi, i, p)

    return kernel


def _attention_cached_masked(h_, kv_, d_, group, lanes, chunks, scale):
    attend_row = _row_macro(d_, group, lanes, chunks, scale, masked=True)

    @T.prim_func(private=True)
    def kernel(q_h: T.handle, k_h: T.handle, v_h: T.handle, kp_h: T.handle, vp_h: T.handle,
               past_h: T.handle, km_h: T.handle,
               y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": OPAQUE, "tirx.is_scheduled": True})
        b, s, c, p = T.int64(), T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (b, h_, s, d_), "float32")
        k = T.match_buffer(k_h, (b, kv_, s, d_), "float32")
        v = T.match_buffer(v_h, (b, kv_, s, d_), "float32")
        kp = T.match_buffer(kp_h, (b, kv_, c, d_), "float32")
        vp = T.match_buffer(vp_h, (b, kv_, c, d_), "float32")
        T.match_buffer(past_h, (p,), "int64")
        km = T.match_buffer(km_h, (b, p + s), "int64")
        y = T.match_buffer(y_h, (b, h_, s, d_), "float32")
        for r in T.parallel(b * h_ * s):
            bi = r // (h_ * s)
            hi = r // s % h_
            i = r % s
            attend_row(q, k, v, kp, vp, km, y, bi, hi, i, p)

    return kernel


def _attention_past_masked(h_, kv_, d_, group, lanes, chunks, scale):
    attend_row = _row_macro(d_, group, lanes, chunks, scale, masked=True)

    @T.prim_func(private=True)
    def kernel(q_h: T.handle, k_h: T.handle, v_h: T.handle, kp_h: T.handle, vp_h: T.handle, km_h: T.handle,
               y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": OPAQUE, "tirx.is_scheduled": True})
        b, s, p = T.int64(), T.int64(), T.int64()
        q = T.match_buffer(q_h, (b, h_, s, d_), "float32")
        k = T.match_buffer(k_h, (b, kv_, s, d_), "float32")
        v = T.match_buffer(v_h, (b, kv_, s, d_), "float32")
        kp = T.match_buffer(kp_h, (b, kv_, p, d_), "float32")
        vp = T.match_buffer(vp_h, (b, kv_, p, d_), "float32")
        km = T.match_buffer(km_h, (b, p + s), "int64")
        y = T.match_buffer(y_h, (b, h_, s, d_), "float32")
        for r in T.parallel(b * h_ * s):
            bi = r // (h_ * s)
            hi = r // s % h_
            i = r % s
            attend_row(q, k, v, kp, vp, km, y, bi, hi, i, p)

    return kernel


def cache_update(num_kv_heads: int, head_dim: int):
    """TIR kernel writing ``new[B, KV, S, D]`` into ``cache[B, KV, C, D]`` at ``[P, P + S)`` in place.

    Arguments: cache, new, the ``past`` marker [P]; the cache is also the output (``call_tir_inplace``).
    Positions past the capacity are not written (the runtime sizes the cache; see generate.py).
    numpy: ``cache[:, :, P:P + S] = new`` (:func:`reference_cache_update`).
    """
    kv_, d_ = num_kv_heads, head_dim

    @T.prim_func(private=True)
    def kernel(cache_h: T.handle, new_h: T.handle, past_h: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": OPAQUE, "tirx.is_scheduled": True})
        b, s, c, p = T.int64(), T.int64(), T.int64(), T.int64()
        cache = T.match_buffer(cache_h, (b, kv_, c, d_), "float32")
        new = T.match_buffer(new_h, (b, kv_, s, d_), "float32")
        T.match_buffer(past_h, (p,), "int64")
        for r in T.parallel(b * kv_ * s):
            if p + r % s < c:
                for dd in T.vectorized(d_):
                    cache[r // (kv_ * s), r // s % kv_, p + r % s, dd] = new[r // (kv_ * s), r // s % kv_,
                                                                               r % s, dd]

    return kernel
