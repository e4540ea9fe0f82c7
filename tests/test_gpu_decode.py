"""What the GPU decode benchmark (bench/gpu/decode.py, bench/gpu/vulkan.py) relies on, checked without a
GPU: artifacts run on generated parameters of the exact names/shapes/dtypes, the generator passes the KV
cache between steps as device tensors, the WGSL GEMV and the greedy argmax kernel compute what numpy
does (Vulkan on Mesa lavapipe)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from safetensors.numpy import load_file

from bench.gpu import decode as gpu_decode
from bench.gpu import vulkan as gpu_vulkan
from qcompile.compiler.driver import CompileOptions, compile_model
from qcompile.compiler.frontends import DecoderConfig, build_decoder
from qcompile.compiler.frontends.decoder import expected_weights
from qcompile.runtime import ArtifactError, Session
from qcompile.runtime.manifest import PARAMS, param_specs
from tests.helpers import NO_VULKAN, vulkan_available

CONFIG = DecoderConfig(family="llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2,
                       num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5, max_positions=256)


needs_vulkan = pytest.mark.skipif(not vulkan_available(), reason=NO_VULKAN)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory):
    d = tmp_path_factory.mktemp("decoder")
    rng = np.random.default_rng(0)
    weights = {n: (0.05 * rng.standard_normal(s)).astype(np.float32) for n, s in expected_weights(CONFIG).items()}
    model = build_decoder(CONFIG, weights)
    onnx.save(model, d / "tiny.onnx")
    return model, d


def test_random_params_match_the_artifact(decoder, tmp_path):
    """The stripped artifact lists its params' names, shapes, dtypes; the generated arrays have exactly
    those (the same on every call), and the runtime runs on them, refusing to run without them."""
    model, d = decoder
    full = compile_model(d / "tiny.onnx", tmp_path / "x.qcm", CompileOptions(target="x86", bpw=4.25,
                                                                               min_weights=1024, fuse=False)).path
    art = gpu_decode.strip_artifact(full, tmp_path / "strip" / "tiny.x86.qcm")
    assert not (art / PARAMS).exists()
    stored = load_file(str(full / PARAMS))
    specs = gpu_decode.load_specs(art)
    assert specs == param_specs(full / PARAMS)
    params = gpu_decode.random_params(specs)
    assert sorted(params) == sorted(stored)
    for name, a in stored.items():
        assert params[name].shape == a.shape and params[name].dtype == a.dtype, name
    again = gpu_decode.random_params(specs)
    assert all(np.array_equal(params[n], again[n]) for n in params)
    with pytest.raises(ArtifactError, match=PARAMS):
        Session(art)
    tokens = Session(art, params=params).generate([5, 6, 7], 4)
    assert len(tokens) == 4


def test_generator_keeps_the_cache_on_the_device(decoder, tmp_path):
    """Each step's ``present`` outputs go back as the next ``past`` inputs unchanged (no host copy)."""
    _, d = decoder
    art = compile_model(d / "tiny.onnx", tmp_path / "x.qcm", CompileOptions(target="x86", bpw=4.25, min_weights=1024,
                                                                              fuse=False)).path
    sess = Session(art)
    calls = []
    run_device = sess.run_device

    def spy(args):
        outs = run_device(args)
        calls.append((args, outs))
        return outs

    sess.run_device = spy
    sess.generate([1, 2, 3], 4)
    assert len(calls) == 4
    n_past = len(sess.generator().past)
    for (_, outs), (args, _) in zip(calls, calls[1:]):
        past_args = args[1:1 + n_past]
        assert all(a is o for a, o in zip(past_args, outs[1:]))
        assert all(type(a).__name__ == "Tensor" for a in past_args)


@needs_vulkan
def test_vulkan_decoder_on_generated_params_matches_onnxruntime(decoder, tmp_path):
    """bench.gpu.decode's check, small: the Vulkan decoder (decode steps on the GEMV plan; float
    activations, ``int8_dot=False``) with generated parameters against onnxruntime on the same parameters
    decoded by numpy."""
    from qcompile.runtime import vulkan

    model, d = decoder
    full = compile_model(d / "tiny.onnx", tmp_path / "v.qcm", CompileOptions(target="vulkan", bpw=4.25,
                                                                               min_weights=1024, int8_dot=False)).path
    plan = json.loads((full / "plan.json").read_text())
    assert plan["variants"][0]["when"] == {"batch": 1, "seq": 1}
    wgsl = {c.split("\n", 1)[0]: c for c in (full / "kernels.wgsl").read_text().split("// qcompile-kernel: ")[1:]}
    qmatmuls = {name: src for name, src in wgsl.items() if "qmatmul_" in name}
    # the decode step's quantized matmuls are the GEMV kernel (codes to floats by the 0x4B000000 bit trick),
    # the prefill's dlight's matmul
    assert qmatmuls and all(("1258291200u" in src) == name.startswith("v0/") for name, src in qmatmuls.items())
    art = gpu_decode.strip_artifact(full, tmp_path / "strip" / "tiny.vulkan.qcm")
    ref = gpu_decode.reference(model, full, steps=3)
    sess = vulkan.Session(art, params=gpu_decode.random_params(gpu_decode.load_specs(art)))
    past_names = [i.name for i in sess.inputs if i.name.startswith("past_key_values")]
    past = {n: np.zeros((1, CONFIG.num_kv_heads, 0, CONFIG.head_dim), np.float32) for n in past_names}
    ids = ref["prompt"][None]
    for i in range(4):
        outs = sess.run(None, {"input_ids": ids, **past})
        past = dict(zip(past_names, outs[1:]))
        assert gpu_decode._rel(outs[0][0, -1], ref["logits"][i]) < 1e-5
        ids = np.array([[ref["tokens"][i]]], np.int64)


def test_cuda_decoder_gets_a_decode_step_with_cuda_graphs(decoder, tmp_path):
    """A CUDA decoder's module has ``decode_step`` (main with batch = seq = 1) whose static parts TVM's
    RewriteCUDAGraph turns into captured regions (at least one a layer), ``main`` none; the manifest says
    which function and dims, and the artifact built by the CLI path records the same."""
    import shutil as sh

    if sh.which("nvcc") is None and not Path("/usr/local/cuda/bin/nvcc").is_file():
        pytest.skip("building for CUDA needs nvcc")
    from qcompile.compiler.driver import lower_model, quantize_model
    from qcompile.targets import BackendOptions, make_backend, resolve_target
    from qcompile.targets.cuda.build import BuiltSources, build_library

    _, d = decoder
    opts = CompileOptions(target="cuda", bpw=4.25, min_weights=1024)
    q = quantize_model(d / "tiny.onnx", opts)
    backend = make_backend(resolve_target("cuda"), BackendOptions(int8_dot=True))
    lowered, interface, _, _ = lower_model(q, backend, opts)
    mod, extra = backend.add_decoder_functions(lowered.mod, CONFIG.vocab_size, lowered.num_inputs)
    assert extra == {"decode_step": {"function": "decode_step", "dims": {"batch": 1, "seq": 1}, "cuda_graphs": True}}
    sink = BuiltSources()
    build_library(mod, {"kind": "cuda", "arch": "sm_90"}, str(tmp_path / "m.so"), sink)
    assert sink.cuda_graphs["main"] == 0 and sink.cuda_graphs["decode_step"] >= CONFIG.num_layers, sink.cuda_graphs
    art = compile_model(d / "tiny.onnx", tmp_path / "c.qcm", opts).path
    assert json.loads((art / "manifest.json").read_text())["decode_step"] == extra["decode_step"]


@pytest.mark.gpu
@pytest.mark.skipif(not (Path("/dev/nvidia0").exists() or Path("/dev/nvidiactl").exists()), reason="needs an NVIDIA GPU")
def test_cuda_decode_step_matches_main_on_the_gpu(decoder, tmp_path):
    """On the GPU: each decode step through ``decode_step`` (CUDA-graph replays) gives main's logits and
    cache on the same inputs (1e-5: its static-shape kernels sum in another order), step after step."""
    _, d = decoder
    art = compile_model(d / "tiny.onnx", tmp_path / "c.qcm", CompileOptions(target="cuda", bpw=4.25,
                                                                              min_weights=1024)).path
    sess = Session(art)
    gen = sess.generator()
    past = [sess.device_tensor(a) for a in gen._empty_past(1)]
    outs = sess.run_device(gen._args(np.array([[5, 6, 7, 8]], np.int64), past, 0))
    for _ in range(5):
        past, tok = list(outs[1:]), int(np.argmax(outs[0].numpy()[0, -1]))
        args = gen._args(np.array([[tok]], np.int64), past, past[0].shape[2])
        main = [o.numpy() for o in sess._main(*args, *sess._param_args)]
        outs = sess.run_device(args)  # the decode step
        for got, want in zip(outs, main):
            assert gpu_decode._rel(got.numpy(), want) < 1e-5


@needs_vulkan
def test_vulkan_generate_keeps_the_cache_on_the_device(decoder, tmp_path):
    """The Vulkan session's generate (run_device: the cache stays in device buffers, copied on the device
    into the next step's inputs) gives the tokens of step-by-step ``run`` with host arrays, which match
    onnxruntime's logits (float activations); an output used after a later run is refused."""
    from qcompile.runtime import QCompileError, vulkan

    model, d = decoder
    full = compile_model(d / "tiny.onnx", tmp_path / "v.qcm", CompileOptions(target="vulkan", bpw=4.25,
                                                                               min_weights=1024, int8_dot=False)).path
    ref = gpu_decode.reference(model, full, steps=3)  # on generated parameters
    art = gpu_decode.strip_artifact(full, tmp_path / "strip" / "tiny.vulkan.qcm")
    sess = vulkan.Session(art, params=gpu_decode.random_params(gpu_decode.load_specs(art)))
    tokens = sess.generate(ref["prompt"].tolist(), 4)
    assert tokens == ref["tokens"][:4].tolist()
    past_names = [i.name for i in sess.inputs if i.name.startswith("past_key_values")]
    past = {n: np.zeros((1, CONFIG.num_kv_heads, 0, CONFIG.head_dim), np.float32) for n in past_names}
    ids, host = ref["prompt"][None], []
    for _ in range(4):
        outs = sess.run(None, {"input_ids": ids, **past})
        past = dict(zip(past_names, outs[1:]))
        host.append(int(np.argmax(outs[0][0, -1])))
        ids = np.array([[host[-1]]], np.int64)
    assert host == tokens
    # device tensors: the same logits and cache as the host path, step by step
    dev_past = [sess.device_tensor(np.zeros((1, CONFIG.num_kv_heads, 0, CONFIG.head_dim), np.float32))
                for _ in past_names]
    first = sess.run_device([sess.device_tensor(ref["prompt"][None]), *dev_past])
    logits = first[0].numpy()
    assert gpu_decode._rel(logits[0, -1], ref["logits"][0]) < 1e-5
    second = sess.run_device([np.array([[tokens[0]]], np.int64), *first[1:]])
    assert second[1].shape == (1, CONFIG.num_kv_heads, len(ref["prompt"]) + 1, CONFIG.head_dim)
    assert gpu_decode._rel(second[0].numpy()[0, -1], ref["logits"][1]) < 1e-5
    with pytest.raises(QCompileError, match="overwritten by run"):
        first[0].numpy()
    with pytest.raises(QCompileError, match="overwritten by run"):
        sess.run_device([np.array([[tokens[1]]], np.int64), *first[1:]])


@needs_vulkan
@pytest.mark.parametrize("bits, n, k, config", [(2, 40, 256, None), (3, 36, 256, (4, 64)), (4, 100, 384, None),
                                                (5, 17, 256, (16, 64)), (6, 20, 512, (4, 64)), (8, 64, 128, (8, 32)), (4, 50, 4096, (8, 64, False)),
                                                # GemvConfig flags: split_reduce, inplace, early
                                                (2, 40, 256, (8, 64, True, False, False, True)),
                                                (3, 36, 256, (4, 64, True, True, True, True)),
                                                (4, 100, 2560, (16, 64, True, True, True)),
                                                (4, 50, 4096, (8, 32, True, True, True, True)),
                                                (8, 64, 128, (8, 32, True, True, True, True)), (8, 72, 256, None)])
def test_vulkan_gemv_kernel(tmp_path, bits, n, k, config):
    """targets.vulkan.kernels.gemv against float64 numpy: every width, N not a multiple of the rows,
    K not a multiple of the threads' chunks."""
    from qcompile.runtime import vulkan
    from qcompile.targets.vulkan.kernels import GemvConfig

    art = gpu_vulkan.build_gemv(tmp_path, "vulkan", bits, n, k, GemvConfig(*config) if config else None)
    params = gpu_decode.random_params(gpu_decode.load_specs(art))
    x = np.random.default_rng(bits).standard_normal((1, k)).astype(np.float32)
    ref = gpu_vulkan._reference(gpu_vulkan._fmt(bits), params, x, n, k)
    (y,) = vulkan.Session(art, params=params).run(None, {"x": x})
    assert gpu_decode._rel(y, ref) < 1e-5


@needs_vulkan
@pytest.mark.parametrize("vocab", [1000, 4096])
def test_greedy_argmax_kernel(tmp_path, vocab):
    """targets.cuda.sampling.argmax_last (run through the WGSL path: same TIR) equals np.argmax of the last
    position, the first index among ties."""
    from tvm import relax

    from qcompile.runtime import vulkan
    from qcompile.runtime.manifest import FORMAT_VERSION, sha256_file
    from qcompile.targets.cuda.sampling import argmax_last
    from qcompile.targets.vulkan.build import build_plan

    bb = relax.BlockBuilder()
    logits = relax.Var("logits", relax.TensorType([2, 3, vocab], "float32"))
    with bb.function("main", [logits]):
        gv = bb.add_func(argmax_last(vocab, threads=256), "argmax_last")
        with bb.dataflow():
            out = bb.emit_output(relax.call_tir(gv, [logits], relax.TensorType([2], "int32")))
        bb.emit_func_output(out)
    mod = bb.get()
    mod["main"] = mod["main"].with_attr("num_input", 1)
    files = build_plan(mod, [], 1, tmp_path)
    from safetensors.numpy import save_file

    save_file({}, str(tmp_path / PARAMS))
    (tmp_path / "manifest.json").write_text(json.dumps({
        "format_version": FORMAT_VERSION, "target": {"device": "vulkan"}, "params": [], "tensors": [], "bpw": {},
        "inputs": [{"name": "logits", "dtype": "float32", "shape": [2, 3, vocab]}],
        "outputs": [{"name": "ids", "dtype": "int32", "shape": [2]}],
        "files": {f: sha256_file(tmp_path / f) for f in [*files, PARAMS]}}))
    sess = vulkan.Session(tmp_path)
    x = np.random.default_rng(vocab).standard_normal((2, 3, vocab)).astype(np.float32)
    x[1, 2, [7, vocab - 3]] = 50.0  # a tie: the first index wins
    (ids,) = sess.run(None, {"logits": x})
    assert ids.tolist() == np.argmax(x[:, -1], axis=-1).tolist() == [ids[0], 7]
    shutil.rmtree(tmp_path)


def test_large_model_loads_without_whole_model_serialization(decoder, tmp_path, monkeypatch):
    """A model over protobuf's 2 GB (here: a limit lowered to force that path) is checked from its file
    and shape-inferred on dims-only stubs of its large initializers: the same graph as the normal path."""
    from qcompile.compiler import frontend

    model, d = decoder
    normal = frontend.load_onnx(d / "tiny.onnx")
    onnx.save(model, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.data", size_threshold=1024)
    monkeypatch.setattr(frontend, "PROTOBUF_LIMIT", 1 << 16)
    monkeypatch.setattr(frontend, "LARGE_INITIALIZER", 1 << 12)
    large = frontend.load_onnx(tmp_path / "ext.onnx")
    types = lambda m: {v.name: v.type.SerializeToString() for v in [*m.graph.value_info, *m.graph.output]}  # noqa: E731
    assert types(large) == types(normal) and len(types(normal)) > 50
    assert [n.SerializeToString() for n in large.graph.node] == [n.SerializeToString() for n in normal.graph.node]
