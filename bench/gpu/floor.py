"""What one launch can stream: the floor under the batch-1 GEMV timings of bench/gpu/gpu_check.py.

A GEMV of 31 MB (4-bit 14336x4096) is one launch that must read its bytes from DRAM.  Besides the bytes
at the copy rate it pays a fixed cost: the launch (a kernel node of a CUDA graph), the DRAM latency
before the first bytes arrive, and the tail of the last blocks.  This measures that cost without any
GEMV arithmetic: a kernel that only reads ``B`` bytes (16-byte loads, ``unroll`` of them in flight per
thread, XOR-folded into a register, written only if the fold hits a constant) at each byte count that
a GEMV of gpu_check must move, under several launch shapes, and an empty kernel.  Timed exactly like
gpu_check (:class:`bench.gpu.gpu_check._Timer`: CUDA-graph replays over buffer copies exceeding L2,
median), in the same run as our GEMV and torch's fp16 linear on the same shapes, so each GEMV gets a
ratio to the fastest pure read of its bytes.

    python -m bench.gpu.floor build --dir .gpu/floor                  # here (TVM, nvcc)
    python -m bench.gpu.floor run --dir .gpu/floor --gemv .gpu/build --json $OUT/gpu_floor.json   # GPU
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

from bench.gpu.gpu_check import BITS, GROUP, L2_BYTES, SHAPES, _copy_bandwidth, _gemv_bytes, _Timer

log = logging.getLogger("floor")

SMS = 132  # H100 SXM
# (threads a block, 16-byte loads a thread in flight, blocks: 0 = one pass (as many blocks as the bytes
# need), else a grid-stride loop over that many blocks)
CONFIGS = ((256, 4, 0), (256, 8, 0), (512, 4, 0), (1024, 4, 0), (128, 8, 0), (256, 8, SMS * 4), (512, 8, SMS * 2),
           (1024, 4, SMS * 2), (256, 16, SMS * 4))
MAGIC = 0x1E3779B9


def sizes() -> dict[str, int]:
    """name -> bytes: each GEMV of gpu_check (bits x shape) and torch's fp16 linear on each shape."""
    out = {f"b{bits}_n{n}_k{k}": _gemv_bytes(bits, n, k, GROUP) for bits in BITS for n, k in SHAPES}
    out.update({f"fp16_n{n}_k{k}": 2 * (n * k + k + n) for n, k in SHAPES})
    return out


def _cfg_name(cfg) -> str:
    t, u, b = cfg
    return f"t{t}u{u}" + (f"p{b}" if b else "")


def read_kernel(nbytes: int, threads: int, unroll: int, blocks: int):
    """numpy: ``np.bitwise_xor.reduce(a)`` folded per thread; ``out[0] = fold`` only if it equals MAGIC."""
    from tvm.script import tirx as T  # noqa: PLC0415

    vec = -(-nbytes // 16)
    words = vec * 4
    per = threads * unroll
    nb = blocks or -(-vec // per)
    iters = -(-vec // (nb * per))

    @T.prim_func(private=True)
    def kernel(a: T.Buffer((words,), "int32"), out: T.Buffer((1,), "int32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for bx in T.thread_binding(nb, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                buf = T.alloc_buffer((unroll, 4), "int32", scope="local")
                acc = T.alloc_buffer((1,), "int32", scope="local")
                acc[0] = T.int32(0)
                for it in range(iters):
                    for u in T.unroll(unroll):
                        if ((it * nb + bx) * unroll + u) * threads + tx < vec:
                            for i in T.vectorized(4):
                                buf[u, i] = a[(((it * nb + bx) * unroll + u) * threads + tx) * 4 + i]
                        else:
                            for i in T.vectorized(4):
                                buf[u, i] = T.int32(0)
                    for u in T.unroll(unroll):
                        for i in T.unroll(4):
                            acc[0] = T.bitwise_xor(acc[0], buf[u, i])
                if acc[0] == T.int32(MAGIC):
                    out[0] = acc[0]

    return kernel, words


def empty_kernel(blocks: int, threads: int):
    """numpy: nothing (``out`` is written only where it holds MAGIC + the thread's index: never, as the
    timing passes zeros; a condition the compiler cannot prove false, so the launch stays)."""
    from tvm.script import tirx as T  # noqa: PLC0415

    @T.prim_func(private=True)
    def kernel(out: T.Buffer((1,), "int32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for bx in T.thread_binding(blocks, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                if out[0] == T.int32(MAGIC) + bx * threads + tx:
                    out[0] = T.int32(0)

    return kernel


def build(out: Path) -> None:
    import tvm  # noqa: PLC0415

    from qcompile.targets.cuda import build as cuda_build  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    funcs, table = {}, {"read": {}, "empty": []}
    for name, nbytes in sizes().items():
        for cfg in CONFIGS:
            fname = f"read_{name}_{_cfg_name(cfg)}"
            funcs[fname], words = read_kernel(nbytes, *cfg)
            table["read"].setdefault(name, {"bytes": nbytes, "words": words, "kernels": {}})["kernels"][
                _cfg_name(cfg)] = fname
    for blocks, threads in ((1, 32), (SMS, 256), (SMS * 8, 256)):
        fname = f"empty_b{blocks}_t{threads}"
        funcs[fname] = empty_kernel(blocks, threads)
        table["empty"].append({"blocks": blocks, "threads": threads, "kernel": fname})
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    cuda_build.ensure_cuda_codegen()
    sink = cuda_build.BuiltSources()
    t0 = time.perf_counter()
    with cuda_build._nvcc_callback("90", sink), target:  # noqa: SLF001
        lib = tvm.compile(mod, target=target)
    lib.export_library(str(out / "floor.so"))
    (out / "floor.json").write_text(json.dumps(table, indent=1))
    log.info("floor.so: %d kernels in %.1f s", len(funcs), time.perf_counter() - t0)


def run(root: Path, gemv_root: Path | None, json_path: Path) -> int:
    import torch  # noqa: PLC0415

    import qcompile.runtime  # noqa: F401, PLC0415
    from qcompile.runtime.session import _import_tvm_runtime, _load_cuda_runtime  # noqa: PLC0415

    tvm, _ = _import_tvm_runtime()
    _load_cuda_runtime(tvm)
    import tvm_ffi  # noqa: PLC0415

    from bench.gpu import gpu_check  # noqa: PLC0415

    table = json.loads((root / "floor.json").read_text())
    lib = tvm.runtime.load_module(str(root / "floor.so"))
    timer = _Timer(torch, tvm_ffi)
    res = {"device": torch.cuda.get_device_name(0), "copy_GBps": _copy_bandwidth(torch), "empty": [], "read": [],
           "gemv": [], "failures": []}

    def dump():
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(res, indent=1) + "\n")

    res["empty"], res["read"] = measure(lib, table, torch, tvm_ffi, timer, dump)
    if gemv_root is not None:  # our GEMV and torch's linear in the same run (gpu_check's timing)
        klib = tvm.runtime.load_module(str(gemv_root / "kernels.so"))
        kinds_path = gemv_root / "gemv_kinds.json"
        results = {"gemv": [], "checks": [], "gemv_variants": []}
        gpu_check._run_gemv(klib, torch, tvm_ffi, timer, results, res["failures"],  # noqa: SLF001
                            json.loads(kinds_path.read_text()) if kinds_path.is_file() else None)
        res["gemv"] = results["gemv"]
        res["checks"] = len(results["checks"])
    res["timing"] = "eager launches (CUDA graph capture failed)" if timer.eager else "CUDA graph replays"
    res["summary"] = summarize(res)
    dump()
    for row in res["summary"]:
        print(json.dumps(row))
    return 1 if res["failures"] else 0


def measure(lib, table: dict, torch, tvm_ffi, timer, after=None) -> tuple[list[dict], list[dict]]:
    """Rows of the empty kernels (us a launch) and of every read kernel (us, GB/s) of ``table``."""
    dev = torch.device("cuda")
    empty, read = [], []
    out_t = torch.zeros(1, dtype=torch.int32, device=dev)
    out_a = tvm_ffi.from_dlpack(out_t)
    for e in table["empty"]:
        f = lib[e["kernel"]]
        us = timer.time(lambda c: f(out_a), 64)  # noqa: B023
        empty.append({**e, "us": us})
        log.info("empty %s: %.2f us", e["kernel"], us)
    for name, entry in table["read"].items():
        nbytes, words = entry["bytes"], entry["words"]
        copies = max(2, math.ceil(L2_BYTES / nbytes))
        bufs = [torch.randint(-2**31, 2**31 - 1, (words,), dtype=torch.int32, device=dev) for _ in range(copies)]
        args = [tvm_ffi.from_dlpack(b) for b in bufs]
        for cfg, fname in entry["kernels"].items():
            f = lib[fname]
            us = timer.time(lambda c: f(args[c], out_a), copies)  # noqa: B023
            read.append({"name": name, "config": cfg, "bytes": nbytes, "us": us, "GBps": nbytes / us / 1e3})
            log.info("read %-18s %-10s %8.2f us %7.0f GB/s", name, cfg, us, nbytes / us / 1e3)
        del bufs, args
        torch.cuda.empty_cache()
        if after is not None:
            after()
    return empty, read


def summarize(res: dict) -> list[dict]:
    """Per GEMV row: the fastest pure read of its bytes (config, us, GB/s) and the GEMV's time over it."""
    best: dict[str, dict] = {}
    for r in res["read"]:
        if r["name"] not in best or r["us"] < best[r["name"]]["us"]:
            best[r["name"]] = r
    rows = []
    for g in res["gemv"]:
        name = (f"fp16_n{g['N']}_k{g['K']}" if g["target"] == "torch_fp16" else f"b{g['bits']}_n{g['N']}_k{g['K']}")
        if name not in best:
            continue
        b = best[name]
        rows.append({"target": g["target"], "bits": g["bits"], "N": g["N"], "K": g["K"], "us": g["us"],
                     "GBps": g["GBps"], "read_us": b["us"], "read_GBps": b["GBps"], "read_config": b["config"],
                     "us_over_read": g["us"] / b["us"]})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=("build", "run"))
    ap.add_argument("--dir", type=Path, default=Path(".gpu/floor"))
    ap.add_argument("--gemv", type=Path, default=None, help="gpu_check build folder: time its GEMVs in the same run")
    ap.add_argument("--json", type=Path, default=Path("bench/results/gpu_floor.json"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    if args.step == "build":
        build(args.dir)
        return 0
    return run(args.dir, args.gemv, args.json)


if __name__ == "__main__":
    sys.exit(main())
