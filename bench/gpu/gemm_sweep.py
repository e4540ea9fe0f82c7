"""Tensor-core dequant-GEMM (targets/cuda/gemm.py) on the GPU: correctness and a sweep of tile configs.

Two steps, like gpu_check (the GPU machine has no TVM compiler):

    python -m bench.gpu.gemm_sweep build --dir .gpu/gemm                 # here: kernels.so + index.json
    python -m bench.gpu.gemm_sweep run --dir .gpu/gemm --json $OUT/gpu_gemm_sweep.json   # on the GPU

``run`` checks every format (bits 2-8, groups 32/64/128) on odd shapes (N and M not multiples of the
tile, K split across blocks) against the numpy reference with the kernel's fp16 rounding
(``gemm.reference``, tolerance ``EMULATED_TOLERANCE``) and against float32 weights and x
(``FP16_TOLERANCE``), the dispatching function (GEMV for M <= 8, GEMM tiers above) at M from 1 to 300,
then times each config at M = 16, 64, 256 on N x K = 4096x4096, 4096x14336, 14336x4096 (4 bits: every
config; 2 and 8 bits: the defaults), dlight's wmma schedule of the same numerics (4 bits) and torch's
fp16 linear (cuBLAS).  Timings replay a CUDA graph over weight copies that exceed L2 (as gpu_check).
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

log = logging.getLogger("gemm_sweep")

SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (N, K)
BATCHES = (16, 64, 256)
GROUP = 128
# name -> GemmConfig(bm, bn, bk, wm, wn, ksplit, depth).  Run 1 (depth 1 only, NOTES.md) found every
# config latency-bound (~0.9 us per K step whatever the tile): run 2 sweeps register stages in flight.
SWEEP = {
    "s16_n128_k128_s8_d1": (16, 128, 128, 1, 4, 8, 1),  # run 1's best at M = 16
    "s16_n128_k128_s8_d3": (16, 128, 128, 1, 4, 8, 3),
    "s16_n128_k128_s4_d3": (16, 128, 128, 1, 4, 4, 3),
    "s16_n128_k64_s8_d4": (16, 128, 64, 1, 4, 8, 4),
    "s16_n64_k128_s4_d3": (16, 64, 128, 1, 4, 4, 3),
    "s32_n128_k128_s4_d3": (32, 128, 128, 2, 4, 4, 3),
    "s64_n128_k64_s2_d1": (64, 128, 64, 2, 4, 2, 1),  # run 1's best at M = 256 (and close at 64)
    "s64_n128_k64_s2_d3": (64, 128, 64, 2, 4, 2, 3),
    "s64_n128_k32_s2_d4": (64, 128, 32, 2, 4, 2, 4),
    "s64_n64_k64_s2_d3": (64, 64, 64, 2, 2, 2, 3),
    "s64_n128_k64_s1_d3": (64, 128, 64, 2, 4, 1, 3),
    "s128_n128_k32_s2_d4": (128, 128, 32, 2, 4, 2, 4),
    "s128_n128_k32_s1_d4": (128, 128, 32, 2, 4, 1, 4),
    "s128_n128_k64_s2_d2": (128, 128, 64, 2, 4, 2, 2),
}
DEFAULTS = ("s16_n128_k128_s8_d3", "s64_n128_k64_s2_d3", "s128_n128_k32_s2_d4")  # gemm_tiers during run 2
# (since run 2, gemm_tiers: s16_n128_k128_s4_d3, s32_n128_k128_s4_d3, s64_n128_k64_s2_d1; NOTES.md)
CHECK_A = (16, 128, 64, 1, 4, 2, 3)  # every format: N=200, K=512 (its own group), M=37; 4 steps, 3 in flight
CHECK_B = (128, 128, 32, 2, 4, 1, 4)  # every width, group 32: N=136, K=352 (11 steps, 4 in flight), M=300
DISPATCH_M = (1, 8, 9, 16, 17, 100, 300)
DLIGHT = False  # dlight's wmma schedule of the same numerics (run 1: 89-327 us, far behind): not rebuilt
L2_BYTES = 256 << 20


def _cfg(t):
    from qcompile.targets.cuda.gemm import GemmConfig  # noqa: PLC0415

    return GemmConfig(*t)


def _tname(cfg: str, bits: int, n: int, k: int) -> str:
    return f"{cfg}_b{bits}_n{n}_k{k}"


def build(out: Path) -> None:
    import tvm  # noqa: PLC0415
    from tvm.s_tir import dlight as dl  # noqa: PLC0415

    from qcompile.passes.formats import PRESETS, WeightFormat  # noqa: PLC0415
    from qcompile.targets.cuda import build as cuda_build  # noqa: PLC0415
    from qcompile.targets.cuda import gemm, kernels  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    funcs, index = {}, {"timed": [], "dlight": []}
    for fmt in PRESETS.values():
        funcs[f"chk_a_{fmt.name}"] = gemm.gemm(fmt, 512, 200, _cfg(CHECK_A))
    for bits in (2, 3, 4, 5, 6, 8):
        funcs[f"chk_b_q{bits}g32"] = gemm.gemm(WeightFormat(bits, 32), 352, 136, _cfg(CHECK_B))
        fmt = WeightFormat(bits, GROUP)
        tiers = [(gemm.GEMV_MAX_M, kernels.gemv(fmt, 768, 264))]
        tiers += [(mm, gemm.gemm(fmt, 768, 264, c)) for mm, c in gemm.gemm_tiers(264, 768)]
        funcs[f"qmm_q{bits}g128"] = gemm.dispatch(tiers)
    for bits in (2, 4, 8):
        fmt = WeightFormat(bits, GROUP)
        for n, k in SHAPES:
            for name, t in SWEEP.items():
                if bits == 4 or name in DEFAULTS:
                    funcs[_tname(name, bits, n, k)] = gemm.gemm(fmt, k, n, _cfg(t))
                    index["timed"].append([name, bits, n, k])
    dfuncs = {}
    for n, k in SHAPES if DLIGHT else ():
        dfuncs[_tname("dlight_wmma", 4, n, k)] = gemm.dequant_matmul_f16(WeightFormat(4, GROUP), k, n)
        index["dlight"].append(["dlight_wmma", 4, n, k])
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    dmod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in dfuncs.items()})
    with target:
        dmod = dl.ApplyDefaultSchedule(dl.gpu.Matmul(), dl.gpu.Fallback())(dmod)
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    for name in dfuncs:
        mod[name] = dmod[name]
    cuda_build.ensure_cuda_codegen()
    sink = cuda_build.BuiltSources()
    t0 = time.perf_counter()
    with cuda_build._nvcc_callback("90", sink), target:  # noqa: SLF001
        lib = tvm.compile(mod, target=target)
    lib.export_library(str(out / "kernels.so"))
    (out / "index.json").write_text(json.dumps(index))
    (out / "kernels.cu").write_text("\n".join(sink.sources))
    log.info("kernels.so: %d functions in %.1f s", len(mod.functions), time.perf_counter() - t0)
    build_check(out)
    build_models(out)


MODEL_BATCHES = {"mlp": (8, 9, 32, 100), "convnet": (1, 2)}  # convnet: M = batch * 18 * 18 rows (GEMM)


def build_models(out: Path) -> None:
    """mlp and convnet at 3.0 bpw (mixed widths) for CUDA and x86 (float activations both), with the x86
    build's and onnxruntime's (on the decoded weights) outputs: the dispatch end to end, M > 8 on the GEMM."""
    import onnxruntime as ort  # noqa: PLC0415
    from onnx import numpy_helper  # noqa: PLC0415

    import qcompile.runtime as rt  # noqa: PLC0415
    from qcompile.compiler.driver import CompileOptions, compile_model  # noqa: PLC0415
    from tests.helpers import convnet_model, mlp_model, save  # noqa: PLC0415

    from .gpu_check import _decoded  # noqa: PLC0415

    makers = {"mlp": (mlp_model, (256,)), "convnet": (convnet_model, (16, 20, 20))}
    refs = {}
    for name, (make, shape) in makers.items():
        model = make()
        path = save(model, out / f"{name}.onnx")
        cuda = compile_model(path, out / f"{name}.cuda.qcm", CompileOptions(target="cuda", bpw=3.0, int8_dot=False))
        x86 = rt.load(compile_model(path, out / f"{name}.x86.qcm",
                                    CompileOptions(target="x86", bpw=3.0, int8_dot=False)).path)
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
        for b in MODEL_BATCHES[name]:
            x = np.random.default_rng(b).standard_normal((b, *shape)).astype(np.float32)
            refs[f"{name}/b{b}/x"] = x
            refs[f"{name}/b{b}/x86"] = x86.run(None, {"x": x})[0]
            refs[f"{name}/b{b}/ort"] = sess.run(None, {"x": x})[0]
        log.info("%s: cuda kernels %s", name, cuda.manifest["kernels"]["quantized_matmuls"])
    np.savez(out / "model_refs.npz", **refs)
    for p in out.glob("*.x86.qcm"):  # only the CUDA artifacts travel
        import shutil  # noqa: PLC0415

        shutil.rmtree(p)


# ------------------------------------------------------------------------------------------------ run


def gemm_bytes(bits: int, n: int, k: int, m: int, g: int = GROUP) -> int:
    """Bytes a quantized GEMM must move: packed codes, fp16 scales and zeros, float32 x and y."""
    return n * k * bits // 8 + 4 * n * (k // g) + 4 * m * k + 4 * m * n


class Bench:
    """Device buffers and launches for one kernel library (torch tensors passed through DLPack)."""

    def __init__(self, lib, torch, tvm_ffi, timer):
        self.lib, self.torch, self.tvm_ffi, self.timer = lib, torch, tvm_ffi, timer
        self.dev = torch.device("cuda")

    def tensor(self, a: np.ndarray):
        return self.torch.from_numpy(np.ascontiguousarray(a)).to(self.dev)

    def launch(self, fname: str, x_t, planes_t, s_t, z_t, y_t):
        f = self.lib[fname]
        w1 = planes_t[1] if len(planes_t) > 1 else planes_t[0]
        args = [self.tvm_ffi.from_dlpack(t) for t in (x_t, planes_t[0], w1, s_t, z_t, y_t)]
        return lambda: f(*args)

    def check(self, fname: str, fmt, planes, s, z, x) -> tuple[float, float, bool]:
        """(rel err vs the fp16-emulating reference, rel err vs float32 operands, every element written)."""
        from qcompile.targets.cuda.gemm import reference  # noqa: PLC0415

        from .gpu_check import _reference, _rel  # noqa: PLC0415

        torch = self.torch
        m, n = x.shape[0], planes[0].shape[0]
        y_t = torch.full((m, n), float("nan"), device=self.dev)
        self.launch(fname, self.tensor(x), [self.tensor(p) for p in planes], self.tensor(s), self.tensor(z), y_t)()
        torch.cuda.synchronize()
        y = y_t.cpu().numpy()
        return _rel(y, reference(fmt, planes, s, z, x)), _rel(y, _reference(fmt, planes, s, z, x)), \
            bool(np.isfinite(y).all())

    def weight_sets(self, fmt, n: int, k: int, rng) -> list:
        """Random packed weights on the device, cloned until the copies exceed L2."""
        from .gpu_check import _random_weight  # noqa: PLC0415

        copies = max(2, math.ceil(L2_BYTES / gemm_bytes(fmt.bits, n, k, 0, fmt.group_size)))
        planes, s, z = _random_weight(rng, fmt, n, k)
        p_t, s_t, z_t = [self.tensor(p) for p in planes], self.tensor(s), self.tensor(z)
        return [(p_t, s_t, z_t)] + [([p.clone() for p in p_t], s_t.clone(), z_t.clone()) for _ in range(1, copies)]

    def time(self, fname: str, sets: list, x_t, ys: list) -> float:
        """Median µs of one launch, a CUDA graph cycling through the weight copies ``sets``."""
        launches = [self.launch(fname, x_t, p, sc, zc, ys[c]) for c, (p, sc, zc) in enumerate(sets)]
        return self.timer.time(lambda c: launches[c](), len(sets))


def time_torch(torch, timer, n: int, k: int, m: int) -> float:
    """Median µs of torch's fp16 ``x @ W.T`` (cuBLAS) over L2-exceeding weight copies."""
    dev = torch.device("cuda")
    copies = max(2, math.ceil(L2_BYTES / (2 * n * k)))
    ws = [torch.randn((n, k), device=dev, dtype=torch.float16) for _ in range(copies)]
    x_t = torch.randn((m, k), device=dev, dtype=torch.float16)
    outs = [torch.empty((m, n), device=dev, dtype=torch.float16) for _ in range(copies)]
    us = timer.time(lambda c: torch.matmul(x_t, ws[c].t(), out=outs[c]), copies)
    del ws, outs
    torch.cuda.empty_cache()
    return us


def row(target: str, bits: int, m: int, n: int, k: int, us: float, **extra) -> dict:
    nbytes = 2 * (n * k + m * k + m * n) if target == "torch_fp16" else gemm_bytes(bits, n, k, m)
    return {"target": target, "bits": bits, "M": m, "N": n, "K": k, "us": us, "TFLOPs": 2 * m * n * k / us / 1e6,
            "GBps": nbytes / us / 1e3, **extra}


PARTS = ("checks", "sweep", "gpu_check")


def run(root: Path, json_path: Path, parts: tuple[str, ...] = PARTS) -> int:
    """``parts`` of the run (each in its own process where a crash could take the CUDA context along)."""
    import torch  # noqa: PLC0415

    import qcompile.runtime  # noqa: F401, PLC0415
    from qcompile.passes.formats import PRESETS, WeightFormat  # noqa: PLC0415
    from qcompile.runtime.session import _import_tvm_runtime, _load_cuda_runtime  # noqa: PLC0415
    from qcompile.targets.cuda.gemm import EMULATED_TOLERANCE, FP16_TOLERANCE  # noqa: PLC0415

    from .gpu_check import _random_weight, _Timer  # noqa: PLC0415

    tvm, _ = _import_tvm_runtime()
    _load_cuda_runtime(tvm)
    import tvm_ffi  # noqa: PLC0415

    index = json.loads((root / "index.json").read_text())
    lib = tvm.runtime.load_module(str(root / "kernels.so"))
    timer = _Timer(torch, tvm_ffi)
    bench = Bench(lib, torch, tvm_ffi, timer)
    res = {"device": torch.cuda.get_device_name(0), "checks": [], "sweep": [], "failures": [], "configs": SWEEP}
    rng = np.random.default_rng(0)

    def check(fname, fmt, n, k, m):
        planes, s, z = _random_weight(rng, fmt, n, k)
        x = rng.standard_normal((m, k)).astype(np.float32)
        try:
            e16, e32, full = bench.check(fname, fmt, planes, s, z, x)
        except Exception as e:  # noqa: BLE001
            res["failures"].append(f"{fname} M={m}: {type(e).__name__}: {e}")
            log.exception(fname)
            return
        small = m <= 8 and fname.startswith("qmm")  # the GEMV: float32 throughout
        ok = full and e32 < (1e-5 if small else FP16_TOLERANCE) and (small or e16 < EMULATED_TOLERANCE)
        res["checks"].append({"kernel": fname, "format": fmt.name, "N": n, "K": k, "M": m, "rel_err_fp16_ref": e16,
                              "rel_err_fp32_ref": e32, "all_written": full, "ok": ok})
        log.info("check %-22s M=%3d: vs fp16 ref %.2g, vs fp32 %.2g%s", fname, m, e16, e32, "" if ok else "  FAIL")
        if not ok:
            res["failures"].append(f"{fname} M={m}: vs fp16 ref {e16:.3g}, vs fp32 {e32:.3g}, written {full}")

    json_path.parent.mkdir(parents=True, exist_ok=True)
    if "checks" in parts:
        for fmt in PRESETS.values():
            check(f"chk_a_{fmt.name}", fmt, 200, 512, 37)
        for bits in (2, 3, 4, 5, 6, 8):
            check(f"chk_b_q{bits}g32", WeightFormat(bits, 32), 136, 352, 300)
            for m in DISPATCH_M:
                check(f"qmm_q{bits}g128", WeightFormat(bits, GROUP), 264, 768, m)
        run_models(root, res)
        json_path.write_text(json.dumps(res, indent=1) + "\n")

    for n, k in SHAPES if "sweep" in parts else ():
        for m in BATCHES:
            res["sweep"].append(row("torch_fp16", 16, m, n, k, time_torch(torch, timer, n, k, m)))
            log.info("torch fp16 M=%d %dx%d: %.1f us", m, n, k, res["sweep"][-1]["us"])
        for bits in (2, 4, 8):
            fmt = WeightFormat(bits, GROUP)
            sets = bench.weight_sets(fmt, n, k, rng)
            for m in BATCHES:
                x_t = bench.tensor(rng.standard_normal((m, k)).astype(np.float32))
                ys = [torch.empty((m, n), device=bench.dev) for _ in sets]
                for name, b, nn, kk in index["timed"] + index["dlight"]:
                    if (b, nn, kk) != (bits, n, k):
                        continue
                    fname = _tname(name, bits, n, k)
                    try:
                        us = bench.time(fname, sets, x_t, ys)
                    except Exception as e:  # noqa: BLE001
                        res["failures"].append(f"time {fname} M={m}: {type(e).__name__}: {e}")
                        log.exception(fname)
                        continue
                    r = row("dlight_wmma" if name == "dlight_wmma" else "cuda", bits, m, n, k, us, config=name)
                    res["sweep"].append(r)
                    log.info("%-20s b%d M=%3d %5dx%-5d %8.1f us %6.1f TFLOP/s %6.0f GB/s", name, bits, m, n, k, us,
                             r["TFLOPs"], r["GBps"])
                del ys
            del sets
            torch.cuda.empty_cache()
            json_path.write_text(json.dumps(res, indent=1) + "\n")
    if "gpu_check" in parts:
        res["gpu_check_gemm"] = {"gemm": [], "checks": []}  # gpu_check's section, as the final run does it
        try:
            run_check(tvm, root, torch, tvm_ffi, timer, res["gpu_check_gemm"], res["failures"])
        except Exception as e:  # noqa: BLE001
            log.exception("run_check")
            res["failures"].append(f"run_check: {type(e).__name__}: {e}")
    res["timing"] = "eager launches" if timer.eager else "CUDA graph replays over L2-exceeding weight copies"
    json_path.write_text(json.dumps(res, indent=1) + "\n")
    _summary(res)
    return 1 if res["failures"] else 0


def run_models(root: Path, res: dict) -> None:
    """The CUDA artifacts against the x86 float build and ORT: fp16 operands on the GEMM (M > 8)."""
    import qcompile.runtime as rt  # noqa: PLC0415
    from qcompile.targets.cuda.gemm import FP16_TOLERANCE  # noqa: PLC0415

    from .gpu_check import _rel  # noqa: PLC0415

    if not (root / "model_refs.npz").is_file():
        return
    refs = np.load(root / "model_refs.npz")
    res["models"] = []
    for name, batches in MODEL_BATCHES.items():
        try:
            sess = rt.load(root / f"{name}.cuda.qcm")
            for b in batches:
                y = sess.run(None, {"x": refs[f"{name}/b{b}/x"]})[0]
                e_x86 = _rel(y, refs[f"{name}/b{b}/x86"].astype(np.float64))
                e_ort = _rel(y, refs[f"{name}/b{b}/ort"].astype(np.float64))
                res["models"].append({"model": name, "bpw": 3.0, "batch": b, "rel_err_vs_x86_float": e_x86,
                                      "rel_err_vs_ort_decoded": e_ort})
                log.info("model %s batch %d: rel err vs x86 float %.2g, vs ORT %.2g", name, b, e_x86, e_ort)
                if not (e_x86 < FP16_TOLERANCE and e_ort < FP16_TOLERANCE):
                    res["failures"].append(f"model {name} batch {b}: vs x86 {e_x86:.3g}, vs ORT {e_ort:.3g}")
        except Exception as e:  # noqa: BLE001
            log.exception(name)
            res["failures"].append(f"model {name}: {type(e).__name__}: {e}")


def _summary(res: dict) -> None:
    print(f"device {res['device']}; {len(res['checks'])} checks, failures: {res['failures'] or 'none'}")
    worst16 = max((c["rel_err_fp16_ref"] for c in res["checks"] if c["M"] > 8), default=float("nan"))
    worst32 = max((c["rel_err_fp32_ref"] for c in res["checks"] if c["M"] > 8), default=float("nan"))
    print(f"M > 8: worst rel err vs fp16-emulating ref {worst16:.2g}, vs fp32 {worst32:.2g}")
    for r in res.get("gpu_check_gemm", {}).get("gemm", []):
        print(f"gpu_check gemm {r['target']}:{r['bits']} M={r['M']} {r['N']}x{r['K']}: {r['us']:.1f} us "
              f"{r['TFLOPs']:.1f} TF")
    for r in res.get("models", []):
        print(f"model {r['model']} b{r['batch']}: vs x86 float {r['rel_err_vs_x86_float']:.2g}, "
              f"vs ORT {r['rel_err_vs_ort_decoded']:.2g}")
    best: dict[tuple, dict] = {}
    for r in res["sweep"]:
        key = (r["target"] if r["target"] != "dlight_wmma" else "dlight", r["bits"], r["M"], r["N"], r["K"])
        if key not in best or r["us"] < best[key]["us"]:
            best[key] = r
    for key, r in sorted(best.items(), key=lambda kv: (kv[0][2], kv[0][3], kv[0][4], kv[0][0], kv[0][1])):
        print(f"{key[0]:>10} b{key[1]:<2} M={key[2]:<3} {key[3]}x{key[4]}: {r['us']:8.1f} us {r['TFLOPs']:6.1f} TF "
              f"{r.get('config', '')}")


# ------------------------------------------------------------------------- gpu_check's GEMM section

CHECK_BITS = (2, 4, 8)  # gpu_check times these widths (group 128) at BATCHES on SHAPES


def build_check(out: Path) -> None:
    """``gemm.so`` for gpu_check: the quantized matmul as the compiler emits it (:func:`gemv_or_gemm`: GEMV
    for M <= 8, the GEMM tiers above) for each width of CHECK_BITS and each shape."""
    import tvm  # noqa: PLC0415

    from qcompile.passes.formats import WeightFormat  # noqa: PLC0415
    from qcompile.targets.cuda import build as cuda_build  # noqa: PLC0415
    from qcompile.targets.cuda import gemm, kernels  # noqa: PLC0415

    funcs = {}
    for bits in CHECK_BITS:
        fmt = WeightFormat(bits, GROUP)
        for n, k in SHAPES:
            funcs[_tname("qmm", bits, n, k)] = gemm.gemv_or_gemm(kernels.gemv(fmt, k, n), fmt, k, n)
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    cuda_build.ensure_cuda_codegen()
    with cuda_build._nvcc_callback("90", cuda_build.BuiltSources()), target:  # noqa: SLF001
        tvm.compile(mod, target=target).export_library(str(out / "gemm.so"))


def run_check(tvm, root: Path, torch, tvm_ffi, timer, results: dict, failures: list) -> None:
    """gpu_check's ``gemm`` rows: our quantized matmul (``cuda``) and torch's fp16 linear at M in BATCHES;
    each 4096x4096 output (and M = 16 of the others) checked against :func:`gemm.reference`."""
    from qcompile.passes.formats import WeightFormat  # noqa: PLC0415
    from qcompile.targets.cuda.gemm import EMULATED_TOLERANCE, FP16_TOLERANCE, reference  # noqa: PLC0415

    from .gpu_check import _random_weight, _reference, _rel  # noqa: PLC0415

    if not (root / "gemm.so").is_file():
        return
    bench = Bench(tvm.runtime.load_module(str(root / "gemm.so")), torch, tvm_ffi, timer)
    rng = np.random.default_rng(1)
    for n, k in SHAPES:
        for m in BATCHES:
            results["gemm"].append(row("torch_fp16", 16, m, n, k, time_torch(torch, timer, n, k, m)))
        for bits in CHECK_BITS:
            fmt = WeightFormat(bits, GROUP)
            planes, s, z = _random_weight(rng, fmt, n, k)
            p_t, s_t, z_t = [bench.tensor(p) for p in planes], bench.tensor(s), bench.tensor(z)
            copies = max(2, math.ceil(L2_BYTES / gemm_bytes(bits, n, k, 0)))
            sets = [(p_t, s_t, z_t)] + [([p.clone() for p in p_t], s_t.clone(), z_t.clone()) for _ in range(1, copies)]
            fname = _tname("qmm", bits, n, k)
            for m in BATCHES:
                x = rng.standard_normal((m, k)).astype(np.float32)
                x_t = bench.tensor(x)
                ys = [torch.empty((m, n), device=bench.dev) for _ in sets]
                if (n, k) == SHAPES[0] or m == BATCHES[0]:
                    ys[0].fill_(float("nan"))
                    bench.launch(fname, x_t, p_t, s_t, z_t, ys[0])()
                    torch.cuda.synchronize()
                    y = ys[0].cpu().numpy()
                    e16, e32 = _rel(y, reference(fmt, planes, s, z, x)), _rel(y, _reference(fmt, planes, s, z, x))
                    results["checks"].append({"kernel": "gemm", "bits": bits, "N": n, "K": k, "group": GROUP, "M": m,
                                              "rel_err": e32, "rel_err_fp16_ref": e16})
                    if not (e16 < EMULATED_TOLERANCE and e32 < FP16_TOLERANCE):
                        failures.append(f"gemm b{bits} {n}x{k} M={m}: rel err vs fp16 ref {e16:.3g}, fp32 {e32:.3g}")
                us = bench.time(fname, sets, x_t, ys)
                results["gemm"].append(row("cuda", bits, m, n, k, us))
                log.info("gemm b%d M=%3d %5dx%-5d %8.1f us %6.1f TFLOP/s", bits, m, n, k, us,
                         results["gemm"][-1]["TFLOPs"])
                del ys
            del sets, p_t
            torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=("build", "run"))
    ap.add_argument("--dir", type=Path, default=Path(".gpu/gemm"))
    ap.add_argument("--json", type=Path, default=Path("bench/results/gpu_gemm_sweep.json"))
    ap.add_argument("--part", choices=PARTS, action="append", help="run only these parts (repeatable)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    if args.step == "build":
        build(args.dir)
        return 0
    return run(args.dir, args.json, tuple(args.part or PARTS))


if __name__ == "__main__":
    sys.exit(main())
