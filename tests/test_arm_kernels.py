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
from qcompile.targets.x86 import attention_kernels as A
from qcompile.targets.x86 import decoder_kernels as DK
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


def _inputs(fmt_name: str, m: int, n: int, k: int):
    fmt = PRESETS[fmt_name]
    rng = np.random.default_rng(fmt.bits * 1000 + fmt.group_size)
    w = rng.standard_normal((n, k)).astype(np.float32)
    q = fmt.quantize(w)
    rng = np.random.default_rng(m)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[:, 5] *= 30  # an outlier channel
    x[m - 1, k - 32:] = 0  # an all-zero block
    return fmt, q, x


@pytest.fixture(scope="module")
def ran(arm_python, tmp_path_factory):  # noqa: F811
    """Build every kernel (cortex-a76: sdot; cortex-a72: float), run them all under qemu: {key: (y, ref)}."""
    d = tmp_path_factory.mktemp("arm-kernels")
    jobs, refs = [], {}
    cases = [(name, N, K_, "") for name in DOT_FORMATS + ["q8g128"]]
    # a tiny decoder's projection (K 64, N 32): one or two blocks per group
    cases += [(name, 32, 64, "-small") for name in DOT_FORMATS if 64 % PRESETS[name].group_size == 0]
    for name, n, k, tag in cases:
        fmt = PRESETS[name]
        dot = name in DOT_FORMATS
        if dot:
            lib = _export(KD.int8_matmul(fmt.planes, fmt.group_size, k, n), "cortex-a76", d / f"{name}{tag}.so")
        else:
            lib = _export(K.dequant_matmul(fmt, k, n), "cortex-a72", d / f"{name}{tag}.so")
        for m in ROWS:
            fmt, q, x = _inputs(name, m, n, k)
            if dot:
                planes = KD.dot_planes(fmt.pack(q.codes), fmt.planes, k)
                t = KD.TILE
                ref = KD.reference_int8_matmul(x, q.codes, q.scales, q.zeros, fmt.group_size)
            else:
                t = K.tile_for(n)
                planes = K.tile_planes(fmt.pack(q.codes), t)
                ref = x @ q.dequantize().T
            args = [x, planes[0], planes[-1], K.tile_groups(q.scales, t), K.tile_groups(q.zeros, t)]
            key = f"{name}{tag}-m{m}"
            np.savez(d / f"{key}-args.npz", **{f"arg{i}": a for i, a in enumerate(args)})
            jobs.append({"kind": "library", "path": lib, "args": str(d / f"{key}-args.npz"),
                         "outputs": [[[m, n], "float32"]], "out": str(d / f"{key}-out.npz")})
            refs[key] = ref
    for key, func, args, outs, ref in _decoder_cases():
        lib = _export(func, "cortex-a76", d / f"{key}.so")
        np.savez(d / f"{key}-args.npz", **{f"arg{i}": a for i, a in enumerate(args)})
        jobs.append({"kind": "library", "path": lib, "args": str(d / f"{key}-args.npz"),
                     "outputs": [[list(shape), "float32"] for shape in outs], "out": str(d / f"{key}-out.npz")})
        refs[key] = ref
    seconds = arm_python.run(jobs, d)
    return {key: (np.load(d / f"{key}-out.npz")["arr_0"], ref) for key, ref in refs.items()}, seconds, d


def _decoder_cases():
    """(key, kernel, args, output shapes, numpy result of the first output) of the decoder fusions' kernels,
    the x86 target's plain TIR that the ARM target builds as it is."""
    rng = np.random.default_rng(3)
    heads, kv, hd, scale = 4, 2, 16, 0.25
    for batch, seq, past in ((1, 1, 0), (2, 5, 0), (2, 5, 7), (2, 1, 7)):
        q = rng.standard_normal((batch, heads, seq, hd)).astype(np.float32) * 3
        k, v = (rng.standard_normal((batch, kv, seq, hd)).astype(np.float32) for _ in range(2))
        kc, vc = (rng.standard_normal((batch, kv, past + seq + 3, hd)).astype(np.float32) for _ in range(2))
        yield (f"attention-{batch}-{seq}-{past}", A.attention(heads, kv, hd, scale, cached=True),
               [q, k, v, kc, vc, np.arange(past)], [q.shape], A.reference_attention(q, k, v, kc, vc, past, scale))
    for rows in (1, 7, 40):
        x = (rng.standard_normal((rows, 576)) * 3).astype(np.float32)
        gamma = rng.standard_normal(576).astype(np.float32)
        yield f"rms_norm-{rows}", DK.rms_norm(576, 1e-5), [x, gamma], [x.shape], DK.reference_rms_norm(x, gamma, 1e-5)
    for b, s, heads_axis in ((1, 1, 1), (2, 6, 1), (2, 100, 2)):
        shape = (b, s, 3, 16) if heads_axis == 2 else (b, 3, s, 16)
        x = rng.standard_normal(shape).astype(np.float32)
        cos, sin = rng.standard_normal((2, b, s, 16)).astype(np.float32)
        yield (f"rotary-{b}-{s}-{heads_axis}", DK.rotary(16, heads_axis == 2), [x, cos, sin], [(b, 3, s, 16)],
               DK.reference_rotary(x, cos, sin, heads_axis == 2))
    for act in DK.ACTIVATIONS:
        gate = (rng.standard_normal((12, 1536)) * 4).astype(np.float32)
        up = rng.standard_normal((12, 1536)).astype(np.float32)
        yield (f"gated_act-{act}", DK.gated_act(1536, act), [gate, up], [gate.shape],
               DK.reference_gated_act(gate, up, act))


@pytest.mark.parametrize("kind", ["attention", "rms_norm", "rotary", "gated_act"])
def test_decoder_kernels_match_numpy_under_qemu(ran, kind):
    results, _, _ = ran
    keys = [key for key in results if key.startswith(kind + "-")]
    assert keys
    for key in keys:
        y, ref = results[key]
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("fmt_name", DOT_FORMATS)
def test_sdot_kernel_matches_numpy_under_qemu(ran, fmt_name):
    results, _, _ = ran
    keys = [key for key in results if key.startswith((f"{fmt_name}-m", f"{fmt_name}-small-m"))]
    assert len(keys) in (len(ROWS), 2 * len(ROWS))
    for key in keys:
        y, ref = results[key]
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(), err_msg=key)


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

