"""The compile pipeline: load -> find weights -> measure -> allocate -> quantize -> lower -> build -> write."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from qcompile.passes.allocate import AllocationError, TensorChoices, allocate
from qcompile.passes.calibrate import CalibrationError, CalibrationStats, calibrate, model_hash
from qcompile.passes.formats import PRESETS
from qcompile.passes.fuse_attention import fuse_attention
from qcompile.passes.fuse_decoder import fuse_decoder
from qcompile.passes.measure import MEASURE_ROWS, error_measure_name, load_table, make_quantizer, measure, save_table
from qcompile.passes.outliers import DEFAULT_FORMAT as AWQ_FORMAT
from qcompile.passes.outliers import ActivationScalePass, scaled_stats
from qcompile.passes.quantizable import DEFAULT_MIN_WEIGHTS, QuantTarget, find_quantizable
from qcompile.passes.quantize import QuantizePass, QuantRecord
from qcompile.passes.salient import SHARES, AnyFormat, SplitFormat, format_by_name
from qcompile.passes.sensitivity import (PROBE_FORMAT, Sensitivity, load_sensitivity, measure_sensitivity,
                                         save_sensitivity)
from qcompile.runtime.errors import QCompileError
from qcompile.runtime.manifest import sha256_file

from .artifact import write_artifact
from .calibdata import load_samples
from .selfcalib import is_decoder
from .frontend import load_onnx
from .frontends.tokenizer import source_tokenizer
from .manifest_build import build_manifest
from .report_html import html_report

__all__ = ["CompileOptions", "CompileResult", "Quantized", "compile_model", "quantize_model", "lower_model",
           "FLOAT_BPW"]

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
    keep_float: list[str] = field(default_factory=list)  # regexes of weights that stay float
    calib: str | None = None  # calibration data: a .txt/.npy/.npz file or "random"; None: no calibration
    tokenizer: str | None = None  # tokenizer.json for .txt calibration (default: beside the model)
    calib_samples: int = 32
    calib_seq_len: int = 128
    gptq: bool = True  # with calibration: GPTQ (else RTN with an imatrix-weighted clip search)
    awq: bool | str = "auto"  # with calibration: activation-aware scaling folded into producers: on, off, or
    # auto (both measured; the allocation with the lower objective wins)
    salient: bool = True  # with calibration: also measure split formats (salient input channels at more bits)
    sensitivity: bool = True  # with calibration: weight each layer's error by its measured effect on the output
    sensitivity_samples: int = 4  # calibration samples the sensitivity probes run on
    head_bits: int | None = None  # the output projection at this width, outside the --bpw average
    workdir: str | Path | None = None  # stats and measurements, reused across runs
    fuse: bool = True  # decoder fusions before lowering (passes/fuse_*.py); False: the graph as quantized
    int8_dot: bool = True  # int8-activation dot-product kernels where the target CPU has them (x86: AVX2)
    tuning_db: str | Path | None = None  # `qcompile tune --db` folder: tuned schedules applied at build (x86)


@dataclass
class CompileResult:
    path: Path
    manifest: dict
    records: list[QuantRecord]
    quantized_model: onnx.ModelProto
    seconds: dict[str, float]


def _format_for_bits(spec: str, shape, what: str, op: str = "MatMul") -> AnyFormat:
    if not spec.isdigit():
        try:
            fmt = format_by_name(spec)
        except ValueError as e:
            raise QCompileError(f"{what}: {e}") from None
        if not fmt.supports(shape):
            raise QCompileError(f"{what}: format {spec} does not fit a weight of shape [N, K] = {list(shape)}")
        if isinstance(fmt, SplitFormat) and op == "Conv":
            raise QCompileError(f"{what}: split format {spec} is for MatMul/Gemm weights, not Conv")
        return fmt
    fits = [f for f in PRESETS.values() if f.bits == int(spec) and f.supports(shape)]
    if fits:
        return max(fits, key=lambda f: f.group_size)
    raise QCompileError(f"{what}: {spec!r} is not a format ({', '.join(PRESETS)}, or LO+HI/SHARE) or a bit "
                        f"width (2, 3, 4, 5, 6, 8) fitting [N, K] = {list(shape)}")


def _work_dir(opts: CompileOptions, mhash: str) -> Path:
    if opts.workdir is not None:
        return Path(opts.workdir)
    root = Path(os.environ.get("QCOMPILE_CACHE") or Path.home() / ".cache" / "qcompile")
    return root / "work" / mhash


def _file_digest(spec: str | None) -> str | None:
    if spec is None or spec in ("random", "self"):
        return spec
    path = Path(spec)
    if not path.is_file():
        raise QCompileError(f"--calib {spec}: no such file (give a .txt, .npy or .npz file, or 'random')")
    return sha256_file(path)


def _heads(model: ir.Model, targets: list[QuantTarget]) -> set[str]:
    """Targets whose consumer produces a graph output (the output projection / classifier head)."""
    outputs = {v.name for v in model.graph.outputs}
    heads = set()
    for t in targets:
        uses = model.graph.initializers[t.name].uses()
        if any(o.name in outputs for use in uses for o in use.node.outputs):
            heads.add(t.name)
    return heads


def _no_coarser_than(choices: TensorChoices, bpw: float) -> TensorChoices:
    """``choices`` without the formats that store fewer than ``bpw`` bits a weight (the finest kept if none)."""
    kept = tuple(c for c in choices.candidates if c.bits >= bpw * choices.n_weights)
    return dataclasses.replace(choices, candidates=kept or (max(choices.candidates, key=lambda c: c.bits),))


class _Pipeline:
    """One compile: the steps share the model, the targets and the work directory."""

    def __init__(self, model_path, opts: CompileOptions, progress: Progress | None):
        self.opts, self.progress, self.model_path = opts, progress, Path(model_path)
        self.proto = load_onnx(model_path)
        self.model = ir.from_proto(self.proto)
        self.targets = find_quantizable(self.model, opts.min_weights)
        for pattern in opts.keep_float:
            try:
                rx = re.compile(pattern)
            except re.error as e:
                raise QCompileError(f"--keep-float {pattern!r}: not a regular expression ({e})") from e
            kept = [t.name for t in self.targets if rx.search(t.name)]
            log.info("--keep-float %r: %s stay float", pattern, kept)
            self.targets = [t for t in self.targets if t.name not in kept]
        self.mhash = model_hash(self.proto)
        self.work = _work_dir(opts, self.mhash)
        self._samples: list[dict] | None = None
        self._tokenizer: str | None = None

    def _tick(self, step: str, total: int):
        return (lambda i: self.progress(step, i, total)) if self.progress else None

    def weight(self, t: QuantTarget) -> np.ndarray:
        return t.matrix(self.model.graph.initializers[t.name].const_value.numpy())

    def tokenizer(self) -> str | None:
        """The tokenizer.json text: ``--tokenizer``, else the one the model source ships (or None)."""
        if self.opts.tokenizer is not None:
            p = Path(self.opts.tokenizer)
            p = p / "tokenizer.json" if p.is_dir() else p
            if not p.is_file():
                raise QCompileError(f"--tokenizer {self.opts.tokenizer}: no such file (expected a Hugging Face "
                                    "tokenizer.json)")
            return p.read_text()
        if self._tokenizer is None:
            self._tokenizer = source_tokenizer(self.model_path) or ""
        return self._tokenizer or None

    def samples(self) -> list[dict]:
        """The calibration feeds (loaded once)."""
        if self._samples is None:
            o = self.opts
            tokenizer = o.tokenizer
            if tokenizer is None and o.calib is not None and o.calib.endswith(".txt") and self.tokenizer():
                tokenizer = self.work / "tokenizer.json"  # the one the model source ships
                tokenizer.parent.mkdir(parents=True, exist_ok=True)
                tokenizer.write_text(self.tokenizer())
            self._samples = load_samples(o.calib, self.proto, model_path=self.model_path,
                                         n_samples=o.calib_samples, seq_len=o.calib_seq_len, tokenizer=tokenizer)
        return self._samples

    def stats(self) -> tuple[CalibrationStats | None, str | None]:
        o = self.opts
        if o.calib is None:
            return None, None
        key = hashlib.sha256(json.dumps([_file_digest(o.calib), _file_digest(o.tokenizer), o.calib_samples,
                                         o.calib_seq_len, sorted(t.name for t in self.targets)]).encode()).hexdigest()[:16]
        path = self.work / f"stats-{key}.npz"
        if path.is_file():
            try:
                stats = CalibrationStats.load(path, self.mhash)
                log.info("reusing calibration stats %s", path)
                return stats, key
            except CalibrationError as e:
                log.warning("recalibrating: cached stats unusable (%s)", e)
        samples = self.samples()
        try:
            stats = calibrate(self.proto, self.targets, samples, progress=self._tick("calibrate", len(samples)))
        except CalibrationError as e:
            raise QCompileError(f"{self.model_path}: --calib {o.calib}: {e}") from e
        stats.save(path)
        return stats, key

    def outliers(self, stats: CalibrationStats, stats_key: str) -> tuple[CalibrationStats, dict, str]:
        """AWQ scaling folded into the producers; scales are kept in the work dir and replayed."""
        # one search format for every --bpw, so that a new --bpw reuses the scales and the measurement
        fmt = AWQ_FORMAT
        path = self.work / f"awq-{stats_key}-{fmt.name}.npz"
        cached = None
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                cached = {k: z[k] for k in z.files}
            log.info("replaying %d activation scales from %s", len(cached), path)
        awq = ActivationScalePass(self.targets, stats, fmt, scales=cached)
        awq(self.model)
        if cached is None:
            fd, tmp = tempfile.mkstemp(dir=self.work, prefix=f".{path.name}.", suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **awq.scales)
            os.replace(tmp, path)
        digest = hashlib.sha256(b"".join(k.encode() + np.ascontiguousarray(v).tobytes()
                                         for k, v in sorted(awq.scales.items()))).hexdigest()[:16]
        report = {a: {"producer": r.producer, "consumers": list(r.consumers), "alpha": r.alpha,
                      "error_before": r.error_before, "error_after": r.error_after}
                  for a, r in awq.report.items()}
        return scaled_stats(stats, awq.scales), report, digest

    def sensitivity(self, stats: CalibrationStats, stats_key: str) -> dict[str, Sensitivity]:
        """Whole-model sensitivity of every target (:mod:`qcompile.passes.sensitivity`), cached."""
        n = max(1, self.opts.sensitivity_samples)
        key = {"model": self.mhash, "stats": stats_key, "samples": n, "probe": PROBE_FORMAT.name,
               "tensors": [t.name for t in self.targets]}
        path = self.work / f"sensitivity-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}.json"
        table = load_sensitivity(path, key)
        if table is not None:
            log.info("reusing sensitivities %s", path)
            return table
        samples = self.samples()
        picks = np.unique(np.linspace(0, len(samples) - 1, min(n, len(samples))).astype(int))
        table = measure_sensitivity(ir.to_proto(self.model), self.targets, stats, [samples[i] for i in picks],
                                    progress=self._tick("sensitivity", len(self.targets)))
        save_sensitivity(path, key, table)
        return table

    def measurement(self, free: list[QuantTarget], quantizer, stats_key, stats) -> list:
        salient = self.opts.salient and stats is not None
        key = {"model": self.mhash, "stats": stats_key, "gptq": self.opts.gptq, "rows": MEASURE_ROWS,
               "tensors": [t.name for t in free], "salient": list(SHARES) if salient else []}
        path = self.work / f"measurement-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]}.json"
        table = load_table(path, key)
        if table is not None:
            log.info("reusing measurement %s", path)
            return table
        table = measure(free, self.weight, quantizer, progress=self._tick("measure", len(free)),
                        salient=lambda t: salient and t.name in stats.tensors)
        save_table(path, key, table)
        return table

    def plan(self, quantizer, stats_key, stats: CalibrationStats | None = None,
             sensitivity: dict[str, Sensitivity] | None = None,
             ) -> tuple[dict[str, AnyFormat], set[str], dict, float]:
        """(format per weight, heads, measured candidates, the allocation's objective: its total error)."""
        opts, targets = self.opts, self.targets
        fixed: dict[str, AnyFormat] = {}
        heads: set[str] = set()
        if opts.head_bits is not None:
            heads = _heads(self.model, targets)
            for name in sorted(heads):
                t = next(t for t in targets if t.name == name)
                fixed[name] = _format_for_bits(str(opts.head_bits), t.shape, "--head-bits", t.op)
                log.info("head %s -> %s (--head-bits, outside the bpw average)", name, fixed[name].name)
        for pattern, spec in opts.overrides:
            try:
                rx = re.compile(pattern)
            except re.error as e:
                raise QCompileError(f"--override {pattern!r}: not a regular expression ({e})") from e
            for t in targets:
                if rx.search(t.name) and t.name not in fixed:
                    fixed[t.name] = _format_for_bits(spec, t.shape, f"--override {pattern}={spec}", t.op)
                    log.info("override %s -> %s (by %r)", t.name, fixed[t.name].name, pattern)
        if opts.bpw >= FLOAT_BPW:  # float weights, but for the explicit overrides
            return fixed, heads, {}, 0.0
        free = [t for t in targets if t.name not in fixed]
        table = self.measurement(free, quantizer, stats_key, stats) if free else []
        body = [t for t in targets if t.name not in heads]
        total = sum(t.n_weights for t in body)
        fixed_bits = sum(fixed[t.name].storage_bits(t.shape).total for t in body if t.name in fixed)
        plan = dict(fixed)
        objective = 0.0
        if free:
            budget = Fraction(str(opts.bpw)) * total - fixed_bits
            if budget <= 0:
                raise QCompileError(f"--bpw {opts.bpw}: the overrides alone use {fixed_bits / total:.3f} bpw")
            free_weights = sum(t.n_weights for t in free)
            weighted = table if not sensitivity else [_weighted(c, sensitivity[c.name].sensitivity) for c in table]
            if not sensitivity:
                weighted = _head_policy(weighted, _heads(self.model, free), opts.bpw)
            try:
                alloc = allocate(weighted, opts.bpw if len(free) == len(body) else budget / free_weights)
            except AllocationError as e:
                raise QCompileError(f"{self.model_path}: --bpw {opts.bpw}: {e}") from e
            plan.update({name: format_by_name(f) for name, f in alloc.choices.items()})
            objective = alloc.total_error
        candidates = {c.name: [{"format": x.format_name, "bits": x.bits, "error": x.error}
                               for x in c.candidates] for c in table}
        return plan, heads, candidates, objective


def _head_policy(table: list[TensorChoices], heads: set[str], bpw: float) -> list[TensorChoices]:
    """Policy when no sensitivity was measured: an output head gets no fewer bits than the average.

    Without calibration the allocator weighs every tensor's relative error alike, and a large head (an
    LLM's vocabulary projection: 21% of SmolLM2's weights) is then the cheapest place to save bits, although
    its error reaches the output undamped (llama.cpp keeps it at 6 bits, EXL2 at ``head_bits`` 6-8).
    With measured sensitivities the allocator knows what a head's error costs and this rule is not needed.
    """
    out = []
    for c in table:
        if c.name in heads:
            c = _no_coarser_than(c, bpw)
            log.info("head %s: no sensitivity measured -> formats of at least %s bpw (policy: %d candidates)",
                     c.name, bpw, len(c.candidates))
        out.append(c)
    return out


def _resolve_calib(opts: CompileOptions, proto: onnx.ModelProto, model_path) -> CompileOptions:
    """``--calib auto`` (the CLI's default): a decoder LLM calibrates on text it writes itself
    (:mod:`.selfcalib`), anything else compiles without calibration; ``none``: no calibration."""
    if opts.calib not in ("auto", "none"):
        return opts
    calib = None
    if opts.calib == "auto" and opts.bpw < FLOAT_BPW and is_decoder(proto):
        calib = "self"
        log.info("%s: a decoder LLM and no --calib: calibrating on %d sequences of %d tokens it generates "
                 "itself (--calib none: no calibration)", model_path, opts.calib_samples, opts.calib_seq_len)
    return dataclasses.replace(opts, calib=calib)


def _awq_settings(opts: CompileOptions, stats: CalibrationStats | None) -> list[bool]:
    if stats is None or opts.awq in (False, "off"):
        return [False]
    if opts.awq in (True, "on"):
        return [True]
    if opts.awq == "auto":
        return [False, True]
    raise QCompileError(f"--awq {opts.awq!r}: expected auto, on or off")


def _weighted(choices: TensorChoices, weight: float) -> TensorChoices:
    """The choices with their errors in units of model output divergence (error x sensitivity)."""
    return TensorChoices(choices.name, choices.n_weights,
                         tuple(dataclasses.replace(c, error=c.error * weight) for c in choices.candidates))


@dataclass
class Quantized:
    """The quantized IR of a model and what the manifest says about it (before any target is involved)."""

    proto: onnx.ModelProto  # the float model as loaded
    qproto: onnx.ModelProto  # qcompile's quantized IR (valid ONNX with qcompile-domain ops)
    targets: list[QuantTarget]
    records: list[QuantRecord]
    heads: set[str]
    candidates: dict
    outliers: dict
    error_measure: str
    float_weights: bool
    sensitivity: dict
    seconds: dict[str, float]
    tokenizer: str | None = None  # tokenizer.json text shipped with the model (or --tokenizer)
    calibration: str | None = None  # what calibrated: a file name, "self", "random", or None


def quantize_model(model_path: str | Path, opts: CompileOptions, progress: Progress | None = None) -> Quantized:
    """Load, calibrate, scale outliers, measure, allocate and quantize: the target-independent half."""
    if not opts.bpw > 0:
        raise QCompileError(f"--bpw {opts.bpw}: must be a positive number of bits per weight")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    run = _Pipeline(model_path, opts, progress)
    opts = run.opts = _resolve_calib(opts, run.proto, model_path)
    if not run.targets:
        log.warning("%s: no weight is large enough to quantize; compiling with float weights", model_path)
    seconds["load"] = time.perf_counter() - t0

    float_weights = opts.bpw >= FLOAT_BPW and not opts.overrides and opts.head_bits is None
    t0 = time.perf_counter()
    stats, stats_key = (None, None) if float_weights else run.stats()
    seconds["calibrate"] = time.perf_counter() - t0
    sensitivity = None
    if stats is not None and opts.sensitivity and not float_weights and run.targets:
        # probed on the model as loaded: the divergence per unit of relative layer error does not depend
        # on how the AWQ scaling below redistributes the weights, so one probe serves both settings
        t0 = time.perf_counter()
        sensitivity = run.sensitivity(stats, stats_key)
        seconds["sensitivity"] = time.perf_counter() - t0
    # AWQ scaling on, off, or both ("auto"): each setting is measured and allocated (cached in the work
    # dir) and the one whose allocation has the lower objective (sensitivity-weighted error) is applied
    settings = [None] if float_weights else _awq_settings(opts, stats)
    tried = []
    t0 = time.perf_counter()
    for use_awq in settings:
        if use_awq and len(settings) > 1:
            # the scaling edits the model in place: the unscaled setting keeps the model as loaded
            run.model = ir.from_proto(run.proto)
        st, key, outliers = stats, stats_key, {}
        if use_awq:
            t1 = time.perf_counter()
            st, outliers, awq_digest = run.outliers(stats, stats_key)
            key = f"{stats_key}-awq-{awq_digest}"
            seconds["outliers"] = seconds.get("outliers", 0.0) + time.perf_counter() - t1
        quantizer = make_quantizer(st, opts.gptq)
        plan, heads, candidates, objective = ({}, set(), {}, 0.0) if float_weights else \
            run.plan(quantizer, key, st, sensitivity)
        tried.append((objective, use_awq, run.model, plan, heads, candidates, quantizer, outliers, st))
    # a tie (e.g. every format fixed by --override: nothing allocated) keeps the scaling
    objective, use_awq, run.model, plan, heads, candidates, quantizer, outliers, stats = min(
        tried, key=lambda t: (t[0], not t[1]))
    if len(tried) > 1:
        log.info("AWQ scaling %s: allocation objective %.4g with it, %.4g without", "on" if use_awq else "off",
                 *[t[0] for t in sorted(tried, key=lambda t: not t[1])])
    awq_choice = {"setting": "auto" if len(settings) > 1 else ("on" if use_awq else "off"),
                  "applied": bool(use_awq),
                  "objective": {("on" if t[1] else "off"): t[0] for t in tried if t[1] is not None}}
    float_weights = float_weights or not plan
    seconds["allocate"] = time.perf_counter() - t0 - seconds.get("outliers", 0.0)

    t0 = time.perf_counter()
    qpass = QuantizePass(run.targets, plan, quantizer=quantizer, progress=run._tick("quantize", len(plan)))
    qpass(run.model)
    qproto = ir.to_proto(run.model)
    seconds["quantize"] = time.perf_counter() - t0
    measure_name = error_measure_name(stats, opts.gptq)
    if sensitivity:
        measure_name += " x whole-model sensitivity (output divergence per unit of it)"
    sens = {k: dataclasses.asdict(v) for k, v in (sensitivity or {}).items()}
    return Quantized(run.proto, qproto, run.targets, qpass.records, heads, candidates,
                     {"activation_scaling": outliers, "awq": awq_choice}, measure_name, float_weights, sens,
                     seconds, run.tokenizer(), None if opts.calib is None or float_weights else Path(opts.calib).name)


def lower_model(q: Quantized, backend, opts: CompileOptions):
    """Fuse and lower a quantized model for ``backend``: (the backend's LoweredModel, the model whose
    inputs and outputs the artifact has, the fusion counts, the KV cache or None)."""
    qproto, interface, cache = q.qproto, q.proto, None
    fusion: dict = {"enabled": opts.fuse}
    if opts.fuse and backend.decoder_fusion:
        qproto, counts = fuse_decoder(qproto)
        fusion |= counts
    if opts.fuse and backend.attention_fusion:
        attn = fuse_attention(qproto)
        qproto, cache = attn.model, attn.cache
        fusion |= {"attention": attn.attention, "kv_cache": cache is not None}
        if cache is not None:  # the model's inputs and outputs changed: the manifest shows the new ones
            interface = qproto
    return backend.lower(qproto), interface, fusion, cache


def compile_model(model_path: str | Path, out: str | Path, opts: CompileOptions,
                  progress: Progress | None = None) -> CompileResult:
    """The whole compile: :func:`quantize_model`, then lower, build and write the artifact."""
    from qcompile.targets import BackendOptions, make_backend, resolve_target  # noqa: PLC0415

    spec = resolve_target(opts.target)
    q = quantize_model(model_path, opts, progress)
    seconds = dict(q.seconds)
    t0 = time.perf_counter()
    backend = make_backend(spec, BackendOptions(int8_dot=opts.int8_dot,
                                                tuning_db=None if opts.tuning_db is None else str(opts.tuning_db)))
    lowered, interface, fusion, cache = lower_model(q, backend, opts)
    decoder_extra = {}
    if is_decoder(interface) and hasattr(backend, "add_decoder_functions"):  # e.g. CUDA: greedy, decode step
        vocab = interface.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
        lowered.mod, decoder_extra = backend.add_decoder_functions(lowered.mod, vocab, lowered.num_inputs)
    seconds["lower"] = time.perf_counter() - t0

    manifest = build_manifest(interface, spec, opts, q.records, q.targets, lowered, q.float_weights,
                              heads=q.heads, candidates=q.candidates, error_measure=q.error_measure)
    manifest["fusion"] = fusion
    manifest["kernels"] = backend.manifest_kernels(lowered)
    manifest.update(decoder_extra)
    if cache is not None:
        manifest["kv_cache"] = cache.to_manifest()
    manifest["outliers"] = q.outliers
    manifest["calibration"] = q.calibration
    manifest["sensitivity"] = q.sensitivity
    extra = {"report.html": lambda m: html_report(m, f"qcompile: {Path(model_path).name}")}
    if q.tokenizer:
        extra["tokenizer.json"] = lambda m: q.tokenizer
    t0 = time.perf_counter()
    if progress:
        progress("build", 0, 1)

    def build(path: str):
        built = backend.build(lowered.mod, path)
        if opts.tuning_db is not None:  # the manifest is written after the build
            manifest["tuning"] = {"db": str(opts.tuning_db),
                                  "tuned_functions": list(getattr(backend, "tuned_functions", None) or []),
                                  "tuned_kernels": getattr(lowered, "tuned_kernels", {})}
        return built

    path = write_artifact(out, manifest, lowered.params, build, extra=extra)
    if progress:
        progress("build", 1, 1)
    seconds["build"] = time.perf_counter() - t0
    log.info("compiled %s -> %s: %.4f bpw (target %s) in %.1f s", model_path, path,
             manifest["bpw"]["achieved"], opts.bpw, sum(seconds.values()))
    return CompileResult(path, manifest, q.records, q.qproto, seconds)
