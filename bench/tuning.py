"""MetaSchedule tuning: speedup on x86, and tuning throughput over a TVM RPC tracker with 1, 2, 4 servers.

    python bench/tuning.py [--trials 8] [--rpc-trials 4]

- ``x86``: a small CNN (4 convolutions, batch 1, 4.25 bpw: the largest conv runs on our quantized kernel,
  the others stay float and are tuned) is tuned into a fresh database (``--trials`` schedules per kernel),
  then compiled without and with ``--db`` and both artifacts are timed in alternation (median ms).
- ``rpc``: a static MLP tuned over a loopback tracker with 1, 2 and 4 ``rpc_server`` processes
  (``--rpc-trials`` per kernel, fresh database each time); seconds of the tuning run (search, local builds,
  remote measurements).
- ``server_killed``: 2 servers, one killed (SIGKILL to its process group) after its second session;
  ``trials_done`` counts the measurements that reached the database with a valid time.

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
    return {"model": CNN_NAME, "untuned_ms": report.model_default_ms, "tuned_ms": report.model_tuned_ms,
            "speedup": report.model_speedup, "trials_per_kernel": trials, "tuning_seconds": report.seconds,
            "not_tuned": report.result.skipped, "kernels": kernels}


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
    p.add_argument("--out", type=Path, default=RESULTS / "tuning.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("qcompile.passes").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="qcompile-bench-tuning-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        x86 = bench_x86(work, args.trials)
        log.info("x86: %s", {k: v for k, v in x86.items() if k != "kernels"})
        rpc = [bench_rpc(work, n, args.rpc_trials) for n in args.servers]
        killed = bench_rpc(work, 2, args.rpc_trials, kill_one=True)
        total = time.perf_counter() - t0
    doc = {"machine": machine(),
           "note": ("one run; tracker, servers, builder and search share this machine's cores with each other "
                    "(and with other users' jobs): throughput cannot scale past the core count here"),
           "x86": x86, "rpc": rpc,
           "server_killed": {"trials_done": killed["valid_trials"], "trials": killed["trials"],
                             "completed": killed["completed"], "sessions_per_server": killed["sessions_per_server"],
                             "seconds": killed["seconds"]},
           "seconds": total}
    write_json(doc, args.out)
    print(f"wrote {args.out}: x86 {x86['untuned_ms']:.3f} -> {x86['tuned_ms']:.3f} ms; "
          f"rpc {[(r['servers'], round(r['seconds'], 1)) for r in rpc]}; killed: {doc['server_killed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
