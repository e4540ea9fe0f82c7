"""The x86 int8 dot-product kernels against their numpy equivalent, for every format they take."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from qcompile.passes.formats import PRESETS
from qcompile.targets.x86 import X86Target, host_target
from qcompile.targets.x86 import kernels as K
from qcompile.targets.x86 import kernels_int8 as K8

INT8_FORMATS = sorted(name for name, f in PRESETS.items() if f.bits <= K8.MAX_BITS)

pytestmark = pytest.mark.skipif(not X86Target(host_target()).int8_dot, reason="the host CPU has no AVX2")


def _build(func):
    target = tvm.target.Target(host_target().tvm)
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)["main"]


def _tensor(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu())


def _fields_back(plane: np.ndarray, pb: int, n: int, k: int) -> np.ndarray:
    """Invert the dot layout with plain loops over its definition (module docstring)."""
    out = np.zeros((n, k), np.uint8)
    fpb = 8 // pb
    for nt in range(n // K8.TILE):
        for kb in range(k // 32):
            for sb in range(8):
                v, fi = divmod(sb, fpb)
                for o in range(K8.TILE):
                    for j in range(4):
                        byte = plane[nt, kb, 32 * v + 4 * o + j]
                        out[nt * K8.TILE + o, 32 * kb + 4 * sb + j] = (byte >> (pb * fi)) & ((1 << pb) - 1)
    return out


@pytest.mark.parametrize("fmt_name", ["q2g32", "q3g64", "q5g128", "q6g32"])
def test_dot_layout_is_the_documented_permutation(fmt_name):
    fmt = PRESETS[fmt_name]
    n, k = 16, 256
    codes = np.random.default_rng(1).integers(0, 1 << fmt.bits, (n, k)).astype(np.uint8)
    planes = K8.dot_planes(fmt.pack(codes), fmt.planes, k)
    back = np.zeros((n, k), np.uint8)
    shift = 0
    for plane, pb in zip(planes, fmt.planes):
        assert plane.shape == (n // K8.TILE, k // 32, 32 * pb)
        back |= _fields_back(plane, pb, n, k) << shift
        shift += pb
    np.testing.assert_array_equal(back, codes)


@pytest.mark.parametrize("fmt_name", INT8_FORMATS)
def test_int8_matmul_matches_numpy(fmt_name):
    fmt = PRESETS[fmt_name]
    rng = np.random.default_rng(fmt.bits * 1000 + fmt.group_size)
    n, k = 40, 384  # N a multiple of the 8-output tile but not of 16
    w = rng.standard_normal((n, k)).astype(np.float32)
    q = fmt.quantize(w)
    planes = K8.dot_planes(fmt.pack(q.codes), fmt.planes, k)
    fn = _build(K8.int8_matmul(fmt.planes, fmt.group_size, k, n))
    for m in (1, 3, 4, 9):  # GEMV path below the row block, GEMM path with and without a ragged tail
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[:, 5] *= 30  # an outlier channel: per-block scales keep the other blocks' resolution
        x[m - 1, 64:96] = 0  # an all-zero block
        y = _tensor(np.zeros((m, n), np.float32))
        fn(_tensor(x), _tensor(planes[0]), _tensor(planes[-1]), _tensor(K.tile_groups(q.scales, K8.TILE)),
           _tensor(K.tile_groups(q.zeros, K8.TILE)), y)
        ref = K8.reference_int8_matmul(x, q.codes, q.scales, q.zeros, fmt.group_size)
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        # against the float product on the same weights, the error is the activations' rounding alone:
        # at most half a step of each element's block, times |w|
        w_deq = q.dequantize()
        _, sx, _ = K8.quantize_activations(x, fmt.group_size)
        bound = (np.repeat(sx, 32, axis=1) / 2) @ np.abs(w_deq).T
        assert np.all(np.abs(ref - x @ w_deq.T) <= bound * 1.001 + 1e-4)


def test_reference_quantizes_activations_per_block_of_32():
    x = np.zeros((1, 64), np.float32)
    x[0, :32] = np.linspace(-1, 1, 32)
    x[0, 32:] = np.linspace(-100, 100, 32)
    xq, sx, xs = K8.quantize_activations(x, 64)
    np.testing.assert_allclose(sx[0], [1 / 127, 100 / 127], rtol=1e-6)
    assert xq.dtype == np.int8 and xq.min() == -127 and xq.max() == 127
    np.testing.assert_allclose(xq[0, :32] * sx[0, 0], x[0, :32], atol=0.5 / 127 + 1e-7)
    # the zero-point term sums the quantized activations, like the code term
    np.testing.assert_allclose(xs, [[(xq[0, :32].sum() * sx[0, 0] + xq[0, 32:].sum() * sx[0, 1])]], rtol=1e-6)


@pytest.mark.parametrize("bits,k,n,g,ok", [(4, 64, 16, 32, True), (6, 128, 8, 128, True), (8, 64, 16, 32, False),
                                            (4, 64, 12, 32, False)])
def test_supports(bits, k, n, g, ok):
    assert K8.supports(bits, k, n, g) is ok
