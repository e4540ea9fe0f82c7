"""The CUDA target: what is checked without a GPU (target names, the kernels' CUDA C++ and fatbin, the
artifact and its weights), and on a GPU the artifact's outputs against the x86 build and onnxruntime.

The GPU machine of this project has no TVM compiler: there, bench/gpu/gpu_check.py runs the GPU half
(every bit width, odd shapes, the test models) on artifacts built here.
"""

from __future__ import annotations

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
    assert m["kernels"]["quantized_matmuls"] == {"gemv": 3}
    assert set(m["kernels"]["param_layouts"].values()) == {"canonical"}
    assert len({t["format"] for t in m["tensors"]}) > 1  # 3.0 bpw mixes widths: several GEMV kernels
    lib = (cuda.path / "module.so").read_bytes()
    assert bytes.fromhex("50ed55ba") in lib  # the fatbin is embedded: loading needs no CUDA compiler
    assert b"gemv_q" in lib  # our kernels by name in the CUDA module's function table


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


@pytest.mark.gpu
@pytest.mark.skipif(not _has_gpu(), reason="needs an NVIDIA GPU")
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_gpu_outputs_match_x86_and_onnxruntime(cuda_artifact, batch):
    import qcompile.runtime as rt

    model, cuda, x86 = cuda_artifact
    x = np.random.default_rng(batch).standard_normal((batch, 256)).astype(np.float32)
    got = rt.load(cuda.path).run(None, {"x": x})[0]
    ref_x86 = rt.load(x86.path).run(None, {"x": x})[0]
    fake = type(model).FromString(model.SerializeToString())
    decoded = _decoded_canonical(cuda.path)
    layouts = {t["name"]: t["onnx_layout"] for t in cuda.manifest["tensors"]}
    for init in fake.graph.initializer:
        if init.name in decoded:
            w = decoded[init.name] if layouts[init.name] == "NK" else decoded[init.name].T
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w), init.name))
    ref = ort.InferenceSession(fake.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    np.testing.assert_allclose(got, ref_x86, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
