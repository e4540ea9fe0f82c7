"""The Vulkan target: WGSL kernels + plan.json run by wgpu (Mesa lavapipe in CI).

Float models are checked against onnxruntime; quantized ones against the x86 build of the same weights
and against onnxruntime running the float model with the artifact's weights decoded by numpy.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from helpers import convnet_model, mlp_model, save
from onnx import numpy_helper

from qcompile.compiler.driver import CompileOptions, compile_model
from qcompile.passes.formats import PRESETS
from qcompile.runtime import ArtifactError, load
from qcompile.runtime.vulkan import compile_expr

pytestmark = pytest.mark.vulkan


def _vulkan_available() -> bool:
    try:
        from qcompile.runtime.vulkan import request_device

        request_device()
        return True
    except Exception:  # noqa: BLE001  (no wgpu, no driver)
        return False


needs_device = pytest.mark.skipif(not _vulkan_available(), reason="no Vulkan device (apt-get install mesa-vulkan-drivers)")


def _ort(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]


def _decoded_model(model: onnx.ModelProto, artifact) -> onnx.ModelProto:
    """``model`` with each quantized weight replaced by numpy's decoding of the artifact's canonical planes."""
    from safetensors.numpy import load_file

    manifest = json.loads((artifact / "manifest.json").read_text())
    params = load_file(str(artifact / "params.safetensors"))
    assert set(manifest["kernels"]["param_layouts"].values()) <= {"canonical"}
    new = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {i.name: i for i in new.graph.initializer}
    for t in manifest["tensors"]:
        fmt = PRESETS[t["format"]]
        n, k = t["shape"]
        planes = [params[p] for p in t["params"] if ".q" in p.rsplit("/", 1)[-1]]
        codes = fmt.unpack(planes, (n, k)).astype(np.float32)
        s = np.repeat(params[f"{t['name']}.scales"].astype(np.float32), fmt.group_size, 1)
        z = np.repeat(params[f"{t['name']}.zeros"].astype(np.float32), fmt.group_size, 1)
        w = codes * s + z
        shape = t["onnx_shape"]
        arr = {"conv": lambda: w.reshape(shape), "NK": lambda: w, "KN": lambda: w.T}[t["onnx_layout"]]()
        inits[t["name"]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr, np.float32), t["name"]))
    return new


def test_plan_expressions():
    env = {"batch": 7, "sequence": 3}
    assert compile_expr("(((batch) + 31) // 32)")(env) == 1
    assert compile_expr("max(batch * 4, 16) % 5 - sequence")(env) == 28 % 5 - 3
    with pytest.raises(ArtifactError):
        compile_expr("__import__('os').getcwd()")


@needs_device
def test_float_mlp_matches_onnxruntime(tmp_path):
    model = mlp_model()
    path = save(model, tmp_path / "mlp.onnx")
    art = compile_model(path, tmp_path / "mlp.qcm", CompileOptions(target="vulkan", bpw=16)).path
    files = json.loads((art / "manifest.json").read_text())["files"]
    assert {"kernels.wgsl", "plan.json", "params.safetensors"} <= set(files) and "module.so" not in files
    sess = load(art)
    assert [i.name for i in sess.get_inputs()] == ["x"] and sess.get_inputs()[0].shape == ("batch", 256)
    rng = np.random.default_rng(0)
    for batch in (1, 5, 1):  # symbolic batch: buffers and launches sized at run time
        x = rng.standard_normal((batch, 256)).astype(np.float32)
        (y,) = sess.run(None, {"x": x})
        np.testing.assert_allclose(y, _ort(model, {"x": x}), rtol=1e-4, atol=1e-4)


@needs_device
@pytest.mark.parametrize("formats", [("q2g32", "q3g64", "q4g128"), ("q5g128", "q6g32", "q8g64")])
def test_quantized_mlp_every_bit_width(tmp_path, formats):
    """Each layer in another format: the WGSL output equals the x86 build and the decoded float model."""
    model = mlp_model()
    path = save(model, tmp_path / "mlp.onnx")
    overrides = [(f"^{w}$", f) for w, f in zip(("W1", "W2", "W3"), formats)]
    arts = {t: compile_model(path, tmp_path / f"{t}.qcm", CompileOptions(target=t, bpw=9, overrides=overrides,
                                                                          int8_dot=False)).path
            for t in ("vulkan", "x86")}
    manifest = json.loads((arts["vulkan"] / "manifest.json").read_text())
    assert sorted(t["format"] for t in manifest["tensors"]) == sorted(formats)
    x = np.random.default_rng(1).standard_normal((3, 256)).astype(np.float32)
    (y,) = load(arts["vulkan"]).run(None, {"x": x})
    (y86,) = load(arts["x86"]).run(None, {"x": x})
    ref = _ort(_decoded_model(model, arts["vulkan"]), {"x": x})
    scale = np.abs(ref).max()
    assert np.abs(y - y86).max() <= 1e-5 * scale
    assert np.abs(y - ref).max() <= 1e-5 * scale


@needs_device
def test_quantized_convnet_matches_x86(tmp_path):
    model = convnet_model()
    path = save(model, tmp_path / "conv.onnx")
    arts = {t: compile_model(path, tmp_path / f"{t}.qcm", CompileOptions(target=t, bpw=4.25, int8_dot=False)).path
            for t in ("vulkan", "x86")}
    x = np.random.default_rng(2).standard_normal((2, 16, 20, 20)).astype(np.float32)
    (y,) = load(arts["vulkan"]).run(None, {"x": x})
    (y86,) = load(arts["x86"]).run(None, {"x": x})
    ref = _ort(_decoded_model(model, arts["vulkan"]), {"x": x})
    np.testing.assert_allclose(y, y86, rtol=1e-4, atol=1e-5 * np.abs(y86).max())
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@needs_device
def test_modified_plan_is_refused(tmp_path):
    path = save(mlp_model(), tmp_path / "mlp.onnx")
    art = compile_model(path, tmp_path / "mlp.qcm", CompileOptions(target="vulkan", bpw=16)).path
    bad = tmp_path / "bad.qcm"
    shutil.copytree(art, bad)
    plan = bad / "plan.json"
    plan.write_text(plan.read_text().replace('"grid"', '"grid" ', 1))
    with pytest.raises(ArtifactError, match="plan.json does not match"):
        load(bad)
