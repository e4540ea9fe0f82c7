"""The CUDA target: what is checked without a GPU (target names, the kernels' CUDA C++ and fatbin, the
artifact and its weights), and on a GPU the artifact's outputs against the x86 build and onnxruntime.

The GPU machine of this project has no TVM compiler: there, bench/gpu/gpu_check.py runs the GPU half
(every bit width, odd shapes, the test models) on artifacts built here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from safetensors.numpy import load_file

from qcompile.passes.formats import PRESETS, WeightFormat
from qcompile.runtime.errors import ArtifactError, QCompileError
from tests.helpers import decoded_weights, mlp_model, save

BITS = (2, 3, 4, 5, 6, 8)
INT8_VS_FLOAT = 3e-2  # relative error (norm) of int8-activation outputs against float activations
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").is_file(),
                                reason="building for CUDA needs nvcc")


def _has_gpu() -> bool:
    return Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists()


# -- target names ----------------------------------------------------------------------------------


def test_resolve_presets_and_json():
    from qcompile.targets import make_backend, resolve_target

    assert resolve_target("cuda").tvm == {"kind": "cuda", "arch": "sm_90"}
    for arch in ("sm_80", "sm_89", "sm_90"):
        spec = resolve_target(f"cuda:{arch}")
        assert (spec.name, spec.device, spec.arch, spec.tvm["arch"]) == ("cuda", "cuda", arch, arch)
    spec = resolve_target('{"kind": "cuda", "arch": "sm_86", "max_threads_per_block": 1024}')
    assert spec.tvm["max_threads_per_block"] == 1024 and spec.arch == "sm_86"
    with pytest.raises(QCompileError, match="sm_75"):
        resolve_target("cuda:sm_75")
    backend = make_backend(resolve_target("cuda"))
    assert backend.name == "cuda" and not backend.decoder_fusion and not backend.attention_fusion


# -- kernels ---------------------------------------------------------------------------------------


@needs_nvcc
@pytest.mark.parametrize("bits", BITS)
def test_gemv_cuda_source_and_fatbin(bits):
    """Each width's GEMV compiles ahead of time: 16-byte weight loads, warp shuffles, no local-memory
    arrays, and a fatbin holding sm_90 SASS."""
    import tvm

    from qcompile.targets.cuda import build, kernels

    fmt = WeightFormat(bits, 32)
    f = kernels.gemv(fmt, 384, 100)  # N not a multiple of the rows, K of 12 groups: the guards
    sink = build.BuiltSources()
    build.ensure_cuda_codegen()
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    with build._nvcc_callback("90", sink), target:  # noqa: SLF001
        tvm.compile(tvm.IRModule({"gemv": f.with_attr("global_symbol", "gemv")}), target=target)
    (src,) = sink.sources
    assert 'extern "C" __global__' in src and "gemv_kernel" in src
    assert "__shfl_down_sync" in src
    assert "uint4" in src  # the first plane's 16-byte loads
    fatbin = build.compile_cuda_source(src, "90")
    assert fatbin[:4] == bytes.fromhex("50ed55ba")  # fatbin magic


def test_gemv_config_and_chunks():
    from qcompile.targets.cuda import kernels

    assert kernels.chunk_codes((4,), 4096) == 32 and kernels.chunk_codes((2, 1), 4096) == 64
    assert kernels.chunk_codes((2,), 96) == 32 and kernels.chunk_codes((8,), 4096) == 16
    big = kernels.gemv_config(4096, 14336)
    assert big.smem and big.ksplit == 8  # K large: x staged in shared memory
    # x larger than the shared-memory limit stays in global memory
    assert not kernels.gemv_config(4096, 32768).smem


@needs_nvcc
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("xsmem", [False, True])
@pytest.mark.parametrize("prefetch", [False, True])
def test_gemv_int8_cuda_source_and_fatbin(bits, xsmem, prefetch):
    """Each width's int8-activation GEMV compiles ahead of time: dp4a, byte permutes for the arranged
    activations, rotate+mask lanes, 16-byte weight loads (where the chunk holds 4 words), warp shuffles;
    with xsmem one barrier after x is staged in shared memory; with and without the next step's loads
    issued before this step's math (prefetch)."""
    import tvm

    from qcompile.targets.cuda import build, kernels_int8

    fmt = WeightFormat(bits, 32)
    # N not a multiple of the rows, K of 11 blocks (chunks halved to 32 codes), 2 warps on K: the guards
    cfg = kernels_int8.Int8GemvConfig(rows=8, wrows=2, ksplit=2, chunk=64, xsmem=xsmem, prefetch=prefetch)
    f = kernels_int8.gemv_int8(fmt, 352, 100, cfg)
    sink = build.BuiltSources()
    build.ensure_cuda_codegen()
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    with build._nvcc_callback("90", sink), target:  # noqa: SLF001
        tvm.compile(tvm.IRModule({"gemv_i8": f.with_attr("global_symbol", "gemv_i8")}), target=target)
    (src,) = sink.sources
    assert "__dp4a" in src and "__byte_perm" in src and "__funnelshift_r" in src and "__shfl_down_sync" in src
    assert src.count("__syncthreads()") == 1 + xsmem  # the K-split reduction (+ staged x)
    if fmt.planes[0] == 4:
        assert "uint4" in src  # 32 codes of the first plane: one 16-byte load
    assert build.compile_cuda_source(src, "90")[:4] == bytes.fromhex("50ed55ba")


@pytest.mark.parametrize("bits", BITS)
def test_gemv_int8_xpre_cuda_source_and_fatbin(bits):
    """x quantized once per launch (config ``q``): quantize_x (a thread a block of 32: the activation
    quantizer's round-to-nearest-even adds, byte permutes, 16-byte stores) and a GEMV that reads the
    arranged int8 activations (16-byte loads) and quantizes nothing; both compile ahead of time."""
    import tvm

    from qcompile.targets.cuda import build, kernels_int8

    fmt = WeightFormat(bits, 32)
    cfg = kernels_int8.Int8GemvConfig(rows=8, wrows=2, ksplit=2, chunk=64, prefetch=True, xpre=True)
    assert kernels_int8.xq_width(352, fmt.planes) % 4 == 0  # rows of xq stay 16-byte aligned
    funcs = {"xq": kernels_int8.quantize_x(352, fmt.planes), "gemv_q": kernels_int8.gemv_int8(fmt, 352, 100, cfg)}
    sink = build.BuiltSources()
    build.ensure_cuda_codegen()
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    with build._nvcc_callback("90", sink), target:  # noqa: SLF001
        tvm.compile(tvm.IRModule({nm: f.with_attr("global_symbol", nm) for nm, f in funcs.items()}), target=target)
    (src,) = sink.sources

    def body(name):  # the kernel's definition, up to the next one
        start = src.index("{", src.index(f" {name}_kernel(", src.index(f" {name}_kernel(") + 1))
        end = src.find('extern "C"', start)
        return src[start:end if end >= 0 else len(src)]

    quant, gemv = body("xq"), body("gemv_q")
    assert "__fadd_rn" in quant and "__byte_perm" in quant and "int4" in quant
    assert "__fadd_rn" not in gemv and "__byte_perm" not in gemv and "__dp4a" in gemv and "int4" in gemv
    assert build.compile_cuda_source(src, "90")[:4] == bytes.fromhex("50ed55ba")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [32, 128])
def test_gemv_int8_arithmetic_matches_the_x86_int8_reference(bits, group):
    """The kernel's integer path in numpy (canonical words rotated and masked into byte lanes, activations
    in x_order, dp4a sums, 8-bit codes flipped to signed) equals the x86 int8 reference."""
    from qcompile.targets.cuda import kernels_int8

    rng = np.random.default_rng(bits)
    fmt = WeightFormat(bits, group)
    n, k, m = 24, 384, 3
    planes = [rng.integers(0, 2**32, size=(n, k * pb // 32), dtype=np.uint32) for pb in fmt.planes]
    s = (rng.random((n, k // group)) * 0.02 + 0.005).astype(np.float16)
    z = (-rng.random((n, k // group)) * 0.05).astype(np.float16)
    x = rng.standard_normal((m, k)).astype(np.float32)
    x[1, 32:64] = 0  # a block of zeros: scale 0
    ref = kernels_int8.reference(x, fmt.unpack(planes, (n, k)), s, z, group)
    np.testing.assert_allclose(kernels_int8.emulate(fmt, planes, s, z, x), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_gemv_int8_lanes_and_order():
    """lane_extract puts codes (8/pb)*i + s of a word in byte i (at the plane's offset); x_order lists the
    activations in the same order; gpu_check's numpy reference is the x86 one."""
    from bench.gpu.gpu_check import int8_reference
    from qcompile.targets.cuda import kernels_int8
    from qcompile.targets.x86.kernels_int8 import reference_int8_matmul

    rng = np.random.default_rng(0)
    for pb, off in ((1, 0), (1, 2), (1, 4), (2, 0), (2, 4), (4, 0), (8, 0)):
        codes = rng.integers(0, 1 << pb, size=32 // pb, dtype=np.uint32)
        word = np.array([(codes << (pb * np.arange(32 // pb, dtype=np.uint32))).sum(dtype=np.uint32)], np.uint32)
        for s in range(8 // pb):
            got = kernels_int8.lane_extract(word, pb, s, off).view(np.uint8)
            np.testing.assert_array_equal(got, (codes[(8 // pb) * np.arange(4) + s] << off).astype(np.uint8))
        order = kernels_int8.x_order(pb)
        assert sorted(order) == list(range(32))
        assert list(order[:4]) == [(8 // pb) * i for i in range(4)]
    fmt = WeightFormat(5, 64)
    planes = [rng.integers(0, 2**32, size=(16, 256 * pb // 32), dtype=np.uint32) for pb in fmt.planes]
    codes = fmt.unpack(planes, (16, 256))
    s = np.full((16, 4), 0.01, np.float16)
    z = np.full((16, 4), -0.1, np.float16)
    x = rng.standard_normal((2, 256)).astype(np.float32)
    np.testing.assert_allclose(int8_reference(x, codes, s, z, 64), reference_int8_matmul(x, codes, s, z, 64), rtol=1e-5)


def test_gemv_int8_config():
    from qcompile.targets.cuda import kernels_int8

    cfg = kernels_int8.Int8GemvConfig(rows=16, wrows=2, ksplit=4, chunk=64, unroll=2)
    assert kernels_int8.Int8GemvConfig.parse(cfg.name) == cfg
    for c in (dataclasses.replace(cfg, prefetch=True), dataclasses.replace(cfg, xsmem=True, prefetch=True),
              dataclasses.replace(cfg, prefetch=True, xpre=True), dataclasses.replace(cfg, xpre=True)):
        assert kernels_int8.Int8GemvConfig.parse(c.name) == c
    with pytest.raises(ValueError, match="Int8GemvConfig"):
        kernels_int8.Int8GemvConfig.parse("rows8")
    assert {kernels_int8.shape_class(n, k) for n, k in ((4096, 4096), (4096, 14336), (14336, 4096), (96, 4096))} \
        == {"square", "wide_k", "tall_n", "small"}
    for key, name in kernels_int8.TUNED.items():  # the measured table parses and names a width and class
        bits, cls = key.split("/")
        assert int(bits) in BITS and cls in ("square", "wide_k", "tall_n", "small")
        kernels_int8.Int8GemvConfig.parse(name)
    small = kernels_int8.int8_config(6, 4096, 4)
    assert small.rows * small.wrows <= 8  # a block's rows shrink towards N
    assert not kernels_int8.supports(4, 48, 32) and kernels_int8.supports(8, 4096, 128)


def test_dequant_matmul_unscheduled_is_generic():
    """The dlight-scheduled definition (shared with WebGPU): two blocks, a symbolic or static M."""
    from qcompile.targets.cuda import kernels

    f = kernels.dequant_matmul(WeightFormat(3, 64), 256, 48)
    text = f.script()
    assert "dequantize" in text and "matmul" in text and "thread_binding" not in text
    assert "(m, T.int64(256))" in text  # symbolic M; every dim int64 (dlight rejects mixed index dtypes)
    assert "(T.int64(1), T.int64(256))" in kernels.dequant_matmul(WeightFormat(4, 128), 256, 48, rows=1).script()


# -- the artifact -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cuda_artifact(tmp_path_factory):
    if shutil.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").is_file():
        pytest.skip("building for CUDA needs nvcc")
    from qcompile.compiler.driver import CompileOptions, compile_model

    d = tmp_path_factory.mktemp("cuda")
    model = mlp_model()
    path = save(model, d / "mlp.onnx")
    cuda = compile_model(path, d / "mlp.cuda.qcm", CompileOptions(target="cuda", bpw=3.0))
    x86 = compile_model(path, d / "mlp.x86.qcm", CompileOptions(target="x86", bpw=3.0, int8_dot=False))
    return model, cuda, x86


@pytest.fixture(scope="module")
def x86_int8_artifact(cuda_artifact, tmp_path_factory):
    """The x86 int8 build (activations quantized like the CUDA int8 GEMV) of the same model."""
    from qcompile.compiler.driver import CompileOptions, compile_model

    model = cuda_artifact[0]
    path = save(model, tmp_path_factory.mktemp("x86i8") / "mlp.onnx")
    return compile_model(path, path.with_suffix(".x86i8.qcm"), CompileOptions(target="x86", bpw=3.0))


def _decoded_canonical(artifact: Path) -> dict[str, np.ndarray]:
    manifest = json.loads((artifact / "manifest.json").read_text())
    params = load_file(str(artifact / "params.safetensors"))
    out = {}
    for t in manifest["tensors"]:
        fmt = PRESETS[t["format"]]
        n, k = t["shape"]
        planes = [params[p] for p in t["params"] if ".q" in p.rsplit("/", 1)[-1]]
        codes = fmt.unpack(planes, (n, k)).astype(np.float32)
        s = np.repeat(params[f"{t['name']}.scales"].astype(np.float32), fmt.group_size, 1)
        z = np.repeat(params[f"{t['name']}.zeros"].astype(np.float32), fmt.group_size, 1)
        out[t["name"]] = codes * s + z
    return out


def test_artifact_manifest_and_device_code(cuda_artifact):
    _, cuda, _ = cuda_artifact
    m = cuda.manifest
    assert m["target"] == {"name": "cuda", "tvm": {"kind": "cuda", "arch": "sm_90"}, "device": "cuda",
                           "arch": "sm_90", "cpu_flags": []}
    assert m["kernels"]["int8_dot"] is True
    assert sum(m["kernels"]["quantized_matmuls"].values()) == 3
    assert set(m["kernels"]["param_layouts"].values()) == {"canonical"}
    assert len({t["format"] for t in m["tensors"]}) > 1  # 3.0 bpw mixes widths: several GEMV kernels
    lib = (cuda.path / "module.so").read_bytes()
    assert bytes.fromhex("50ed55ba") in lib  # the fatbin is embedded: loading needs no CUDA compiler
    # our kernels by name in the CUDA module's function table (int8-activation GEMVs: gemv_i8_<format>_...)
    assert b"gemv_i8_q" in lib


def test_int8_layers_are_the_x86_int8_layers(cuda_artifact, x86_int8_artifact):
    """CUDA quantizes activations exactly where the x86 int8 build does (so their outputs match)."""
    cuda = cuda_artifact[1].manifest["kernels"]["quantized_matmuls"]
    x86 = x86_int8_artifact.manifest["kernels"]["quantized_matmuls"]
    assert cuda.get("gemv_int8", 0) == x86.get("int8_dot", 0) > 0
    assert cuda.get("gemv", 0) == x86.get("float", 0)


def test_artifact_weights_are_the_x86_weights(cuda_artifact):
    """Same quantization on both targets; the CUDA artifact stores it in the canonical packing."""
    _, cuda, x86 = cuda_artifact
    ours, theirs = _decoded_canonical(cuda.path), decoded_weights(x86.path)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        np.testing.assert_array_equal(ours[name], theirs[name])


def test_dlight_path_builds(cuda_artifact, tmp_path):
    """The target-generic lowering (unscheduled quantized matmul, dlight schedules it: the WebGPU
    target's path) builds for CUDA with a symbolic batch (no FuseTIR or dlight index-dtype failure)."""
    from qcompile.targets.cuda.build import BuiltSources, build_library
    from qcompile.targets.cuda.lower import lower_to_relax

    _, cuda, _ = cuda_artifact
    lowered = lower_to_relax(cuda.quantized_model, scheduled=False)
    assert lowered.kernels == {"dequant_matmul": 3}
    sink = BuiltSources()
    build_library(lowered.mod, {"kind": "cuda", "arch": "sm_90"}, str(tmp_path / "m.so"), sink)
    assert any("qmatmul_q" in src for src in sink.sources)


def test_runtime_refuses_cuda_artifact_without_gpu(cuda_artifact):
    if _has_gpu():
        pytest.skip("this machine has a GPU")
    _, cuda, _ = cuda_artifact
    code = ("import qcompile.runtime as rt, sys\n"
            "from qcompile.runtime.errors import ArtifactError\n"
            f"try:\n    rt.load({str(cuda.path)!r})\nexcept ArtifactError as e:\n    print('refused:', e)\n"
            "else:\n    sys.exit('loaded')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0 and "refused:" in out.stdout, out.stdout + out.stderr
    assert ArtifactError  # the error type the runtime raises


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_gpu_outputs_match_x86_and_onnxruntime(cuda_artifact, x86_int8_artifact, batch):
    """Int8 activations on both targets: CUDA matches the x86 int8 build to 1e-4 (float summation order)
    row by row, but for a rare row (one, or a quarter at most) where an activation of the second layer sits
    within that summation noise of a rounding boundary and is quantized one step apart (~1e-3: seen on the
    H100 in bench/gpu/gpu_check.py); against onnxruntime on the decoded weights (float activations) the
    int8 activations cost ~1e-2."""
    import qcompile.runtime as rt

    model, cuda, _ = cuda_artifact
    x = np.random.default_rng(batch).standard_normal((batch, 256)).astype(np.float32)
    got = rt.load(cuda.path).run(None, {"x": x})[0]
    ref_x86 = rt.load(x86_int8_artifact.path).run(None, {"x": x})[0]
    fake = type(model).FromString(model.SerializeToString())
    decoded = _decoded_canonical(cuda.path)
    layouts = {t["name"]: t["onnx_layout"] for t in cuda.manifest["tensors"]}
    for init in fake.graph.initializer:
        if init.name in decoded:
            w = decoded[init.name] if layouts[init.name] == "NK" else decoded[init.name].T
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w), init.name))
    ref = ort.InferenceSession(fake.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    rows = [_rel(got[i], ref_x86[i]) for i in range(batch)]
    assert sum(not r < 1e-4 for r in rows) <= max(1, batch // 4) and max(rows) < 1e-2, rows
    assert _rel(got, ref) < INT8_VS_FLOAT


# -- the tensor-core dequant-GEMM (batch > 8) -----------------------------------------------------


def _relerr(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


def _packed(rng, fmt, n, k):
    codes = rng.integers(0, fmt.max_code + 1, (n, k)).astype(np.uint8)
    s = (rng.random((n, k // fmt.group_size)) * 0.02 + 0.005).astype(np.float16)
    z = (-rng.random((n, k // fmt.group_size)) * 0.05).astype(np.float16)
    return codes, fmt.pack(codes), s, z


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_gemm_dequantize_pairs_match_the_format(name):
    """The kernel's bit tricks in numpy (codes at bits p and p+16 ORed into half2 1024.0, the high
    plane's bits rotated next to them, two fp16 FMAs) give float16(code * scale + zero), rounded once,
    in the shared-memory order of pair_order."""
    from qcompile.targets.cuda import gemm

    fmt = PRESETS[name]
    rng = np.random.default_rng(fmt.bits * 1000 + fmt.group_size)
    n, k = 7, 256
    codes, planes, s, z = _packed(rng, fmt, n, k)
    order = gemm.pair_order(tuple(fmt.planes))
    assert sorted(order) == list(range(32)) and list(order[16:]) == [o + 16 for o in order[:16]]
    g = fmt.group_size
    w64 = codes.astype(np.float64).reshape(n, k // g, g) * s.astype(np.float64)[..., None] + \
        z.astype(np.float64)[..., None]
    perm = (np.arange(0, k, 32)[:, None] + order[None, :]).reshape(-1)
    want = w64.reshape(n, k).astype(np.float16)[:, perm]
    np.testing.assert_array_equal(gemm.dequantize_pairs(fmt, planes, s, z).view(np.uint16), want.view(np.uint16))


def test_gemm_reference_and_tolerances():
    """The numpy equivalent rounds x and W to fp16: against float32 operands its error is well inside
    FP16_TOLERANCE (the bound the GPU checks assert); a plain float32 matmul is far inside it."""
    from qcompile.targets.cuda import gemm

    rng = np.random.default_rng(1)
    fmt = WeightFormat(4, 32)
    codes, planes, s, z = _packed(rng, fmt, 64, 512)
    x = rng.standard_normal((40, 512)).astype(np.float32)
    w32 = (codes.astype(np.float32).reshape(64, 16, 32) * s.astype(np.float32)[..., None]
           + z.astype(np.float32)[..., None]).reshape(64, 512)
    exact = x.astype(np.float64) @ w32.astype(np.float64).T
    err = _relerr(gemm.reference(fmt, planes, s, z, x), exact)
    assert 1e-5 < err < gemm.FP16_TOLERANCE / 2  # fp16 rounding is visible, and within the bound
    assert _relerr(x @ w32.T, exact) < gemm.EMULATED_TOLERANCE


def test_gemm_configs_fit_k():
    from qcompile.targets.cuda import gemm

    assert gemm.fit_config(gemm.GemmConfig(bk=128, ksplit=4), 4096) == gemm.GemmConfig(bk=128, ksplit=4)
    assert gemm.fit_config(gemm.GemmConfig(bk=128, ksplit=4), 352) == gemm.GemmConfig(bk=32, ksplit=1)  # 11 chunks
    assert gemm.fit_config(gemm.GemmConfig(bk=64, ksplit=2), 14336).bk * 2 <= 14336
    tiers = gemm.gemm_tiers(4096, 4096)
    assert tiers[-1][0] is None and [t[0] for t in tiers[:-1]] == sorted(t[0] for t in tiers[:-1])
    assert all(t[0] > gemm.GEMV_MAX_M for t in tiers[:-1])
    with pytest.raises(ValueError, match="multiples of 16"):
        gemm.GemmConfig(bm=24)


@needs_nvcc
@pytest.mark.parametrize("bits", BITS)
def test_gemm_cuda_source_and_fatbin(bits):
    """Each width's GEMM compiles ahead of time: ldmatrix + mma.sync m16n8k16 (f32 += f16 x f16), the
    fp16 conversions, 16-byte shared stores; K split across blocks adds into y with atomics; the masks
    and shifts are constants in the kernel (none hoisted into launch parameters), and so are the
    register stages' indices (no local-memory arrays: no stack frame in the SASS)."""
    import tvm

    from qcompile.targets.cuda import build, gemm

    fmt = WeightFormat(bits, 32)
    cfg = gemm.GemmConfig(bm=16, bn=64, bk=64, wm=1, wn=2, ksplit=2, depth=2)
    f = gemm.gemm(fmt, 384, 100, cfg)  # N not a multiple of the tile, K of 12 groups split in 2, 2 steps in flight
    sink = build.BuiltSources()
    build.ensure_cuda_codegen()
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    with build._nvcc_callback("90", sink), target:  # noqa: SLF001
        tvm.compile(tvm.IRModule({"gemm": f.with_attr("global_symbol", "gemm")}), target=target)
    (src,) = sink.sources
    for needle in ("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", "ldmatrix.sync.aligned.m8n8.x4",
                   "fma.rn.f16x2", "cvt.rn.f16x2.f32", "atomicAdd", "uint4"):
        assert needle in src, needle
    kernels_decl = [line for line in src.splitlines() if "__global__" in line and line.endswith(";")]
    assert len(kernels_decl) == 2 and not any("cse_v" in line for line in kernels_decl)  # zero-fill + GEMM
    assert build.compile_cuda_source(src, "90")[:4] == bytes.fromhex("50ed55ba")
    assert "0 bytes stack frame" in _ptxas_report(src) and "bytes spill" not in _ptxas_report(src).replace(
        "0 bytes spill", "")


def _ptxas_report(src: str) -> str:
    """ptxas's resource report (-v) for CUDA source ``src`` compiled for sm_90."""
    import tempfile

    from qcompile.targets.cuda.build import nvcc_path

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "k.cu").write_text(src)
        out = subprocess.run([nvcc_path(), "--cubin", "-O3", "-arch=sm_90", "-Xptxas", "-v", "-o",
                              str(Path(tmp) / "k.cubin"), str(Path(tmp) / "k.cu")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stderr


@needs_nvcc
def test_gemv_or_gemm_branches_on_m():
    """One PrimFunc for a quantized matmul: the GEMV for M <= 8, GEMM tiers above; one launch each."""
    import tvm

    from qcompile.targets.cuda import build, gemm, kernels

    fmt = WeightFormat(5, 64)
    f = gemm.gemv_or_gemm(kernels.gemv(fmt, 256, 72), fmt, 256, 72)
    text = f.script()
    assert "if m <= T.int64(8)" in text
    for max_m, _ in gemm.gemm_tiers(72, 256)[:-1]:
        assert f"if m <= T.int64({max_m})" in text
    sink = build.BuiltSources()
    build.ensure_cuda_codegen()
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    with build._nvcc_callback("90", sink), target:  # noqa: SLF001
        tvm.compile(tvm.IRModule({"qmm": f.with_attr("global_symbol", "qmm")}), target=target)
    (src,) = sink.sources
    assert "__shfl_down_sync" in src and src.count("mma.sync.aligned.m16n8k16") >= 1
    assert sum(line.endswith(";") for line in src.splitlines() if "__global__" in line) >= 1 + len(
        gemm.gemm_tiers(72, 256))


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("batch", [9, 32, 100])
def test_gpu_gemm_batches_match_the_float_build(tmp_path, batch):
    """M > 8 runs the tensor-core GEMM (fp16 x and weights, fp32 sums): the CUDA build (float
    activations) matches the x86 float build within FP16_TOLERANCE."""
    import qcompile.runtime as rt
    from qcompile.compiler.driver import CompileOptions, compile_model
    from qcompile.targets.cuda.gemm import FP16_TOLERANCE

    path = save(mlp_model(), tmp_path / "mlp.onnx")
    cuda = compile_model(path, tmp_path / "c.qcm", CompileOptions(target="cuda", bpw=3.0, int8_dot=False))
    x86 = compile_model(path, tmp_path / "x.qcm", CompileOptions(target="x86", bpw=3.0, int8_dot=False))
    x = np.random.default_rng(batch).standard_normal((batch, 256)).astype(np.float32)
    got = rt.load(cuda.path).run(None, {"x": x})[0]
    assert _relerr(got, rt.load(x86.path).run(None, {"x": x})[0]) < FP16_TOLERANCE


# -- the read floor under the GEMV timings (bench/gpu/floor.py) -------------------------------------


@needs_nvcc
def test_read_floor_kernels_and_summary():
    """The floor's read kernels cover each GEMV's bytes with 16-byte loads (the launch kept by a runtime
    condition), and the summary puts each GEMV over the fastest read of its bytes."""
    import tvm

    from bench.gpu import floor
    from bench.gpu.gpu_check import _gemv_bytes
    from qcompile.targets.cuda import build

    sizes = floor.sizes()
    assert sizes["b4_n14336_k4096"] == _gemv_bytes(4, 14336, 4096, 128)
    sink = build.BuiltSources()
    build.ensure_cuda_codegen()
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    f, words = floor.read_kernel(1000, 128, 4, 0)
    assert words * 4 >= 1000
    with build._nvcc_callback("90", sink), target:  # noqa: SLF001
        tvm.compile(tvm.IRModule({"read": f.with_attr("global_symbol", "read"),
                                  "empty": floor.empty_kernel(2, 32).with_attr("global_symbol", "empty")}), target=target)
    (src,) = sink.sources
    assert "*(int4*)(a_ptr" in src and "empty_kernel" in src and "out_ptr[0] =" in src.split("empty_kernel")[1]
    read = [{"name": "b4_n4096_k4096", "config": c, "bytes": 10, "us": us, "GBps": 0} for c, us in (("a", 5.0), ("b", 4.0))]
    gemv = [{"target": "cuda", "bits": 4, "N": 4096, "K": 4096, "us": 6.0, "GBps": 1.0}]
    (row,) = floor.summarize({"read": read, "gemv": gemv})
    assert row["read_config"] == "b" and row["us_over_read"] == 1.5
