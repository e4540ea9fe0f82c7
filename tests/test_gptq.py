"""GPTQ: the structure of round-to-nearest, less output error on correlated inputs, the textbook sweep."""

import logging

import numpy as np
import pytest

from qcompile.passes.formats import WeightFormat
from qcompile.passes.gptq import gptq_quantize, h_error


def correlated_inputs(m, k, seed):
    """X = Z @ A: m calibration rows whose k channels are mixed by a random matrix (float64)."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, k)) @ rng.standard_normal((k, k))


def gaussian(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def textbook_gptq(w, H, fmt, damp, order):
    """The unblocked GPTQ sweep with the explicit inverse Hessian (no Cholesky), as in the paper.

    Same static group parameters as gptq_quantize. After each column j: the remaining columns move by
    the OBS correction, and j is removed from H⁻¹ by its Schur complement.
    """
    g = fmt.group_size
    static = fmt.quantize(w, importance=np.diag(H))
    s = np.repeat(static.scales.astype(np.float32), g, axis=1)
    z = np.repeat(static.zeros.astype(np.float32), g, axis=1)
    k = H.shape[0]
    hinv = np.linalg.inv(H + damp * np.mean(np.diag(H)) * np.eye(k))
    work = w.astype(np.float64)
    codes = np.zeros(w.shape, dtype=np.uint8)
    for t, j in enumerate(order):
        c = np.clip(np.rint((work[:, j].astype(np.float32) - z[:, j]) / s[:, j]), 0, fmt.max_code)
        codes[:, j] = c
        e = (work[:, j] - (c * s[:, j] + z[:, j])) / hinv[j, j]
        rest = order[t + 1 :]
        work[:, rest] -= np.outer(e, hinv[j, rest])
        hinv = hinv - np.outer(hinv[:, j], hinv[j, :]) / hinv[j, j]
    return codes


# -- 1. uncorrelated inputs: nothing to compensate ----------------------------------------------------


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_identity_hessian_gives_round_to_nearest(bits, act_order):
    fmt = WeightFormat(bits, 32)
    w = gaussian((48, 128), seed=bits)
    H = np.eye(128)
    q = gptq_quantize(w, H, fmt, act_order=act_order, block_size=32)
    rtn = fmt.quantize(w, importance=np.diag(H))
    np.testing.assert_array_equal(q.codes, rtn.codes)
    np.testing.assert_array_equal(q.scales, rtn.scales)
    np.testing.assert_array_equal(q.zeros, rtn.zeros)


# -- 2. correlated inputs: GPTQ beats RTN, and h_error is the output error ----------------------------

# GPTQ / RTN h_error measured on this case (seed 0): 2 bits 0.62 (g32) 0.59 (g128); 3 bits 0.59 / 0.54;
# 4 bits 0.55 / 0.50. Three other seeds give at most 0.65 at 2 bits and 0.59 at 3-4 bits.
MAX_RATIO = {2: 0.75, 3: 0.7, 4: 0.7}


@pytest.fixture(scope="module")
def calibration():
    x = correlated_inputs(2048, 256, seed=0)
    w = gaussian((64, 256), seed=100)
    return x, x.T @ x, w


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_beats_rtn_on_correlated_inputs(calibration, bits, group_size):
    x, H, w = calibration
    fmt = WeightFormat(bits, group_size)
    rtn = fmt.quantize(w, importance=np.diag(H))  # same group parameters: only the codes differ
    q = gptq_quantize(w, H, fmt)
    e_rtn = h_error(w, rtn.dequantize(), H)
    e_gptq = h_error(w, q.dequantize(), H)
    assert e_gptq <= MAX_RATIO[bits] * e_rtn, (e_gptq, e_rtn, e_gptq / e_rtn)

    # h_error is the relative output error on the calibration rows.
    y = x @ w.T.astype(np.float64)
    y_hat = x @ q.dequantize().T.astype(np.float64)
    out_err = np.sum((y_hat - y) ** 2)
    assert out_err == pytest.approx(e_gptq * np.sum(y**2), rel=1e-8)


def test_h_error_edge_cases():
    w = gaussian((4, 32), seed=1)
    H = np.eye(32)
    assert h_error(w, w, H) == 0.0
    assert h_error(w, np.zeros_like(w), H) == pytest.approx(1.0)
    assert h_error(w, 0.5 * w, 4.0 * H) == pytest.approx(0.25)
    assert h_error(np.zeros_like(w), np.zeros_like(w), H) == 0.0
    assert h_error(np.zeros_like(w), w, H) == float("inf")
    with pytest.raises(ValueError):
        h_error(w, w, np.eye(16))
    with pytest.raises(ValueError):
        h_error(w, w[:, :16], H)


# -- 3. act order -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_act_order_helps_with_a_few_loud_channels(bits):
    # Measured act_order / sequential h_error here: 0.71 (2 bits), 0.68 (3), 0.75 (4); three other
    # seeds 0.47-0.69. The brief asks for <= 1.05; 0.9 also catches act_order being ignored.
    rng = np.random.default_rng(200)
    x = correlated_inputs(2048, 256, seed=0)
    x[:, rng.choice(256, 6, replace=False)] *= 20.0
    H = x.T @ x
    w = rng.standard_normal((64, 256)).astype(np.float32)
    fmt = WeightFormat(bits, 128)
    e_act = h_error(w, gptq_quantize(w, H, fmt, act_order=True).dequantize(), H)
    e_seq = h_error(w, gptq_quantize(w, H, fmt, act_order=False).dequantize(), H)
    assert e_act <= 0.9 * e_seq, (e_act, e_seq, e_act / e_seq)


# -- 4. the blocked Cholesky sweep is the textbook sweep ---------------------------------------------


@pytest.mark.parametrize("act_order", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_blocked_sweep_matches_textbook_gptq(bits, act_order):
    # 16x64 in blocks of 16 (four blocks, so the between-block GEMM runs). Measured on 20 seeds x
    # these 6 cases (122,880 codes): 0 codes differ. Allow 0.5% differing by 1 for float rounding.
    rng = np.random.default_rng(bits)
    x = rng.standard_normal((256, 64)) @ rng.standard_normal((64, 64))
    H = x.T @ x
    w = rng.standard_normal((16, 64)).astype(np.float32)
    fmt = WeightFormat(bits, 32)
    q = gptq_quantize(w, H, fmt, act_order=act_order, block_size=16, damp=0.01)
    order = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(64)
    ref = textbook_gptq(w, H, fmt, 0.01, order)
    diff = np.abs(q.codes.astype(np.int64) - ref)
    assert diff.max() <= 1
    assert np.count_nonzero(diff) <= 0.005 * diff.size
    # And the sweep did something: it is not round-to-nearest.
    assert np.count_nonzero(q.codes != fmt.quantize(w, importance=np.diag(H)).codes) > 0.05 * w.size


def test_block_size_does_not_change_the_result(calibration):
    _, H, w = calibration
    fmt = WeightFormat(3, 64)
    codes = [gptq_quantize(w, H, fmt, block_size=b).codes for b in (1, 7, 64, 128, 1000)]
    for c in codes[1:]:
        np.testing.assert_array_equal(c, codes[0])


# -- 5. singular and odd Hessians ---------------------------------------------------------------------


def test_singular_hessian_with_dead_channels():
    k, dead = 128, [3, 40, 41, 100, 127]
    x = correlated_inputs(48, k, seed=3)  # 48 rows < 128 channels: rank-deficient
    x[:, dead] = 0.0  # channels that are never active: zero rows and columns in H
    H = x.T @ x
    w = gaussian((32, k), seed=4)
    fmt = WeightFormat(4, 32)
    rtn = fmt.quantize(w, importance=np.diag(H))
    for act_order in (True, False):
        q = gptq_quantize(w, H, fmt, act_order=act_order)
        w_hat = q.dequantize()
        assert np.isfinite(w_hat).all()
        np.testing.assert_array_equal(q.codes[:, dead], rtn.codes[:, dead])
        assert h_error(w, w_hat, H) < 0.5 * h_error(w, rtn.dequantize(), H)


def test_zero_hessian_is_round_to_nearest():
    w = gaussian((8, 64), seed=5)
    fmt = WeightFormat(3, 32)
    q = gptq_quantize(w, np.zeros((64, 64)), fmt)
    np.testing.assert_array_equal(q.codes, fmt.quantize(w, importance=np.zeros(64)).codes)


def test_indefinite_matrix_gets_more_damping(caplog):
    # Positive diagonal but not positive semidefinite (eigenvalues 3 and -1): not a Gram matrix.
    H = np.kron(np.eye(16), np.array([[1.0, 2.0], [2.0, 1.0]]))
    w = gaussian((4, 32), seed=6)
    with caplog.at_level(logging.WARNING, logger="qcompile.passes.gptq"):
        q = gptq_quantize(w, H, WeightFormat(4, 32))
    assert np.isfinite(q.dequantize()).all()
    assert "retrying with more damping" in caplog.text


def test_bad_inputs_are_rejected():
    w = gaussian((4, 32), seed=7)
    fmt = WeightFormat(4, 32)
    with pytest.raises(ValueError, match="H must be"):
        gptq_quantize(w, np.eye(16), fmt)
    with pytest.raises(ValueError, match="negative diagonal"):
        gptq_quantize(w, -np.eye(32), fmt)
    with pytest.raises(ValueError, match="NaN"):
        gptq_quantize(w, np.full((32, 32), np.nan), fmt)
    with pytest.raises(ValueError, match="cannot store"):
        gptq_quantize(gaussian((4, 48), seed=7), np.eye(48), fmt)


# -- 6. the result is an ordinary QuantizedWeight -----------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
def test_result_has_the_format_structure(calibration, bits):
    _, H, w = calibration
    fmt = WeightFormat(bits, 64)
    q = gptq_quantize(w, H, fmt)
    static = fmt.quantize(w, importance=np.diag(H))
    assert q.format == fmt
    assert q.codes.dtype == np.uint8 and q.codes.shape == w.shape
    assert int(q.codes.max()) <= fmt.max_code
    assert q.scales.dtype == np.float16 and q.zeros.dtype == np.float16
    np.testing.assert_array_equal(q.scales, static.scales)
    np.testing.assert_array_equal(q.zeros, static.zeros)
    deq = q.dequantize()
    assert deq.dtype == np.float32 and deq.shape == w.shape
    planes = fmt.pack(q.codes)
    assert sum(p.nbytes for p in planes) * 8 == fmt.storage_bits(w.shape).codes
    np.testing.assert_array_equal(fmt.unpack(planes, w.shape), q.codes)
