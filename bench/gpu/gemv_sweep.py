"""Launch-shape sweep of the CUDA GEMVs on the GPU machine: per-device tuning of :mod:`qcompile.targets.cuda.
kernels_int8` (``TUNED``) from one call.

Every width (2, 3, 4, 5, 6, 8 bits, group 128) x shape (N x K = 4096x4096, 4096x14336, 14336x4096) x
launch shape (:data:`CONFIGS`) of the int8-activation GEMV, next to the float GEMV (:func:`.kernels.gemv`,
its default and the 8-bit variants), each checked against numpy before it is timed:

- int8 kernels against the x86 int8 reference (same activation quantization, float64 sums): rel err < 1e-5;
- float kernels against float64 ``x @ dequantize(W).T``: rel err < 1e-5;
- odd shapes (N not a multiple of the rows, K of 3 or 11 blocks, groups of 32, M = 1, 3, 5).

Timing as bench/gpu/gpu_check.py (CUDA-graph replays over weight copies exceeding L2, median), twice in
opposite orders; batch 8 once.  ``pick`` is, per (bits, shape class), the config with the lowest mean of
the two batch-1 timings: paste it into ``kernels_int8.TUNED``.

    python -m bench.gpu.gemv_sweep build --dir .gpu/sweep                         # here (TVM, nvcc)
    python -m bench.gpu.gemv_sweep run --dir .gpu/sweep --json $OUT/gpu_gemv_sweep.json   # GPU machine
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path

import numpy as np

from bench.gpu.gpu_check import (BITS, GROUP, L2_BYTES, SHAPES, _copy_bandwidth, _gemv_bytes, _random_weight,
                                 _reference, _rel, _Timer, int8_reference)

log = logging.getLogger("gemv_sweep")

# rows per warp, warps on rows, warps on K, chunk (0: 16-byte loads of the first plane), unroll, s: x
# quantized once per block into shared memory (else per warp in registers)
CONFIGS = ("r8w2k2c0u1", "r8w1k4c0u1", "r8w4k1c0u1", "r4w4k2c0u1", "r8w2k4c0u1", "r8w4k2c0u1", "r4w2k4c0u1",
           "r8w2k2c0u2", "r16w1k4c0u1", "r16w2k2c0u1",
           "r8w2k2c0u1s", "r8w4k2c0u1s", "r4w4k2c0u1s", "r8w4k1c0u1s", "r4w8k1c0u1s", "r8w2k4c0u1s", "r16w2k2c0u1s",
           "r8w4k2c0u2s", "r4w8k2c0u1s", "r8w8k1c0u1s")
EXTRA = {2: ("r8w2k2c32u1", "r8w2k2c128u1", "r8w4k2c32u1s", "r8w4k2c128u1s"),
         3: ("r8w2k2c32u1", "r8w4k2c32u1s", "r16w2k2c32u1s"),
         8: ("r8w2k2c64u1", "r8w4k2c64u1s")}
F32_VARIANTS = ((8, 4, 1, False, False), (8, 8, 2, True, False), (4, 4, 1, False, False), (16, 4, 1, False, False))
ODD = ((100, 96, 32, 3), (24, 352, 32, 5), (72, 4096, 32, 1))  # (N, K, group, M)
ODD_CONFIGS = ("r8w2k2c0u1", "r8w4k1c0u1", "r4w2k4c0u2", "r16w1k4c0u1", "r8w2k2c0u1s", "r4w8k2c0u2s")
# round 2 (after round 1, bench/results/gpu_gemv_sweep.json "round1"): ncu showed 12% achieved occupancy
# (8 warps an SM: the grid is too small) -> more warps along K; with the round-1 winners (TUNED) again
ROUND2 = ("r8w1k8c0u1", "r4w1k8c0u1", "r8w2k8c0u1", "r8w1k16c0u1", "r16w1k8c0u1", "r8w2k8c0u1s", "r4w2k8c0u1s",
          "r8w1k8c0u1s", "r4w4k4c0u1s", "r4w1k16c0u1")
ROUND2_BITS = (2, 3, 4, 5, 6)
F32_ROUND2 = ((4, 4, 1, False, False), (4, 8, 1, False, False), (2, 8, 1, False, False), (8, 4, 1, False, False))
ODD_ROUND2 = ("r8w1k16c0u1", "r4w2k8c0u1s")
# round 3 (bench/gpu/NOTES.md, bench/results/gpu_gemv_sweep_round3.json): ``p``, the next step's loads
# (with their scales and zero points) issued before this step's math (two register buffers); built with
# each shape class's TUNED config (and, --baseline, that config compiled from an earlier kernels_int8.py).
# The measured run also had ``lD`` variants (the block's weights bulk-prefetched into L2 D steps ahead:
# slower everywhere, removed).
ROUND3 = ("r4w8k1c0u1sp", "r4w4k2c0u2sp", "r4w8k2c0u1sp", "r4w4k2c0u1sp", "r8w4k2c0u1sp", "r8w4k1c0u1sp",
          "r8w2k2c0u1sp", "r8w1k4c0u1p")
ODD_ROUND3 = ("r4w2k4c0u2p", "r8w4k2c0u1sp", "r4w8k1c0u1sp", "r8w2k2c0u1")
# round 4 (bench/results/gpu_gemv_sweep_xpre.json): ``q``, x quantized once per launch by a kernel of its own
# (kernels_int8.quantize_x) instead of by every block; timed with that kernel (``us``) and without it
XPRE = ("r8w1k4c0u1q", "r8w1k4c0u1pq", "r4w4k2c0u1q", "r4w4k2c0u2pq", "r8w2k2c0u1q", "r4w8k1c0u1pq", "r8w4k1c0u1q",
        "r16w1k4c0u1q", "r8w2k2c0u1pq", "r4w4k1c0u1pq")
ODD_XPRE = ("r8w1k4c0u1q", "r4w4k2c0u2pq")
CLASSES = {(4096, 4096): "square", (4096, 14336): "wide_k", (14336, 4096): "tall_n"}
BATCH = 8
SWEEP_BITS = (4, 2, 3, 5, 6, 8)  # the 4-bit goal first: a run cut off at its time limit has it


def _config(name: str, bits: int):
    """An Int8GemvConfig from a sweep name (``c0``: the first plane's 16-byte chunk, 32 codes at least)."""
    from qcompile.passes.formats import WeightFormat  # noqa: PLC0415
    from qcompile.targets.cuda.kernels_int8 import Int8GemvConfig  # noqa: PLC0415

    cfg = Int8GemvConfig.parse(name)
    if cfg.chunk == 0:
        p0 = WeightFormat(bits, GROUP).planes[0]
        cfg = dataclasses.replace(cfg, chunk=max(32, 128 // p0))
    return cfg


def _configs(bits: int) -> list[str]:
    names = []
    for c in (*CONFIGS, *EXTRA.get(bits, ())):
        name = _config(c, bits).name
        if name not in names:
            names.append(name)
    return names


def _sass_only():
    """TVM's CUDA compile callback -> ``nvcc --fatbin -gencode arch=compute_90,code=sm_90`` (no PTX)."""
    import contextlib  # noqa: PLC0415
    import subprocess  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    import tvm_ffi  # noqa: PLC0415

    from qcompile.targets.cuda.build import nvcc_path  # noqa: PLC0415

    def compile_(code):
        with tempfile.TemporaryDirectory() as tmp:
            src, fat = Path(tmp) / "k.cu", Path(tmp) / "k.fatbin"
            src.write_text(code)
            proc = subprocess.run([nvcc_path(), "--fatbin", "-O3", "-gencode", "arch=compute_90,code=sm_90", "-o",
                                   str(fat), str(src)], capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"nvcc failed:\n{proc.stderr[-4000:]}")
            return bytearray(fat.read_bytes())

    @contextlib.contextmanager
    def ctx():
        previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)
        tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_, override=True)
        try:
            yield
        finally:
            if previous is not None:
                tvm_ffi.register_global_func("tvm_callback_cuda_compile", previous, override=True)

    return ctx()


def _load_baseline(path: Path):
    """An earlier ``kernels_int8.py`` (e.g. ``git show HEAD~1:targets/cuda/kernels_int8.py``) as a module."""
    import importlib.util  # noqa: PLC0415

    spec = importlib.util.spec_from_file_location("kernels_int8_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def build(out: Path, smoke: bool = False, round2: bool = False, round3: bool = False, bits_only=(),
          baseline: Path | None = None, extra=(), shapes=(), xpre: bool = False) -> None:
    import tvm  # noqa: PLC0415

    from qcompile.passes.formats import WeightFormat  # noqa: PLC0415
    from qcompile.targets.cuda import build as cuda_build  # noqa: PLC0415
    from qcompile.targets.cuda import kernels, kernels_int8  # noqa: PLC0415

    out.mkdir(parents=True, exist_ok=True)
    funcs, table = {}, []

    def add(name, f, **row):
        funcs[name] = f
        table.append({"kernel": name, **row})

    def add_int8(name, fmt, k, n, c, **row):
        """An int8 GEMV; with ``q`` (xpre) also the quantize_x kernel it needs (row ``xquant``, ``xwidth``)."""
        cfg = kernels_int8.Int8GemvConfig.parse(c)
        if cfg.xpre:
            qname = f"xquant_k{k}_p{''.join(map(str, fmt.planes))}"
            if qname not in funcs:
                funcs[qname] = kernels_int8.quantize_x(k, fmt.planes)
            row |= {"xquant": qname, "xwidth": kernels_int8.xq_width(k, fmt.planes)}
        add(name, kernels_int8.gemv_int8(fmt, k, n, cfg), **row)

    base = _load_baseline(baseline) if baseline else None

    def configs(bits, n=0, k=0):
        if xpre:  # TUNED's, and x quantized per launch (XPRE; TUNED's own shape with q)
            tuned = kernels_int8.int8_config(n, k, bits)
            names = [tuned.name, dataclasses.replace(tuned, xsmem=False, xpre=True).name]
            return names + [c for c in (_config(c, bits).name for c in XPRE) if c not in names]
        if extra:  # --configs: these and TUNED's
            return list(dict.fromkeys([kernels_int8.int8_config(n, k, bits).name, *(_config(c, bits).name for c in extra)]))
        if round3:
            tuned = kernels_int8.int8_config(n, k, bits)
            names = [tuned.name, dataclasses.replace(tuned, prefetch=not tuned.prefetch).name]
            return names + [c for c in (_config(c, bits).name for c in ROUND3) if c not in names]
        if not round2:
            return _configs(bits)[:2] if smoke else _configs(bits)
        names = [_config(c, bits).name for c in ROUND2]
        return names + sorted({v for key, v in kernels_int8.TUNED.items() if key.startswith(f"{bits}/")} - set(names))

    t0 = time.perf_counter()
    for bits in bits_only or BITS:
        fmt = WeightFormat(bits, GROUP)
        for n, k in SHAPES[:1] if smoke else [sh for sh in SHAPES if not shapes or sh in shapes]:
            base_row = dict(bits=bits, N=n, K=k, group=GROUP)
            if base is not None:  # the earlier kernel's measured pick, for the side-by-side comparison
                c = base.int8_config(n, k, bits).name
                add(f"base_i8_{c}_b{bits}_n{n}_k{k}", base.gemv_int8(fmt, k, n, base.Int8GemvConfig.parse(c)),
                    kind="int8_base", config=f"base:{c}", **base_row)
            if not round3 and not extra and not xpre:
                add(f"f32_default_b{bits}_n{n}_k{k}", kernels.gemv(fmt, k, n), kind="float", config="default",
                    **base_row)
            if bits == 8 and not round3 and not extra and not xpre:
                for v in F32_ROUND2 if round2 else F32_VARIANTS:
                    vn = "f32_r{}k{}g{}{}".format(v[0], v[1], v[2], "s" if v[3] else "")
                    add(f"{vn}_b{bits}_n{n}_k{k}", kernels.gemv(fmt, k, n, kernels.GemvConfig(*v)), kind="float",
                        config=vn[4:], **base_row)
            for c in configs(bits, n, k) if not round2 or bits in ROUND2_BITS else ():
                add_int8(f"i8_{c}_b{bits}_n{n}_k{k}", fmt, k, n, c, kind="int8", config=c, **base_row)
        for n, k, g, m in ODD:
            fmt = WeightFormat(bits, g)
            odd = ODD_XPRE if xpre else extra[:1] if extra else ODD_ROUND3 if round3 else ODD_ROUND2 if round2 else ODD_CONFIGS[-2:] if smoke else ODD_CONFIGS
            for c in odd:
                c = _config(c, bits).name
                add_int8(f"odd_i8_{c}_b{bits}_n{n}_k{k}_g{g}", fmt, k, n, c, kind="int8", config=c, bits=bits, N=n, K=k,
                         group=g, M=m, odd=True)
    log.info("%d kernels defined in %.1f s", len(funcs), time.perf_counter() - t0)
    mod = tvm.IRModule({name: f.with_attr("global_symbol", name) for name, f in funcs.items()})
    target = tvm.target.Target({"kind": "cuda", "arch": "sm_90"})
    cuda_build.ensure_cuda_codegen()
    with _sass_only(), target:  # ~500 kernels: their PTX would not fit what travels to the GPU machine
        lib = tvm.compile(mod, target=target)
    lib.export_library(str(out / "sweep.so"))
    (out / "sweep.json").write_text(json.dumps(table, indent=0))
    log.info("sweep.so: %d kernels in %.1f s", len(funcs), time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------ run


def run(root: Path, json_path: Path) -> int:
    import torch  # noqa: PLC0415

    import qcompile.runtime  # noqa: F401, PLC0415
    from qcompile.passes.formats import WeightFormat  # noqa: PLC0415
    from qcompile.runtime.session import _import_tvm_runtime, _load_cuda_runtime  # noqa: PLC0415

    tvm, _ = _import_tvm_runtime()
    _load_cuda_runtime(tvm)
    import tvm_ffi  # noqa: PLC0415

    table = json.loads((root / "sweep.json").read_text())
    lib = tvm.runtime.load_module(str(root / "sweep.so"))
    timer = _Timer(torch, tvm_ffi)
    dev = torch.device("cuda")
    rng = np.random.default_rng(0)
    res = {"device": torch.cuda.get_device_name(0), "copy_GBps": _copy_bandwidth(torch), "checks": [], "timings": [],
           "torch_fp16": [], "failures": []}
    log.info("%s: copy %.0f GB/s", res["device"], res["copy_GBps"])

    rows_by_name = {r["kernel"]: r for r in table}

    def quantizer(row, x_t):
        """(launch of the xpre row's quantize_x on ``x_t``, its output)."""
        fq = lib[row["xquant"]]
        xq_t = torch.empty((x_t.shape[0], row["xwidth"]), dtype=torch.int32, device=dev)
        qargs = [tvm_ffi.from_dlpack(t) for t in (x_t, xq_t)]
        return lambda: fq(*qargs), xq_t

    def call(name, x_t, planes_t, s_t, z_t, y_t, quantize=True):
        """The launch of kernel ``name``; an xpre kernel after its quantize_x (``quantize=False``: alone, on x
        quantized once here)."""
        f = lib[name]
        w1 = planes_t[1] if len(planes_t) > 1 else planes_t[0]
        row = rows_by_name[name]
        if "xquant" not in row:
            args = [tvm_ffi.from_dlpack(t) for t in (x_t, planes_t[0], w1, s_t, z_t, y_t)]
            return lambda: f(*args)
        fq, xq_t = quantizer(row, x_t)
        args = [tvm_ffi.from_dlpack(t) for t in (xq_t, planes_t[0], w1, s_t, z_t, y_t)]
        if not quantize:
            fq()
            return lambda: f(*args)

        def launch():
            fq()
            f(*args)
        return launch

    def check(row, x, planes, s, z, y_t, ref_int8, ref_float, launch):
        y_t.fill_(float("nan"))
        torch.cuda.synchronize()
        try:
            launch()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001  (e.g. too many registers for the block: not a config)
            res["failures"].append(f"{row['kernel']} M={x.shape[0]}: {type(e).__name__}: {str(e)[:200]}")
            return False
        y = y_t.cpu().numpy()
        ref = ref_int8 if row["kind"].startswith("int8") else ref_float
        err = _rel(y, ref)
        rec = {"kernel": row["kernel"], "M": x.shape[0], "rel_err": err, "rel_err_vs_float": _rel(y, ref_float)}
        res["checks"].append(rec)
        if not err < 1e-5:
            res["failures"].append(f"{row['kernel']} M={x.shape[0]}: rel err {err:.3g}")
        return err < 1e-5

    def dump():  # after every shape: a run cut off by its time limit still returns what it measured
        res["pick"] = pick(res["timings"])
        res["eager"] = timer.eager
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(res, indent=1) + "\n")

    def torch_in(a):
        return torch.from_numpy(np.ascontiguousarray(a)).to(dev)

    for row in (r for r in table if r.get("odd")):
        fmt = WeightFormat(row["bits"], row["group"])
        n, k, m = row["N"], row["K"], row["M"]
        planes, s, z = _random_weight(rng, fmt, n, k)
        x = rng.standard_normal((m, k)).astype(np.float32)
        codes = fmt.unpack(planes, (n, k))
        y_t = torch.empty((m, n), device=dev)
        check(row, x, planes, s, z, y_t, int8_reference(x, codes, s, z, row["group"]), _reference(fmt, planes, s, z, x),
              call(row["kernel"], torch_in(x), [torch_in(p) for p in planes], torch_in(s), torch_in(z), y_t))

    for bits in SWEEP_BITS:
        fmt = WeightFormat(bits, GROUP)
        for n, k in SHAPES:
            rows = [r for r in table if not r.get("odd") and r["bits"] == bits and (r["N"], r["K"]) == (n, k)]
            if not rows:
                continue
            nbytes = _gemv_bytes(bits, n, k, GROUP)
            copies = max(2, math.ceil(L2_BYTES / nbytes))
            planes, s, z = _random_weight(rng, fmt, n, k)
            codes = fmt.unpack(planes, (n, k))
            xs = {m: rng.standard_normal((m, k)).astype(np.float32) for m in (1, BATCH)}
            refs = {m: (int8_reference(x, codes, s, z, GROUP), _reference(fmt, planes, s, z, x)) for m, x in xs.items()}
            x_t = {m: torch_in(x) for m, x in xs.items()}
            dev_planes = [torch_in(p) for p in planes]
            s_t, z_t = torch_in(s), torch_in(z)
            sets = [(dev_planes, s_t, z_t)] + [([p.clone() for p in dev_planes], s_t.clone(), z_t.clone())
                                               for _ in range(1, copies)]
            ys = {m: [torch.empty((m, n), device=dev) for _ in range(copies)] for m in xs}
            launches = {(r["kernel"], m): [call(r["kernel"], x_t[m], p, sc, zc, ys[m][c]) for c, (p, sc, zc) in enumerate(sets)]
                        for r in rows for m in xs}
            good = []
            for r in rows:
                ok = all(check(r, xs[m], planes, s, z, ys[m][0], *refs[m], launches[(r["kernel"], m)][0]) for m in xs)
                if ok:
                    good.append(r)
            times: dict[str, list[float]] = {r["kernel"]: [] for r in good}
            for order in (good, good[::-1]):
                for r in order:
                    times[r["kernel"]].append(timer.time(lambda c: launches[(r["kernel"], 1)][c](), copies))  # noqa: B023
            for r in good:
                us8 = timer.time(lambda c: launches[(r["kernel"], BATCH)][c](), copies)  # noqa: B023
                t = times[r["kernel"]]
                us = float(np.mean(t))
                rec = {**{key: r[key] for key in ("kernel", "kind", "config", "bits", "N", "K")}, "us": t, "us_mean": us,
                       "GBps": nbytes / us / 1e3, "us_batch8": us8,
                       "GBps_batch8": _gemv_bytes(bits, n, k, GROUP, BATCH) / us8 / 1e3}
                if "xquant" in r:  # the GEMV alone (x quantized beforehand), and quantize_x alone
                    alone = [call(r["kernel"], x_t[1], p, sc, zc, ys[1][c], quantize=False)
                             for c, (p, sc, zc) in enumerate(sets)]
                    rec["us_gemv_only"] = timer.time(lambda c: alone[c](), copies)  # noqa: B023
                    fq, _ = quantizer(r, x_t[1])
                    rec["us_quantize_only"] = timer.time(lambda c: fq(), copies)  # noqa: B023
                res["timings"].append(rec)
                log.info("b%d %5dx%-5d %-28s %7.2f %7.2f us %6.0f GB/s  batch 8: %7.2f us", bits, n, k, r["config"],
                         t[0], t[1], rec["GBps"], us8)
            del sets, dev_planes, ys, launches
            torch.cuda.empty_cache()
            dump()

    for n, k in SHAPES:  # the peer: torch fp16 linear
        nbytes = 2 * (n * k + k + n)
        copies = max(2, math.ceil(L2_BYTES / nbytes))
        ws = [torch.randn((n, k), device=dev, dtype=torch.float16) for _ in range(copies)]
        x_h = torch.randn((1, k), device=dev, dtype=torch.float16)
        outs = [torch.empty((1, n), device=dev, dtype=torch.float16) for _ in range(copies)]
        us = timer.time(lambda c: torch.matmul(x_h, ws[c].t(), out=outs[c]), copies)  # noqa: B023
        res["torch_fp16"].append({"N": n, "K": k, "us": us, "GBps": nbytes / us / 1e3})
        del ws, outs
        torch.cuda.empty_cache()

    dump()
    summary(res)
    return 1 if res["failures"] else 0


def profile(root: Path, names: list[str]) -> None:
    """Launch each named kernel once on random data (4096x14336), for ``ncu`` around this step."""
    import torch  # noqa: PLC0415

    import qcompile.runtime  # noqa: F401, PLC0415
    from qcompile.passes.formats import WeightFormat  # noqa: PLC0415
    from qcompile.runtime.session import _import_tvm_runtime, _load_cuda_runtime  # noqa: PLC0415

    tvm, _ = _import_tvm_runtime()
    _load_cuda_runtime(tvm)
    import tvm_ffi  # noqa: PLC0415

    lib = tvm.runtime.load_module(str(root / "sweep.so"))
    table = {r["kernel"]: r for r in json.loads((root / "sweep.json").read_text())}
    rng = np.random.default_rng(0)
    for name in names:
        r = table[name]
        fmt = WeightFormat(r["bits"], r["group"])
        planes, s, z = _random_weight(rng, fmt, r["N"], r["K"])
        ts = [torch.from_numpy(a).cuda() for a in (rng.standard_normal((1, r["K"])).astype(np.float32), planes[0],
                                                   planes[-1], s, z)]
        y = torch.empty((1, r["N"]), device="cuda")
        lib[name](*[tvm_ffi.from_dlpack(t) for t in (*ts, y)])
        torch.cuda.synchronize()


def pick(timings: list[dict]) -> dict[str, dict]:
    """The fastest int8 config per (bits, shape class) by mean batch-1 time, with the float default's time."""
    out = {}
    for (n, k), cls in CLASSES.items():
        for bits in BITS:
            mine = [t for t in timings if (t["N"], t["K"], t["bits"]) == (n, k, bits)]
            i8 = [t for t in mine if t["kind"] == "int8"]
            f32 = [t for t in mine if t["kind"] == "float"]
            old = [t for t in mine if t["kind"] == "int8_base"]
            if not i8:
                continue
            best = min(i8, key=lambda t: t["us_mean"])
            fbest = min(f32, key=lambda t: t["us_mean"]) if f32 else None
            out[f"{bits}/{cls}"] = {"config": best["config"], "us": best["us_mean"], "GBps": best["GBps"],
                                    "float_best": fbest and fbest["config"], "float_us": fbest and fbest["us_mean"]}
            if old:  # the earlier kernel's pick (--baseline), measured in the same run
                out[f"{bits}/{cls}"].update(base=old[0]["config"], base_us=old[0]["us_mean"], base_GBps=old[0]["GBps"])
    return out


def summary(res: dict) -> None:
    print(f"device {res['device']}  copy {res['copy_GBps']:.0f} GB/s  eager={res['eager']}")
    for key, p in res["pick"].items():
        print(f"{key:10s} int8 {p['config']:14s} {p['us']:6.2f} us {p['GBps']:5.0f} GB/s   float {p['float_best']} "
              f"{p['float_us'] or 0:6.2f} us" + (f"   {p['base']} {p['base_us']:6.2f} us {p['base_GBps']:5.0f} GB/s"
                                                  if "base" in p else ""))
    for t in res["torch_fp16"]:
        print(f"torch fp16 {t['N']}x{t['K']}: {t['us']:.2f} us {t['GBps']:.0f} GB/s")
    worst = max((c["rel_err"] for c in res["checks"]), default=float("nan"))
    print(f"{len(res['checks'])} checks, worst rel err {worst:.2g}; failures: {res['failures'][:20] or 'none'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=("build", "run", "profile"))
    ap.add_argument("--dir", type=Path, default=Path(".gpu/sweep"))
    ap.add_argument("--json", type=Path, default=Path("bench/results/gpu_gemv_sweep.json"))
    ap.add_argument("--smoke", action="store_true", help="build: a few kernels only (a check of the script)")
    ap.add_argument("--round2", action="store_true", help="build: the round-2 configs (ROUND2) and TUNED's")
    ap.add_argument("--round3", action="store_true", help="build: the round-3 configs (ROUND3) and TUNED's, with and "
                    "without prefetch; no float kernels")
    ap.add_argument("--bits", default="", help="build: comma-separated widths only (default: all)")
    ap.add_argument("--baseline", type=Path, help="build: also each shape's pick compiled from this earlier "
                    "kernels_int8.py (kind int8_base), e.g. git show HEAD:targets/cuda/kernels_int8.py > FILE")
    ap.add_argument("--configs", default="", help="build: comma-separated int8 configs (c0: 16-byte chunks) beside "
                    "TUNED's, no float kernels; the first also on the odd shapes")
    ap.add_argument("--xpre", action="store_true", help="build: round 4, TUNED's configs and x quantized once "
                    "per launch (XPRE, 'q' configs), no float kernels")
    ap.add_argument("--shapes", default="", help="build: comma-separated NxK of SHAPES only (default: all)")
    ap.add_argument("--kernels", default="", help="profile: comma-separated kernel names")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    if args.step == "build":
        build(args.dir, args.smoke, args.round2, args.round3, tuple(int(b) for b in args.bits.split(",") if b),
              args.baseline, tuple(c for c in args.configs.split(",") if c),
              tuple(tuple(int(v) for v in sh.split("x")) for sh in args.shapes.split(",") if sh), args.xpre)
        return 0
    if args.step == "profile":
        profile(args.dir, [k for k in args.kernels.split(",") if k])
        return 0
    return run(args.dir, args.json)


if __name__ == "__main__":
    sys.exit(main())
