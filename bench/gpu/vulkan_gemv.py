"""Batch-1 quantized GEMV through the Vulkan runtime (wgpu on Vulkan): time and check one kernel.

Two steps, because the GPU machine carries the runtime only (no TVM compiler):

    # build machine: one-layer models y[1, N] = x[1, K] @ W, compiled with --target vulkan, + references
    python -m bench.gpu.vulkan_gemv build --dir .gpu/vulkan [--bits 2 3 4 5 6 8] [--shapes 4096x4096 ...]
    # GPU machine (VK_DRIVER_FILES=... for NVIDIA, DESIGN §7): median time a call, GB/s, max error
    python -m bench.gpu.vulkan_gemv run --dir .gpu/vulkan --json bench/results/vulkan_gemv.json

From Python (the GPU bench script): :func:`build_gemv` then :func:`time_gemv` on an artifact.  The time
is the median over rounds of one command buffer holding ``reps`` dispatches of the plan's calls
(the GEMV kernel alone for these models), each pass binding another copy of the weights so that they
come from DRAM, not a cache.  GB/s counts the bytes the kernel must move: packed codes + fp16 scales +
fp16 zeros + float32 x and y.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import numpy as np

log = logging.getLogger("vulkan_gemv")

BITS = (2, 3, 4, 5, 6, 8)
SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (N, K)
GROUP = 128
CACHE_BYTES = 256 << 20  # weight copies per timing add up to at least this


def _name(bits: int, n: int, k: int, group: int) -> str:
    return f"gemv_b{bits}_n{n}_k{k}_g{group}"


def build_gemv(out_dir: str | Path, bits: int, n: int, k: int, group: int = GROUP, seed: int = 0) -> Path:
    """Compile ``y = x @ W`` (W [K, N] random, format q{bits}g{group}) for Vulkan into ``out_dir``;
    also write ``<name>.npz`` with x and the float64 numpy reference of the stored weights."""
    import onnx  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    from qcompile.compiler.driver import CompileOptions, compile_model  # noqa: PLC0415
    from qcompile.passes.formats import PRESETS  # noqa: PLC0415
    from safetensors.numpy import load_file  # noqa: PLC0415

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = _name(bits, n, k, group)
    model = onnx.parser.parse_model(f"""
        <ir_version: 8, opset_import: ["" : 17]>
        gemv (float[1, {k}] x) => (float[1, {n}] y) {{ y = MatMul(x, W) }}""")
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) / math.sqrt(k)).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(w, "W"))
    onnx.save(model, str(out_dir / f"{name}.onnx"))
    fmt = f"q{bits}g{group}"
    art = compile_model(out_dir / f"{name}.onnx", out_dir / f"{name}.qcm",
                        CompileOptions(target="vulkan", bpw=9, overrides=[("^W$", fmt)], min_weights=1)).path
    params = load_file(str(art / "params.safetensors"))
    f = PRESETS[fmt]
    planes = [params[p] for p in sorted(params) if ".q" in p.rsplit("/", 1)[-1]]
    codes = f.unpack(planes, (n, k)).astype(np.float64)
    wd = codes * np.repeat(params["W.scales"].astype(np.float64), group, 1) + \
        np.repeat(params["W.zeros"].astype(np.float64), group, 1)
    x = rng.standard_normal((1, k)).astype(np.float32)
    np.savez(out_dir / f"{name}.npz", x=x, y=x.astype(np.float64) @ wd.T,
             weight_bytes=sum(a.nbytes for a in params.values()))
    return art


def time_gemv(artifact: str | Path, device=None, reps: int = 200, rounds: int = 5) -> dict:
    """Check and time the GEMV artifact written by :func:`build_gemv` on ``device`` (a wgpu device;
    default: the first Vulkan GPU).  Returns microseconds a call, GB/s and the max abs error."""
    from qcompile.runtime import vulkan  # noqa: PLC0415

    artifact = Path(artifact)
    ref = np.load(artifact.with_suffix(".npz"))
    sess = vulkan.Session(artifact, device)
    (y,) = sess.run(None, {"x": ref["x"]})
    err = float(np.abs(y - ref["y"]).max())
    wbytes = int(ref["weight_bytes"])
    copies = max(1, math.ceil(CACHE_BYTES / wbytes))
    seconds = sess.time_calls({"x": ref["x"]}, reps=reps, copies=copies, rounds=rounds)
    moved = wbytes + ref["x"].nbytes + y.nbytes
    return {"us": seconds * 1e6, "GBps": moved / seconds / 1e9, "max_abs_err": err,
            "ref_max_abs": float(np.abs(ref["y"]).max()), "copies": copies, "reps": reps,
            "device": sess.device.adapter.info["device"]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=("build", "run"))
    ap.add_argument("--dir", default=".gpu/vulkan")
    ap.add_argument("--bits", type=int, nargs="*", default=list(BITS))
    ap.add_argument("--shapes", nargs="*", default=[f"{n}x{k}" for n, k in SHAPES], help="NxK")
    ap.add_argument("--json", help="write the results here (run)")
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes]
    results = []
    for bits in args.bits:
        for n, k in shapes:
            art = Path(args.dir) / f"{_name(bits, n, k, GROUP)}.qcm"
            if args.step == "build":
                build_gemv(args.dir, bits, n, k)
                continue
            r = dict(time_gemv(art, reps=args.reps), bits=bits, n=n, k=k, group=GROUP)
            log.info("%d-bit %dx%d: %.1f us, %.0f GB/s, max err %.2e", bits, n, k, r["us"], r["GBps"],
                     r["max_abs_err"])
            results.append(r)
    if args.step == "run" and args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"gemv": results}, indent=1))


if __name__ == "__main__":
    main()
