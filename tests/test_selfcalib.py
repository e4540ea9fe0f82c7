"""Self-generated calibration text (compiler/selfcalib.py): sampled from the float decoder with its cache."""

from __future__ import annotations

import numpy as np
import pytest

from qcompile.compiler.calibdata import load_samples
from qcompile.compiler.driver import CompileOptions, quantize_model
from qcompile.compiler.selfcalib import _nucleus, generate_ids, is_decoder
from qcompile.runtime.errors import QCompileError
from tests.helpers import mlp_model as mlp
from tests.test_llm_frontend import TINY, empty_past, run


@pytest.fixture(scope="module")
def tiny(built_llama):
    return built_llama


@pytest.fixture(scope="module")
def built_llama(tmp_path_factory):
    from qcompile.compiler.frontends import load_llm
    from tests.test_llm_frontend import tiny_hf_model

    folder = tmp_path_factory.mktemp("llama")
    tiny_hf_model("llama").save_pretrained(folder, safe_serialization=True)
    return folder, load_llm(folder)


def test_nucleus_keeps_the_shortest_prefix_reaching_top_p():
    rng = np.random.default_rng(0)
    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 2000))
    picks = _nucleus(logits, rng, 1.0, 0.75)  # 0.5 + 0.3 reach 0.75: only tokens 0 and 1
    assert set(picks) == {0, 1}
    assert abs(np.mean(picks == 0) - 0.5 / 0.8) < 0.04
    assert set(_nucleus(logits[:50], rng, 1.0, 1e-9)) == {0}  # tiny top_p: greedy


def test_generated_tokens_come_from_the_models_own_nucleus(tiny):
    _, model = tiny
    ids = generate_ids(model, 4, 12, seed=3, top_p=0.6)
    assert ids.shape == (4, 12) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < TINY["vocab_size"]
    assert np.array_equal(ids, generate_ids(model, 4, 12, seed=3, top_p=0.6))  # deterministic
    # the float model run on the whole sequence at once (no cache): every sampled token lies in the
    # top-0.6 nucleus of the logits before it, so the cached generation saw the same logits
    from tests.test_llm_frontend import session

    logits, _ = run(session(model), ids, empty_past(model, 4))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    for b in range(4):
        for t in range(11):
            row = p[b, t]
            better = row[row > row[ids[b, t + 1]]].sum()  # the mass ranked above the sampled token
            assert better < 0.6 + 1e-6


def test_self_samples_feed_the_decoder_like_token_ids(tiny):
    _, model = tiny
    samples = load_samples("self", model, n_samples=3, seq_len=9)
    assert len(samples) == 3
    for feed in samples:
        assert feed["input_ids"].shape == (1, 9)
        assert all(v.shape[2] == 0 for k, v in feed.items() if k.startswith("past_key_values"))


def test_auto_calibrates_a_decoder_on_its_own_text_and_nothing_else(tiny, tmp_path):
    folder, model = tiny
    assert is_decoder(model) and not is_decoder(mlp())
    opts = dict(bpw=4.25, min_weights=0, calib="auto", calib_samples=4, calib_seq_len=16, workdir=tmp_path)
    q = quantize_model(folder, CompileOptions(**opts))
    assert q.calibration == "self" and q.sensitivity  # calibrated: sensitivities were measured
    plain = quantize_model(folder, CompileOptions(**(opts | {"calib": "none"})))
    assert plain.calibration is None and not plain.sensitivity


def test_self_refuses_a_model_that_is_not_a_decoder():
    with pytest.raises(QCompileError, match="needs a decoder LLM"):
        generate_ids(mlp(), 2, 4)


def test_without_calibration_the_head_gets_no_fewer_bits_than_the_average(tiny, tmp_path):
    folder, _ = tiny
    q = quantize_model(folder, CompileOptions(bpw=3.0, min_weights=0, calib="none", workdir=tmp_path))
    by_name = {r.name: r for r in q.records}
    head = by_name["lm_head.weight"]
    n = int(np.prod(head.onnx_shape))
    assert head.storage.total >= 3.0 * n
    total = sum(r.storage.total for r in q.records) / sum(int(np.prod(r.onnx_shape)) for r in q.records)
    assert total <= 3.0 + 1e-9  # and the budget still holds
