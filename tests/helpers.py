"""Shared test helpers: small models written with onnx.parser, and a numpy decoding of artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from qcompile.passes.formats import PRESETS
from qcompile.targets.x86.kernels import tile_for
from qcompile.targets.x86.kernels_int8 import codes_from_dot

MLP_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[batch, 256] x) => (float[batch, 128] y) {
    h = MatMul(x, W1)
    h1 = Add(h, b1)
    h2 = Relu(h1)
    h3 = MatMul(h2, W2)
    y = Gemm<transB = 1>(h3, W3, b3)
}
"""

CONVNET_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
convnet (float[batch, 16, 20, 20] x) => (float[batch, 10] y) {
    c1 = Conv<kernel_shape = [3, 3], pads = [1, 1, 1, 1]>(x, K1, B1)
    r1 = Relu(c1)
    c2 = Conv<kernel_shape = [3, 3], strides = [2, 2], pads = [1, 0, 1, 0]>(r1, K2)
    r2 = Relu(c2)
    c3 = Conv<kernel_shape = [1, 1]>(r2, K3, B3)
    r3 = Relu(c3)
    p = GlobalAveragePool(r3)
    f = Flatten(p)
    y = Gemm<transB = 1>(f, F, FB)
}
"""


def _with_weights(text: str, shapes: dict[str, tuple], seed: int) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) == 4 else shape[0]
        a = (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(a, name))
    onnx.checker.check_model(model)
    return model


def mlp_model(seed: int = 0) -> onnx.ModelProto:
    return _with_weights(MLP_TEXT, {"W1": (256, 512), "b1": (512,), "W2": (512, 384),
                                    "W3": (128, 384), "b3": (128,)}, seed)


def convnet_model(seed: int = 0) -> onnx.ModelProto:
    return _with_weights(CONVNET_TEXT, {"K1": (64, 16, 3, 3), "B1": (64,), "K2": (64, 64, 3, 3),
                                        "K3": (96, 64, 1, 1), "B3": (96,), "F": (10, 96), "FB": (10,)}, seed)


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def decoded_weights(artifact: Path) -> dict[str, np.ndarray]:
    """Decode every quantized tensor of an artifact from its stored bytes (numpy reference).

    Returns name -> dequantized [N, K] float32, using the manifest (formats, and each packed param's
    kernel layout) and params.safetensors only.
    """
    from safetensors.numpy import load_file

    manifest = json.loads((artifact / "manifest.json").read_text())
    params = load_file(str(artifact / "params.safetensors"))
    layouts = manifest["kernels"]["param_layouts"]
    out = {}
    for t in manifest["tensors"]:
        fmt = PRESETS[t["format"]]
        n, k = t["shape"]
        names = t["params"]
        plane_names = [p for p in names if ".q" in p.rsplit("/", 1)[-1]]
        layout = layouts[plane_names[0]]
        untile = lambda a: a.transpose(0, 2, 1).reshape(n, -1)  # noqa: E731  (groups: tiled in both)
        scales = untile(params[f"{t['name']}.scales"])
        zeros = untile(params[f"{t['name']}.zeros"])
        if layout == "dot8":
            codes = codes_from_dot([params[p] for p in plane_names], fmt.planes, n, k)
        else:
            assert layout == f"tiled{tile_for(n)}" and params[plane_names[0]].shape[2] == tile_for(n), layout
            codes = fmt.unpack([untile(params[p]) for p in plane_names], (n, k))
        out[t["name"]] = (codes.astype(np.float32) * np.repeat(scales.astype(np.float32), fmt.group_size, 1)
                          + np.repeat(zeros.astype(np.float32), fmt.group_size, 1))
    return out


def with_decoded_weights(model: onnx.ModelProto, artifact: Path) -> onnx.ModelProto:
    """The float model with each quantized weight replaced by its decoded value (a fake-quant model)."""
    decoded = decoded_weights(artifact)
    manifest = json.loads((artifact / "manifest.json").read_text())
    shapes = {t["name"]: (t["onnx_layout"], t["onnx_shape"]) for t in manifest["tensors"]}
    new = onnx.ModelProto.FromString(model.SerializeToString())
    for init in new.graph.initializer:
        if init.name in decoded:
            layout, shape = shapes[init.name]
            w = decoded[init.name]
            arr = {"conv": lambda: w.reshape(shape), "NK": lambda: w, "KN": lambda: w.T}[layout]()
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), init.name))
    return new


def vulkan_available() -> bool:
    """Whether wgpu finds a Vulkan device (Mesa lavapipe in CI)."""
    try:
        from qcompile.runtime.vulkan import request_device  # noqa: PLC0415

        request_device()
        return True
    except Exception:  # noqa: BLE001  (no wgpu, no driver)
        return False


NO_VULKAN = "no Vulkan device (apt-get install mesa-vulkan-drivers)"
