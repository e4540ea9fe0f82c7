"""Whole-model sensitivity: divergences against numpy, probes against independent onnxruntime runs,
and the allocation following the output (not the layer) error."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import numpy_helper

from qcompile.compiler.driver import CompileOptions, quantize_model
from qcompile.passes.calibrate import calibrate
from qcompile.passes.gptq import h_error
from qcompile.passes.quantizable import find_quantizable
from qcompile.passes.sensitivity import measure_sensitivity, output_divergence, probe_format

TWO_BRANCH = """
<ir_version: 8, opset_import: ["" : 17]>
two (float[batch, 128] x) => (float[batch, 128] y) {
    a = MatMul(x, Wquiet)
    b = MatMul(x, Wloud)
    c = Constant<value = float {0.05}>()
    aq = Mul(a, c)
    y = Add(aq, b)
}
"""

DEEP = """
<ir_version: 8, opset_import: ["" : 17]>
deep (float[batch, 128] x) => (float[batch, 1024] logits) {
    h = MatMul(x, W1)
    r = Relu(h)
    logits = MatMul(r, W2)
}
"""


def _build(text: str, shapes: dict[str, tuple], seed: int = 0) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        w = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
        model.graph.initializer.append(numpy_helper.from_array(w, name))
    onnx.checker.check_model(model)
    return model


def _feeds(n: int, rows: int = 32, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((rows, 128)).astype(np.float32)} for _ in range(n)]


def _run(model: onnx.ModelProto, feed) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feed)


def test_divergence_is_kl_for_logits_and_relative_squared_error_otherwise():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2, 3, 1000)).astype(np.float32) * 3
    z2 = z + 0.1 * rng.standard_normal(z.shape).astype(np.float32)
    p = np.exp(z - z.max(-1, keepdims=True)).astype(np.float64)
    p /= p.sum(-1, keepdims=True)
    q = np.exp(z2 - z2.max(-1, keepdims=True)).astype(np.float64)
    q /= q.sum(-1, keepdims=True)
    kl = np.mean(np.sum(p * (np.log(p) - np.log(q)), -1))
    assert np.isclose(output_divergence([z], [z2]), kl, rtol=1e-6)
    assert abs(output_divergence([z], [z])) < 1e-12
    # logits win over other outputs (the KV cache of an LM does not count)
    assert np.isclose(output_divergence([z, z[..., :16]], [z2, z[..., :16] + 5]), kl, rtol=1e-6)

    y = rng.standard_normal((4, 16)).astype(np.float32)
    y2 = y + 0.01 * rng.standard_normal(y.shape).astype(np.float32)
    expect = np.sum((y2.astype(np.float64) - y) ** 2) / np.sum(y.astype(np.float64) ** 2)
    assert np.isclose(output_divergence([y], [y2]), expect, rtol=1e-6)


def test_probes_match_independent_onnxruntime_runs_of_the_perturbed_model():
    model = _build(DEEP, {"W1": (128, 256), "W2": (256, 1024)})
    targets = find_quantizable(ir.from_proto(model), min_weights=0)
    feeds = _feeds(3)
    stats = calibrate(model, targets, feeds)
    got = measure_sensitivity(model, targets, stats, feeds)
    assert set(got) == {"W1", "W2"}
    ref = [_run(model, f) for f in feeds]
    for t in targets:
        init = next(i for i in model.graph.initializer if i.name == t.name)
        w = t.matrix(numpy_helper.to_array(init))
        fmt = probe_format(t.shape)
        q = fmt.quantize(w, importance=stats.tensors[t.name].sq).dequantize()
        perturbed = onnx.ModelProto.FromString(model.SerializeToString())
        for i in perturbed.graph.initializer:
            if i.name == t.name:
                i.CopyFrom(numpy_helper.from_array(t.onnx_array(q), t.name))
        outs = [_run(perturbed, f) for f in feeds]
        kls = []
        for r, o in zip(ref, outs):  # logits [rows, 1024]: KL averaged over rows
            lp = r[0].astype(np.float64) - np.log(np.exp(r[0].astype(np.float64)).sum(-1, keepdims=True))
            lq = o[0].astype(np.float64) - np.log(np.exp(o[0].astype(np.float64)).sum(-1, keepdims=True))
            kls.append(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))
        s = got[t.name]
        assert s.probe == fmt.name
        assert np.isclose(s.divergence, np.mean(kls), rtol=1e-4, atol=1e-9)
        assert np.isclose(s.layer_error, h_error(w, q, stats.tensors[t.name].H), rtol=1e-9)
        assert s.divergence > 0 and np.isclose(s.sensitivity, s.divergence / s.layer_error)


def test_a_damped_branch_is_measured_less_sensitive_and_gets_fewer_bits(tmp_path):
    model = _build(TWO_BRANCH, {"Wquiet": (128, 256), "Wloud": (128, 256)})
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 256
    onnx.checker.check_model(model)
    targets = find_quantizable(ir.from_proto(model), min_weights=0)
    feeds = _feeds(2)
    stats = calibrate(model, targets, feeds)
    sens = measure_sensitivity(model, targets, stats, feeds)
    # the quiet branch reaches the output scaled by 0.05: its errors count 0.05² as much
    ratio = sens["Wquiet"].sensitivity / sens["Wloud"].sensitivity
    assert 0.5 * 0.05**2 < ratio < 2 * 0.05**2, ratio

    path = tmp_path / "two.onnx"
    onnx.save(model, path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.concatenate([f["x"] for f in _feeds(8)]))

    def bits(**kw):
        q = quantize_model(path, CompileOptions(bpw=4.25, min_weights=0, calib=str(calib), calib_samples=8,
                                                awq=False, workdir=tmp_path / "work", **kw))
        return {r.name: r.format.bits for r in q.records}, q

    weighted, q = bits()
    assert weighted["Wloud"] > weighted["Wquiet"], weighted
    assert set(q.sensitivity) == {"Wquiet", "Wloud"} and "sensitivity" in q.error_measure
    flat, q = bits(sensitivity=False)
    assert not q.sensitivity
    assert abs(flat["Wloud"] - flat["Wquiet"]) < weighted["Wloud"] - weighted["Wquiet"], (flat, weighted)
