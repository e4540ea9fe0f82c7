"""The x86 kernels against their numpy equivalents, for every format, on odd shapes and batches."""

from __future__ import annotations

import numpy as np
import pytest
import tvm

from qcompile.passes.formats import PRESETS
from qcompile.targets.x86 import host_target
from qcompile.targets.x86 import kernels as K


def _build(func):
    target = tvm.target.Target(host_target().tvm)
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)["main"]


def _tensor(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu())


@pytest.mark.parametrize("fmt_name", sorted(PRESETS))
def test_dequant_matmul_matches_numpy(fmt_name):
    fmt = PRESETS[fmt_name]
    rng = np.random.default_rng(fmt.bits * 1000 + fmt.group_size)
    n, k = 40, 384  # N not a multiple of 16: tile 8
    w = rng.standard_normal((n, k)).astype(np.float32)
    q = fmt.quantize(w)
    t = K.tile_for(n)
    planes = K.tile_planes(fmt.pack(q.codes), t)
    fn = _build(K.dequant_matmul(fmt, k, n))
    for m in (1, 2, 5, 17):  # GEMV path below the row block, GEMM path with a ragged tail above
        x = rng.standard_normal((m, k)).astype(np.float32)
        y = _tensor(np.zeros((m, n), np.float32))
        fn(_tensor(x), _tensor(planes[0]), _tensor(planes[-1]), _tensor(K.tile_groups(q.scales, t)),
           _tensor(K.tile_groups(q.zeros, t)), y)
        ref = K.reference_matmul(x, q.dequantize())
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("n", [1, 2, 3, 24, 48])
def test_tile_choice_divides_n(n):
    t = K.tile_for(n)
    assert n % t == 0 and t in (1, 2, 4, 8, 16)
    planes = [np.arange(n * 4, dtype=np.uint32).reshape(n, 4)]
    tiled = K.tile_planes(planes, t)[0]
    assert tiled.shape == (n // t, 4, t)
    np.testing.assert_array_equal(tiled.transpose(0, 2, 1).reshape(n, 4), planes[0])


@pytest.mark.parametrize(
    "c,h,w,ks,st,pads,dil",
    [
        (3, 7, 9, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1)),
        (4, 8, 8, (3, 3), (2, 2), (1, 0, 1, 0), (1, 1)),
        (2, 9, 7, (2, 3), (1, 2), (0, 1, 1, 0), (2, 1)),
        (5, 6, 6, (1, 1), (2, 2), (0, 0, 0, 0), (1, 1)),
    ],
)
def test_im2col_matches_numpy(c, h, w, ks, st, pads, dil):
    rng = np.random.default_rng(0)
    b = 2
    x = rng.standard_normal((b, c, h, w)).astype(np.float32)
    kh, kw = ks
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    oh = (h + pads[0] + pads[2] - dil[0] * (kh - 1) - 1) // st[0] + 1
    ow = (w + pads[1] + pads[3] - dil[1] * (kw - 1) - 1) // st[1] + 1
    ref = np.zeros((b * oh * ow, c * kh * kw), np.float32)
    for bi in range(b):
        for i in range(oh):
            for j in range(ow):
                patch = xp[bi, :, i * st[0]:i * st[0] + dil[0] * (kh - 1) + 1:dil[0],
                           j * st[1]:j * st[1] + dil[1] * (kw - 1) + 1:dil[1]]
                ref[(bi * oh + i) * ow + j] = patch.reshape(-1)
    fn = _build(K.im2col(c, h, w, ks, st, pads, dil))
    y = _tensor(np.zeros_like(ref))
    fn(_tensor(x), y)
    np.testing.assert_array_equal(y.numpy(), ref)
