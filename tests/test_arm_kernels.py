"""The ARM target's kernels, cross-compiled for aarch64 and run under qemu, against their numpy equivalents.

The ``sdot`` kernels (:mod:`qcompile.targets.arm.kernels_dot`) for every format they take, on both their
GEMV (M < 4) and GEMM (with and without a ragged tail) paths; the float dequantizing kernels as a CPU
without dotprod gets them.  Every library is built first and all run in one emulated Python process.
"""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import tvm

from qcompile.passes.formats import PRESETS
from qcompile.targets.arm import CROSS_CXX, resolve
from qcompile.targets.arm import kernels_dot as KD
from qcompile.targets.x86 import kernels as K
from tests.arm_helpers import arm_python  # noqa: F401  (fixture)

pytestmark = pytest.mark.arm

DOT_FORMATS = sorted(name for name, f in PRESETS.items() if f.bits <= KD.MAX_BITS)
ROWS = (1, 3, 4, 9)  # GEMV below the row block, GEMM with and without a ragged tail
N, K_ = 40, 384  # N a multiple of the 8-output tile but not of 16


def _export(func, preset: str, path) -> str:
    from tvm.support import cc

    target = tvm.target.Target(resolve(f"arm:{preset}", None).tvm)
    ex = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)
    ex.export_library(str(path), fcompile=cc.cross_compiler(CROSS_CXX))
    return str(path)


def _inputs(fmt_name: str, m: int):
    fmt = PRESETS[fmt_name]
    rng = np.random.default_rng(fmt.bits * 1000 + fmt.group_size)
    w = rng.standard_normal((N, K_)).astype(np.float32)
    q = fmt.quantize(w)
    rng = np.random.default_rng(m)
    x = rng.standard_normal((m, K_)).astype(np.float32)
    x[:, 5] *= 30  # an outlier channel
    x[m - 1, 64:96] = 0  # an all-zero block
    return fmt, q, x


@pytest.fixture(scope="module")
def ran(arm_python, tmp_path_factory):  # noqa: F811
    """Build every kernel (cortex-a76: sdot; cortex-a72: float), run them all under qemu: {key: (y, ref)}."""
    d = tmp_path_factory.mktemp("arm-kernels")
    jobs, refs = [], {}
    for name in DOT_FORMATS + ["q8g128"]:
        fmt = PRESETS[name]
        dot = name in DOT_FORMATS
        if dot:
            lib = _export(KD.int8_matmul(fmt.planes, fmt.group_size, K_, N), "cortex-a76", d / f"{name}.so")
        else:
            lib = _export(K.dequant_matmul(fmt, K_, N), "cortex-a72", d / f"{name}.so")
        for m in ROWS:
            fmt, q, x = _inputs(name, m)
            if dot:
                planes = KD.dot_planes(fmt.pack(q.codes), fmt.planes, K_)
                t = KD.TILE
                ref = KD.reference_int8_matmul(x, q.codes, q.scales, q.zeros, fmt.group_size)
            else:
                t = K.tile_for(N)
                planes = K.tile_planes(fmt.pack(q.codes), t)
                ref = x @ q.dequantize().T
            args = [x, planes[0], planes[-1], K.tile_groups(q.scales, t), K.tile_groups(q.zeros, t)]
            key = f"{name}-m{m}"
            np.savez(d / f"{key}-args.npz", **{f"arg{i}": a for i, a in enumerate(args)})
            jobs.append({"kind": "library", "path": lib, "args": str(d / f"{key}-args.npz"),
                         "outputs": [[[m, N], "float32"]], "out": str(d / f"{key}-out.npz")})
            refs[key] = ref
    seconds = arm_python.run(jobs, d)
    return {key: (np.load(d / f"{key}-out.npz")["arr_0"], ref) for key, ref in refs.items()}, seconds, d


@pytest.mark.parametrize("fmt_name", DOT_FORMATS)
def test_sdot_kernel_matches_numpy_under_qemu(ran, fmt_name):
    results, _, _ = ran
    for m in ROWS:
        y, ref = results[f"{fmt_name}-m{m}"]
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_float_kernel_matches_numpy_under_qemu(ran):
    results, _, _ = ran
    for m in ROWS:
        y, ref = results[f"q8g128-m{m}"]
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_the_dot_kernels_use_sdot(ran):
    _, _, d = ran
    objdump = CROSS_CXX.replace("g++", "objdump")
    asm = subprocess.run([objdump, "-d", str(d / "q4g32.so")], capture_output=True, text=True, check=True).stdout
    assert "\tsdot\t" in asm
    asm = subprocess.run([objdump, "-d", str(d / "q8g128.so")], capture_output=True, text=True, check=True).stdout
    assert "\tsdot\t" not in asm  # cortex-a72 has no dotprod

