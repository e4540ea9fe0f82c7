"""The compile pipeline: load -> find weights -> measure -> allocate -> quantize -> lower -> build -> write."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from qcompile.passes.allocate import AllocationError, allocate
from qcompile.passes.formats import PRESETS, WeightFormat
from qcompile.passes.measure import measure_rtn
from qcompile.passes.quantizable import DEFAULT_MIN_WEIGHTS, QuantTarget, find_quantizable
from qcompile.passes.quantize import QuantizePass, QuantRecord
from qcompile.runtime.errors import QCompileError

from .artifact import write_artifact
from .frontend import load_onnx

__all__ = ["CompileOptions", "CompileResult", "compile_model", "FLOAT_BPW"]

log = logging.getLogger(__name__)

FLOAT_BPW = 16.0
"""``--bpw`` at or above this keeps the weights in float (for comparison)."""

Progress = Callable[[str, int, int], None]  # (step, done, total)


@dataclass
class CompileOptions:
    target: str = "x86"
    bpw: float = 4.25
    min_weights: int = DEFAULT_MIN_WEIGHTS
    overrides: list[tuple[str, str]] = field(default_factory=list)  # (regex, format name or bits)


@dataclass
class CompileResult:
    path: Path
    manifest: dict
    records: list[QuantRecord]
    quantized_model: onnx.ModelProto
    seconds: dict[str, float]


def _override_format(spec: str, shape) -> WeightFormat:
    if spec in PRESETS:
        return PRESETS[spec]
    if spec.isdigit():
        fits = [f for f in PRESETS.values() if f.bits == int(spec) and f.supports(shape)]
        if fits:
            return max(fits, key=lambda f: f.group_size)
    raise QCompileError(f"--override: {spec!r} is not a format ({', '.join(PRESETS)}) or bit width fitting {shape}")


def _plan(targets: list[QuantTarget], weights, opts: CompileOptions, progress: Progress | None):
    fixed: dict[str, WeightFormat] = {}
    for pattern, spec in opts.overrides:
        rx = re.compile(pattern)
        for t in targets:
            if rx.search(t.name) and t.name not in fixed:
                fixed[t.name] = _override_format(spec, t.shape)
                log.info("override %s -> %s (by %r)", t.name, fixed[t.name].name, pattern)
    free = [t for t in targets if t.name not in fixed]
    choices = measure_rtn(free, weights, progress=(lambda i: progress("measure", i, len(free))) if progress else None)
    total = sum(t.n_weights for t in targets)
    fixed_bits = sum(fixed[t.name].storage_bits(t.shape).total for t in targets if t.name in fixed)
    plan = dict(fixed)
    if free:
        free_weights = sum(t.n_weights for t in free)
        budget = Fraction(str(opts.bpw)) * total - fixed_bits
        if budget <= 0:
            raise QCompileError(f"--bpw {opts.bpw}: the overrides alone use {fixed_bits / total:.3f} bpw")
        try:
            alloc = allocate(choices, opts.bpw if not fixed else budget / free_weights)
        except AllocationError as e:
            raise QCompileError(f"--bpw {opts.bpw}: {e}") from e
        plan.update({name: PRESETS[f] for name, f in alloc.choices.items()})
    return plan


def compile_model(model_path: str | Path, out: str | Path, opts: CompileOptions,
                  progress: Progress | None = None) -> CompileResult:
    from qcompile.targets import resolve_target  # noqa: PLC0415
    from qcompile.targets.x86 import X86Target  # noqa: PLC0415

    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    spec = resolve_target(opts.target)
    if not (0 < opts.bpw):
        raise QCompileError(f"--bpw {opts.bpw}: must be a positive number of bits per weight")
    proto = load_onnx(model_path)
    model = ir.from_proto(proto)
    targets = find_quantizable(model, opts.min_weights)
    if not targets:
        log.warning("%s: no weight is large enough to quantize; compiling with float weights", model_path)
    seconds["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    weights = {}

    def weight(t: QuantTarget) -> np.ndarray:
        return t.matrix(model.graph.initializers[t.name].const_value.numpy())

    float_weights = opts.bpw >= FLOAT_BPW
    plan = {} if float_weights else _plan(targets, weight, opts, progress)
    seconds["allocate"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    qpass = QuantizePass(targets, plan,
                         progress=(lambda i: progress("quantize", i, len(plan))) if progress else None)
    qpass(model)
    qproto = ir.to_proto(model)
    seconds["quantize"] = time.perf_counter() - t0
    del weights

    t0 = time.perf_counter()
    backend = X86Target(spec)
    lowered = backend.lower(qproto)
    seconds["lower"] = time.perf_counter() - t0

    manifest = _manifest(proto, spec, opts, qpass.records, targets, lowered, float_weights)
    t0 = time.perf_counter()
    if progress:
        progress("build", 0, 1)
    path = write_artifact(out, manifest, lowered.params, lambda p: backend.build(lowered.mod, p))
    if progress:
        progress("build", 1, 1)
    seconds["build"] = time.perf_counter() - t0
    log.info("compiled %s -> %s: %.4f bpw (target %s) in %.1f s", model_path, path,
             manifest["bpw"]["achieved"], opts.bpw, sum(seconds.values()))
    return CompileResult(path, manifest, qpass.records, qproto, seconds)


def _value_info(v: onnx.ValueInfoProto) -> dict:
    tt = v.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
    return {"name": v.name, "dtype": str(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)), "shape": dims}


def _manifest(proto, spec, opts, records: list[QuantRecord], targets, lowered, float_weights: bool) -> dict:
    import tvm  # noqa: PLC0415

    from qcompile.compiler import __version__  # noqa: PLC0415

    qbits = sum(r.storage.total for r in records)
    qweights = sum(int(np.prod(r.onnx_shape)) for r in records)
    if float_weights:
        fbits = sum(t.n_weights * 32 for t in targets)
        achieved = 32.0 if targets else 0.0
        qbits, qweights = fbits, sum(t.n_weights for t in targets)
    else:
        achieved = qbits / qweights if qweights else 0.0
    param_bits = sum(a.nbytes * 8 for a in lowered.params.values())
    n_params = sum(int(np.prod(r.onnx_shape)) for r in records) + sum(
        a.size for n, a in lowered.params.items() if not any(n in r.initializers for r in records))
    return {
        "qcompile_version": __version__,
        "tvm_version": tvm.__version__,
        "model": {"producer": proto.producer_name, "opset": max((o.version for o in proto.opset_import
                                                                  if o.domain in ("", "ai.onnx")), default=0)},
        "target": spec.to_manifest(),
        "inputs": [_value_info(v) for v in proto.graph.input],
        "outputs": [_value_info(v) for v in proto.graph.output],
        "params": lowered.param_names,
        "bpw": {
            "target": opts.bpw,
            "achieved": achieved,
            "float_weights": float_weights,
            "quantized_weights": qweights,
            "storage_bits": qbits,
            "file_bits_per_param": param_bits / n_params if n_params else 0.0,
        },
        "tensors": [
            {
                "name": r.name,
                "op": r.op,
                "onnx_shape": list(r.onnx_shape),
                "shape": list(r.shape),
                "onnx_layout": r.onnx_layout,
                "format": r.format.name,
                "bits": r.format.bits,
                "group_size": r.format.group_size,
                "storage_bits": {"codes": r.storage.codes, "scales": r.storage.scales,
                                 "zeros": r.storage.zeros, "total": r.storage.total},
                "params": list(r.initializers),
                "rel_error": r.rel_error,
            }
            for r in records
        ],
    }
