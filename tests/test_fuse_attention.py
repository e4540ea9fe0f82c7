"""Fused decoder attention with an in-place KV cache: the kernels against numpy on odd shapes; the rewrite
on tiny Llama / Qwen2 / Gemma decoders of our frontend (and what it refuses); a compiled fused Qwen2
against onnxruntime on the unfused graph through prefill and decode (batch 2); greedy generation equal
to the unfused artifact's and transformers'; the cache buffers allocated once."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import tvm

import qcompile.runtime as rt
from qcompile.runtime.errors import QCompileError
from qcompile.compiler.driver import CompileOptions, compile_model
from qcompile.compiler.frontend import load_onnx
from qcompile.compiler.frontends import load_llm
from qcompile.passes import qops
from qcompile.passes.fuse_attention import PAST_POSITIONS, fuse_attention
from qcompile.targets.x86 import attention_kernels as A
from qcompile.targets.x86 import host_target
from tests.test_llm_frontend import TINY, VARIANTS, empty_past, run, session, tiny_hf_model


def _build(func):
    target = tvm.target.Target(host_target().tvm)
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)["main"]


def _tensor(a):
    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu())


# -- kernels ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(3, 1, 16), (4, 2, 64), (2, 2, 12)])
def test_attention_kernels_match_numpy(heads, kv_heads, head_dim):
    rng = np.random.default_rng(heads * 100 + head_dim)
    scale = head_dim ** -0.5
    cached = _build(A.attention(heads, kv_heads, head_dim, scale, cached=True))
    past = _build(A.attention(heads, kv_heads, head_dim, scale, cached=False))
    update = _build(A.cache_update(kv_heads, head_dim))
    for batch, seq, past_len in ((1, 1, 0), (2, 5, 0), (1, 1, 7), (2, 5, 7)):
        capacity = past_len + seq + 3
        q = rng.standard_normal((batch, heads, seq, head_dim)).astype(np.float32) * 3  # peaked softmax
        k, v = (rng.standard_normal((batch, kv_heads, seq, head_dim)).astype(np.float32) for _ in range(2))
        kc, vc = (rng.standard_normal((batch, kv_heads, capacity, head_dim)).astype(np.float32) for _ in range(2))
        ref = A.reference_attention(q, k, v, kc, vc, past_len, scale)
        y = _tensor(np.zeros_like(q))
        cached(_tensor(q), _tensor(k), _tensor(v), _tensor(kc), _tensor(vc), _tensor(np.arange(past_len)), y)
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5)
        y = _tensor(np.zeros_like(q))
        past(_tensor(q), _tensor(k), _tensor(v), _tensor(kc[:, :, :past_len]), _tensor(vc[:, :, :past_len]), y)
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5)
        buf = _tensor(kc)
        update(buf, _tensor(k), _tensor(np.arange(past_len)))
        np.testing.assert_array_equal(buf.numpy(), A.reference_cache_update(kc, k, past_len))


@pytest.mark.parametrize("cached", [True, False])
def test_attention_kernel_with_a_key_mask_matches_numpy(cached):
    """Padding keys (key mask 0) are skipped; a row that sees no key at all gives zeros."""
    rng = np.random.default_rng(7)
    heads, kv_heads, head_dim, scale = 3, 1, 16, 0.3
    fn = _build(A.attention(heads, kv_heads, head_dim, scale, cached=cached, key_mask=True))
    for batch, seq, past_len in ((1, 1, 0), (2, 5, 7), (2, 1, 7)):
        q = rng.standard_normal((batch, heads, seq, head_dim)).astype(np.float32) * 2
        k, v = (rng.standard_normal((batch, kv_heads, seq, head_dim)).astype(np.float32) for _ in range(2))
        kc, vc = (rng.standard_normal((batch, kv_heads, past_len + seq + 2, head_dim)).astype(np.float32)
                  for _ in range(2))
        km = (rng.random((batch, past_len + seq)) < 0.6).astype(np.int64)
        km[0] = 0  # the first sequence is all padding
        ref = A.reference_attention(q, k, v, kc, vc, past_len, scale, key_mask=km)
        past = [_tensor(kc), _tensor(vc), _tensor(np.arange(past_len))] if cached else \
            [_tensor(kc[:, :, :past_len]), _tensor(vc[:, :, :past_len])]
        y = _tensor(np.ones_like(q))
        fn(_tensor(q), _tensor(k), _tensor(v), *past, _tensor(km), y)
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5)
        assert not y.numpy()[0].any()


def test_reference_attention_is_the_unfused_math():
    """The numpy reference against the graph's form: concat, repeat_kv, additive mask, softmax."""
    rng = np.random.default_rng(1)
    q = rng.standard_normal((1, 4, 3, 8)).astype(np.float32)
    k, v = (rng.standard_normal((1, 2, 3, 8)).astype(np.float32) for _ in range(2))
    kp, vp = (rng.standard_normal((1, 2, 5, 8)).astype(np.float32) for _ in range(2))
    keys = np.repeat(np.concatenate([kp, k], 2), 2, axis=1)
    values = np.repeat(np.concatenate([vp, v], 2), 2, axis=1)
    mask = np.where(np.arange(8)[None] <= 5 + np.arange(3)[:, None], 0, np.finfo(np.float32).min)
    s = q @ keys.transpose(0, 1, 3, 2) / np.sqrt(8) + mask
    p = np.exp(s - s.max(-1, keepdims=True))
    ref = (p / p.sum(-1, keepdims=True)) @ values
    np.testing.assert_allclose(A.reference_attention(q, k, v, kp, vp), ref, rtol=1e-5, atol=1e-6)


# -- the rewrite --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    cache = {}

    def get(variant: str):
        if variant not in cache:
            hf = tiny_hf_model(variant)
            folder = tmp_path_factory.mktemp(variant)
            hf.save_pretrained(folder, safe_serialization=True)
            cache[variant] = hf, folder, load_llm(folder)
        return cache[variant]

    return get


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


@pytest.mark.parametrize("variant", ["llama", "qwen2", "gemma", "llama_mha_tied"])
def test_every_layer_is_fused_and_the_cache_moves_in_place(decoders, variant):
    hf, _, model = decoders(variant)
    layers, kv = VARIANTS[variant][2]["num_hidden_layers"], hf.config.num_key_value_heads
    result = fuse_attention(model)
    fused = result.model
    onnx.checker.check_model(fused)
    assert result.attention == layers
    ops = _ops(fused)
    assert ops.count(qops.ATTENTION) == layers and ops.count(qops.CACHE_UPDATE) == 2 * layers
    assert not {"Softmax", "Expand", "Where"} & set(ops)  # attention, GQA repeat and the mask are gone
    attn = next(n for n in fused.graph.node if n.op_type == qops.ATTENTION)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in attn.attribute}
    assert attrs["num_heads"] == 4 and attrs["num_kv_heads"] == kv
    assert attrs["scale"] == pytest.approx(16 ** -0.5)

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    inputs = {i.name: dims(i) for i in fused.graph.input}
    outputs = {o.name: dims(o) for o in fused.graph.output}
    assert inputs[PAST_POSITIONS] == ["past_seq"]
    assert inputs["past_key_values.0.key"] == outputs["present.0.key"] == ["batch", kv, "cache_capacity", 16]
    manifest = result.cache.to_manifest()
    assert [layer["key"] for layer in manifest["layers"]] == [f"past_key_values.{i}.key" for i in range(layers)]
    assert manifest["num_kv_heads"] == kv and manifest["head_dim"] == 16


def test_without_the_cache_pass_the_interface_stays_and_onnx_shapes_hold(decoders):
    _, _, model = decoders("qwen2")
    result = fuse_attention(model, cache=False)
    assert result.attention == 3 and result.cache is None
    assert [i.name for i in result.model.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    assert _ops(result.model).count("Concat") >= 6  # the present outputs are still concatenations


ATTENTION_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
attn (float[1, 2, S, 8] q, float[1, 2, S, 8] k, float[1, 2, P, 8] past_k, float[1, 2, S, 8] v,
      float[1, 2, P, 8] past_v, float[1, 1, S, T] mask) => (float[1, 2, S, 8] y, float[1, 2, T, 8] pk,
      float[1, 2, T, 8] pv) {
    pk = Concat<axis = 2>(past_k, k)
    pv = Concat<axis = 2>(past_v, v)
    kt = Transpose<perm = [0, 1, 3, 2]>(pk)
    s = MatMul(q, kt)
    c = Constant<value = float {2.828427}>()
    scaled = Div(s, c)
    masked = Add(scaled, mask)
    p = Softmax<axis = -1>(masked)
    y = MatMul(p, pv)
}
"""


def test_a_mask_read_from_input_values_is_not_assumed_causal():
    model = onnx.parser.parse_model(ATTENTION_TEXT)
    assert fuse_attention(model).attention == 0
    # the same graph with the causal mask computed from shapes only is fused (Div by √d: scale 1/√8)
    text = ATTENTION_TEXT.replace(", float[1, 1, S, T] mask)", ")").replace("    masked = Add(scaled, mask)", """
    ps = Shape<start = 2, end = 3>(past_k)
    ss = Shape<start = 2, end = 3>(q)
    ts = Add(ps, ss)
    zero = Constant<value = int64[1] {0}>()
    one = Constant<value = int64 {1}>()
    p0 = Squeeze(ps)
    t0 = Squeeze(ts)
    zero_s = Squeeze(zero)
    keys = Range(zero_s, t0, one)
    rows = Range(p0, t0, one)
    axis = Constant<value = int64[1] {1}>()
    col = Unsqueeze(rows, axis)
    visible = LessOrEqual(keys, col)
    lo = Constant<value = float {-3.4028235e38}>()
    fzero = Constant<value = float {0.0}>()
    mask = Where(visible, fzero, lo)
    masked = Add(scaled, mask)""")
    model = onnx.parser.parse_model(text)
    onnx.checker.check_model(model)
    result = fuse_attention(model, cache=False)
    assert result.attention == 1
    attn = next(n for n in result.model.graph.node if n.op_type == qops.ATTENTION)
    scale = next(a.f for a in attn.attribute if a.name == "scale")
    assert scale == pytest.approx(1 / 2.828427)
    # and the fused op computes what the unfused graph does (numpy reference of the kernel)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal(s).astype(np.float32) for n, s in
             (("q", (1, 2, 3, 8)), ("k", (1, 2, 3, 8)), ("v", (1, 2, 3, 8)), ("past_k", (1, 2, 4, 8)),
              ("past_v", (1, 2, 4, 8)))}
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(["y"], feeds)[0]
    ours = A.reference_attention(feeds["q"], feeds["k"], feeds["v"], feeds["past_k"], feeds["past_v"], scale=scale)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exporter", ["torchscript", pytest.param("dynamo", marks=pytest.mark.slow)])
def test_torch_exports_are_fused_with_their_padding_mask(tmp_path_factory, exporter):
    """torch.onnx exports of transformers (tests/exported.py): Q and Kᵀ scaled apart, repeat shapes from
    Shape, a NaN guard, and the mask of attention_mask (causal and padding) as the op's key mask."""
    from tests.exported import exported

    e = exported(tmp_path_factory, "llama", exporter)
    result = fuse_attention(load_onnx(e.path))  # as the compiler loads it (shapes inferred)
    assert result.attention == e.n_layers and result.cache is not None
    attn = [n for n in result.model.graph.node if n.op_type == qops.ATTENTION]
    assert all(list(n.input)[5:] == [PAST_POSITIONS, "attention_mask"] for n in attn)
    assert {a.name: onnx.helper.get_attribute_value(a) for a in attn[0].attribute} == pytest.approx(
        {"num_heads": 4, "num_kv_heads": 2, "scale": 0.25})


# -- compiled -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def qwen2(decoders, tmp_path_factory):
    hf, folder, model = decoders("qwen2")
    d = tmp_path_factory.mktemp("qwen2-art")
    return hf, model, compile_model(folder, d / "fused.qcm", CompileOptions(bpw=16.0, min_weights=0))


def test_compiled_fused_decoder_matches_onnxruntime_on_the_unfused_graph(qwen2):
    _, model, fused = qwen2
    assert fused.manifest["fusion"]["attention"] == 3 and fused.manifest["fusion"]["kv_cache"]
    assert fused.manifest["kv_cache"]["past_positions"] == PAST_POSITIONS
    ours = rt.load(fused.path)
    names = [o.name for o in ours.outputs]
    ref_s = session(model)
    ids = np.random.default_rng(5).integers(0, TINY["vocab_size"], size=(2, 11))
    past = empty_past(model, 2)
    buffers = {n: np.zeros((2, 2, 16, 16), np.float32) for n in past}
    past_len = 0
    for lo, hi in ((0, 6), (6, 7), (7, 8), (8, 11)):  # prefill, two decode steps, three tokens at once
        ref, past = run(ref_s, ids[:, lo:hi], past)
        out = ours.run(names, {"input_ids": ids[:, lo:hi], **buffers, PAST_POSITIONS: np.arange(past_len)})
        past_len = hi
        np.testing.assert_allclose(out[0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        buffers = {n.replace("present", "past_key_values"): v for n, v in zip(names[1:], out[1:])}
        for name, value in buffers.items():
            np.testing.assert_allclose(value[:, :, :past_len], past[name], rtol=1e-5, atol=1e-5)


PROMPT = [5, 77, 140, 3, 250, 31, 9]


def test_greedy_generation_equals_transformers(qwen2):
    hf, _, fused = qwen2
    ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=10, do_sample=False)[0, len(PROMPT):].tolist()
    assert rt.load(fused.path).generate(PROMPT, 10) == ref


@pytest.mark.slow
def test_greedy_generation_equals_the_unfused_artifact(qwen2, decoders, tmp_path):
    _, _, fused = qwen2
    plain = compile_model(decoders("qwen2")[1], tmp_path / "plain.qcm", CompileOptions(bpw=16.0, min_weights=0,
                                                                                       fuse=False))
    assert "kv_cache" not in plain.manifest and not plain.manifest["fusion"]["enabled"]
    assert rt.load(fused.path).generate(PROMPT, 10) == rt.load(plain.path).generate(PROMPT, 10)


def test_the_cache_buffers_are_allocated_once(qwen2):
    _, _, fused = qwen2
    s = rt.load(fused.path)
    gen = s.generator()
    n = len(gen.past)
    steps = []
    run_device = s.run_device

    def spy(args):
        outs = run_device(args)
        steps.append(([a.data_ptr() for a in args[1:1 + n]], [o.data_ptr() for o in outs[1:]]))
        return outs

    s.run_device = spy
    s.generate([1, 2, 3, 4], 8)
    buffers = gen.buffers
    pointers = [b.data_ptr() for b in buffers]
    assert len(steps) == 8 and gen.capacity == 12
    assert all(inp == out == pointers for inp, out in steps)  # the same buffers, updated in place
    s.generate([7, 8], 5)  # fits: the buffers are kept
    assert gen.buffers is buffers and all(inp == pointers for inp, _ in steps[8:])
    s.generate([7, 8], 20)  # needs more room: allocated once more, then kept
    assert gen.capacity == 22 and len({tuple(inp) for inp, _ in steps[13:]}) == 1


def test_run_refuses_a_cache_without_room_for_the_new_positions(qwen2):
    _, _, fused = qwen2
    s = rt.load(fused.path)
    kv = s.manifest["kv_cache"]
    feeds = {}
    for spec in s.get_inputs():
        if spec.name == "input_ids":
            feeds[spec.name] = np.array([[1, 2, 3]], dtype=np.int64)
        elif spec.name == kv["past_positions"]:
            feeds[spec.name] = np.arange(6, dtype=np.int64)
        else:  # the cache buffers: 8 positions, 6 filled, 3 more asked for
            feeds[spec.name] = np.zeros([1, spec.shape[1], 8, spec.shape[3]], np.float32)
    with pytest.raises(QCompileError, match=r"hold 8 positions.*6 are filled.*adds 3.*at least 9"):
        s.run(None, feeds)
    feeds[kv["past_positions"]] = np.arange(5, dtype=np.int64)  # exactly full: runs
    logits = s.run(["logits"], feeds)[0]
    assert logits.shape[:2] == (1, 3) and np.isfinite(logits).all()
