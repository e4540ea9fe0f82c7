"""GPTQ (Frantar et al. 2022): error-compensated quantization into a :class:`~.formats.WeightFormat`.

Problem. A linear layer y = x Wᵀ with W [N, K] sees calibration inputs X [M, K]; H = Σ xᵀx = XᵀX [K, K]
(float64, symmetric PSD, possibly singular). The quantized Ŵ should minimize the output error

    ||X Ŵᵀ - X Wᵀ||² = tr(ΔW H ΔWᵀ),        ΔW = W - Ŵ                              (h_error normalizes it)

which decouples over rows but not over columns: an error left in column j can be compensated by the
columns not yet quantized. GPTQ quantizes the columns one at a time (all N rows at once) and, after each,
moves the remaining columns by the optimal least-squares correction (Optimal Brain Surgeon):

    H ← H + damp · mean(diag H) · I                 (dead channels, diag H = 0, first get H_jj = 1)
    U = upper Cholesky factor of H⁻¹                (H⁻¹ = UᵀU; U_jj · U[j, j:] is row j of the inverse
                                                     Hessian left after removing the columns < j)
    for j = 0 .. K-1 (in processing order):
        v_j  = current value of column j                      [N]
        ŵ_j  = s · clip(round((v_j - z) / s), 0, 2**b - 1) + z     s, z: the fixed fp16 params of j's group
        v_k -= (v_j - ŵ_j) / U_jj · U_jk      for every k > j      (rank-1 update of the remaining columns)

What we compute. The same sweep without H⁻¹ (the LDL form that Chee et al. 2023, "QuIP", show equal to
GPTQ): with
H = R Rᵀ, R upper triangular (R = U⁻¹: the Cholesky factor of H taken in reversed index order), the
recursion above solves to

    v_k = w_k + Σ_{j<k} (w_j - ŵ_j) · R_jk / R_kk             (w: the original columns)

[from V = W - (V - Ŵ)(diag(U)⁻¹U - I) follows V = W + (W - Ŵ)(R diag(R)⁻¹ - I)]. So the value rounded in
column k is the original weight plus the errors already made, fed forward through R; one Cholesky
factorization and no inverse (which is O(K³) again and loses accuracy when H is ill-conditioned).

Lazy batches. Columns are processed in blocks of ``block_size``; the feedback from all finished blocks to
a block is one GEMM, R[:b0, block]ᵀ (W - Ŵ)[:b0], and only the feedback inside the block is done column by
column, so the sweep is dominated by matrix products instead of memory traffic.

Act order. Columns are processed by decreasing diag(H) (the most active inputs first, while the most
columns remain to absorb their error); the codes are scattered back to the original column order.

Static groups. Our formats store one fp16 scale and zero per group of ``group_size`` *consecutive* K
elements (contiguous groups are what the packed layout and the kernels read). GPTQ in its original form
chooses a group's parameters when the sweep reaches the group's first column, which under act order
would make groups non-contiguous (or need a stored permutation, i.e. extra bits and a gather in every
kernel). Instead the parameters of every group are fixed before the sweep, from the original W with the
format's own clip search weighted by diag(H): ``fmt.quantize(w, importance=diag(H))``. The sweep then
only chooses codes, so act order and contiguous groups are compatible and the result has exactly the
structure ``fmt.quantize`` returns (packing and kernels unchanged).

numpy equivalent (unblocked, textbook form, in processing order, without dead channels and act order):

    q = fmt.quantize(w, importance=np.diag(H))
    s, z = (np.repeat(a.astype(np.float32), g, axis=1) for a in (q.scales, q.zeros))
    U = np.linalg.cholesky(np.linalg.inv(H + damp * np.mean(np.diag(H)) * np.eye(K))).T
    V = w.astype(np.float64)
    for j in range(K):
        c = np.clip(np.rint((V[:, j].astype(np.float32) - z[:, j]) / s[:, j]), 0, fmt.max_code)
        codes[:, j] = c
        V[:, j + 1:] -= np.outer((V[:, j] - (c * s[:, j] + z[:, j])) / U[j, j], U[j, j + 1:])
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np

from .formats import QuantizedWeight, WeightFormat

__all__ = ["gptq_quantize", "gptq_quantize_parts", "h_error"]

log = logging.getLogger(__name__)

_DAMP_RETRIES = 4  # each retry multiplies the damping by 10 when H + damp·I is still not positive definite


def gptq_quantize(
    w: np.ndarray,
    H: np.ndarray,
    fmt: WeightFormat,
    *,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
) -> QuantizedWeight:
    """Quantize w [N, K] into ``fmt`` with GPTQ using the input Gram matrix H [K, K] (module docstring).

    Scales and zeros are the static group parameters of ``fmt.quantize(w, importance=diag(H))``; the
    codes are chosen by the error-compensating sweep, in the original column order. Input channels with
    diag(H) == 0 never reach the output: they keep their round-to-nearest code and propagate no error.
    """
    return gptq_quantize_parts(w, H, [(fmt, np.shape(w)[-1] if np.ndim(w) == 2 else 0)], damp=damp,
                               act_order=act_order, block_size=block_size)[0]


def gptq_quantize_parts(
    w: np.ndarray,
    H: np.ndarray,
    parts: Sequence[tuple[WeightFormat, int]],
    *,
    damp: float = 0.01,
    act_order: bool = True,
    block_size: int = 128,
) -> list[QuantizedWeight]:
    """GPTQ of w [N, K] cut along K into consecutive parts, each ``(format, columns)`` (columns sum to K).

    One sweep over all K columns: every part has its own static group parameters
    (``fmt.quantize(part, importance=diag(H) of its columns)``) and code range, and the error of every
    column is compensated by all the columns after it, across parts. This is how a split format
    (:mod:`.salient`) quantizes its salient channels at more bits than the rest of the same matrix.
    """
    w = np.asarray(w)
    if w.ndim != 2 or not np.issubdtype(w.dtype, np.floating):
        raise ValueError(f"expected a float [N, K] weight, got dtype {w.dtype} shape {w.shape}")
    w = w.astype(np.float32, copy=False)  # what fmt.quantize sees, so the sweep starts from the same values
    n, k = w.shape
    if sum(c for _, c in parts) != k or any(c <= 0 for _, c in parts):
        raise ValueError(f"parts {[(f.name, c) for f, c in parts]} must cut K = {k} into positive pieces")
    H = np.asarray(H)
    if H.shape != (k, k):
        raise ValueError(f"H must be [K, K] = {(k, k)} for a weight of shape {w.shape}, got {H.shape}")
    if not np.isfinite(H).all():
        raise ValueError("H has NaN or infinite values: recollect the calibration statistics")
    if not damp >= 0:
        raise ValueError(f"damp must be a non-negative fraction of mean(diag(H)), got {damp!r}")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size!r}")
    diag = np.diag(H).astype(np.float64)
    if (diag < 0).any():
        raise ValueError(
            f"H has {int((diag < 0).sum())} negative diagonal entries; a Gram matrix XᵀX is positive "
            f"semidefinite: check how the calibration statistics were accumulated"
        )
    # static group parameters per part; validates each part's shape against its format
    statics, col_group, col_max, k0, g0 = [], np.empty(k, np.int64), np.empty(k, np.float32), 0, 0
    for fmt, cols in parts:
        statics.append(fmt.quantize(w[:, k0:k0 + cols], importance=diag[k0:k0 + cols]))
        col_group[k0:k0 + cols] = g0 + np.arange(cols) // fmt.group_size
        col_max[k0:k0 + cols] = fmt.max_code
        k0, g0 = k0 + cols, g0 + cols // fmt.group_size
    started = time.perf_counter()

    dead = diag == 0
    order, r, r_diag, used_damp = _factor(H, diag, dead, damp, act_order)

    group = col_group[order]
    limit = col_max[order]
    # [groups, N]: one row per group of every part, indexed by group[j]
    scales = np.concatenate([q.scales.T for q in statics]).astype(np.float32)
    zeros = np.concatenate([q.zeros.T for q in statics]).astype(np.float32)
    skip = dead[order]
    w_t = w.T[order].astype(np.float64)  # [K, N]: row j is column order[j] of W, contiguous over N
    delta = np.zeros((k, n), dtype=np.float64)  # w_j - ŵ_j of the columns done so far
    codes_t = np.empty((k, n), dtype=np.uint8)
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        feedback = r[:b0, b0:b1].T @ delta[:b0]  # [B, N]: the errors of all finished blocks
        for j in range(b0, b1):
            fed = feedback[j - b0] + r[b0:j, j] @ delta[b0:j]
            v = w_t[j] + fed / r_diag[j]
            # The code exactly as WeightFormat computes it: float32 (v - zero16) / scale16, rint, clip.
            s, z = scales[group[j]], zeros[group[j]]
            c = v.astype(np.float32)
            c -= z
            c /= s
            np.rint(c, out=c)
            np.clip(c, 0, limit[j], out=c)
            codes_t[j] = c
            if not skip[j]:  # a dead channel's code is free and it feeds nothing forward
                c *= s
                c += z  # the dequantized value, float32 like the kernels
                delta[j] = w_t[j] - c

    codes = np.empty((n, k), dtype=np.uint8)
    codes[:, order] = codes_t.T
    codes[:, dead] = np.concatenate([q.codes for q in statics], axis=1)[:, dead]
    log.debug(
        "gptq %s [%d, %d]: %.3f s, act_order=%s, damp=%g, %d dead channels",
        "+".join(f.name for f, _ in parts), n, k, time.perf_counter() - started, act_order, used_damp,
        int(dead.sum()),
    )
    out, k0 = [], 0
    for (fmt, cols), q in zip(parts, statics):
        out.append(QuantizedWeight(fmt, np.ascontiguousarray(codes[:, k0:k0 + cols]), q.scales, q.zeros))
        k0 += cols
    return out


_FACTORS: list[tuple[np.ndarray, float, bool, tuple]] = []
_FACTOR_CACHE = 4  # a measurement quantizes one tensor in ~18 formats with the same H: factor it once


def _factor(H: np.ndarray, diag: np.ndarray, dead: np.ndarray, damp: float, act_order: bool):
    """(order, R, diag(R), damp used) for H; the last few are cached by identity of H (never by value)."""
    for h, d, a, result in _FACTORS:
        if h is H and d == damp and a == act_order:
            return result
    k = H.shape[0]
    order = np.argsort(-diag, kind="stable") if act_order else np.arange(k)
    rev = order[::-1]
    h_rev = np.asarray(H, dtype=np.float64)[np.ix_(rev, rev)]  # H in reversed processing order, a copy
    h_rev[dead[rev], dead[rev]] = 1.0
    r, used_damp = _reversed_cholesky(h_rev, damp)
    del h_rev
    result = (order, r, np.diag(r).copy(), used_damp)
    if not H.flags.writeable:  # only immutable H (calibration stats) can be recognised again safely
        _FACTORS.insert(0, (H, damp, act_order, result))
        del _FACTORS[_FACTOR_CACHE:]
    return result


def _reversed_cholesky(h_rev: np.ndarray, damp: float) -> tuple[np.ndarray, float]:
    """(R, damp used): R upper triangular with R Rᵀ = H + damp·mean(diag H)·I, H in processing order.

    ``h_rev`` is J H J (J the reversal permutation; damped here in place). Its lower Cholesky factor L
    gives R = J L J, upper, with R Rᵀ = J L Lᵀ J = H. Damping is raised if H is still not positive
    definite (only possible with damp ~ 0 or a matrix that is not a Gram matrix).
    """
    diagonal = np.arange(h_rev.shape[0])
    mean_diag = float(np.mean(h_rev[diagonal, diagonal]))
    retries = [max(damp, 1e-4) * 10.0**i for i in range(1, _DAMP_RETRIES + 1)]
    added = 0.0
    for d in [damp, *retries]:
        h_rev[diagonal, diagonal] += (d - added) * mean_diag
        added = d
        try:
            lower = np.linalg.cholesky(h_rev)
        except np.linalg.LinAlgError:
            log.warning("H + %g·mean(diag)·I is not positive definite; retrying with more damping", d)
            continue
        return np.ascontiguousarray(lower[::-1, ::-1]), d
    raise ValueError(
        f"H stays indefinite even with damping {added:g}·mean(diag(H)): it is not a Gram matrix XᵀX; "
        f"check the calibration statistics"
    )


def h_error(w: np.ndarray, w_hat: np.ndarray, H: np.ndarray) -> float:
    """Relative output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) on the calibration data, ΔW = w - w_hat.

    Equal to ||X Ŵᵀ - X Wᵀ||² / ||X Wᵀ||² when H = XᵀX. Computed in float64; 0.0 when both traces
    vanish (nothing reaches the output) and inf when only tr(W H Wᵀ) does.
    """
    w64 = np.asarray(w, dtype=np.float64)
    w_hat64 = np.asarray(w_hat, dtype=np.float64)
    h = np.asarray(H, dtype=np.float64)
    if w64.ndim != 2 or w_hat64.shape != w64.shape or h.shape != (w64.shape[1],) * 2:
        raise ValueError(
            f"expected w and w_hat [N, K] and H [K, K], got {w64.shape}, {w_hat64.shape}, {h.shape}"
        )
    delta = w64 - w_hat64
    num = max(float(np.einsum("nk,nk->", delta @ h, delta)), 0.0)  # PSD: only rounding goes below 0
    den = float(np.einsum("nk,nk->", w64 @ h, w64))
    if den <= 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den
