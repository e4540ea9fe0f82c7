"""Activation-aware scaling (AWQ) folded into the producer: the float model is unchanged, activation
outliers cost less quantization error, ineligible activations are left alone, and the scaled statistics
equal a recalibration of the scaled model."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from qcompile.passes.calibrate import calibrate
from qcompile.passes.formats import PRESETS
from qcompile.passes.outliers import ActivationScalePass, scaled_stats
from qcompile.passes.quantizable import find_quantizable

K = 256

LAYERNORM = f"""
<ir_version: 9, opset_import: ["" : 17]>
ln (float[batch, {K}] x) => (float[batch, 128] q, float[batch, 64] k) {{
    n = LayerNormalization<axis = -1>(x, gamma, beta)
    q = MatMul(n, Wq)
    k = Gemm<transB = 1>(n, Wk, bk)
}}
"""

RMSNORM = f"""
<ir_version: 10, opset_import: ["" : 23]>
rms (float[batch, seq, {K}] x) => (float[batch, seq, 128] q, float[batch, seq, 128] k, int64[3] shape) {{
    n = RMSNormalization<axis = -1>(x, gamma)
    q = MatMul(n, Wq)
    k = MatMul(n, Wk)
    shape = Shape(n)
}}
"""

MUL_GAMMA = f"""
<ir_version: 9, opset_import: ["" : 17]>
rms (float[batch, seq, {K}] x) => (float[batch, seq, 192] gate, float[batch, seq, 192] up) {{
    sq = Mul(x, x)
    ms = ReduceMean<axes = [-1]>(sq)
    e = Add(ms, eps)
    r = Sqrt(e)
    xn = Div(x, r)
    n = {{mul}}
    gate = MatMul(n, Wg)
    up = MatMul(n, Wu)
}}
"""

CHAIN = f"""
<ir_version: 9, opset_import: ["" : 17]>
chain (float[batch, {K}] x) => (float[batch, 128] y) {{
    h1 = MatMul(x, W1)
    a1 = Add(b1, h1)
    h2 = MatMul(a1, W2)
    g = Gemm<transB = {{trans_b}}>(h2, W3, c3)
    y = MatMul(g, W4)
}}
"""


GATED = f"""
<ir_version: 9, opset_import: ["" : 17]>
gated (float[batch, 128] x) => (float[batch, 128] y) {{
    g = MatMul(x, Wg)
    u = MatMul(x, Wu)
    sg = Sigmoid(g)
    act = Mul(g, sg)
    h = Mul(act, u)
    y = MatMul(h, Wd)
}}
"""


def _model(text: str, arrays: dict[str, np.ndarray]) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    for name, a in arrays.items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(a, np.float32), name))
    onnx.checker.check_model(model, full_check=True)
    return model


def _weights(rng, **shapes) -> dict[str, np.ndarray]:
    """Gaussian weights scaled by 1/sqrt(fan-in); 1-D arrays are gammas (~1) or biases (~0.1)."""
    out = {}
    for name, shape in shapes.items():
        if len(shape) == 1:
            base = 1.0 if name.startswith("gamma") else 0.0
            out[name] = base + 0.1 * rng.standard_normal(shape)
        else:
            out[name] = rng.standard_normal(shape) / math.sqrt(max(shape))
    return out


def layernorm_model(seed=0, outliers=1.0) -> onnx.ModelProto:
    """LayerNorm -> (MatMul, Gemm transB=1); ``outliers``: 4 channels of gamma that much larger."""
    rng = np.random.default_rng(seed)
    w = _weights(rng, gamma=(K,), beta=(K,), Wq=(K, 128), Wk=(64, K), bk=(64,))
    w["gamma"][rng.choice(K, 4, replace=False)] *= outliers
    return _model(LAYERNORM, w)


def rmsnorm_model(seed=1) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    return _model(RMSNORM, _weights(rng, gamma=(K,), Wq=(K, 128), Wk=(K, 128)))


def mul_gamma_model(mul: str, seed=2) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    return _model(MUL_GAMMA.replace("{mul}", mul),
                  {**_weights(rng, gamma=(K,), Wg=(K, 192), Wu=(K, 192)), "eps": np.float32(1e-6)})


def chain_model(trans_b: int, seed=3) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    return _model(CHAIN.replace("{trans_b}", str(trans_b)),
                  _weights(rng, W1=(K, K), b1=(K,), W2=(K, K), W3=(K, K), c3=(K,), W4=(K, 128)))


def gated_model(seed=4) -> onnx.ModelProto:
    """SwiGLU MLP: down(silu(gate(x)) * up(x)) with K = 256 for down."""
    rng = np.random.default_rng(seed)
    return _model(GATED, _weights(rng, Wg=(128, K), Wu=(128, K), Wd=(K, 128)))


def _feeds(proto: onnx.ModelProto, n: int, seed: int) -> list[dict[str, np.ndarray]]:
    """``n`` samples of standard normal inputs: [96, C] for rank-2 inputs, [3, 64, C] for rank 3."""
    rng = np.random.default_rng(seed)
    shapes = {}
    for i in proto.graph.input:
        dims = i.type.tensor_type.shape.dim
        shapes[i.name] = (96, dims[-1].dim_value) if len(dims) == 2 else (3, 64, dims[-1].dim_value)
    return [{name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
            for _ in range(n)]


def _run(proto: onnx.ModelProto, feeds) -> list[list[np.ndarray]]:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return [sess.run(None, f) for f in feeds]


def _max_rel_diff(a, b) -> float:
    return max(float(np.abs(x - y).max() / np.abs(y).max()) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def _rel_sq_error(a, b) -> float:
    """Σ ||a - b||² / Σ ||b||² over all outputs of all samples."""
    num = sum(float(((x - y) ** 2).sum()) for xs, ys in zip(a, b) for x, y in zip(xs, ys))
    return num / sum(float((y**2).sum()) for ys in b for y in ys)


def _initializers(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: v.const_value.numpy().copy() for name, v in model.graph.initializers.items()}


def _random_scales(names, seed) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: np.exp(rng.uniform(-1.5, 1.5, K)) for name in names}  # factors in [0.22, 4.5]


# -- 1. the float model computes the same function ------------------------------------------------


CASES = {
    "LayerNormalization": (layernorm_model, {"n": "LayerNormalization"}),
    "RMSNormalization": (rmsnorm_model, {"n": "RMSNormalization"}),
    "Mul(xn, gamma)": (lambda: mul_gamma_model("Mul(xn, gamma)"), {"n": "Mul"}),
    "Mul(gamma, xn)": (lambda: mul_gamma_model("Mul(gamma, xn)"), {"n": "Mul"}),
    "gated MLP": (gated_model, {"h": "Mul(MatMul)"}),
    "chain Gemm transB=0": (lambda: chain_model(0), {"a1": "Add(MatMul)", "h2": "MatMul", "g": "Gemm"}),
    "chain Gemm transB=1": (lambda: chain_model(1), {"a1": "Add(MatMul)", "h2": "MatMul", "g": "Gemm"}),
}


@pytest.mark.parametrize("case", CASES)
def test_forced_scales_keep_the_float_model(case):
    build, producers = CASES[case]
    proto = build()
    model = ir.from_proto(proto)
    targets = find_quantizable(model, min_weights=0)
    before = _initializers(model)
    scales = _random_scales(producers, seed=7)

    p = ActivationScalePass(targets, None, scales=scales)
    result = p(model)

    assert result.modified
    assert set(p.scales) == set(producers)
    assert {a: r.producer for a, r in p.report.items()} == producers
    for name, s in scales.items():
        np.testing.assert_array_equal(p.scales[name], s)
    after = _initializers(model)
    for act, r in p.report.items():  # a consumer's [N, K] view becomes W diag(s)
        for name in r.consumers:
            t = next(t for t in targets if t.name == name)
            if model.graph.initializers[name].uses()[0].node.outputs[0].name in producers:
                continue  # also a producer (chain): its output channels were divided too
            np.testing.assert_allclose(t.matrix(after[name]), t.matrix(before[name]) * scales[act], rtol=1e-6)
    scaled = ir.to_proto(model)
    onnx.checker.check_model(scaled, full_check=True)
    feeds = _feeds(proto, 2, seed=11)
    assert _max_rel_diff(_run(scaled, feeds), _run(proto, feeds)) < 1e-5


# -- 2. activation outliers: the search picks α > 0 and the quantized model gets better ------------

# Measured on layernorm_model(seed 0-3, outliers=50): α = 0.3 every time; onnxruntime output error of the
# fake-quantized model after/before scaling 0.35-0.43 (q3g128) and 0.41-0.45 (q4g128), equal to the
# searched H-weighted error to 3 digits (all rows are searched here). With GPTQ instead of RTN (3 consumers
# [256, 256]): 0.37-0.43. Without outliers: α = 0 (6 of 8 cases) or a gain of 1.1-1.3 %.
MAX_RATIO = 0.6


def _fake_quantized(model: ir.Model, targets, stats, fmt) -> onnx.ModelProto:
    """The model with every target replaced by its dequantized RTN weight (imatrix-weighted clip search)."""
    proto = ir.to_proto(model)
    for init in proto.graph.initializer:
        t = next((t for t in targets if t.name == init.name), None)
        if t is None:
            continue
        w = t.matrix(numpy_helper.to_array(init))
        wq = fmt.quantize(w, importance=stats.tensors[t.name].sq).dequantize()
        init.CopyFrom(numpy_helper.from_array(wq.T if t.transpose else wq, init.name))
    return proto


@pytest.mark.parametrize("fmt", ["q3g128", "q4g128"])
def test_outlier_channels_are_scaled_and_quantize_better(fmt):
    fmt = PRESETS[fmt]
    proto = layernorm_model(seed=0, outliers=50.0)
    feeds = _feeds(proto, 4, seed=5)
    model = ir.from_proto(proto)
    targets = find_quantizable(model, min_weights=0)
    stats = calibrate(proto, targets, feeds)

    p = ActivationScalePass(targets, stats, fmt)
    assert p(model).modified
    (rep,) = p.report.values()
    assert rep.activation == "n" and set(rep.consumers) == {"Wq", "Wk"}
    assert rep.alpha > 0
    assert rep.error_after <= MAX_RATIO * rep.error_before

    ref = _run(proto, feeds)
    scaled = ir.to_proto(model)
    assert _max_rel_diff(_run(scaled, feeds), ref) < 1e-5
    plain = _rel_sq_error(_run(_fake_quantized(ir.from_proto(proto), targets, stats, fmt), feeds), ref)
    awq = _rel_sq_error(_run(_fake_quantized(model, targets, scaled_stats(stats, p.scales), fmt), feeds), ref)
    assert awq <= MAX_RATIO * plain


def test_plan_formats_and_nothing_to_gain():
    """Without outliers nothing is rewritten; a consumer absent from the plan stays float and adds no error."""
    proto = layernorm_model(seed=0)
    feeds = _feeds(proto, 2, seed=5)
    model = ir.from_proto(proto)
    targets = find_quantizable(model, min_weights=0)
    stats = calibrate(proto, targets, feeds)
    before = ir.to_proto(model).SerializeToString()
    p = ActivationScalePass(targets, stats, {"Wq": PRESETS["q4g128"]})
    assert not p(model).modified
    assert p.report["n"].alpha == 0.0 and p.report["n"].error_after == p.report["n"].error_before
    assert ir.to_proto(model).SerializeToString() == before


# -- 3. what cannot absorb a scale is left alone --------------------------------------------------

SKIPPED = {
    "other consumer": (f"""
<ir_version: 9, opset_import: ["" : 17]>
m (float[batch, {K}] x) => (float[batch, 128] q, float[batch, {K}] r) {{
    n = LayerNormalization(x, gamma, beta)
    q = MatMul(n, Wq)
    r = Relu(n)
}}""", "n", "also consumed by Relu"),
    "shared gamma": (f"""
<ir_version: 9, opset_import: ["" : 17]>
m (float[batch, {K}] x, float[batch, {K}] z) => (float[batch, 128] q, float[batch, {K}] zg) {{
    n = Mul(x, gamma)
    q = MatMul(n, Wq)
    zg = Mul(z, gamma)
}}""", "n", "gamma has 2 uses"),
    "activation function between": (f"""
<ir_version: 9, opset_import: ["" : 17]>
m (float[batch, {K}] x) => (float[batch, 128] q) {{
    h = MatMul(x, W1)
    r = Relu(h)
    q = MatMul(r, Wq)
}}""", "r", "producer Relu"),
    "graph input": (f"""
<ir_version: 9, opset_import: ["" : 17]>
m (float[batch, {K}] x) => (float[batch, 128] q) {{
    q = MatMul(x, Wq)
}}""", "x", "graph input"),
    "graph output": (f"""
<ir_version: 9, opset_import: ["" : 17]>
m (float[batch, {K}] x) => (float[batch, 128] q, float[batch, {K}] n) {{
    n = LayerNormalization(x, gamma, beta)
    q = MatMul(n, Wq)
}}""", "n", "graph output"),
    "bias output used twice": (f"""
<ir_version: 9, opset_import: ["" : 17]>
m (float[batch, {K}] x) => (float[batch, 128] q, float[batch, {K}] h) {{
    h = MatMul(x, W1)
    a = Add(h, b1)
    q = MatMul(a, Wq)
}}""", "a", "used elsewhere"),
}


@pytest.mark.parametrize("case", SKIPPED)
def test_ineligible_activations_are_left_alone(case):
    text, activation, reason = SKIPPED[case]
    rng = np.random.default_rng(4)
    w = _weights(rng, gamma=(K,), beta=(K,), Wq=(K, 128), W1=(K, K), b1=(K,))
    w["gamma"][:4] *= 50.0  # outliers: the search would scale if it could
    names = {i for n in onnx.parser.parse_model(text).graph.node for i in n.input}
    proto = _model(text, {k: v for k, v in w.items() if k in names})
    model = ir.from_proto(proto)
    targets = find_quantizable(model, min_weights=0)
    before = ir.to_proto(model).SerializeToString()

    forced = ActivationScalePass(targets, None, scales=_random_scales([activation], seed=1))
    assert not forced(model).modified
    assert reason in forced.skipped[activation] and not forced.scales

    stats = calibrate(proto, targets, _feeds(proto, 2, seed=3))
    searched = ActivationScalePass(targets, stats, PRESETS["q3g128"])
    assert not searched(model).modified
    assert reason in searched.skipped[activation] and not searched.scales
    assert ir.to_proto(model).SerializeToString() == before


# -- 4. scaled statistics = recalibrating the scaled model ----------------------------------------


@pytest.mark.parametrize("build", [layernorm_model, lambda: chain_model(1)], ids=["shared", "chain"])
def test_scaled_stats_match_recalibration(build):
    proto = build()
    feeds = _feeds(proto, 2, seed=9)
    model = ir.from_proto(proto)
    targets = find_quantizable(model, min_weights=0)
    stats = calibrate(proto, targets, feeds)
    copies = {n: (t.H.copy(), t.sq.copy(), t.absmean.copy()) for n, t in stats.tensors.items()}
    acts = {t.activation for t in stats.tensors.values()} - {"x"}
    p = ActivationScalePass(targets, stats, scales=_random_scales(acts, seed=2))
    p(model)
    assert set(p.scales) == acts

    new = scaled_stats(stats, p.scales)
    again = calibrate(ir.to_proto(model), targets, feeds)
    for name, ts in new.tensors.items():
        re = again.tensors[name]
        np.testing.assert_allclose(ts.H, re.H, rtol=1e-4, atol=1e-6 * np.abs(re.H).max())
        np.testing.assert_allclose(ts.sq, re.sq, rtol=1e-4)
        np.testing.assert_allclose(ts.absmean, re.absmean, rtol=1e-4)
        assert not (ts.H.flags.writeable or ts.sq.flags.writeable or ts.absmean.flags.writeable)
        if ts.activation not in p.scales:
            assert ts is stats.tensors[name]  # untouched entries are shared, not copied
    for name, (h, sq, am) in copies.items():  # the read-only originals are not modified
        old = stats.tensors[name]
        assert np.array_equal(old.H, h) and np.array_equal(old.sq, sq) and np.array_equal(old.absmean, am)
    if "Wk" in new.tensors:  # q and k read one activation: their new arrays are shared too
        assert new.tensors["Wq"].H is new.tensors["Wk"].H
