"""CPU GEMV/GEMM benchmark: qcompile's dequantizing matmul kernels against onnxruntime, in one run.

For each weight shape [K, N] (4096x4096, 4096x11008) and batch M (1, 32), on the same float weights W:

    qcompile          y = x @ dequantize(W_q).T   (``targets.x86.kernels.dequant_matmul``, q{2,3,4,5,6,8}g128, q4g32)
    ort fp32          a one-node ONNX MatMul, W [K, N] an initializer
    ort MatMulNBits   com.microsoft MatMulNBits, bits=4, block_size=128, uint8 zero points, made by
                      onnxruntime's own MatMulNBitsQuantizer from that one-node model; accuracy_level 0
                      (float activations) and 4 (int8 activations), the same quantized initializers

Every result is checked before it is timed: ours against numpy (x @ dequantized.T), MatMulNBits against
numpy on its own initializers dequantized per the contrib-op spec (and both against the fp32 product, as
``rel_err_vs_fp32``). Time = median of ``time.perf_counter`` around single calls after warmup, the systems
of one shape and batch taking turns in a few rounds so that load from other processes (a shared machine)
falls on all of them alike; ORT runs through an IO binding so both sides pay only their call overhead.
Both use os.cpu_count() threads (TVM's own default is half of that). Ratios are ``other_ms / ms``: > 1
means this row is faster; ``*_by_min`` ratios use each system's fastest call. bpw counts every stored
bit (for MatMulNBits: the initializers' bytes).

    python bench/gemv_cpu.py [--quick] [--out PATH]

``--quick`` (smoke test, < 60 s): 4096x4096, batch 1, q4g128 and the ORT baselines only; it writes JSON
only where ``--out`` is given. The full run writes ``bench/results/gemv_cpu.json``.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qcompile.passes.formats import PRESETS, WeightFormat
from qcompile.targets.x86.kernels import dequant_matmul, tile_for, tile_groups, tile_planes

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.results_io import write_json  # noqa: E402

__all__ = ["run_benchmark", "main"]

log = logging.getLogger(__name__)

SHAPES = ((4096, 4096), (4096, 11008))  # [K, N]
BATCHES = (1, 32)
FORMATS = ("q2g128", "q3g128", "q4g128", "q5g128", "q6g128", "q8g128", "q4g32")
NBITS_BLOCK = 128
NBITS_LEVELS = (0, 4)
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "gemv_cpu.json"

# timing: every system of one (shape, batch) runs in ROUNDS interleaved chunks (rotating order), so load
# from other processes on a shared machine falls on all of them alike; ~BUDGET_S of calls per system
WARMUP = 3
BUDGET_S = 1.5
ROUNDS = 5
MIN_RUNS = 10
MAX_RUNS = 400
PAUSE_S = 0.05  # before each chunk, so the previous thread pool's spinning workers are asleep


# -- timing --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    ms: float  # median
    ms_min: float
    runs: int


def time_interleaved(calls: dict[str, object]) -> dict[str, Timing]:
    """Median wall time of each ``call()``: warmup, then ROUNDS rounds of one chunk per system."""
    chunks = {}
    for name, call in calls.items():
        for _ in range(WARMUP):
            call()
        t0 = time.perf_counter()
        call()
        once = time.perf_counter() - t0
        runs = min(MAX_RUNS, max(MIN_RUNS, int(BUDGET_S / max(once, 1e-6))))
        chunks[name] = -(-runs // ROUNDS)
    samples: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for rnd in range(ROUNDS):
        for name in names[rnd % len(names):] + names[: rnd % len(names)]:
            call = calls[name]
            time.sleep(PAUSE_S)
            for _ in range(chunks[name]):
                t0 = time.perf_counter()
                call()
                samples[name].append(time.perf_counter() - t0)
    return {
        name: Timing(statistics.median(v) * 1e3, min(v) * 1e3, len(v)) for name, v in samples.items()
    }


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def check_close(name: str, y: np.ndarray, ref: np.ndarray, tol: float) -> float:
    """Max abs error relative to max |ref|; raises when above ``tol``."""
    err = float(np.abs(y - ref).max() / np.abs(ref).max())
    if not err <= tol:
        raise RuntimeError(f"{name}: result differs from its numpy reference (max error {err:.3g} > {tol:g})")
    return err


# -- qcompile ------------------------------------------------------------------------------------------


class QcompileMatmul:
    """One compiled ``dequant_matmul`` kernel with its weights in the tiled layout."""

    def __init__(self, fmt: WeightFormat, w: np.ndarray, target):
        import tvm  # noqa: PLC0415

        n, k = w.shape
        self.fmt = fmt
        q = fmt.quantize(w)
        self.w_deq = q.dequantize()
        planes = fmt.pack(q.codes)
        stored = sum(p.nbytes for p in planes) + q.scales.nbytes + q.zeros.nbytes
        bits = fmt.storage_bits((n, k)).total
        if stored * 8 != bits:
            raise RuntimeError(f"{fmt.name}: packed arrays hold {stored * 8} bits, storage_bits says {bits}")
        self.bpw = bits / (n * k)
        t = tile_for(n)
        tiled = tile_planes(planes, t)
        weights = [tiled[0], tiled[-1], tile_groups(q.scales, t), tile_groups(q.zeros, t)]  # w1 = w0 if one plane
        pf = dequant_matmul(fmt, k, n)
        t0 = time.perf_counter()
        lib = tvm.compile(tvm.IRModule({"main": pf.with_attr("global_symbol", "main")}), target=target)
        self.compile_s = time.perf_counter() - t0
        self._lib = lib  # keeps the module alive
        self.fn = lib["main"]
        self.dev = tvm.cpu()
        self.weights = [tvm.runtime.tensor(a, self.dev) for a in weights]
        self.n = n

    def bind(self, x: np.ndarray):
        """(call, output) for input x; tvm.runtime.tensor copies into aligned memory."""
        import tvm  # noqa: PLC0415

        xt = tvm.runtime.tensor(x, self.dev)
        yt = tvm.runtime.tensor(np.zeros((x.shape[0], self.n), np.float32), self.dev)
        args = [xt, *self.weights, yt]
        fn = self.fn
        return (lambda: fn(*args)), (lambda: yt.numpy())


# -- onnxruntime ---------------------------------------------------------------------------------------


def fp32_model(w: np.ndarray) -> onnx.ModelProto:
    """One MatMul: x [M, K] @ W [K, N], W = w.T an initializer, M symbolic."""
    n, k = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="matmul")],
        "gemv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
        [numpy_helper.from_array(np.ascontiguousarray(w.T), "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def nbits_model(fp32: onnx.ModelProto, accuracy_level: int) -> onnx.ModelProto:
    """The fp32 model with its MatMul replaced by onnxruntime's quantizer (4 bits, asymmetric)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer  # noqa: PLC0415

    quant = MatMulNBitsQuantizer(
        onnx.ModelProto.FromString(fp32.SerializeToString()),
        bits=4,
        block_size=NBITS_BLOCK,
        is_symmetric=False,
        accuracy_level=accuracy_level,
    )
    quant.process()
    model = quant.model.model
    (node,) = model.graph.node
    if node.op_type != "MatMulNBits":
        raise RuntimeError(f"onnxruntime's quantizer produced {node.op_type}, expected MatMulNBits")
    return model


def with_accuracy_level(model: onnx.ModelProto, level: int) -> onnx.ModelProto:
    """A copy of a MatMulNBits model (same initializers) with another accuracy_level."""
    out = onnx.ModelProto.FromString(model.SerializeToString())
    node = out.graph.node[0]
    kept = [a for a in node.attribute if a.name != "accuracy_level"]
    del node.attribute[:]
    node.attribute.extend(kept)
    node.attribute.append(helper.make_attribute("accuracy_level", level))
    return out


def nbits_dequantize(model: onnx.ModelProto) -> tuple[np.ndarray, float]:
    """float32 W [N, K] of a 4-bit MatMulNBits node per the contrib-op spec, and its bits per weight.

    B uint8 [N, K/bs, bs/2] (low nibble first), scales float [N*K/bs], zero_points uint8
    [N * ceil((K/bs)/2)] (low nibble first, rows padded to whole bytes); w = (q - zp) * scale.
    """
    node = model.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, bs = attrs["K"], attrs["N"], attrs["block_size"]
    if attrs["bits"] != 4:
        raise ValueError(f"expected a 4-bit MatMulNBits, got bits={attrs['bits']}")
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    b = inits[node.input[1]]
    scales = inits[node.input[2]].astype(np.float32).reshape(n, k // bs)
    kb = k // bs
    q = np.stack([b & 0xF, b >> 4], axis=-1).reshape(n, kb, bs).astype(np.float32)
    if len(node.input) > 3 and node.input[3]:
        zp_bytes = inits[node.input[3]].reshape(n, (kb + 1) // 2)
        zp = np.stack([zp_bytes & 0xF, zp_bytes >> 4], axis=-1).reshape(n, -1)[:, :kb].astype(np.float32)
    else:
        zp = np.full((n, kb), 8.0, np.float32)
    w = ((q - zp[..., None]) * scales[..., None]).reshape(n, k)
    stored_bits = 8 * sum(inits[name].nbytes for name in node.input[1:] if name in inits)
    return w, stored_bits / (n * k)


class OrtMatmul:
    """An InferenceSession (default: intra_op_num_threads = os.cpu_count()), run through an IO binding."""

    def __init__(self, model: onnx.ModelProto, threads: int | None = None):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        self.sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])

    def bind(self, x: np.ndarray, n: int):
        x = np.ascontiguousarray(x)
        y = np.zeros((x.shape[0], n), np.float32)
        binding = self.sess.io_binding()
        binding.bind_cpu_input("x", x)
        binding.bind_output("y", "cpu", 0, np.float32, list(y.shape), y.ctypes.data)
        sess = self.sess

        def call(x=x, y=y):  # x and y are bound by address: the call keeps them alive
            sess.run_with_iobinding(binding)

        return call, (lambda: y.copy())


# -- the benchmark -------------------------------------------------------------------------------------


def source_info() -> dict:
    """The commit benchmarked, and whether the kernel sources differ from it."""
    import subprocess  # noqa: PLC0415

    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    dirty = git("status", "--porcelain", "--", "targets", "passes")
    return {"git_commit": git("rev-parse", "HEAD"), "kernels_modified": bool(dirty) if dirty is not None else None}


def machine_info() -> dict:
    import tvm  # noqa: PLC0415

    model, flags = "unknown", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and model == "unknown":
            model = line.split(":", 1)[1].strip()
        elif line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    simd = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni") if f in flags]
    l3 = Path("/sys/devices/system/cpu/cpu0/cache/index3/size")
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "simd": simd,
        "l3_cache": l3.read_text().strip() if l3.exists() else None,
        "platform": platform.platform(),
        "tvm_mcpu": str(tvm.target.Target.from_device(tvm.cpu()).attrs["mcpu"]),
        "tvm_version": tvm.__version__,
        "tvm_num_threads_env": os.environ.get("TVM_NUM_THREADS"),
        "tvm_num_threads": int(tvm.get_global_func("runtime.NumThreads")()),
        "onnxruntime_version": ort.__version__,
        "ort_intra_op_num_threads": os.cpu_count(),
        "loadavg_before": list(os.getloadavg()),
    }


def _row(shape, m, system, variant, bpw, timing: Timing, err: float) -> dict:
    k, n = shape
    return {
        "shape": [k, n],
        "batch": m,
        "system": system,
        "variant": variant,
        "bpw": bpw,
        "ms": timing.ms,
        "ms_min": timing.ms_min,
        "runs": timing.runs,
        "gflops": 2.0 * m * k * n / (timing.ms * 1e6),
        "rel_err_vs_fp32": err,
        "loadavg_1m": os.getloadavg()[0],
    }


def bench_shape(shape, batches, formats, target, rng) -> list[dict]:
    k, n = shape
    w = (rng.standard_normal((n, k), dtype=np.float32) * 0.02).astype(np.float32)
    log.info("shape K=%d N=%d: quantizing and compiling %d formats", k, n, len(formats))
    ours = {}
    for name in formats:
        ours[name] = QcompileMatmul(PRESETS[name], w, target)
        log.info("  %s: %.2f bpw, compiled in %.1f s", name, ours[name].bpw, ours[name].compile_s)
    fp32 = fp32_model(w)
    nbits = {NBITS_LEVELS[0]: nbits_model(fp32, NBITS_LEVELS[0])}
    for level in NBITS_LEVELS[1:]:
        nbits[level] = with_accuracy_level(nbits[NBITS_LEVELS[0]], level)
    nbits_w, nbits_bpw = nbits_dequantize(nbits[NBITS_LEVELS[0]])

    rows = []
    for m in batches:
        x = rng.standard_normal((m, k), dtype=np.float32)
        y_fp32 = x @ w.T
        # (system, variant, bpw, call, rel_err); each result is checked before anything is timed
        systems = []
        for name, mm in ours.items():
            call, result = mm.bind(x)
            call()
            check_close(f"qcompile {name} {shape} M={m}", result(), x @ mm.w_deq.T, 1e-4)
            systems.append(("qcompile", name, mm.bpw, call, rel_err(result(), y_fp32)))
        # fp32-1t: one intra-op thread, for context: on a loaded machine two threads can be slower than one
        ort_runs = [
            ("ort fp32", "fp32", None, 32.0, fp32, y_fp32, 1e-4),
            ("ort fp32", "fp32-1t", 1, 32.0, fp32, y_fp32, 1e-4),
        ]
        for level, model in nbits.items():
            # int8 activations (level 4) round x: compare loosely with the float dequantized product
            tol = 1e-3 if level == 0 else 0.05
            ort_runs.append(("ort MatMulNBits", f"acc{level}", None, nbits_bpw, model, x @ nbits_w.T, tol))
        sessions = []  # keeps the sessions alive while their calls are timed
        for system, variant, threads, bpw, model, ref, tol in ort_runs:
            sessions.append(OrtMatmul(model, threads))
            call, result = sessions[-1].bind(x, n)
            call()
            check_close(f"{system} {variant} {shape} M={m}", result(), ref, tol)
            systems.append((system, variant, bpw, call, rel_err(result(), y_fp32)))
        log.info("  M=%d: timing %d systems", m, len(systems))
        timings = time_interleaved({variant: call for _, variant, _, call, _ in systems})
        batch_rows = [_row(shape, m, sy, var, bpw, timings[var], err) for sy, var, bpw, _, err in systems]
        for r in batch_rows:
            log.info("  M=%d %-8s %8.3f ms (min %.3f)", m, r["variant"], r["ms"], r["ms_min"])
        del systems, sessions, timings
        fp32_row = next(r for r in batch_rows if r["variant"] == "fp32")
        acc4_row = next((r for r in batch_rows if r["variant"] == "acc4"), None)
        for r in batch_rows:
            r["ratio_vs_ort_fp32"] = fp32_row["ms"] / r["ms"]
            r["ratio_vs_nbits_acc4"] = acc4_row["ms"] / r["ms"] if acc4_row else None
            # the same ratios from the fastest call of each (noise on a shared machine only adds time)
            r["ratio_vs_ort_fp32_by_min"] = fp32_row["ms_min"] / r["ms_min"]
            r["ratio_vs_nbits_acc4_by_min"] = acc4_row["ms_min"] / r["ms_min"] if acc4_row else None
        rows += batch_rows
    return rows


def summarize(rows: list[dict]) -> dict:
    ours = [r for r in rows if r["system"] == "qcompile"]
    b1 = [r for r in ours if r["batch"] == 1]
    slower = [f"{r['variant']} {r['shape'][0]}x{r['shape'][1]}" for r in b1 if r["ratio_vs_ort_fp32"] <= 1.0]
    best_fp32 = {}
    for r in rows:
        if r["system"] == "ort fp32":
            key = (tuple(r["shape"]), r["batch"])
            best_fp32[key] = min(best_fp32.get(key, float("inf")), r["ms"])
    slower_best = [
        f"{r['variant']} {r['shape'][0]}x{r['shape'][1]}"
        for r in b1
        if r["ms"] >= best_fp32[(tuple(r["shape"]), 1)]
    ]
    summary = {
        "target": "qcompile faster than ORT fp32 at batch 1 for every bit width",
        "target_met": bool(b1) and not slower,
        "batch1_not_faster_than_ort_fp32": slower,
        "target_met_vs_faster_ort_fp32_threading": bool(b1) and not slower_best,
        "target_met_by_min": bool(b1) and all(r["ratio_vs_ort_fp32_by_min"] > 1.0 for r in b1),
        "batch1_not_faster_than_faster_ort_fp32_threading": slower_best,
        "per_config": {},
    }
    for key in sorted({(tuple(r["shape"]), r["batch"]) for r in rows}):
        sel = [r for r in rows if (tuple(r["shape"]), r["batch"]) == key]
        mine = [r for r in sel if r["system"] == "qcompile"]
        by = {r["variant"]: r["ms"] for r in sel}
        lo = {r["variant"]: r["ms_min"] for r in sel}
        summary["per_config"][f"{key[0][0]}x{key[0][1]} M={key[1]}"] = {
            "ort_fp32_ms": by.get("fp32"),
            "ort_fp32_1thread_ms": by.get("fp32-1t"),
            "nbits_acc0_ms": by.get("acc0"),
            "nbits_acc4_ms": by.get("acc4"),
            "q4g128_ms": by.get("q4g128"),
            "q4g128_vs_nbits_acc4": (by["acc4"] / by["q4g128"]) if "acc4" in by and "q4g128" in by else None,
            "q4g128_vs_nbits_acc0": (by["acc0"] / by["q4g128"]) if "acc0" in by and "q4g128" in by else None,
            "q4g128_vs_nbits_acc4_by_min": (lo["acc4"] / lo["q4g128"]) if "acc4" in lo and "q4g128" in lo else None,
            "ort_fp32_min_ms": lo.get("fp32"),
            "q4g128_min_ms": lo.get("q4g128"),
            "nbits_acc4_min_ms": lo.get("acc4"),
            "ratio_vs_ort_fp32_min": min(r["ratio_vs_ort_fp32"] for r in mine) if mine else None,
            "ratio_vs_ort_fp32_max": max(r["ratio_vs_ort_fp32"] for r in mine) if mine else None,
        }
    return summary


def run_benchmark(quick: bool = False) -> dict:
    """Run every configuration (or the quick subset) and return the results document."""
    import tvm  # noqa: PLC0415

    # TVM's thread pool defaults to half the hardware threads (it assumes SMT): 1 of 2 cores here. Give it
    # the cores ORT gets; read when the pool starts (machine_info starts it and records the count).
    os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))
    machine = machine_info()
    target = tvm.target.Target({"kind": "llvm", "mcpu": machine["tvm_mcpu"]})
    rng = np.random.default_rng(0)
    shapes, batches, formats = (SHAPES[:1], (1,), ("q4g128",)) if quick else (SHAPES, BATCHES, FORMATS)
    t0 = time.perf_counter()
    rows = []
    for shape in shapes:
        rows += bench_shape(shape, batches, formats, target, rng)
    machine["loadavg_after"] = list(os.getloadavg())
    machine["bench_wall_s"] = time.perf_counter() - t0
    return {
        "benchmark": "gemv_cpu",
        "quick": quick,
        "method": (
            f"median of perf_counter-timed calls ({WARMUP} warmup, ~{BUDGET_S:g} s or {MIN_RUNS}-{MAX_RUNS} calls "
            f"per system, run in {ROUNDS} interleaved rounds across the systems of one shape and batch); ORT "
            "through an IO binding; ratios = other_ms / ms (>1: this row faster); random normal "
            "weights (std 0.02) and inputs, seed 0; rel_err_vs_fp32 = ||y - x@W.T|| / ||x@W.T||"
        ),
        "source": source_info(),
        "machine": machine,
        "rows": rows,
        "summary": summarize(rows),
    }




def format_table(doc: dict) -> str:
    lines = [
        f"{'shape':>10} {'M':>3} {'system':<16} {'variant':<8} {'bpw':>6} {'ms':>9} {'min ms':>9} {'GFLOP/s':>8} "
        f"{'vs fp32':>8} {'vs acc4':>8} {'rel err':>7}"
    ]
    for r in doc["rows"]:
        acc4 = f"{r['ratio_vs_nbits_acc4']:8.2f}" if r["ratio_vs_nbits_acc4"] is not None else f"{'-':>8}"
        lines.append(
            f"{r['shape'][0]:>4}x{r['shape'][1]:<5} {r['batch']:>3} {r['system']:<16} {r['variant']:<8} "
            f"{r['bpw']:6.3f} {r['ms']:9.3f} {r['ms_min']:9.3f} {r['gflops']:8.1f} {r['ratio_vs_ort_fp32']:8.2f} {acc4} "
            f"{r['rel_err_vs_fp32']:7.4f}"
        )
    m = doc["machine"]
    lines.append(
        f"{m['cpu']} ({m['cores']} cores, mcpu {m['tvm_mcpu']}), load {m['loadavg_before'][0]:.2f} -> "
        f"{m['loadavg_after'][0]:.2f}; target met: {doc['summary']['target_met']}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="4096x4096, batch 1, q4g128 + ORT only (smoke test)")
    parser.add_argument("--out", type=Path, help=f"JSON path (default: {DEFAULT_OUT}; none for --quick)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    doc = run_benchmark(quick=args.quick)
    out = args.out or (None if args.quick else DEFAULT_OUT)
    if out is not None:
        write_json(doc, out)
        log.info("wrote %s", out)
    print(format_table(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
