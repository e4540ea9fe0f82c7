"""ONNX in, quantized x86 artifact out, run by the runtime, checked against onnxruntime."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
from safetensors.numpy import load_file

import qcompile.runtime as rt
from qcompile.compiler.driver import CompileOptions, compile_model
from tests.helpers import convnet_model, mlp_model, save, with_decoded_weights


def _ort(model, feeds):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


MODELS = {
    "mlp": (mlp_model, lambda rng, b: {"x": rng.standard_normal((b, 256)).astype(np.float32)}),
    "convnet": (convnet_model, lambda rng, b: {"x": rng.standard_normal((b, 16, 20, 20)).astype(np.float32)}),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def built(request, tmp_path_factory):
    """One model compiled at float, 8 and 4.25 bpw on the float kernels (exactly the decoded weights), and
    at 4.25 bpw with the default int8 dot-product kernels (key "4.25 int8")."""
    make, feeds = MODELS[request.param]
    d = tmp_path_factory.mktemp(request.param)
    model = make()
    path = save(model, d / "model.onnx")
    arts = {bpw: compile_model(path, d / f"m{bpw}.qcm", CompileOptions(bpw=bpw, int8_dot=False))
            for bpw in (16.0, 8.0, 4.25)}
    arts["4.25 int8"] = compile_model(path, d / "m4.25i8.qcm", CompileOptions(bpw=4.25))
    return request.param, model, feeds, arts


@pytest.mark.parametrize("batch", [1, 3, 8])
def test_outputs_match_onnxruntime(built, batch):
    name, model, make_feeds, arts = built
    feeds = make_feeds(np.random.default_rng(batch), batch)
    ref = _ort(model, feeds)[0]
    got = {bpw: rt.load(a.path).run(None, feeds)[0] for bpw, a in arts.items() if bpw != "4.25 int8"}
    # float weights: same math as onnxruntime up to float32 summation order
    np.testing.assert_allclose(got[16.0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    for bpw in (8.0, 4.25):
        # the compiled module computes exactly the decoded (stored) weights: compare with ORT on them
        fake = _ort(with_decoded_weights(model, arts[bpw].path), feeds)[0]
        np.testing.assert_allclose(got[bpw], fake, rtol=1e-4, atol=2e-4 * np.abs(fake).max())
    # and the error against the float model is what the formats predict: independent relative weight
    # errors e_l (squared Frobenius, in the manifest) give an output error of about sqrt(sum e_l) for a
    # chain of linear layers; averaging (global pooling) only shrinks it
    for bpw, bound in ((8.0, 0.03), (4.25, 0.25)):
        predicted = np.sqrt(sum(t["rel_error"] for t in arts[bpw].manifest["tensors"]))
        err = _rel(got[bpw], ref)
        assert err < bound, (name, bpw, err)
        assert err < 1.5 * predicted, (name, bpw, err, predicted)
        if name == "mlp":
            assert err > 0.3 * predicted, (name, bpw, err, predicted)
    # (--bpw 8 is a mix of 6- to 8-bit formats: q8g128 alone costs 8.25 bits)
    assert _rel(got[8.0], ref) < _rel(got[4.25], ref) / 2


def test_bpw_is_recomputed_from_stored_bytes(built):
    _, _, _, arts = built
    for bpw in (8.0, 4.25):
        art = arts[bpw]
        manifest = json.loads((art.path / "manifest.json").read_text())
        params = load_file(str(art.path / "params.safetensors"))
        bits = weights = 0
        for t in manifest["tensors"]:
            stored = sum(params[p].nbytes * 8 for p in t["params"])
            assert stored == t["storage_bits"]["total"]
            bits += stored
            weights += int(np.prod(t["onnx_shape"]))
        assert manifest["bpw"]["achieved"] == bits / weights
        assert manifest["bpw"]["achieved"] <= bpw
        assert manifest["bpw"]["target"] == bpw
    assert arts[4.25].manifest["bpw"]["achieved"] >= 4.0  # close to the target from below
    assert arts[16.0].manifest["bpw"]["float_weights"] is True
    assert arts[16.0].manifest["tensors"] == []


def test_runtime_never_loads_the_tvm_compiler(built):
    """A fresh process loads and runs the artifact with the runtime-only TVM library."""
    _, _, make_feeds, arts = built
    feeds = make_feeds(np.random.default_rng(0), 2)
    art = arts[4.25].path
    np.save(art.parent / "in.npy", feeds["x"])
    code = f"""
import numpy as np, qcompile.runtime as r
s = r.load({str(art)!r})
y = s.run(None, {{"x": np.load({str(art.parent / 'in.npy')!r})}})[0]
np.save({str(art.parent / 'out.npy')!r}, y)
maps = open('/proc/self/maps').read()
assert 'libtvm_runtime' in maps, 'runtime library not loaded'
assert 'libtvm_compiler' not in maps, 'compiler library loaded'
"""
    subprocess.run([sys.executable, "-c", code], check=True, env={"PATH": "/usr/bin:/bin"} | _pyenv())
    expect = rt.load(art).run(None, feeds)[0]
    np.testing.assert_array_equal(np.load(art.parent / "out.npy"), expect)


def _pyenv():
    import os

    return {k: v for k, v in os.environ.items() if k not in ("TVM_USE_RUNTIME_LIB",)}


def test_session_metadata(built):
    _, model, _, arts = built
    s = rt.load(arts[4.25].path)
    assert [i.name for i in s.inputs] == [i.name for i in model.graph.input]
    assert [o.name for o in s.outputs] == [o.name for o in model.graph.output]
    assert s.inputs[0].shape[0] == "batch"


def test_recompiled_artifact_at_the_same_path_runs_the_new_code(tmp_path):
    """The dynamic loader caches libraries by path; the runtime must load what the manifest names."""
    model = mlp_model(seed=5)
    path = save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    for spec in ("q3g64", "q4g128"):  # different kernels (two planes, then one) at the same path
        art = compile_model(path, tmp_path / "same.qcm", CompileOptions(bpw=9, overrides=[(".*", spec)],
                                                                         int8_dot=False)).path
        got = rt.load(art).run(None, {"x": x})[0]
        fake = _ort(with_decoded_weights(model, art), {"x": x})[0]
        np.testing.assert_allclose(got, fake, rtol=1e-4, atol=2e-4 * np.abs(fake).max())


def test_int8_dot_kernels_cost_little_next_to_the_weight_quantization(built):
    """The default x86 build quantizes activations to int8 per block of 32 inside its matmuls (AVX2).
    Against onnxruntime on the same decoded weights, that rounding must stay a small fraction of what the
    4.25-bpw weights themselves cost against the float model."""
    name, model, make_feeds, arts = built
    art = arts["4.25 int8"]
    if not art.manifest["kernels"]["int8_dot"]:
        pytest.skip("the host CPU has no AVX2")
    assert art.manifest["kernels"]["quantized_matmuls"].get("int8_dot", 0) >= 1
    assert set(art.manifest["kernels"]["param_layouts"].values()) >= {"dot8"}
    feeds = make_feeds(np.random.default_rng(11), 3)
    ref = _ort(model, feeds)[0]
    fake = _ort(with_decoded_weights(model, art.path), feeds)[0]
    got = rt.load(art.path).run(None, feeds)[0]
    act_err, weight_err = _rel(got, fake), _rel(fake, ref)
    assert act_err < 0.05, (name, act_err)  # measured: ~0.02 through the mlp's three matmuls
    assert act_err < 0.25 * weight_err, (name, act_err, weight_err)


def test_quantized_ir_decodes_to_what_the_module_computes(built):
    """The quantized IR is valid ONNX; decoded to float, onnxruntime reproduces the compiled module."""
    import onnx

    from qcompile.passes.reference import decode_to_float

    _, _, make_feeds, arts = built
    feeds = make_feeds(np.random.default_rng(4), 3)
    art = arts[4.25]
    decoded = decode_to_float(art.quantized_model)
    onnx.checker.check_model(decoded)
    fake = _ort(decoded, feeds)[0]
    got = rt.load(art.path).run(None, feeds)[0]
    np.testing.assert_allclose(got, fake, rtol=1e-4, atol=2e-4 * np.abs(fake).max())


def test_overrides_apply_with_float_weights(tmp_path):
    """--bpw 16 keeps weights float except those an --override names (uniform-format builds)."""
    path = save(mlp_model(seed=6), tmp_path / "m.onnx")
    r = compile_model(path, tmp_path / "u.qcm", CompileOptions(bpw=16, overrides=[("W[12]", "q4g128")]))
    assert {t["name"]: t["format"] for t in r.manifest["tensors"]} == {"W1": "q4g128", "W2": "q4g128"}
    assert r.manifest["bpw"]["achieved"] == 4.25 and r.manifest["bpw"]["float_weights"] is False


def test_keep_float_leaves_matching_weights_unquantized(tmp_path):
    path = save(mlp_model(seed=7), tmp_path / "m.onnx")
    r = compile_model(path, tmp_path / "k.qcm", CompileOptions(bpw=4.25, keep_float=["^W3$"]))
    assert sorted(t["name"] for t in r.manifest["tensors"]) == ["W1", "W2"]
    assert r.manifest["bpw"]["achieved"] <= 4.25
