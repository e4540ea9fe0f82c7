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
  plans use it), and with ``build --variants`` ``r{rows}t{threads}[s][-flags]`` variants of it at 2 and 4
  bits (s: x staged in workgroup memory; flags: :data:`FLAGS`; bench/gpu/NOTES.md has their timings), or
  those named by ``--configs``;
- ``int8``: :func:`qcompile.targets.vulkan.kernels_int8.gemv_int8` (int8 activations, ``dot4I8Packed``)
  with its default launch shape, and with ``build --int8`` ``i8r{rows}t{threads}[e]`` variants of it
  (checked against the int8 reference: the activations quantized as on x86);
- a 4 KB GEMV (:data:`FLOOR`): what one dispatch costs.

Only some kernels (tuning): ``build --bits 2,4 --shapes 4096x14336 --configs r8t64s-ri,r8t64s --no-dlight
--no-models``, then on the GPU machine ``python -m bench.gpu.vulkan run --dir D --interleave 4 --json
$OUT/x.json`` (the kernels of a width and shape timed in turns: the GPU's clock moves between them).
The int8 kernels against the float default (bench/results/gpu_vulkan_int8.json): ``build --bits 2,3,4,5,6
--no-dlight --no-models --int8 i8,i8r8t64,i8r16t64e``, then ``run ... --interleave 3 --reps 1000 --warmup 1.5``:
with 100 dispatches a pass and no warm-up the H100 stayed at 345-570 MHz, with these at 1980 MHz.

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
import tempfile
import time
from pathlib import Path

import numpy as np

log = logging.getLogger("gpu_vulkan")

BITS = (2, 3, 4, 5, 6, 8)
SHAPES = ((4096, 4096), (4096, 14336), (14336, 4096))  # (N, K), as the CUDA GEMV rows
GROUP = 128
VARIANTS = ((8, 64, False), (4, 64, True), (8, 128, True), (16, 64, True), (4, 128, True), (8, 32, True),
            (16, 128, True))  # (rows, threads, smem_x), no flags, besides the default (kernels.TUNED)
VARIANT_BITS = (2, 4)
FLAGS = {"r": "split_reduce", "i": "inplace", "e": "early"}  # GemvConfig flags in variant names
INT8 = "i8"  # kind prefix of the int8-activation kernels: "i8" (default config) or "i8r8t64e" (a variant)
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


def gemv_module(kernel, fmt, n: int, k: int, m: int | None = 1):
    """Relax ``main(x[M, K], planes..., scales, zeros) -> y[M, N]``: one call of ``kernel``; M = ``m``, or
    symbolic (``m``) when None."""
    from tvm import relax, tirx  # noqa: PLC0415

    g = fmt.group_size
    bb = relax.BlockBuilder()
    m = tirx.Var("m", "int64") if m is None else m
    x = relax.Var("x", relax.TensorType([m, k], "float32"))
    ws = [relax.Var(f"w{i}", relax.TensorType([n, k * pb // 32], "uint32")) for i, pb in enumerate(fmt.planes)]
    s = relax.Var("s", relax.TensorType([n, k // g], "float16"))
    z = relax.Var("z", relax.TensorType([n, k // g], "float16"))
    with bb.function("main", [x, *ws, s, z]):
        gv = bb.add_func(kernel, "gemv")
        with bb.dataflow():
            y = bb.emit_output(relax.call_tir(gv, [x, ws[0], ws[-1], s, z], relax.TensorType([m, n], "float32")))
        bb.emit_func_output(y)
    mod = bb.get()
    mod["main"] = mod["main"].with_attr("num_input", 1)
    return mod


def build_gemv(out: Path, kind: str, bits: int, n: int, k: int, config=None, group: int = GROUP,
               m: int | None = 1) -> Path:
    """A Vulkan artifact of one GEMV kernel (``kind``; ``int8...``: :func:`~qcompile.targets.vulkan.
    kernels_int8.gemv_int8`), without its weights (``<dir>.params.json`` lists them): plan, WGSL, and a
    manifest naming the generated weights' hash.  ``m`` None: x has a symbolic number of rows ``m``."""
    from bench.gpu.decode import strip_artifact  # noqa: PLC0415
    from qcompile.runtime.manifest import FORMAT_VERSION, PARAMS, sha256_file  # noqa: PLC0415
    from qcompile.targets.vulkan import kernels  # noqa: PLC0415
    from qcompile.targets.vulkan.build import build_plan  # noqa: PLC0415

    fmt = _fmt(bits, group)
    if kind.startswith(INT8):
        from qcompile.targets.vulkan.kernels_int8 import gemv_int8  # noqa: PLC0415

        f = gemv_int8(fmt, k, n, config)
    elif kind == "dlight":
        f = kernels.dequant_matmul(fmt, k, n, 1)
    elif kind == "dlight_symbolic_m":
        f = kernels.dequant_matmul(fmt, k, n)
    else:
        f = kernels.gemv(fmt, k, n, config)
    full = Path(tempfile.gettempdir()) / "qcompile-vulkan-gemv" / (_name(kind, bits, n, k) + ("" if group == GROUP
                                                                                             else f"_g{group}"))
    full.mkdir(parents=True, exist_ok=True)
    names = _param_names(fmt)
    files = build_plan(gemv_module(f, fmt, n, k, m), names, 1, full)
    specs = {nm: {"dtype": "uint32", "shape": [n, k * pb // 32]} for nm, pb in zip(names, fmt.planes)}
    specs |= {nm: {"dtype": "float16", "shape": [n, k // fmt.group_size]} for nm in names[-2:]}
    (full / PARAMS).unlink(missing_ok=True)
    manifest = {"format_version": FORMAT_VERSION,
                "target": {"name": "vulkan", "tvm": {"kind": "webgpu"}, "device": "vulkan", "arch": "any"},
                "inputs": [{"name": "x", "dtype": "float32", "shape": ["m" if m is None else m, k]}],
                "outputs": [{"name": "y", "dtype": "float32", "shape": ["m" if m is None else m, n]}],
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


def variant_config(name: str):
    """The :class:`GemvConfig` of a variant name ``r{rows}t{threads}[s][-flags]`` (flags: :data:`FLAGS`)."""
    import re  # noqa: PLC0415

    from qcompile.targets.vulkan.kernels import GemvConfig  # noqa: PLC0415

    match = re.fullmatch(r"r(\d+)t(\d+)(s?)(?:-([a-z]+))?", name)
    if not match or any(f not in FLAGS for f in match[4] or ""):
        raise ValueError(f"GEMV variant {name!r}: expected r<rows>t<threads>[s][-flags], flags from "
                         f"{sorted(FLAGS)}")
    return GemvConfig(int(match[1]), int(match[2]), bool(match[3]), **{FLAGS[f]: True for f in match[4] or ""})


def int8_config(name: str):
    """The :class:`~qcompile.targets.vulkan.kernels_int8.Int8GemvConfig` of a kind ``i8r{rows}t{threads}[e]``
    (``i8``: None, the default)."""
    import re  # noqa: PLC0415

    from qcompile.targets.vulkan.kernels_int8 import Int8GemvConfig  # noqa: PLC0415

    if name == INT8:
        return None
    match = re.fullmatch(INT8 + r"r(\d+)t(\d+)(e?)", name)
    if not match:
        raise ValueError(f"int8 GEMV variant {name!r}: expected {INT8} or {INT8}r<rows>t<threads>[e]")
    return Int8GemvConfig(int(match[1]), int(match[2]), bool(match[3]))


def model_int8(bits: int, n: int, k: int) -> bool:
    """Whether a model's decode step runs this GEMV on the int8 kernel (:func:`qcompile.targets.cuda.lower.
    uses_int8`: where the x86 int8 build quantizes activations)."""
    from qcompile.passes.formats import WeightFormat  # noqa: PLC0415
    from qcompile.targets.cuda.lower import uses_int8  # noqa: PLC0415

    return uses_int8(WeightFormat(bits, GROUP), k, n)


def build(out: Path, variants: bool = False, bits_list=BITS, shapes=SHAPES, configs=(), dlight: bool = True,
          models: bool = True, int8=()) -> None:
    """GEMV plans (``variants``: also the launch-shape variants, for tuning; ``configs``: variant names
    built for every width and shape; ``int8``: int8 kernel kinds, ``i8`` or ``i8r{rows}t{threads}[e]``)
    and the test models."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for bits in bits_list:
        for n, k in shapes:
            if dlight:
                build_gemv(out, "dlight", bits, n, k)
            build_gemv(out, "vulkan", bits, n, k)
            if dlight and bits == 4:
                build_gemv(out, "dlight_symbolic_m", bits, n, k)
            names = [f"r{r}t{t}" + ("s" if sx else "") for r, t, sx in VARIANTS] \
                if variants and bits in VARIANT_BITS else []
            for name in [*names, *configs]:
                build_gemv(out, name, bits, n, k, variant_config(name))
            # the int8 kernel where a model's decode step gets it (x86 int8 widths), beside the float one
            for name in dict.fromkeys([*((INT8,) if model_int8(bits, n, k) else ()), *int8]):
                build_gemv(out, name, bits, n, k, int8_config(name))
    build_gemv(out, "vulkan", *FLOOR)
    log.info("GEMV plans in %.0f s", time.perf_counter() - t0)
    if models:
        build_models(out)


def build_models(out: Path) -> None:
    """The test models for Vulkan and x86 (same quantization), their inputs and the x86 outputs."""
    import qcompile.runtime as rt  # noqa: PLC0415
    from qcompile.compiler.driver import CompileOptions, compile_model  # noqa: PLC0415
    from tests.helpers import convnet_model, mlp_model, save  # noqa: PLC0415

    makers = {"mlp": (mlp_model, (256,)), "convnet": (convnet_model, (16, 20, 20))}
    refs = {}
    work = Path(tempfile.gettempdir()) / "qcompile-vulkan-models"
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


def int8_reference(fmt, params: dict, x: np.ndarray, n: int, k: int) -> np.ndarray:
    """The int8-activation GEMV in numpy without TVM (the GPU machine has the runtime only): x86's
    ``quantize_activations`` + ``reference_int8_matmul`` (:func:`bench.gpu.gpu_check.int8_reference`)."""
    from bench.gpu.gpu_check import int8_reference as ref  # noqa: PLC0415

    planes = [params[f"W.q{i}"] for i in range(len(fmt.planes))]
    return ref(x, fmt.unpack(planes, (n, k)), params["W.scales"], params["W.zeros"], fmt.group_size)


def run_gemv(root: Path, device, results: dict, failures: list, reps: int = 100, rounds: int = 5,
             save=lambda: None, bits_list=BITS, interleave: int = 0, warmup: float = 0.0) -> None:
    """Check and time every GEMV plan under ``root``.  ``interleave`` > 0: the kernels of one width and
    shape timed in turns, ``interleave`` times one round each (start rotated each turn), the GPU shared
    with others: a kernel's rows get the median and the minimum of its turns (``us_gpu_min``).  ``warmup``:
    seconds of passes of the first kernel before a shape's turns (the GPU raises its clock under load)."""
    from bench.gpu.decode import load_specs, random_params  # noqa: PLC0415
    from qcompile.runtime import vulkan  # noqa: PLC0415

    for bits, n, k in [(b, n, k) for b in bits_list for n, k in SHAPES] + [FLOOR]:
        fmt = _fmt(bits)
        arts = sorted(a for a in root.glob(f"*_b{bits}_n{n}_k{k}") if a.is_dir())
        if not arts:
            continue
        params = random_params(load_specs(arts[0]))
        x = np.random.default_rng(bits * n + k).standard_normal((1, k)).astype(np.float32)
        ref = _reference(fmt, params, x, n, k)
        ref8 = int8_reference(fmt, params, x, n, k) if any(a.name.startswith(INT8) for a in arts) else None
        nbytes = _gemv_bytes(fmt, n, k)
        copies = max(1, math.ceil(CACHE_BYTES / nbytes))
        turns = interleave if (bits, n, k) != FLOOR else 0  # the floor's 65536 weight copies: made once
        sessions = {}
        for art in arts:
            kind = art.name.split("_b")[0]
            try:
                sess = vulkan.Session(art, device, params=params)
                (y,) = sess.run(None, {"x": x})
                err = _rel(y, ref8 if kind.startswith(INT8) else ref)
                samples = [] if turns else \
                    [(sess.time_calls({"x": x}, reps=reps, copies=copies, rounds=rounds), sess.gpu_seconds)]
            except Exception as e:  # noqa: BLE001  (the other kernels still run)
                log.exception("vulkan gemv %s", art.name)
                failures.append(f"vulkan gemv {art.name}: {type(e).__name__}: {e}")
                continue
            results["checks"].append({"kernel": f"vulkan_{kind}", "bits": bits, "N": n, "K": k, "group": GROUP,
                                      "M": 1, "rel_err": err, **({"reference": "int8"} if kind.startswith(INT8) else {})})
            if kind.startswith(INT8):  # how far the int8 activations are from float ones
                results["checks"][-1]["rel_err_vs_float"] = _rel(y, ref)
            if not err < 1e-5:
                failures.append(f"vulkan gemv {kind} b{bits} {n}x{k}: rel err {err:.3g}")
            sessions[kind] = (sess, err, samples)
        kinds = list(sessions)
        t_end = time.perf_counter() + warmup
        while kinds and turns and time.perf_counter() < t_end:
            sessions[kinds[0]][0].time_calls({"x": x}, reps=reps, copies=copies, rounds=1)
        for turn in range(turns):
            for kind in kinds[turn % len(kinds):] + kinds[:turn % len(kinds)]:
                sess, _, samples = sessions[kind]
                try:
                    samples.append((sess.time_calls({"x": x}, reps=reps, copies=copies, rounds=1), sess.gpu_seconds))
                except Exception as e:  # noqa: BLE001
                    log.exception("vulkan gemv %s", kind)
                    failures.append(f"vulkan gemv {kind} b{bits} {n}x{k}: {type(e).__name__}: {e}")
        for kind, (sess, err, samples) in sessions.items():
            if not samples:
                continue
            wall = float(np.median([w for w, _ in samples]))
            row = {"bits": bits, "N": n, "K": k, "us": wall * 1e6, "GBps": nbytes / wall / 1e9,
                   "encode_us": sess.encode_seconds * 1e6}
            gpu = [g for _, g in samples if g]
            if gpu:  # the pass's GPU time (timestamps), barriers between dispatches included
                row.update(us_gpu=float(np.median(gpu)) * 1e6, GBps_gpu=nbytes / float(np.median(gpu)) / 1e9)
            if turns:
                row.update(us_min=min(w for w, _ in samples) * 1e6, turns=len(samples))
                if gpu:
                    row.update(us_gpu_min=min(gpu) * 1e6, GBps_gpu_max=nbytes / min(gpu) / 1e9,
                               us_gpu_turns=[round(g * 1e6, 2) for g in gpu])
            if (bits, n, k) == FLOOR:
                results["gemv_variants"].append({"config": "vulkan_dispatch_floor" if kind == "vulkan"
                                                 else f"vulkan_{kind}_dispatch_floor", **row})
            elif kind == (INT8 if INT8 in sessions else "vulkan"):  # the kernel a model's decode step gets
                results["gemv"].append({"target": "vulkan", "kernel": "gemv_int8" if kind == INT8 else "gemv", **row})
            elif kind == "dlight":
                results["gemv"].append({"target": "vulkan_dlight", **row})
            else:  # with the int8 kernel in the rows, the float one is "vulkan_float"
                results["gemv_variants"].append({"config": "vulkan_float" if kind == "vulkan" else f"vulkan_{kind}",
                                                 **row})
            log.info("vulkan gemv %-18s b%d %5dx%-5d %8.1f us %6.0f GB/s (GPU clock %s us, min %s)  err %.2g", kind,
                     bits, n, k, row["us"], row["GBps"], round(row.get("us_gpu", float("nan")), 1),
                     round(row.get("us_gpu_min", float("nan")), 1), err)
        del sessions
        save()


def run_models(root: Path, device, results: dict, failures: list) -> None:
    """The test models on NVIDIA's Vulkan against the x86 build of the same weights."""
    from qcompile.runtime import vulkan  # noqa: PLC0415

    if not (root / "model_refs.npz").exists():  # built with --no-models
        return
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


def run(root: Path, results: dict, failures: list, device=None, save=lambda: None, bits_list=BITS,
        interleave: int = 0, reps: int = 100, warmup: float = 0.0) -> None:
    for key in ("gemv", "gemv_variants", "checks", "vulkan_models"):
        results.setdefault(key, [])
    if device is None:
        return
    results["vulkan_device"] = {k: str(v) for k, v in dict(device.adapter.info).items()}
    for what, fn in (("models", lambda: run_models(root, device, results, failures)),
                     ("gemv", lambda: run_gemv(root, device, results, failures, save=save, bits_list=bits_list,
                                                       interleave=interleave, reps=reps, warmup=warmup))):
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            log.exception("vulkan %s", what)
            failures.append(f"vulkan {what}: {type(e).__name__}: {e}")
        save()


def table(results: dict) -> str:
    """GEMV times per width and shape, one line per kernel (GPU clock, then wall), fastest first."""
    rows = [(r["bits"], r["N"], r["K"], r.get("config", r.get("target")), r) for r in
            results.get("gemv", []) + results.get("gemv_variants", [])]
    lines = []
    for bits, n, k, name, r in sorted(rows, key=lambda t: (t[0], t[1], t[2], t[4].get("us_gpu", t[4]["us"]))):
        lines.append(f"b{bits} {n:5d}x{k:<5d} {name:28s} gpu {r.get('us_gpu', float('nan')):7.2f} us "
                     f"(min {r.get('us_gpu_min', float('nan')):7.2f}) "
                     f"{r.get('GBps_gpu', float('nan')):6.0f} GB/s   wall {r['us']:7.2f} us {r['GBps']:6.0f} GB/s")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=("build", "run"))
    ap.add_argument("--dir", type=Path, default=Path(".gpu/vulkan"))
    ap.add_argument("--variants", action="store_true", help="also the GEMV launch-shape variants (tuning)")
    ap.add_argument("--bits", default=",".join(map(str, BITS)), help="widths, comma-separated (run: in this order)")
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES), help="build: NxK, comma-separated")
    ap.add_argument("--configs", default="",
                    help="build: GEMV variant names r<rows>t<threads>[s][-flags], comma-separated")
    ap.add_argument("--int8", default="",
                    help=f"build: int8-activation kernels {INT8} (default config) or {INT8}r<rows>t<threads>[e], "
                         "comma-separated")
    ap.add_argument("--no-dlight", action="store_true", help="build: without the dlight GEMV baselines")
    ap.add_argument("--no-models", action="store_true", help="build: without the test models")
    ap.add_argument("--json", type=Path, help="run: where the results go")
    ap.add_argument("--interleave", type=int, default=0, help="run: time the kernels of a shape in turns, so many")
    ap.add_argument("--reps", type=int, default=100, help="run: dispatches a timed pass")
    ap.add_argument("--warmup", type=float, default=0.0, help="run: seconds of load before a shape's turns")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    if args.step == "build":  # also run by python -m bench.gpu.decode run (decode and Vulkan), or gpu_check run
        shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        build(args.dir, args.variants, [int(b) for b in args.bits.split(",")], shapes,
              [c for c in args.configs.split(",") if c], not args.no_dlight, not args.no_models,
              [c for c in args.int8.split(",") if c])
        return 0
    results, failures = {}, []
    save = (lambda: args.json.write_text(json.dumps({**results, "failures": failures}, indent=1))) if args.json \
        else (lambda: None)
    run(args.dir, results, failures, device_or_none(failures), save, [int(b) for b in args.bits.split(",")],
        args.interleave, args.reps, args.warmup)
    print(table(results))
    for f in failures:
        print("FAILED:", f)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
