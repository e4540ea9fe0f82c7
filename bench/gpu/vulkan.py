"""The Vulkan target on the GPU machine (wgpu on NVIDIA's Vulkan driver): correctness and GEMV speed.

    # build machine: WGSL GEMV plans (every width and shape of the CUDA GEMV table, several kernels each)
    # and the test models for Vulkan and x86 with their inputs and x86 outputs
    python -m bench.gpu.vulkan build --dir .gpu/vulkan
    # GPU machine: bench/gpu/gpu_check.py run, or python -m bench.gpu.decode run (VK_DRIVER_FILES set as
    # DESIGN §7 says: bench/gpu/prepare_carry.sh shows the command)

GEMV kernels (``kind``), each a one-call plan ``y[1, N] = x[1, K] @ dequantize(W).T``:

- ``dlight``: the unscheduled quantized matmul with a static M = 1, scheduled by dlight's GEMV rule (the
  0.28 TB/s baseline of DESIGN §5);
- ``dlight_symbolic_m``: the same definition with a symbolic M (what a KV-cache model's decode step ran
  before :func:`qcompile.targets.vulkan.kernels.gemv`: dlight's matmul schedule), 4-bit only;
- ``vulkan``: :func:`qcompile.targets.vulkan.kernels.gemv` with its default launch shape (the decode
  plans use it), and with ``build --variants`` ``r{rows}t{threads}[s]`` variants of it at 2 and 4 bits
  (s: x staged in workgroup memory; bench/gpu/NOTES.md has their timings);
- a 4 KB GEMV (:data:`FLOOR`): what one dispatch costs.

The weights are generated on the GPU machine (random, seeded per name: ``bench.gpu.decode.random_params``),
since 18 shapes x widths of weights do not travel; every kernel of one width and shape gets the same
arrays, checked against a float64 numpy reference.  Time: :meth:`qcompile.runtime.vulkan.Session.time_calls`
(one command buffer of ``reps`` dispatches, rotating over weight copies that exceed the GPU's L2 cache),
GB/s counting packed codes + fp16 scales and zeros + float32 x and y, as the CUDA rows.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("gpu_vulkan")

BITS = (2, 3, 4, 5, 6, 8)
SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (N, K), as the CUDA GEMV rows
GROUP = 128
VARIANTS = ((8, 64, False), (4, 64, True), (8, 128, True), (16, 64, True), (4, 128, True), (8, 32, True),
            (16, 128, True))  # (rows, threads, smem_x) besides the default GemvConfig()
VARIANT_BITS = (2, 4)
FLOOR = (4, 64, 128)  # (bits, N, K): a GEMV of 4 KB of weights, timed like the others: the cost of a dispatch
CACHE_BYTES = 256 << 20  # weight copies per timing add up to at least this (H100 L2: 50 MB)
MODELS = ("mlp", "convnet")
MODEL_BPW = (4.25, 3.0)
BATCHES = (1, 3)


def _fmt(bits: int, group: int = GROUP):
    from qcompile.passes.formats import WeightFormat  # noqa: PLC0415

    return WeightFormat(bits, group)


def _name(kind: str, bits: int, n: int, k: int) -> str:
    return f"{kind}_b{bits}_n{n}_k{k}"


def _param_names(fmt) -> list[str]:
    return [f"W.q{i}" for i in range(len(fmt.planes))] + ["W.scales", "W.zeros"]


# ------------------------------------------------------------------------------------------ build


def gemv_module(kernel, fmt, n: int, k: int):
    """Relax ``main(x[1, K], planes..., scales, zeros) -> y[1, N]``: one call of ``kernel``."""
    from tvm import relax  # noqa: PLC0415

    g = fmt.group_size
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType([1, k], "float32"))
    ws = [relax.Var(f"w{i}", relax.TensorType([n, k * pb // 32], "uint32")) for i, pb in enumerate(fmt.planes)]
    s = relax.Var("s", relax.TensorType([n, k // g], "float16"))
    z = relax.Var("z", relax.TensorType([n, k // g], "float16"))
    with bb.function("main", [x, *ws, s, z]):
        gv = bb.add_func(kernel, "gemv")
        with bb.dataflow():
            y = bb.emit_output(relax.call_tir(gv, [x, ws[0], ws[-1], s, z], relax.TensorType([1, n], "float32")))
        bb.emit_func_output(y)
    mod = bb.get()
    mod["main"] = mod["main"].with_attr("num_input", 1)
    return mod


def build_gemv(out: Path, kind: str, bits: int, n: int, k: int, config=None) -> Path:
    """A Vulkan artifact of one GEMV kernel (``kind``), without its weights (``<dir>.params.json``
    lists them): plan, WGSL, and a manifest naming the generated weights' hash."""
    from bench.gpu.decode import strip_artifact  # noqa: PLC0415
    from qcompile.runtime.manifest import FORMAT_VERSION, PARAMS, sha256_file  # noqa: PLC0415
    from qcompile.targets.vulkan import kernels  # noqa: PLC0415
    from qcompile.targets.vulkan.build import build_plan  # noqa: PLC0415

    fmt = _fmt(bits)
    if kind == "dlight":
        f = kernels.dequant_matmul(fmt, k, n, 1)
    elif kind == "dlight_symbolic_m":
        f = kernels.dequant_matmul(fmt, k, n)
    else:
        f = kernels.gemv(fmt, k, n, config)
    full = Path("/tmp/qcompile-vulkan-gemv") / _name(kind, bits, n, k)
    full.mkdir(parents=True, exist_ok=True)
    names = _param_names(fmt)
    files = build_plan(gemv_module(f, fmt, n, k), names, 1, full)
    specs = {nm: {"dtype": "uint32", "shape": [n, k * pb // 32]} for nm, pb in zip(names, fmt.planes)}
    specs |= {nm: {"dtype": "float16", "shape": [n, k // fmt.group_size]} for nm in names[-2:]}
    (full / PARAMS).unlink(missing_ok=True)
    manifest = {"format_version": FORMAT_VERSION,
                "target": {"name": "vulkan", "tvm": {"kind": "webgpu"}, "device": "vulkan", "arch": "any"},
                "inputs": [{"name": "x", "dtype": "float32", "shape": [1, k]}],
                "outputs": [{"name": "y", "dtype": "float32", "shape": [1, n]}],
                "params": names, "tensors": [], "bpw": {"format": fmt.name},
                "kernel": {"kind": kind, "config": repr(config) if config else None},
                "files": {**{f_: sha256_file(full / f_) for f_ in files}, PARAMS: _params_digest(json.dumps(specs))}}
    (full / "manifest.json").write_text(json.dumps(manifest, indent=1))
    art = strip_artifact(full, out / full.name, specs)
    shutil.rmtree(full)
    return art


@functools.lru_cache(maxsize=4)
def _params_digest(specs_json: str) -> str:
    """sha256 of the safetensors file of the generated weights (the manifest names it; it never exists)."""
    from safetensors.numpy import save  # noqa: PLC0415

    from bench.gpu.decode import random_params  # noqa: PLC0415

    return hashlib.sha256(save(random_params(json.loads(specs_json)))).hexdigest()


def build(out: Path, variants: bool = False) -> None:
    """GEMV plans (``variants``: also the launch-shape variants, for tuning) and the test models."""
    from qcompile.targets.vulkan.kernels import GemvConfig  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for bits in BITS:
        for n, k in SHAPES:
            build_gemv(out, "dlight", bits, n, k)
            build_gemv(out, "vulkan", bits, n, k)
            if bits == 4:
                build_gemv(out, "dlight_symbolic_m", bits, n, k)
            if variants and bits in VARIANT_BITS:
                for rows, threads, smem_x in VARIANTS:
                    build_gemv(out, f"r{rows}t{threads}" + ("s" if smem_x else ""), bits, n, k,
                               GemvConfig(rows, threads, smem_x))
    build_gemv(out, "vulkan", *FLOOR)
    log.info("GEMV plans in %.0f s", time.perf_counter() - t0)
    build_models(out)


def build_models(out: Path) -> None:
    """The test models for Vulkan and x86 (same quantization), their inputs and the x86 outputs."""
    import qcompile.runtime as rt  # noqa: PLC0415
    from qcompile.compiler.driver import CompileOptions, compile_model  # noqa: PLC0415
    from tests.helpers import convnet_model, mlp_model, save  # noqa: PLC0415

    makers = {"mlp": (mlp_model, (256,)), "convnet": (convnet_model, (16, 20, 20))}
    refs = {}
    work = Path("/tmp/qcompile-vulkan-models")
    work.mkdir(parents=True, exist_ok=True)
    for name in MODELS:
        make, shape = makers[name]
        path = save(make(), work / f"{name}.onnx")
        for bpw in MODEL_BPW:
            tag = f"{name}_{bpw}"
            compile_model(path, out / f"{tag}.vulkan.qcm", CompileOptions(target="vulkan", bpw=bpw))
            x86 = rt.load(compile_model(path, work / f"{tag}.x86.qcm",
                                        CompileOptions(target="x86", bpw=bpw, int8_dot=False)).path)
            for b in BATCHES:
                x = np.random.default_rng(b).standard_normal((b, *shape)).astype(np.float32)
                refs[f"{tag}/b{b}/x"] = x
                refs[f"{tag}/b{b}/x86"] = x86.run(None, {"x": x})[0]
    np.savez(out / "model_refs.npz", **refs)


# ------------------------------------------------------------------------------------------ run


def _rel(a, b) -> float:
    b = np.asarray(b, np.float64)
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


def _gemv_bytes(fmt, n: int, k: int) -> int:
    return n * k * fmt.bits // 8 + 2 * 2 * n * (k // fmt.group_size) + 4 * k + 4 * n


def _reference(fmt, params: dict, x: np.ndarray, n: int, k: int) -> np.ndarray:
    planes = [params[f"W.q{i}"] for i in range(len(fmt.planes))]
    codes = fmt.unpack(planes, (n, k)).astype(np.float64)
    g = fmt.group_size
    w = codes.reshape(n, k // g, g) * params["W.scales"].astype(np.float64)[..., None] \
        + params["W.zeros"].astype(np.float64)[..., None]
    return x.astype(np.float64) @ w.reshape(n, k).T


def run_gemv(root: Path, device, results: dict, failures: list, reps: int = 100, rounds: int = 5,
             save=lambda: None) -> None:
    from bench.gpu.decode import load_specs, random_params  # noqa: PLC0415
    from qcompile.runtime import vulkan  # noqa: PLC0415

    for bits, n, k in [(b, n, k) for b in BITS for n, k in SHAPES] + [FLOOR]:
        fmt = _fmt(bits)
        arts = sorted(a for a in root.glob(f"*_b{bits}_n{n}_k{k}") if a.is_dir())
        if not arts:
            continue
        params = random_params(load_specs(arts[0]))
        x = np.random.default_rng(bits * n + k).standard_normal((1, k)).astype(np.float32)
        ref = _reference(fmt, params, x, n, k)
        nbytes = _gemv_bytes(fmt, n, k)
        copies = max(1, math.ceil(CACHE_BYTES / nbytes))
        for art in arts:
            kind = art.name.split("_b")[0]
            try:
                sess = vulkan.Session(art, device, params=params)
                (y,) = sess.run(None, {"x": x})
                err = _rel(y, ref)
                seconds = sess.time_calls({"x": x}, reps=reps, copies=copies, rounds=rounds)
            except Exception as e:  # noqa: BLE001  (the other kernels still run)
                log.exception("vulkan gemv %s", art.name)
                failures.append(f"vulkan gemv {art.name}: {type(e).__name__}: {e}")
                continue
            row = {"bits": bits, "N": n, "K": k, "us": seconds * 1e6, "GBps": nbytes / seconds / 1e9,
                   "encode_us": sess.encode_seconds * 1e6}
            if sess.gpu_seconds:  # the pass's GPU time (timestamps), barriers between dispatches included
                row.update(us_gpu=sess.gpu_seconds * 1e6, GBps_gpu=nbytes / sess.gpu_seconds / 1e9)
            results["checks"].append({"kernel": f"vulkan_{kind}", "bits": bits, "N": n, "K": k, "group": GROUP,
                                      "M": 1, "rel_err": err})
            if not err < 1e-5:
                failures.append(f"vulkan gemv {kind} b{bits} {n}x{k}: rel err {err:.3g}")
            if (bits, n, k) == FLOOR:
                results["gemv_variants"].append({"config": "vulkan_dispatch_floor", **row})
            elif kind in ("vulkan", "dlight"):
                results["gemv"].append({"target": "vulkan" if kind == "vulkan" else "vulkan_dlight", **row})
            else:
                results["gemv_variants"].append({"config": f"vulkan_{kind}", **row})
            log.info("vulkan gemv %-18s b%d %5dx%-5d %8.1f us %6.0f GB/s (GPU clock %s us)  err %.2g", kind,
                     bits, n, k, row["us"], row["GBps"], round(row.get("us_gpu", float("nan")), 1), err)
            del sess
        save()


def run_models(root: Path, device, results: dict, failures: list) -> None:
    """The test models on NVIDIA's Vulkan against the x86 build of the same weights."""
    from qcompile.runtime import vulkan  # noqa: PLC0415

    refs = np.load(root / "model_refs.npz")
    for name in MODELS:
        for bpw in MODEL_BPW:
            tag = f"{name}_{bpw}"
            sess = vulkan.Session(root / f"{tag}.vulkan.qcm", device)
            for b in BATCHES:
                y = sess.run(None, {"x": refs[f"{tag}/b{b}/x"]})[0]
                err = _rel(y, refs[f"{tag}/b{b}/x86"])
                results["vulkan_models"].append({"model": name, "target": "vulkan", "bpw": bpw, "batch": b,
                                                 "rel_err_vs_x86": err})
                log.info("vulkan model %-8s %.2f bpw batch %d: rel err vs x86 %.2g", name, bpw, b, err)
                if not err < 1e-4:
                    failures.append(f"vulkan model {tag} batch {b}: rel err vs x86 {err:.3g}")


def device_or_none(failures: list):
    """The Vulkan GPU through wgpu (None, with a failure noted, if there is none)."""
    try:
        from qcompile.runtime.vulkan import request_device  # noqa: PLC0415

        try:  # GPU timestamps where the adapter has them (Session.time_calls then reports GPU time too)
            dev = request_device(("shader-f16", "timestamp-query"))
        except Exception:  # noqa: BLE001
            dev = request_device(("shader-f16",))
        info = dev.adapter.info
        log.info("vulkan: %s, %s (%s)", info.get("device"), info.get("adapter_type"), info.get("description"))
        if info.get("adapter_type") == "CPU":
            failures.append(f"vulkan: only a CPU adapter ({info.get('device')}): NVIDIA's Vulkan driver not found")
            return None
        return dev
    except Exception as e:  # noqa: BLE001
        log.exception("vulkan device")
        failures.append(f"vulkan device: {type(e).__name__}: {e}")
        return None


def run(root: Path, results: dict, failures: list, device=None, save=lambda: None) -> None:
    for key in ("gemv", "gemv_variants", "checks", "vulkan_models"):
        results.setdefault(key, [])
    if device is None:
        return
    results["vulkan_device"] = {k: str(v) for k, v in dict(device.adapter.info).items()}
    for what, fn in (("models", lambda: run_models(root, device, results, failures)),
                     ("gemv", lambda: run_gemv(root, device, results, failures, save=save))):
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            log.exception("vulkan %s", what)
            failures.append(f"vulkan {what}: {type(e).__name__}: {e}")
        save()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=("build",))
    ap.add_argument("--dir", type=Path, default=Path(".gpu/vulkan"))
    ap.add_argument("--variants", action="store_true", help="also the GEMV launch-shape variants (tuning)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    build(args.dir, args.variants)  # run: python -m bench.gpu.decode run (decode and Vulkan), or gpu_check run
    return 0


if __name__ == "__main__":
    sys.exit(main())
