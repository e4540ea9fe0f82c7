"""Split formats (salient input channels at more bits): bit accounting, GPTQ over the parts against a
textbook loop, the graph rewrite against numpy, the x86 build against onnxruntime, and the switch."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import qcompile.runtime as rt
from qcompile.compiler.driver import CompileOptions, compile_model, quantize_model
from qcompile.passes.formats import PRESETS
from qcompile.passes.gptq import gptq_quantize, gptq_quantize_parts, h_error
from qcompile.passes.reference import decode_to_float
from qcompile.passes.salient import SplitFormat, format_by_name, salient_order, split_formats_for
from qcompile.runtime.errors import QCompileError

SPLIT = SplitFormat(PRESETS["q3g32"], PRESETS["q5g32"], 8)

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
two (float[batch, 256] x) => (float[batch, 96] y) {
    h = MatMul(x, W1)
    r = Relu(h)
    y = Gemm<transB = 1>(r, W2, b2)
}
"""


def _outlier_inputs(rng, rows: int, k: int, loud: int = 12) -> np.ndarray:
    x = rng.standard_normal((rows, k))
    x[:, rng.choice(k, loud, replace=False)] *= 20.0  # a few channels carry most of the energy
    return x


def _layer(seed: int, n: int, k: int, rows: int, loud: int) -> tuple[np.ndarray, np.ndarray]:
    """A random weight [N, K] and the Gram matrix H of inputs with ``loud`` outlier channels."""
    rng = np.random.default_rng(seed)
    x = _outlier_inputs(rng, rows, k, loud=loud)
    return rng.standard_normal((n, k)).astype(np.float32), x.T @ x


def test_names_storage_and_fit():
    assert SPLIT.name == "q3g32+q5g32/8" and format_by_name(SPLIT.name) == SPLIT
    assert format_by_name("q4g64") is PRESETS["q4g64"]
    with pytest.raises(ValueError, match="unknown format"):
        format_by_name("q3g64+q9g64/8")
    n, k = 48, 256
    assert SPLIT.k_hi(k) == 32
    bits = SPLIT.storage_bits((n, k))
    assert bits.codes == n * 32 * 5 + n * 224 * 3
    assert bits.scales == bits.zeros == n * (256 // 32) * 16
    assert bits.index == k * 16
    assert bits.total == bits.codes + bits.scales + bits.zeros + bits.index
    assert SplitFormat(PRESETS["q3g128"], PRESETS["q5g128"], 8).k_hi(384) == 128  # at least one group
    assert not SplitFormat(PRESETS["q3g128"], PRESETS["q5g128"], 8).supports((8, 128))  # nothing left for lo
    names = {f.name for f in split_formats_for((64, 576))}
    assert "q3g64+q5g64/8" in names and "q5g64+q8g64/8" in names and not any(n.startswith("q6") for n in names)
    assert not split_formats_for((64, 128 + 32)) or all(f.supports((64, 160)) for f in split_formats_for((64, 160)))


def test_rtn_split_weight_dequantizes_into_the_permuted_columns():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 256)).astype(np.float32)
    imp = rng.random(256)
    q = SPLIT.quantize(w, importance=imp)
    perm = np.argsort(-imp, kind="stable")
    np.testing.assert_array_equal(q.perm, perm)
    kh = SPLIT.k_hi(256)
    expect = np.empty_like(w)
    expect[:, perm[:kh]] = SPLIT.hi.quantize(w[:, perm[:kh]], importance=imp[perm[:kh]]).dequantize()
    expect[:, perm[kh:]] = SPLIT.lo.quantize(w[:, perm[kh:]], importance=imp[perm[kh:]]).dequantize()
    np.testing.assert_array_equal(q.dequantize(), expect)
    assert q.index_hi.dtype == np.int16 and len(q.index_hi) + len(q.index_lo) == 256


def test_gptq_parts_match_a_textbook_loop_with_per_column_formats():
    n, k = 12, 128
    w, H = _layer(1, n, k, rows=400, loud=6)
    parts = [(PRESETS["q5g32"], 32), (PRESETS["q3g32"], 96)]
    got = gptq_quantize_parts(w, H, parts, act_order=False, block_size=16)

    damp = 0.01
    statics = [f.quantize(w[:, a:a + c], importance=np.diag(H)[a:a + c]) for (f, c), a in zip(parts, (0, 32))]
    s = np.concatenate([np.repeat(q.scales.astype(np.float32), q.format.group_size, 1) for q in statics], 1)
    z = np.concatenate([np.repeat(q.zeros.astype(np.float32), q.format.group_size, 1) for q in statics], 1)
    top = np.array([31] * 32 + [7] * 96, dtype=np.float32)
    u = np.linalg.cholesky(np.linalg.inv(H + damp * np.mean(np.diag(H)) * np.eye(k))).T
    v = w.astype(np.float64)
    codes = np.zeros((n, k), np.uint8)
    for j in range(k):
        c = np.clip(np.rint((v[:, j].astype(np.float32) - z[:, j]) / s[:, j]), 0, top[j])
        codes[:, j] = c
        v[:, j + 1:] -= np.outer((v[:, j] - (c * s[:, j] + z[:, j])) / u[j, j], u[j, j + 1:])
    mismatch = np.mean(np.concatenate([got[0].codes, got[1].codes], 1) != codes)
    assert mismatch < 0.01, mismatch  # float64 vs float32 ties only
    # one part is exactly gptq_quantize
    one = gptq_quantize_parts(w, H, [(PRESETS["q4g32"], k)])[0]
    np.testing.assert_array_equal(one.codes, gptq_quantize(w, H, PRESETS["q4g32"]).codes)


def test_salient_channels_at_more_bits_cut_the_output_error():
    n, k = 512, 512
    w, H = _layer(2, n, k, rows=2048, loud=24)
    perm = salient_order(np.diag(H))
    split = SplitFormat(PRESETS["q3g64"], PRESETS["q5g64"], 8)
    kh = split.k_hi(k)
    hi, lo = gptq_quantize_parts(w[:, perm], H[np.ix_(perm, perm)], [(split.hi, kh), (split.lo, k - kh)])
    deq = np.empty_like(w)
    deq[:, perm[:kh]], deq[:, perm[kh:]] = hi.dequantize(), lo.dequantize()
    e_split = h_error(w, deq, H)
    e_lo = h_error(w, gptq_quantize(w, H, PRESETS["q3g64"]).dequantize(), H)
    e_q4 = h_error(w, gptq_quantize(w, H, PRESETS["q4g64"]).dequantize(), H)
    bpw_split = split.storage_bits((n, k)).total / (n * k)
    # 3.78 bpw: most of the way from q3g64 (3.5) to q4g64 (4.5) in error, at well under its cost
    assert bpw_split < 3.8 and e_split < 0.5 * e_lo and e_split < 1.5 * e_q4, (bpw_split, e_split, e_lo, e_q4)


def _model(tmp_path, seed=3):
    rng = np.random.default_rng(seed)
    model = onnx.parser.parse_model(MODEL)
    for name, shape in {"W1": (256, 128), "W2": (96, 128), "b2": (96,)}.items():
        model.graph.initializer.append(numpy_helper.from_array(
            (rng.standard_normal(shape) / np.sqrt(shape[-1])).astype(np.float32), name))
    onnx.checker.check_model(model)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=_outlier_inputs(rng, 64, 256).astype(np.float32))
    return model, path, calib


def test_forced_split_formats_compile_to_x86_and_match_onnxruntime(tmp_path):
    model, path, calib = _model(tmp_path)
    opts = CompileOptions(bpw=4.0, min_weights=0, calib=str(calib), calib_samples=8,
                          overrides=[("^W1$", "q3g32+q5g32/8"), ("^W2$", "q2g64+q4g64/8")],
                          workdir=tmp_path / "work", int8_dot=False)  # float kernels: exact decoded weights
    res = compile_model(path, tmp_path / "m.qcm", opts)
    fmts = {t["name"]: t["format"] for t in res.manifest["tensors"]}
    assert fmts == {"W1": "q3g32+q5g32/8", "W2": "q2g64+q4g64/8"}
    w1 = next(t for t in res.manifest["tensors"] if t["name"] == "W1")
    assert w1["storage_bits"]["index"] == 256 * 16
    assert w1["storage_bits"]["total"] == format_by_name("q3g32+q5g32/8").storage_bits((128, 256)).total
    ops = [n.op_type for n in res.quantized_model.graph.node]
    assert ops.count("QMatMul") == 4 and ops.count("Gather") == 4
    x = np.random.default_rng(4).standard_normal((5, 256)).astype(np.float32)
    ref = ort.InferenceSession(decode_to_float(res.quantized_model).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = rt.load(res.path).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # the decoded reference is the numpy product with the dequantized split weights
    q = quantize_model(path, opts)
    assert {r.name: r.format.name for r in q.records} == fmts
    with pytest.raises(QCompileError, match="does not fit"):
        quantize_model(path, CompileOptions(bpw=4.0, min_weights=0, overrides=[("^W2$", "q3g128+q5g128/8")]))


def test_split_formats_are_measured_with_calibration_and_switch_off(tmp_path):
    _, path, calib = _model(tmp_path, seed=5)
    base = dict(bpw=3.75, min_weights=0, calib=str(calib), calib_samples=8, workdir=tmp_path / "work")
    on = quantize_model(path, CompileOptions(**base))
    names = {c["format"] for cands in on.candidates.values() for c in cands}
    assert any("+" in n for n in names)
    off = quantize_model(path, CompileOptions(**base, salient=False))
    assert not any("+" in c["format"] for cands in off.candidates.values() for c in cands)
    assert not any("+" in r.format.name for r in off.records)
