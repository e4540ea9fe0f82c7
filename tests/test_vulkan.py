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
from onnx import numpy_helper

from qcompile.compiler.driver import CompileOptions, compile_model
from qcompile.passes.formats import PRESETS
from qcompile.runtime import ArtifactError, load
from qcompile.runtime.vulkan import compile_expr
from tests import models
from tests.helpers import NO_VULKAN, convnet_model, mlp_model, save, vulkan_available

pytestmark = pytest.mark.vulkan


needs_device = pytest.mark.skipif(not vulkan_available(), reason=NO_VULKAN)


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


BLOCK_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
block (int64[batch, seq] ids) => (float[batch, seq, 64] logits, int64[batch, seq] next) {
    e = Gather(E, ids)
    ln = LayerNormalization<axis=-1>(e, G, Bt)
    q = MatMul(ln, Wq)
    k = MatMul(ln, Wk)
    v = MatMul(ln, Wv)
    kt = Transpose<perm=[0,2,1]>(k)
    s0 = MatMul(q, kt)
    s = Mul(s0, scale)
    n = Shape<start=1, end=2>(ids)
    sq = Concat<axis=0>(n, n)
    ones = ConstantOfShape<value = float[1] {1.0}>(sq)
    tri = Trilu<upper=0>(ones)
    off = Sub(tri, one)
    mask = Mul(off, big)
    sm = Add(s, mask)
    p = Softmax<axis=-1>(sm)
    a = MatMul(p, v)
    h = Add(e, a)
    u = MatMul(h, W1)
    r = Relu(u)
    d = MatMul(r, W2)
    h2 = Add(h, d)
    logits = MatMul(h2, Wo)
    next = Add(ids, step)
}
"""


def block_model(seed: int = 0) -> onnx.ModelProto:
    """A causal self-attention block on int64 token ids (symbolic batch and sequence), an int64 output."""
    model = onnx.parser.parse_model(BLOCK_TEXT)
    rng = np.random.default_rng(seed)
    shapes = {"E": (100, 128), "G": (128,), "Bt": (128,), "Wq": (128, 128), "Wk": (128, 128), "Wv": (128, 128),
              "W1": (128, 256), "W2": (256, 128), "Wo": (128, 64)}
    for name, shape in shapes.items():
        a = rng.standard_normal(shape) / (np.sqrt(shape[0]) if len(shape) == 2 else 1)
        model.graph.initializer.append(numpy_helper.from_array(a.astype(np.float32), name))
    for name, value in {"scale": np.float32(0.125), "one": np.float32(1), "big": np.float32(1e4),
                        "step": np.int64(1)}.items():
        model.graph.initializer.append(numpy_helper.from_array(np.array(value), name))
    onnx.checker.check_model(model)
    return model


@needs_device
@pytest.mark.parametrize("bpw", [16, 4.25])
def test_attention_block_int64_ids(tmp_path, bpw):
    """int64 ids run as int32 on the device; batch and sequence vary between runs of one session."""
    model = block_model()
    path = save(model, tmp_path / "block.onnx")
    opts = dict(bpw=bpw, min_weights=1024)
    art = compile_model(path, tmp_path / "b.qcm", CompileOptions(target="vulkan", **opts)).path
    sess = load(art)
    ref_sess = load(compile_model(path, tmp_path / "x.qcm", CompileOptions(target="x86", int8_dot=False, **opts)).path) \
        if bpw < 16 else None
    for batch, seq in ((1, 7), (2, 12), (1, 1)):
        ids = np.random.default_rng(seq).integers(0, 100, (batch, seq)).astype(np.int64)
        logits, nxt = sess.run(None, {"ids": ids})
        assert nxt.dtype == np.int64 and np.array_equal(nxt, ids + 1)
        ref = _ort(model, {"ids": ids}) if ref_sess is None else ref_sess.run(["logits"], {"ids": ids})[0]
        np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


KV_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
kv (int64[batch, seq] ids, float[batch, past, 64] past_h) => (float[batch, seq, 32] y, float[batch, total, 64] present_h) {
    e = Gather(E, ids)
    present_h = Concat<axis=1>(past_h, e)
    kt = Transpose<perm=[0,2,1]>(present_h)
    s = MatMul(e, kt)
    p = Softmax<axis=-1>(s)
    a = MatMul(p, present_h)
    y = MatMul(a, Wo)
}
"""


def _rel(a, b) -> float:
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


@needs_device
@pytest.mark.parametrize("int8_dot", [False, True])
def test_kv_cache_model_has_a_decode_variant(tmp_path, int8_dot):
    """A model with a past input gets a batch = sequence = 1 plan (static M: GEMV kernels) beside the
    general one; prefill and decode steps both match the x86 build with the same activation handling.

    With ``int8_dot`` the decode step's quantized matmul is the int8-activation GEMV (as on x86 and CUDA)
    and matches the x86 int8 build (to 1e-4, or ~1e-3 where an activation sits within the float summation
    noise of a rounding boundary and is quantized one step apart: the CUDA comparisons' rule); the prefill
    (the general plan: dlight's float matmul) matches the x86 float build."""
    model = onnx.parser.parse_model(KV_TEXT)
    rng = np.random.default_rng(3)
    for name, shape in {"E": (100, 64), "Wo": (64, 32)}.items():
        model.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    path = save(model, tmp_path / "kv.onnx")
    opts = dict(bpw=9, overrides=[("^Wo$", "q4g32")], min_weights=2048)
    art = compile_model(path, tmp_path / "kv.qcm", CompileOptions(target="vulkan", int8_dot=int8_dot, **opts)).path
    plan = json.loads((art / "plan.json").read_text())
    assert [v["when"] for v in plan["variants"]] == [{"batch": 1, "seq": 1}, {}]
    manifest = json.loads((art / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tensors"]] == ["Wo"]
    assert manifest["kernels"]["int8_dot"] is int8_dot
    assert manifest["kernels"]["decode_step_gemv"] == {"gemv_int8" if int8_dot else "gemv": 1}
    sess = load(art)
    ref_float = load(compile_model(path, tmp_path / "x.qcm", CompileOptions(target="x86", int8_dot=False, **opts)).path)
    ref_int8 = load(compile_model(path, tmp_path / "x8.qcm", CompileOptions(target="x86", **opts)).path) \
        if int8_dot else ref_float
    past = np.zeros((1, 0, 64), np.float32)
    errs = []  # int8: the decode steps' rel err against the x86 int8 build
    for step, ids in enumerate(([[5, 17, 42]], [[7]], [[9]])):  # prefill, then two decode steps
        feeds = {"ids": np.array(ids, np.int64), "past_h": past}
        y, present = sess.run(None, feeds)
        y86, present86 = (ref_int8 if step else ref_float).run(None, feeds)
        if step and int8_dot:
            errs.append(_rel(y, y86))
        else:
            np.testing.assert_allclose(y, y86, rtol=1e-4, atol=1e-5 * np.abs(y86).max())
        np.testing.assert_array_equal(present, present86)
        past = present
    if int8_dot:  # at most one step a rounding step apart; the int8 activations are visible (vs float)
        assert sum(not e < 1e-4 for e in errs) <= 1 and max(errs) < 1e-2, errs
        y_float = ref_float.run(None, {"ids": np.array([[9]], np.int64), "past_h": past[:, :-1]})[0]
        assert _rel(y, y_float) > 1e-4
    # the prefill ran the general plan, the decode steps the specialized one
    assert sorted(tuple(p.variant.when) for p in sess._programs.values()) == [(), ("batch", "seq"), ("batch", "seq")]


def test_plan_expressions():
    """Plan expressions are compiled to Python: only ints, names, + - * // %, unary minus, min and max."""
    from qcompile.runtime.vulkan import compile_exprs

    env = {"batch": 7, "sequence": 3}
    assert compile_expr("(((batch) + 31) // 32)")(env) == 1
    assert compile_expr("max(batch * 4, 16) % 5 - sequence")(env) == 28 % 5 - 3
    assert compile_exprs(["-batch // 2", "min(batch, sequence)", "12"])(env) == (-4, 3, 12)
    assert compile_exprs([])(env) == ()
    for bad in ("__import__('os').getcwd()", "batch.real", "(lambda: 1)()", "'a' * 3", "1.5", "True + 1",
                "batch if sequence else 0", "[batch][0]", "abs(batch)", "batch ** 2"):
        with pytest.raises(ArtifactError):
            compile_expr(bad)


@needs_device
def test_programs_from_the_last_equal_fresh_ones(tmp_path):
    """A decode step at a new cache length starts from the last program and recomputes only the calls
    that read a changed dim or bind a buffer that changed: each such program equals one made from
    scratch (grids, bound buffers and offsets, uniform values, buffer sizes)."""
    from qcompile.runtime.vulkan import _Program

    model = onnx.parser.parse_model(KV_TEXT)
    rng = np.random.default_rng(5)
    for name, shape in {"E": (100, 64), "Wo": (64, 32)}.items():
        model.graph.initializer.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name))
    art = compile_model(save(model, tmp_path / "kv.onnx"), tmp_path / "kv.qcm",
                        CompileOptions(target="vulkan", bpw=9, overrides=[("^Wo$", "q4g32")], min_weights=2048)).path
    sess = load(art)
    past = np.zeros((1, 3, 64), np.float32)
    reused, prev = 0, None
    for length in range(3, 40, 3):  # the pool regrows buffers along the way
        past = np.concatenate([past, rng.standard_normal((1, length - past.shape[1], 64)).astype(np.float32)], 1)
        sess.run(None, {"ids": np.array([[7]], np.int64), "past_h": past})
        prog = sess._programs[next(reversed(sess._programs))]  # noqa: SLF001
        fresh = _Program(sess, prog.variant, prog.env)
        assert prog.sizes == fresh.sizes and prog.buffers == fresh.buffers
        assert len(prog.entries) == len(fresh.entries)
        for a, b in zip(prog.entries, fresh.entries):
            assert (a is None) == (b is None)
            if a is not None:
                (_, ka, bound_a, slot_a, grid_a), (_, group_a, _) = a
                (_, kb, bound_b, slot_b, grid_b), (_, group_b, _) = b
                assert (ka["id"], slot_a, grid_a) == (kb["id"], slot_b, grid_b)
                assert [(id(buf), off) for buf, off in bound_a] == [(id(buf), off) for buf, off in bound_b]
                assert group_a is group_b  # the same cached bind group
                n = 4 * len(ka["pod"])
                assert prog.pods[slot_a:slot_a + n] == fresh.pods[slot_b:slot_b + n]
        if prev is not None and prev.variant is prog.variant:
            reused += sum(a is b and a is not None for a, b in zip(prog.entries, prev.entries))
        prev = prog
    assert reused > 0  # calls that read no changed dim kept the last program's entries


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


@pytest.mark.slow
@needs_device
def test_minilm_matches_onnxruntime_and_x86(tmp_path):
    """A torch.onnx export (int64 ids and masks, gather-index normalization, bool masks) in float and at
    4.25 bpw."""
    path = models.minilm_onnx()
    feeds = models.minilm_inputs(models.MINILM_SENTENCES[:2])
    (ref,) = ort.InferenceSession(str(path)).run(["last_hidden_state"], feeds)
    art = compile_model(path, tmp_path / "f.qcm", CompileOptions(target="vulkan", bpw=16)).path
    (y,) = load(art).run(["last_hidden_state"], feeds)
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
    arts = {t: compile_model(path, tmp_path / f"{t}.qcm", CompileOptions(target=t, bpw=4.25, int8_dot=False)).path
            for t in ("vulkan", "x86")}
    (y,) = load(arts["vulkan"]).run(["last_hidden_state"], feeds)
    (y86,) = load(arts["x86"]).run(["last_hidden_state"], feeds)
    np.testing.assert_allclose(y, y86, rtol=1e-4, atol=1e-5 * np.abs(y86).max())
