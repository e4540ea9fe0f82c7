"""Calibration: H = Σ xᵀx, mean x² and mean |x| of every quantizable weight's input, against numpy;
the stats file; and calibration samples from .npz / .npy / .txt / random."""

from __future__ import annotations

import logging
import os
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from qcompile.compiler.calibdata import CalibrationDataError, load_samples
from qcompile.passes.calibrate import (
    CalibrationError,
    CalibrationStats,
    calibrate,
    im2col,
    model_hash,
)
from qcompile.passes.quantizable import QuantTarget, find_quantizable
from qcompile.runtime.errors import QCompileError

MLP = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[batch, 64] x) => (float[batch, 48] y) {
    h = MatMul(x, W1)
    h1 = Add(h, b1)
    h2 = Relu(h1)
    y = Gemm<transB = 1>(h2, W2, b2)
}
"""

CONVNET = """
<ir_version: 8, opset_import: ["" : 17]>
convnet (float[batch, 8, 11, 9] x) => (float[batch, 24, 6, 5] y) {
    c1 = Conv<kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]>(x, K1, B1)
    r1 = Relu(c1)
    y = Conv<kernel_shape = [1, 1]>(r1, K2)
}
"""

SHARED = """
<ir_version: 8, opset_import: ["" : 17]>
shared (float[batch, 3, 32] x) => (float[batch, 3, 16] y, float[batch, 3, 32] n) {
    n = Tanh(x)
    q = MatMul(n, Wq)
    k = MatMul(n, Wk)
    y = Add(q, k)
}
"""

DILATED = """
<ir_version: 8, opset_import: ["" : 17]>
dilated (float[2, 4, 13, 12] x) => (float[2, 6, 5, 4] y) {
    y = Conv<kernel_shape = [3, 2], strides = [2, 3], pads = [0, 2, 1, 0], dilations = [2, 3]>(x, K)
}
"""

TEXT_LM = """
<ir_version: 8, opset_import: ["" : 17]>
lm (int64[batch, seq] input_ids, int64[batch, seq] attention_mask, int64[batch, seq] token_type_ids)
    => (float[batch, seq, 16] y) {
    e = Gather(E, input_ids)
    t = Gather(T, token_type_ids)
    m = Cast<to = 1>(attention_mask)
    axes = Constant<value = int64[1] {2}>()
    m3 = Unsqueeze(m, axes)
    h = Add(e, t)
    hm = Mul(h, m3)
    y = MatMul(hm, W)
}
"""


def build(text: str, shapes: dict[str, tuple], seed: int = 0) -> onnx.ModelProto:
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(seed)
    for name, shape in shapes.items():
        model.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    onnx.checker.check_model(model)
    return model


def mlp():
    return build(MLP, {"W1": (64, 96), "b1": (96,), "W2": (48, 96), "b2": (48,)})


def convnet():
    return build(CONVNET, {"K1": (16, 8, 3, 3), "B1": (16,), "K2": (24, 16, 1, 1)})


def targets_of(model: onnx.ModelProto) -> list[QuantTarget]:
    return find_quantizable(ir.from_proto(model), min_weights=0)


def conv_target(name: str, shape: tuple) -> QuantTarget:
    return QuantTarget(name, "Conv", "Conv", shape, False)


def samples(rng, shape, n):
    return [{"x": rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def with_outputs(model: onnx.ModelProto, names: list[str], feeds: list[dict]) -> list[dict[str, np.ndarray]]:
    """Intermediate values of ``model`` by onnxruntime, independently of calibrate's own session."""
    m = onnx.ModelProto.FromString(model.SerializeToString())
    m.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return [dict(zip(names, sess.run(names, f))) for f in feeds]


def reference(rows: list[np.ndarray]):
    x = np.concatenate([r.astype(np.float64) for r in rows])
    return x.T @ x, (x * x).mean(0), np.abs(x).mean(0), len(x)


def assert_stats(ts, rows, rtol=1e-5):
    h, sq, am, n = reference(rows)
    assert ts.rows == n
    assert ts.H.shape == (ts.k, ts.k) and ts.H.dtype == np.float64
    np.testing.assert_allclose(ts.H, h, rtol=rtol, atol=rtol * np.abs(h).max())
    np.testing.assert_allclose(ts.sq, sq, rtol=rtol)
    np.testing.assert_allclose(ts.absmean, am, rtol=rtol)


def im2col_loop(x, kernel, strides, pads, dilations):
    """Patches one output position at a time, in the weight's (c, r, s) order."""
    (kh, kw), (sh, sw), (pt, pl, pb, pr), (dh, dw) = kernel, strides, pads, dilations
    b, c, h, w = x.shape
    xp = np.zeros((b, c, h + pt + pb, w + pl + pr), x.dtype)
    xp[:, :, pt:pt + h, pl:pl + w] = x
    ho = (h + pt + pb - (kh - 1) * dh - 1) // sh + 1
    wo = (w + pl + pr - (kw - 1) * dw - 1) // sw + 1
    rows = []
    for n in range(b):
        for i in range(ho):
            for j in range(wo):
                patch = np.empty((c, kh, kw), x.dtype)
                for ci in range(c):
                    for r in range(kh):
                        for s in range(kw):
                            patch[ci, r, s] = xp[n, ci, i * sh + r * dh, j * sw + s * dw]
                rows.append(patch.ravel())
    return np.array(rows)


# -- the statistics --------------------------------------------------------------------------------


def test_mlp_stats_match_numpy():
    model = mlp()
    targets = targets_of(model)
    assert [(t.name, t.op) for t in targets] == [("W1", "MatMul"), ("W2", "Gemm")]
    rng = np.random.default_rng(1)  # batches below and above the accumulator's 256-row blocks
    feeds = [{"x": rng.standard_normal((b, 64)).astype(np.float32)} for b in (3, 300, 5, 700, 2)]
    done = []
    stats = calibrate(model, targets, feeds, progress=done.append)
    assert done == [1, 2, 3, 4, 5] and stats.n_samples == 5
    assert stats.model_hash == model_hash(model)

    w1, b1 = (numpy_helper.to_array(i) for i in model.graph.initializer[:2])
    first = [f["x"] for f in feeds]  # W1 reads the graph input itself
    second = [np.maximum(x @ w1 + b1, 0) for x in first]  # Gemm's A: the ReLU output
    assert_stats(stats.tensors["W1"], first)
    assert_stats(stats.tensors["W2"], second, rtol=1e-4)
    assert stats.tensors["W1"].k == 64 and stats.tensors["W2"].k == 96
    assert stats.tensors["W2"].activation == "h2"
    # sq is the diagonal of H over the rows: the imatrix and the Gram matrix agree
    t = stats.tensors["W2"]
    np.testing.assert_allclose(t.sq, np.diag(t.H) / t.rows, rtol=1e-5)


def test_conv_stats_match_an_explicit_im2col_loop():
    model = convnet()
    targets = [conv_target("K1", (16, 8, 3, 3)), conv_target("K2", (24, 16, 1, 1))]
    feeds = samples(np.random.default_rng(2), (2, 8, 11, 9), 3)
    stats = calibrate(model, targets, feeds, max_conv_rows=10_000)
    first = [im2col_loop(f["x"], (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)) for f in feeds]
    assert first[0].shape == (2 * 6 * 5, 8 * 9)
    assert_stats(stats.tensors["K1"], first)
    r1 = [v["r1"] for v in with_outputs(model, ["r1"], feeds)]
    assert_stats(stats.tensors["K2"], [im2col_loop(r, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1)) for r in r1], rtol=1e-4)
    assert stats.tensors["K1"].k == 72 and stats.tensors["K1"].rows == 3 * 60


def test_im2col_rows_times_weight_matrix_is_the_convolution():
    """The patch order (c, r, s) is QuantTarget.matrix()'s: W.reshape(N, -1) @ patch = Conv."""
    model = build(DILATED, {"K": (6, 4, 3, 2)})
    x = np.random.default_rng(3).standard_normal((2, 4, 13, 12)).astype(np.float32)
    (y,) = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    geometry = ((3, 2), (2, 3), (0, 2, 1, 0), (2, 3))
    rows = im2col(x, *geometry)
    np.testing.assert_array_equal(rows, im2col_loop(x, *geometry))
    t = conv_target("K", (6, 4, 3, 2))
    w = t.matrix(numpy_helper.to_array(model.graph.initializer[0]))
    got = (rows @ w.T).reshape(2, 5, 4, 6).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, y, rtol=1e-4, atol=1e-4)
    stats = calibrate(model, [t], [{"x": x}])
    assert_stats(stats.tensors["K"], [rows])


def test_conv_rows_are_subsampled_by_a_deterministic_stride():
    model = convnet()
    targets = [conv_target("K1", (16, 8, 3, 3))]
    feeds = samples(np.random.default_rng(4), (2, 8, 11, 9), 2)
    stats = calibrate(model, targets, feeds, max_conv_rows=25)  # 60 positions -> every 3rd: 20 rows
    full = [im2col_loop(f["x"], (3, 3), (2, 2), (1, 1, 1, 1), (1, 1)) for f in feeds]
    assert_stats(stats.tensors["K1"], [r[::3] for r in full])
    assert stats.tensors["K1"].rows == 40
    again = calibrate(model, targets, feeds, max_conv_rows=25)
    np.testing.assert_array_equal(again.tensors["K1"].H, stats.tensors["K1"].H)


def test_targets_reading_one_value_share_read_only_stats_and_existing_outputs_work():
    """q and k read n, which is also a graph output: one fetch, one accumulation, shared arrays."""
    model = build(SHARED, {"Wq": (32, 16), "Wk": (32, 16)})
    targets = targets_of(model)
    feeds = samples(np.random.default_rng(5), (2, 3, 32), 4)
    stats = calibrate(model, targets, feeds)
    q, k = stats.tensors["Wq"], stats.tensors["Wk"]
    assert q.H is k.H and q.rows == k.rows == 4 * 6
    assert_stats(q, [np.tanh(f["x"]).reshape(-1, 32) for f in feeds])
    with pytest.raises(ValueError):
        q.H[0, 0] = 1.0  # read-only: an in-place edit for one target would change the other
    assert [o.name for o in model.graph.output] == ["y", "n"]  # calibrate left the model as it was


def test_save_load_roundtrip_and_model_check(tmp_path):
    model = build(SHARED, {"Wq": (32, 16), "Wk": (32, 16)})
    stats = calibrate(model, targets_of(model), samples(np.random.default_rng(6), (1, 3, 32), 2))
    path = stats.save(tmp_path / "work" / "calib.npz")
    assert os.listdir(path.parent) == ["calib.npz"]  # no temporary file left behind
    back = CalibrationStats.load(path, model_hash=model_hash(model))
    assert (back.model_hash, back.n_samples, list(back.tensors)) == (stats.model_hash, 2, ["Wq", "Wk"])
    for name, t in stats.tensors.items():
        b = back.tensors[name]
        assert (b.name, b.k, b.rows, b.activation) == (t.name, t.k, t.rows, t.activation)
        for field in ("H", "sq", "absmean"):
            np.testing.assert_array_equal(getattr(b, field), getattr(t, field))
    assert back.tensors["Wq"].H is back.tensors["Wk"].H  # stored once
    with np.load(path) as z:
        assert sorted(z.files) == ["g0.H", "g0.absmean", "g0.sq", "meta"]

    other = mlp()
    with pytest.raises(ValueError, match=r"calibration stats are for another model \(hash [0-9a-f]{16}"):
        CalibrationStats.load(path, model_hash=model_hash(other))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CalibrationError, match="not a qcompile calibration stats file"):
        CalibrationStats.load(tmp_path / "junk.npz")


def test_model_hash_names_the_computation():
    a, b = mlp(), mlp()
    assert model_hash(a) == model_hash(b) and len(model_hash(a)) == 16
    assert model_hash(onnx.shape_inference.infer_shapes(a)) == model_hash(a)  # value_info is not the model
    c = build(MLP, {"W1": (64, 96), "b1": (96,), "W2": (48, 96), "b2": (48,)}, seed=1)
    assert model_hash(c) != model_hash(a)


def test_bad_samples_are_named():
    model = mlp()
    targets = targets_of(model)
    with pytest.raises(CalibrationError, match=r"sample 0: model inputs are \['x'\]; missing \['x'\], unknown \['z'\]"):
        calibrate(model, targets, [{"z": np.zeros((1, 64), np.float32)}])
    with pytest.raises(CalibrationError, match="no calibration samples"):
        calibrate(model, targets, [])
    with pytest.raises(CalibrationError, match="not the weight input of any node"):
        calibrate(model, [QuantTarget("nope", "MatMul", "MatMul", (64, 96), True)], [])


# -- calibration data --------------------------------------------------------------------------------


def test_npz_splits_the_batch_axis_or_takes_one_feed_per_entry(tmp_path):
    model = mlp()
    x = np.random.default_rng(7).standard_normal((5, 64))  # float64: cast to the input's float32
    np.savez(tmp_path / "rows.npz", x=x)
    feeds = load_samples(tmp_path / "rows.npz", model)
    assert len(feeds) == 5 and feeds[0]["x"].shape == (1, 64) and feeds[0]["x"].dtype == np.float32
    np.testing.assert_array_equal(feeds[3]["x"][0], x[3].astype(np.float32))
    np.savez(tmp_path / "feeds.npz", x=np.zeros((4, 3, 64), np.float32))
    feeds = load_samples(str(tmp_path / "feeds.npz"), model, n_samples=2)
    assert len(feeds) == 2 and feeds[1]["x"].shape == (3, 64)

    fixed = build(DILATED, {"K": (6, 4, 3, 2)})  # batch fixed at 2: rows grouped in twos
    np.savez(tmp_path / "fixed.npz", x=np.zeros((6, 4, 13, 12), np.float32))
    feeds = load_samples(tmp_path / "fixed.npz", fixed)
    assert [f["x"].shape for f in feeds] == [(2, 4, 13, 12)] * 3
    np.savez(tmp_path / "odd.npz", x=np.zeros((5, 4, 13, 12), np.float32))
    with pytest.raises(CalibrationDataError, match="fixed batch of 2; found 5 rows"):
        load_samples(tmp_path / "odd.npz", fixed)


def test_npz_errors_name_the_file_the_input_and_what_was_expected(tmp_path):
    model = mlp()
    np.savez(tmp_path / "wrong.npz", y=np.zeros((2, 64), np.float32))
    names = r"wrong.npz: .*input names \['x'\]; missing \['x'\], unknown \['y'\]"
    with pytest.raises(CalibrationDataError, match=names):
        load_samples(tmp_path / "wrong.npz", model)
    np.savez(tmp_path / "shape.npz", x=np.zeros((2, 65), np.float32))
    with pytest.raises(CalibrationDataError, match=r"shape.npz: input 'x' expects float32\[batch, 64\]; .*\[1, 65\]"):
        load_samples(tmp_path / "shape.npz", model)
    np.savez(tmp_path / "ints.npz", x=np.zeros((2, 64), np.int64))
    with pytest.raises(CalibrationDataError, match="input 'x' expects float32, found an array of int64"):
        load_samples(tmp_path / "ints.npz", model)
    np.savez(tmp_path / "rank.npz", x=np.zeros(64, np.float32))
    with pytest.raises(CalibrationDataError, match="rank 2"):
        load_samples(tmp_path / "rank.npz", model)
    with pytest.raises(CalibrationDataError, match="no such calibration file"):
        load_samples(tmp_path / "absent.npz", model)
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(CalibrationDataError, match=r"unknown calibration file type '.csv'"):
        load_samples(tmp_path / "data.csv", model)
    assert issubclass(CalibrationDataError, QCompileError)


def test_npy_feeds_a_single_input_model(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((3, 2, 64), np.float32))
    feeds = load_samples(tmp_path / "x.npy", mlp())
    assert len(feeds) == 3 and feeds[0]["x"].shape == (2, 64)
    lm = build(TEXT_LM, {"E": (20, 32), "T": (2, 32), "W": (32, 16)})
    with pytest.raises(CalibrationDataError, match="one input; this model has 3 .*write a .npz"):
        load_samples(tmp_path / "x.npy", lm)


def test_random_samples_are_shaped_like_the_inputs_and_warned_about(caplog):
    lm = build(TEXT_LM, {"E": (100, 32), "T": (2, 32), "W": (32, 16)})
    with caplog.at_level(logging.WARNING, logger="qcompile.compiler.calibdata"):
        feeds = load_samples("random", lm, n_samples=3, seq_len=7)
    assert "random data" in caplog.text and "['input_ids']" in caplog.text
    assert len(feeds) == 3
    f = feeds[0]
    assert {k: (v.shape, v.dtype) for k, v in f.items()} == {
        "input_ids": ((1, 7), np.int64), "attention_mask": ((1, 7), np.int64), "token_type_ids": ((1, 7), np.int64)}
    assert f["input_ids"].min() >= 0 and f["input_ids"].max() < 100
    assert (f["attention_mask"] == 1).all() and (f["token_type_ids"] == 0).all()
    again = load_samples(None, lm, n_samples=3, seq_len=7)
    np.testing.assert_array_equal(again[2]["input_ids"], feeds[2]["input_ids"])  # seeded

    x = load_samples(None, mlp(), n_samples=2)[0]["x"]
    assert x.shape == (1, 64) and x.dtype == np.float32
    stats = calibrate(lm, targets_of(lm), feeds)  # the feeds run
    assert stats.tensors["W"].rows == 21


@pytest.fixture
def tokenizer_json(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    words = ["[UNK]"] + [f"w{i}" for i in range(40)]
    tok = tokenizers.Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.enable_truncation(16)  # as shipped tokenizers often do: calibration must see the whole text
    tok.enable_padding(length=16)
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    tok.save(str(path))
    return path


def test_text_is_tokenized_into_evenly_spaced_windows(tmp_path, tokenizer_json):
    lm = build(TEXT_LM, {"E": (41, 32), "T": (2, 32), "W": (32, 16)})
    ids = np.arange(100) % 40 + 1  # w0..w39 are ids 1..40
    (tmp_path / "calib.txt").write_text(" ".join(f"w{i - 1}" for i in ids) + "\n")
    feeds = load_samples(tmp_path / "calib.txt", lm, tokenizer=tokenizer_json, n_samples=4, seq_len=10)
    starts = [0, 30, 60, 90]
    assert len(feeds) == 4
    for f, s in zip(feeds, starts):
        np.testing.assert_array_equal(f["input_ids"], ids[None, s:s + 10])
        assert f["input_ids"].dtype == np.int64
        np.testing.assert_array_equal(f["attention_mask"], np.ones((1, 10)))
        np.testing.assert_array_equal(f["token_type_ids"], np.zeros((1, 10)))

    # a tokenizer.json beside the model is found; the windows then calibrate the model
    model_path = tokenizer_json.parent / "model.onnx"
    beside = load_samples(tmp_path / "calib.txt", lm, model_path=model_path, n_samples=4, seq_len=10)
    np.testing.assert_array_equal(beside[3]["input_ids"], feeds[3]["input_ids"])
    stats = calibrate(lm, targets_of(lm), feeds)
    e, t = (numpy_helper.to_array(i) for i in lm.graph.initializer[:2])
    assert_stats(stats.tensors["W"], [e[f["input_ids"][0]] + t[0] for f in feeds])

    # too little text for the windows asked: fewer, non-overlapping windows
    assert len(load_samples(tmp_path / "calib.txt", lm, tokenizer=tokenizer_json.parent, seq_len=30)) == 3


def test_text_errors(tmp_path, tokenizer_json, monkeypatch):
    lm = build(TEXT_LM, {"E": (41, 32), "T": (2, 32), "W": (32, 16)})
    (tmp_path / "calib.txt").write_text("w1 w2 w3 " * 20)
    with pytest.raises(CalibrationDataError, match=r"calib.txt: text calibration needs a tokenizer \(none found "
                                                   r"beside the model, at .*tokenizer.json\).*--tokenizer"):
        load_samples(tmp_path / "calib.txt", lm, model_path=tmp_path / "model.onnx")
    with pytest.raises(CalibrationDataError, match="needs a tokenizer"):
        load_samples(tmp_path / "calib.txt", lm)
    with pytest.raises(CalibrationDataError, match="tokenizer .*missing.json does not exist"):
        load_samples(tmp_path / "calib.txt", lm, tokenizer=tmp_path / "missing.json")
    with pytest.raises(CalibrationDataError, match="needs a model input named 'input_ids'.*\\['x'\\]"):
        load_samples(tmp_path / "calib.txt", mlp(), tokenizer=tokenizer_json)
    extra = build(TEXT_LM.replace("int64[batch, seq] token_type_ids", "int64[batch, seq] token_type_ids, "
                                  "float[batch, 4] pixel_values"), {"E": (41, 32), "T": (2, 32), "W": (32, 16)})
    with pytest.raises(CalibrationDataError, match=r"also needs \['pixel_values'\]"):
        load_samples(tmp_path / "calib.txt", extra, tokenizer=tokenizer_json)
    with pytest.raises(CalibrationDataError, match="fewer than one window of 128"):
        load_samples(tmp_path / "calib.txt", lm, tokenizer=tokenizer_json)
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed
    with pytest.raises(CalibrationDataError, match="pip install tokenizers"):
        load_samples(tmp_path / "calib.txt", lm, tokenizer=tokenizer_json, seq_len=8)
