"""Host cost of a Vulkan decode step: what the runtime (``qcompile.runtime.vulkan``) spends on the CPU.

A decode step at a new cache length needs a program for its dims (buffers from the pool, uniform values,
dispatches with their bind groups, made from the last step's: :class:`~qcompile.runtime.vulkan._Program`)
and one compute pass recorded (every dispatch: pipeline, bind group, workgroups).  Both are Python + wgpu
work on the host, paid every token whatever the GPU; on the H100 (bench/gpu/NOTES.md) recording alone was
4.9 ms of a SmolLM2 step whose GPU time was 3.0 ms.

This builds a decoder from the LLM frontend at random weights (Llama shape, ``--layers``; 4.25 bpw,
``--target vulkan``), generates ``--tokens`` tokens greedily through ``session.generate`` (the cache on the
device; its ms a token include the driver running the kernels: lavapipe's CPU time here), then times the
host work alone for that many consecutive cache lengths: making each step's program from the last one,
and recording its pass into a command encoder that is never submitted (best of 3 rounds; the first also
makes each length's bind groups).  With ``--baseline FILE`` (an earlier ``runtime/vulkan.py``, e.g.
``git show HEAD~1:runtime/vulkan.py > FILE``) both runtimes run the same artifact in alternating rounds,
their tokens compared.

    python bench/vulkan_host.py [--layers 8] [--tokens 64] [--rounds 3] [--baseline FILE [--baseline-label TEXT]]
                                [--out PATH]
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results_io import write_json  # noqa: E402

log = logging.getLogger("vulkan_host")


def build(out: Path, layers: int) -> Path:
    import onnx  # noqa: PLC0415

    from qcompile.compiler.driver import CompileOptions, compile_model  # noqa: PLC0415
    from qcompile.compiler.frontends import DecoderConfig, build_decoder  # noqa: PLC0415
    from qcompile.compiler.frontends.decoder import expected_weights  # noqa: PLC0415

    cfg = DecoderConfig(family="llama", vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=layers,
                        num_heads=4, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-5, max_positions=1024)
    rng = np.random.default_rng(0)
    weights = {n: (0.05 * rng.standard_normal(s)).astype(np.float32) for n, s in expected_weights(cfg).items()}
    onnx.save(build_decoder(cfg, weights), out / "decoder.onnx")
    return compile_model(out / "decoder.onnx", out / "decoder.qcm",
                         CompileOptions(target="vulkan", bpw=4.25, min_weights=1024)).path


def _runtime(baseline: Path | None):
    if baseline is None:
        import qcompile.runtime.vulkan as vk  # noqa: PLC0415

        return vk
    spec = importlib.util.spec_from_file_location("qcompile.runtime.vulkan_baseline", baseline)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def measure(vk, art: Path, tokens: int, rounds: int) -> dict:
    """Host milliseconds a decode step spends making its program and recording its pass, for ``tokens``
    consecutive cache lengths, apart from running it (no submit: the driver's work stays out), best of
    ``rounds`` (the first round also makes the bind groups of each length); and a real ``generate``."""
    gc.collect()  # (the earlier runs' sessions: collections scan what is alive)
    sess = vk.load(art)
    prompt = [5, 6, 7, 8]
    t = time.perf_counter()
    out = sess.generate(prompt, tokens)
    step_ms = 1e3 * (time.perf_counter() - t) / tokens
    last = next(reversed(sess._programs.values()))  # noqa: SLF001  (a decode step's program)
    variant, env0 = last.variant, dict(last.env)
    grow = [k for k in env0 if k not in variant.when]  # the cache length(s)
    program_ms, encode_ms = [], []
    for _ in range(rounds):
        env, prog, made, recorded = dict(env0), None, 0.0, 0.0
        for step in range(tokens):  # as generate: each program from the last, recorded, the older dropped
            env.update({k: env0[k] + 1 + step for k in grow})
            t = time.perf_counter()
            prog = vk._Program(sess, variant, dict(env), prog)  # noqa: SLF001
            made += time.perf_counter() - t
            encoder = sess.device.create_command_encoder()
            t = time.perf_counter()
            sess._encode(encoder, prog)  # noqa: SLF001
            recorded += time.perf_counter() - t
            encoder.finish()
        program_ms.append(1e3 * made / tokens)
        encode_ms.append(1e3 * recorded / tokens)
    return {"program_ms": min(program_ms), "encode_ms": min(encode_ms), "program_ms_rounds": program_ms,
            "encode_ms_rounds": encode_ms, "generate_step_ms": step_ms,
            "calls": [len(v.plan["calls"]) for v in sess.variants], "tokens": [int(v) for v in out]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", type=Path, help="an earlier runtime/vulkan.py, run on the same artifact in turns")
    ap.add_argument("--baseline-label", default="", help="what the baseline is (e.g. its commit), for the JSON")
    ap.add_argument("--out", type=Path, default=Path("bench/results/vulkan_host.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    runtimes = {"current": _runtime(None)}
    if args.baseline:
        runtimes["baseline"] = _runtime(args.baseline)
    with tempfile.TemporaryDirectory() as tmp:
        art = build(Path(tmp), args.layers)
        adapter = runtimes["current"].request_device().adapter.info
        rows, first = [], None
        for rnd in range(args.rounds):
            for name, vk in runtimes.items():
                r = measure(vk, art, args.tokens, 3)
                first = first or r["tokens"]
                rows.append({"runtime": name, "round": rnd, **{k: v for k, v in r.items() if k != "tokens"},
                             "tokens_equal_first_run": r["tokens"] == first})
                log.info("%-8s round %d: program %.2f ms, encode %.2f ms a step (%d calls); generate %.2f ms a token",
                         name, rnd, r["program_ms"], r["encode_ms"], r["calls"][0], r["generate_step_ms"])
    summary = {}
    for name in runtimes:
        mine = [r for r in rows if r["runtime"] == name]
        summary[name] = {k: float(np.median([r[k] for r in mine]))
                         for k in ("program_ms", "encode_ms", "generate_step_ms")}
    if "baseline" in summary:
        summary["baseline_over_current"] = {k: summary["baseline"][k] / summary["current"][k]
                                            for k in ("program_ms", "encode_ms", "generate_step_ms")}
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.machine())
    doc = {"machine": {"cpu": cpu, "cores": os.cpu_count(),
                       "platform": platform.platform(), "vulkan_adapter": {k: str(v) for k, v in adapter.items()}},
           "model": f"llama decoder, {args.layers} layers, hidden 128, 4.25 bpw, random weights",
           "tokens": args.tokens, "baseline": (args.baseline_label or str(args.baseline)) if args.baseline else None,
           "rows": rows, "median": summary}
    write_json(doc, args.out)
    print(summary)
    return 0 if all(r["tokens_equal_first_run"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
