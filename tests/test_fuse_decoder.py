"""Decoder fusion (passes/fuse_decoder.py) and its x86 kernels (targets/x86/decoder_kernels.py).

Each kernel agrees with its numpy equivalent on odd shapes; the rewrites recognise our frontend's
Llama / Qwen2 / Gemma decoders (one RMSNorm per norm, one Rotary per q/k, one GatedAct per MLP) and the
forms torch's exporter writes (Pow / ReduceMean with axes as an input / Slice-based rotate_half / Gelu),
leave near misses alone, and keep the model's function (onnx's reference evaluator running our ops
through the kernels' numpy equivalents); the fused model compiled for x86 matches onnxruntime on the
unfused quantized graph through a prefill and decode steps, with fewer kernels. Slow tier: models
exported by torch (tests/exported.py)."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import tvm
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun

from qcompile.compiler.driver import CompileOptions, compile_model, quantize_model
from qcompile.compiler.frontend import load_onnx
from qcompile.passes import qops
from qcompile.passes.fuse_decoder import DecoderFusionPass, fuse_decoder
from qcompile.passes.reference import decode_to_float
from qcompile.targets.x86 import decoder_kernels as DK
from qcompile.targets.x86 import host_target
from tests.test_llm_frontend import built, empty_past, run, tiny_hf_model  # noqa: F401 - `built` is a fixture

log = logging.getLogger(__name__)
OPS = (qops.RMSNORM, qops.ADD_RMSNORM, qops.ROTARY, qops.GATED_ACT)


# -- kernels against numpy -------------------------------------------------------------------------------


def _build(func):
    target = tvm.target.Target(host_target().tvm)
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)["main"]


def _call(kernel, out_shape, *arrays):
    """Run ``kernel`` on ``arrays`` (copied into 64-byte aligned TVM tensors) and return its output."""
    out = tvm.runtime.tensor(np.zeros(out_shape, np.float32))
    kernel(*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays], out)
    return out.numpy()


@pytest.mark.parametrize("d", [48, 576, 6])
def test_rms_norm_kernel_matches_numpy(d):
    kernel = _build(DK.rms_norm(d, 1e-5))
    rng = np.random.default_rng(d)
    gamma = rng.standard_normal(d).astype(np.float32)
    for rows in (1, 3, 7, 40):  # 40 x 576 runs the parallel branch
        x = (rng.standard_normal((rows, d)) * 3).astype(np.float32)
        np.testing.assert_allclose(_call(kernel, x.shape, x, gamma), DK.reference_rms_norm(x, gamma, 1e-5),
                                   rtol=1e-5, atol=1e-5)


def test_add_rms_norm_kernel_matches_numpy():
    kernel = _build(DK.add_rms_norm(576, 1e-6))
    rng = np.random.default_rng(1)
    gamma = rng.standard_normal(576).astype(np.float32)
    for rows in (1, 3, 40):
        a, b = rng.standard_normal((2, rows, 576)).astype(np.float32)
        y, total = (tvm.runtime.tensor(np.zeros((rows, 576), np.float32)) for _ in range(2))
        kernel(*[tvm.runtime.tensor(x) for x in (a, b, gamma)], y, total)
        want_y, want_sum = DK.reference_add_rms_norm(a, b, gamma, 1e-6)
        np.testing.assert_allclose(total.numpy(), want_sum, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(y.numpy(), want_y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("heads_axis", [1, 2])
@pytest.mark.parametrize("heads,d", [(3, 16), (9, 64)])
def test_rotary_kernel_matches_numpy(heads, d, heads_axis):
    kernel = _build(DK.rotary(d, heads_axis == 2))
    rng = np.random.default_rng(d + heads_axis)
    for b, s, bc in ((1, 1, 1), (2, 3, 1), (3, 7, 3), (2, 100, 2)):  # the last runs in parallel
        x = rng.standard_normal((b, s, heads, d) if heads_axis == 2 else (b, heads, s, d)).astype(np.float32)
        cos, sin = rng.standard_normal((2, bc, s, d)).astype(np.float32)
        got = _call(kernel, (b, heads, s, d), x, cos, sin)
        np.testing.assert_allclose(got, DK.reference_rotary(x, cos, sin, heads_axis == 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", DK.ACTIVATIONS)
@pytest.mark.parametrize("n", [1536, 45])
def test_gated_act_kernel_matches_numpy(activation, n):
    kernel = _build(DK.gated_act(n, activation))
    rng = np.random.default_rng(n)
    for rows in (1, 3, 7, 12):  # 12 x 1536 runs in parallel
        gate = (rng.standard_normal((rows, n)) * 4).astype(np.float32)
        gate[0, :3] = [-90.0, 90.0, 0.0]  # saturated and zero
        up = rng.standard_normal((rows, n)).astype(np.float32)
        np.testing.assert_allclose(_call(kernel, gate.shape, gate, up), DK.reference_gated_act(gate, up, activation),
                                   rtol=1e-5, atol=1e-5)


def test_unknown_activation_is_refused():
    with pytest.raises(ValueError, match="relu"):
        DK.gated_act(8, "relu")


# -- the rewrites -----------------------------------------------------------------------------------------


class RMSNorm(OpRun):
    op_domain = qops.DOMAIN

    def _run(self, x, gamma, epsilon=None):
        return (DK.reference_rms_norm(x, gamma, epsilon).astype(np.float32),)


class AddRMSNorm(OpRun):
    op_domain = qops.DOMAIN

    def _run(self, a, b, gamma, epsilon=None):
        return DK.reference_add_rms_norm(a, b, gamma, epsilon)


class Rotary(OpRun):
    op_domain = qops.DOMAIN

    def _run(self, x, cos, sin, heads_axis=None):
        as3 = lambda t: t.reshape(-1, *t.shape[-2:])  # noqa: E731 - [S, d] / [1, S, d] / [B, 1, S, d]
        return (DK.reference_rotary(x, as3(cos), as3(sin), heads_axis == 2).astype(np.float32),)


class GatedAct(OpRun):
    op_domain = qops.DOMAIN

    def _run(self, gate, up, activation=None):
        return (DK.reference_gated_act(gate, up, activation),)


def _evaluator(model: onnx.ModelProto) -> ReferenceEvaluator:
    return ReferenceEvaluator(model, new_ops=[RMSNorm, AddRMSNorm, Rotary, GatedAct])


def _fused(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    fused, counts = fuse_decoder(onnx.shape_inference.infer_shapes(model))
    onnx.checker.check_model(fused)
    return fused, counts


def _ort(model: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


@pytest.mark.parametrize("variant,layers,activation", [("llama", 2, "silu"), ("qwen2", 3, "silu"),
                                                        ("gemma", 2, "gelu_tanh"), ("llama_exact_gelu", 2, "gelu")])
def test_frontend_decoders_fuse_every_block_and_compute_the_same(built, variant, layers, activation):
    _, _, model, sess = built(variant)
    fused, counts = _fused(model)
    assert counts == {qops.RMSNORM: 2 * layers + 1, qops.ADD_RMSNORM: 2 * layers, qops.ROTARY: 2 * layers,
                      qops.GATED_ACT: layers}
    ops = [n for n in fused.graph.node if n.domain == qops.DOMAIN]
    assert {onnx.helper.get_attribute_value(n.attribute[0]) for n in ops if n.op_type == qops.GATED_ACT} == \
        {activation.encode()}
    # q and k were [batch, seq, heads, d] before their transposes: both are folded into the Rotary op
    assert {n.attribute[0].i for n in ops if n.op_type == qops.ROTARY} == {2}
    assert not {"Sqrt", "Reciprocal", "Neg", "Sigmoid", "Tanh", "Erf"} & {n.op_type for n in fused.graph.node}
    # every residual add is folded into the norm after it (the last one into the final norm)
    assert not [n.name for n in fused.graph.node if n.name.endswith("_residual")]
    ids = np.array([[3, 17, 101, 45, 9], [200, 12, 7, 7, 1]], np.int64)
    feeds = {"input_ids": ids, **empty_past(model, 2)}
    want = sess.run(None, feeds)
    got = _evaluator(fused).run(None, feeds)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())


# The forms torch.onnx.export(dynamo=True) writes for transformers' Llama / Qwen2 / Gemma blocks
EXPORTED_RMS_NORM = """
<ir_version: 9, opset_import: ["" : 18]>
g (float[N, S, 48] x, float[48] gamma) => (float[N, S, 48] y) {
    two = Constant<value = float {2.0}>()
    axes = Constant<value = int64[1] {-1}>()
    eps = Constant<value = float {1e-5}>()
    sq = Pow(x, two)
    mean = ReduceMean<keepdims = 1, noop_with_empty_axes = 0>(sq, axes)
    var = Add(mean, eps)
    rms = Sqrt(var)
    inv = Reciprocal(rms)
    n = Mul(x, inv)
    y = Mul(gamma, n)
}
"""

EXPORTED_ROTARY = """
<ir_version: 9, opset_import: ["" : 18]>
g (float[B, S, 64] qp, float[B, S, 16] c, float[B, S, 16] s) => (float[B, 4, S, 16] y) {
    split_shape = Constant<value = int64[4] {0, 0, 4, 16}>()
    view = Reshape(qp, split_shape)
    q = Transpose<perm = [0, 2, 1, 3]>(view)
    one = Constant<value = int64[1] {1}>()
    cos = Unsqueeze(c, one)
    sin = Unsqueeze(s, one)
    zero = Constant<value = int64[1] {0}>()
    half = Constant<value = int64[1] {8}>()
    end = Constant<value = int64[1] {9223372036854775807}>()
    axis = Constant<value = int64[1] {3}>()
    x1 = Slice(q, zero, half, axis, one)
    x2 = Slice(q, half, end, axis, one)
    neg = Neg(x2)
    rotated = Concat<axis = -1>(neg, x1)
    a = Mul(q, cos)
    b = Mul(rotated, sin)
    y = Add(a, b)
}
"""

EXPORTED_GATED = """
<ir_version: 9, opset_import: ["" : 20]>
g (float[N, 40] gate, float[N, 40] up) => (float[N, 40] swiglu, float[N, 40] geglu, float[N, 40] gelu) {
    sig = Sigmoid(gate)
    silu = Mul(sig, gate)
    swiglu = Mul(up, silu)
    t = Gelu<approximate = "tanh">(gate)
    geglu = Mul(t, up)
    e = Gelu(up)
    gelu = Mul(e, gate)
}
"""


@pytest.mark.parametrize("text,counts,feeds", [
    (EXPORTED_RMS_NORM, {qops.RMSNORM: 1}, {"x": (2, 3, 48), "gamma": (48,)}),
    (EXPORTED_ROTARY, {qops.ROTARY: 1}, {"qp": (2, 5, 64), "c": (2, 5, 16), "s": (2, 5, 16)}),
    (EXPORTED_GATED, {qops.GATED_ACT: 3}, {"gate": (3, 40), "up": (3, 40)}),
], ids=["rms_norm", "rotary", "gated"])
def test_exported_forms_are_fused(text, counts, feeds):
    model = onnx.parser.parse_model(text)
    fused, got = _fused(model)
    assert {k: v for k, v in got.items() if v} == counts
    assert all(n.domain == qops.DOMAIN or n.op_type in ("Constant", "Reshape", "Unsqueeze") for n in fused.graph.node)
    rng = np.random.default_rng(0)
    feeds = {k: (rng.standard_normal(shape) * 2).astype(np.float32) for k, shape in feeds.items()}
    for a, b in zip(_evaluator(fused).run(None, feeds), _ort(model, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


NEAR_MISSES = """
<ir_version: 9, opset_import: ["" : 18]>
g (float[N, 48] x, float[48] gamma, float[N, 48] gamma2, float[2, 4, 6, 16] q, float[6, 16] cos,
   float[6, 16] sin)
    => (float[N, 48] norm_rows, float[N, 48] broadcast_gamma, float[2, 4, 6, 16] wrong_halves, float[N, 48] relu_glu) {
    sq0 = Mul(x, x)
    axis0 = Constant<value = int64[1] {0}>()
    mean0 = ReduceMean<keepdims = 1>(sq0, axis0)
    eps = Constant<value = float {1e-6}>()
    var0 = Add(mean0, eps)
    rms0 = Sqrt(var0)
    n0 = Div(x, rms0)
    norm_rows = Mul(n0, gamma)
    sq1 = Mul(x, x)
    last = Constant<value = int64[1] {-1}>()
    mean1 = ReduceMean<keepdims = 1>(sq1, last)
    var1 = Add(mean1, eps)
    rms1 = Sqrt(var1)
    n1 = Div(x, rms1)
    broadcast_gamma = Mul(n1, gamma2)
    sizes = Constant<value = int64[2] {4, 12}>()
    x1, x2 = Split<axis = -1>(q, sizes)
    neg = Neg(x2)
    rotated = Concat<axis = -1>(neg, x1)
    a = Mul(q, cos)
    b = Mul(rotated, sin)
    wrong_halves = Add(a, b)
    r = Relu(x)
    relu_glu = Mul(r, x)
}
"""


def test_near_misses_are_left_alone_and_logged(caplog):
    """Mean over rows, a per-element gamma [N, 48], unequal rotary halves, an activation we don't fuse."""
    with caplog.at_level(logging.DEBUG, logger="qcompile.passes.fuse_decoder"):
        _, counts = _fused(onnx.parser.parse_model(NEAR_MISSES))
    assert not any(counts.values())
    assert "at norm_rows: ReduceMean must reduce the last axis only" in caplog.text
    assert "at broadcast_gamma: gamma must have shape [48]" in caplog.text
    assert "at wrong_halves: the halves must be 8 wide, found [4, 12]" in caplog.text


def test_a_transpose_read_elsewhere_stays():
    model = onnx.parser.parse_model(EXPORTED_ROTARY.replace("=> (float[B, 4, S, 16] y)",
                                                            "=> (float[B, 4, S, 16] y, float[B, 4, S, 16] q)"))
    fused, counts = _fused(model)
    assert counts[qops.ROTARY] == 1
    assert [n.attribute[0].i for n in fused.graph.node if n.op_type == qops.ROTARY] == [1]
    assert "Transpose" in {n.op_type for n in fused.graph.node}


def test_pass_reports_counts_and_imports_the_domain(built, caplog):
    _, _, model, _ = built("llama")
    ir_model = ir.from_proto(model)
    fusion = DecoderFusionPass()
    with caplog.at_level(logging.INFO, logger="qcompile.passes.fuse_decoder"):
        assert fusion(ir_model).modified
    assert ir_model.opset_imports[qops.DOMAIN] == qops.OPSET
    assert "5 RMSNorm, 4 AddRMSNorm, 4 Rotary, 2 GatedAct" in caplog.text
    assert not DecoderFusionPass()(ir_model).modified  # nothing left to fuse


# -- compiled for x86 ----------------------------------------------------------------------------------------


def _main_kernels(mod) -> list[str]:
    """The PrimFuncs ``main`` calls (one entry per call), after TVM's fusion and our scheduling."""
    from tvm import relax

    from qcompile.targets.x86.build import relax_pipeline

    target = tvm.target.Target(host_target().tvm)
    with target:
        mod = relax_pipeline(target)(mod)
    calls = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.GlobalVar) and \
                isinstance(mod[e.op], tvm.tirx.PrimFunc):
            calls.append(e.op.name_hint)

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return calls


@pytest.fixture(scope="module")
def quantized_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuse-llama")
    tiny_hf_model("llama", seed=5).save_pretrained(folder, safe_serialization=True)
    return folder, quantize_model(folder, CompileOptions(bpw=3.0, min_weights=0)).qproto


def test_fused_module_matches_onnxruntime_on_the_unfused_graph(quantized_llama):
    from tvm import relax

    from qcompile.targets.x86.build import relax_pipeline
    from qcompile.targets.x86.lower import lower_to_relax

    _, qproto = quantized_llama
    fused, counts = fuse_decoder(qproto)
    assert counts == {qops.RMSNORM: 5, qops.ADD_RMSNORM: 4, qops.ROTARY: 4, qops.GATED_ACT: 2}
    lowered = lower_to_relax(fused)
    target = tvm.target.Target(host_target().tvm)
    with target:
        vm = relax.VirtualMachine(tvm.compile(lowered.mod, target=target, relax_pipeline=relax_pipeline(target)),
                                  tvm.cpu())
    params = [tvm.runtime.tensor(lowered.params[n]) for n in lowered.param_names]
    if len(lowered.mod["main"].params) != len(qproto.graph.input) + len(params):  # params bundled in one tuple
        import tvm_ffi

        params = [tvm_ffi.convert(params)]
    inputs = [i.name for i in qproto.graph.input]
    ref = ort.InferenceSession(decode_to_float(qproto).SerializeToString(), providers=["CPUExecutionProvider"])
    names = [o.name for o in ref.get_outputs()]
    rng = np.random.default_rng(1)
    feeds = {"input_ids": rng.integers(0, 256, (2, 7)), **empty_past(qproto, 2)}
    for seq in (3, 1, 1):  # prefill of 7, then 3 tokens, then single-token decode steps (batch 2)
        want = ref.run(None, feeds)
        got = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(feeds[n])) for n in inputs], *params)
        for name, a, b in zip(names, got, want):
            np.testing.assert_allclose(a.numpy(), b, rtol=1e-4, atol=1e-4 * np.abs(b).max(), err_msg=name)
        feeds = {"input_ids": rng.integers(0, 256, (2, seq)),
                 **{n.replace("present", "past_key_values"): v for n, v in zip(names[1:], want[1:])}}


@pytest.mark.slow
def test_fusion_calls_fewer_kernels(quantized_llama):
    from qcompile.targets.x86.lower import lower_to_relax

    _, qproto = quantized_llama
    before = _main_kernels(lower_to_relax(qproto).mod)
    after = _main_kernels(lower_to_relax(fuse_decoder(qproto)[0]).mod)
    log.info("TVM kernels called by main: %d unfused, %d fused", len(before), len(after))
    assert len(after) < len(before)
    assert sum(k.startswith(("rms_norm", "add_rms_norm", "rotary", "gated_act")) for k in after) == 11


@pytest.mark.slow  # a whole compile (20-30 s here); the fast tier compiles the fused graph above
def test_compile_records_the_fusion_in_the_manifest(quantized_llama, tmp_path):
    from qcompile.compiler.cli import _parser

    folder, _ = quantized_llama
    fusion = compile_model(folder, tmp_path / "f.qcm", CompileOptions(bpw=3.0, min_weights=0)).manifest["fusion"]
    assert {op: fusion[op] for op in OPS} == {qops.RMSNORM: 5, qops.ADD_RMSNORM: 4, qops.ROTARY: 4, qops.GATED_ACT: 2}
    assert _parser().parse_args(["compile", "m.onnx", "-o", "m.qcm", "--no-fuse"]).no_fuse


# -- models exported by torch (slow: an export takes 10-40 s) ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("exporter", ["dynamo", "torchscript", "optimum"])
def test_torch_exports_fuse_every_block(tmp_path_factory, arch, exporter):
    exported_mod = pytest.importorskip("tests.exported")
    try:
        exp = exported_mod.exported(tmp_path_factory, arch, exporter)
    except exported_mod.ExporterUnavailable as e:
        pytest.skip(str(e))
    model = load_onnx(exp.path)  # as the compiler reads it: shape arithmetic on static dims folded
    fused, counts = _fused(model)
    layers = exp.n_layers
    assert counts == {qops.RMSNORM: 2 * layers + 1, qops.ADD_RMSNORM: 2 * layers, qops.ROTARY: 2 * layers,
                      qops.GATED_ACT: layers}
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = exported_mod.ort_feeds(sess, np.array([[5, 17, 99]], np.int64))
    for a, b in zip(_evaluator(fused).run(None, feeds), sess.run(None, feeds)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
