"""The Vulkan int8-activation GEMV (targets/vulkan/kernels_int8.py) against the x86 int8 reference.

Each kernel is built into a one-call plan with a symbolic number of rows M (bench.gpu.vulkan.build_gemv)
and run by wgpu (Mesa lavapipe here), at M = 1 and M = 3 in one session: every code width, groups of 32
and 128, N not a multiple of a workgroup's rows, K over more than one step of a workgroup.
"""

from __future__ import annotations

import numpy as np
import pytest

from bench.gpu import vulkan as gpu_vulkan
from qcompile.passes.formats import WeightFormat
from tests.helpers import NO_VULKAN, vulkan_available

pytestmark = pytest.mark.vulkan


needs_device = pytest.mark.skipif(not vulkan_available(), reason=NO_VULKAN)


def _rel(a, b) -> float:
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / np.linalg.norm(b))


def _params(fmt: WeightFormat, n: int, k: int, seed: int) -> dict:
    """Random codes packed canonically, scales and zeros of a realistic size (weights around +-0.05)."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 1 << fmt.bits, (n, k))
    planes = fmt.pack(codes)
    params = {f"W.q{i}": p for i, p in enumerate(planes)}
    params["W.scales"] = (rng.uniform(0.5, 1.5, (n, k // fmt.group_size)) * 0.1 / (1 << fmt.bits)).astype(np.float16)
    params["W.zeros"] = (-params["W.scales"].astype(np.float32) * (1 << (fmt.bits - 1))).astype(np.float16)
    return params


@needs_device
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group, n, k, config", [(32, 37, 2560, None), (128, 21, 384, (16, 32, False)),
                                                 (32, 1030, 1024, None)])  # the square default: 16 rows x 128
def test_gemv_int8_matches_the_x86_int8_reference(tmp_path, bits, group, n, k, config):
    """Groups of 32 over two steps of the default launch shape (K = 2560 > 64 x 32), groups of 128 with 16
    rows of 32 invocations, loads after staging (K = 384: one step, 12 of 32 invocations busy); N odd."""
    from qcompile.runtime import vulkan
    from qcompile.targets.vulkan.kernels_int8 import Int8GemvConfig, reference

    fmt = WeightFormat(bits, group)
    art = gpu_vulkan.build_gemv(tmp_path, gpu_vulkan.INT8, bits, n, k, Int8GemvConfig(*config) if config else None,
                                group=group, m=None)
    params = _params(fmt, n, k, bits)
    codes = fmt.unpack([params[f"W.q{i}"] for i in range(len(fmt.planes))], (n, k))
    sess = vulkan.Session(art, params=params)
    rng = np.random.default_rng(k + bits)
    for m in (1, 3):
        x = rng.standard_normal((m, k)).astype(np.float32)
        x[:, 32:64] = 0  # a block of zeros (scale 0)
        (y,) = sess.run(None, {"x": x})
        ref = reference(x, codes, params["W.scales"], params["W.zeros"], group)
        assert y.shape == (m, n)
        assert _rel(y, ref) < 1e-5


def test_tuned_config_by_shape_class():
    from qcompile.targets.vulkan.kernels_int8 import TUNED, tuned_config

    assert tuned_config(4, 4096, 4096) is TUNED["square"] and TUNED["square"].rows == 16
    assert tuned_config(4, 4096, 14336) is TUNED[4] and tuned_config(3, 14336, 4096) is TUNED[None]


def test_supports_is_the_cuda_condition():
    from qcompile.targets.cuda import kernels_int8 as cuda_int8
    from qcompile.targets.vulkan import kernels_int8

    for bits in (2, 3, 4, 5, 6, 7, 8):
        for k, g in ((4096, 128), (96, 32), (100, 100), (4096, 48)):
            assert kernels_int8.supports(bits, k, g) == cuda_int8.supports(bits, k, g)
    with pytest.raises(ValueError, match="multiples of 32"):
        kernels_int8.gemv_int8(WeightFormat(4, 32), 100, 8)
