"""``qcompile tune``: a model's kernels tuned on the target device, with records that later compiles reuse.

    qcompile tune MODEL --target x86 --trials 32 --db DIR [--tracker HOST:PORT --key KEY]
    qcompile MODEL --target x86 --db DIR -o OUT.qcm        # builds with the tuned schedules and knobs

The model is quantized and lowered as ``qcompile compile`` would (same flags). Two kinds of kernels are
tuned where the database has no record yet:

- the kernels TVM schedules (the legalized, fused ops with static shapes): MetaSchedule
  (:mod:`qcompile.targets.tuning`), then each is timed with its default and its tuned schedule;
- our hand-scheduled quantized matmuls (static or symbolic M: decoders too): each knob setting measured
  at the model's row counts, M = 1 and M = ``prefill_rows`` for a symbolic M
  (:mod:`qcompile.targets.kernel_tuning`).

Then the whole model is compiled without and with the database and timed both ways: one run of a
static-shape model, or for a decoder (an artifact with a KV cache) the prefill of a ``prefill_rows``-token
prompt and the decode steps after it, through the runtime's generator.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from qcompile.runtime.errors import QCompileError

from .driver import CompileOptions, compile_model, lower_model, quantize_model

__all__ = ["TuneReport", "tune_model", "time_artifact", "time_artifacts", "time_decoders"]

log = logging.getLogger(__name__)


@dataclass
class TuneReport:
    result: object  # qcompile.targets.tuning.TuningResult
    kernels: list  # qcompile.targets.tuning.KernelTiming, one per tunable kernel
    model_default_ms: float | None  # the whole model compiled without / with the database (None: not timed):
    model_tuned_ms: float | None  # one run, or for a decoder one decode step
    seconds: float  # tuning time (search, builds, measurements)
    quant_kernels: list = field(default_factory=list)  # qcompile.targets.kernel_tuning.KernelTuning
    kernel_seconds: float = 0.0  # of which measuring the quantized kernels' knobs
    decoder: bool = False  # the model is a decoder: model_*_ms per decode step, prefill_*_ms for the prompt
    prefill_rows: int = 0
    prefill_default_ms: float | None = None
    prefill_tuned_ms: float | None = None

    @property
    def model_speedup(self) -> float | None:
        if self.model_default_ms and self.model_tuned_ms:
            return self.model_default_ms / self.model_tuned_ms
        return None


def tune_model(model_path: str | Path, opts: CompileOptions, db: str | Path, trials: int,
               tracker: str | None = None, key: str | None = None, time_model: bool = True,
               seed: int = 0, prefill_rows: int | None = None, decode_steps: int = 16) -> TuneReport:
    """Tune the kernels of ``model_path`` compiled with ``opts`` into the database ``db``.

    ``trials``: MetaSchedule schedules per TVM-scheduled kernel, and knob settings per quantized kernel.
    ``prefill_rows``: M of a prompt for kernels with a symbolic M, and a decoder's timed prompt length
    (default :data:`qcompile.targets.kernel_tuning.PREFILL_ROWS`).
    """
    from qcompile.targets import BackendOptions, make_backend, resolve_target  # noqa: PLC0415
    from qcompile.targets import kernel_tuning, tuning  # noqa: PLC0415

    prefill_rows = kernel_tuning.PREFILL_ROWS if prefill_rows is None else prefill_rows
    if trials < 1:
        raise QCompileError(f"--trials {trials}: must be at least 1")
    if prefill_rows < 1:
        raise QCompileError(f"--prefill-rows {prefill_rows}: must be at least 1")
    if (tracker is None) != (key is None):
        raise QCompileError("--tracker and --key go together (the tracker's HOST:PORT and the devices' key)")
    spec = resolve_target(opts.target)
    backend = make_backend(spec, BackendOptions(int8_dot=opts.int8_dot))
    if not getattr(backend, "tunable", False):
        raise QCompileError(f"--target {opts.target}: tuning is not supported for this target (x86 is)")
    q = quantize_model(model_path, opts)
    lowered = lower_model(q, backend, opts)[0]
    runner = tuning.rpc_runner(tracker, key) if tracker else None
    t0 = time.perf_counter()
    result = tuning.tune(lowered.mod, spec.tvm, db, backend.prepare_for_tuning, trials=trials, runner=runner,
                         seed=seed)
    # the default schedules of the kernels tuned now enter the database as candidates
    kernels = tuning.time_kernels(result.tasks, spec.tvm, db, backend.default_schedule_of, runner=runner,
                                  enter_defaults=set(result.tuned))
    t1 = time.perf_counter()
    quant = kernel_tuning.tune_kernels(lowered.quant_kernels, spec.tvm, db, trials, runner=runner,
                                       prefill_rows=prefill_rows)
    kernel_seconds = time.perf_counter() - t1
    seconds = time.perf_counter() - t0
    report = TuneReport(result, kernels, None, None, seconds, quant, kernel_seconds, prefill_rows=prefill_rows)
    changed = any(kt.config != lowered.quant_kernels[kt.name].space.default for kt in quant)
    if time_model and (result.tasks or changed):  # nothing tuned: both builds would be the same
        _time_model(report, model_path, opts, db, decode_steps)
    return report


def _time_model(report: TuneReport, model_path, opts: CompileOptions, db, decode_steps: int) -> None:
    """Compile the model without and with the database and time both (a decoder: prefill and decode)."""
    import qcompile.runtime as rt  # noqa: PLC0415
    from qcompile.runtime.generate import Generator  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="qcompile-tune-") as tmp:
        plain = compile_model(model_path, Path(tmp) / "default.qcm", replace(opts, tuning_db=None))
        tuned = compile_model(model_path, Path(tmp) / "tuned.qcm", replace(opts, tuning_db=str(db)))
        log.info("compiled with %d tuned functions and %d tuned kernels",
                 len(tuned.manifest["tuning"]["tuned_functions"]), len(tuned.manifest["tuning"]["tuned_kernels"]))
        try:
            Generator(rt.load(plain.path))
            report.decoder = True
        except QCompileError:
            report.decoder = False
        try:
            if report.decoder:
                (pd, dd), (pt, dt) = time_decoders([plain.path, tuned.path], report.prefill_rows, decode_steps)
                report.prefill_default_ms, report.prefill_tuned_ms = pd, pt
                report.model_default_ms, report.model_tuned_ms = dd, dt
            else:
                report.model_default_ms, report.model_tuned_ms = time_artifacts([plain.path, tuned.path])
        except QCompileError as e:
            log.warning("whole-model timing skipped: %s", e)


def time_decoders(paths: list[Path], prompt_tokens: int = 64, steps: int = 16,
                  rounds: int = 3) -> list[tuple[float, float]]:
    """(prefill ms, ms per decode step) of each decoder artifact: greedy generation of ``steps`` + 1 tokens
    after the same random ``prompt_tokens``-token prompt (the runtime's generator, KV cache in place), the
    artifacts in alternation round after round; medians over ``rounds``."""
    import qcompile.runtime as rt  # noqa: PLC0415

    sessions = [rt.load(p) for p in paths]
    vocab = sessions[0].get_outputs()[0].shape[-1]
    vocab = vocab if isinstance(vocab, int) else 100
    prompt = np.random.default_rng(0).integers(0, vocab, prompt_tokens).tolist()
    for s in sessions:
        s.generate(prompt, 2)  # warm-up (and the cache buffers)
    prefill: list[list[float]] = [[] for _ in sessions]
    decode: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for i, s in enumerate(sessions):
            s.generate(prompt, steps + 1)
            st = s.generator().stats
            prefill[i].append(st.prefill_seconds * 1e3)
            decode[i].append(st.decode_seconds * 1e3 / max(1, st.new_tokens - 1))
    return [(float(np.median(p)), float(np.median(d))) for p, d in zip(prefill, decode)]


def _random_feeds(session, rng: np.random.Generator) -> dict:
    feeds = {}
    for spec in session.get_inputs():
        if not all(isinstance(d, int) for d in spec.shape):
            raise QCompileError(f"input {spec.name!r} has a symbolic shape {list(spec.shape)}")
        dtype = np.dtype(spec.dtype)
        if dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(spec.shape).astype(dtype)
        else:
            feeds[spec.name] = rng.integers(0, 2, spec.shape).astype(dtype)
    return feeds


def time_artifacts(paths: list[Path], rounds: int = 5, min_seconds: float = 0.2) -> list[float]:
    """Median milliseconds per run of each artifact on the same random inputs; the artifacts are run
    in alternation, round after round, so that a load change on the machine affects them alike."""
    import qcompile.runtime as rt  # noqa: PLC0415

    sessions = [rt.load(p) for p in paths]
    feeds = _random_feeds(sessions[0], np.random.default_rng(0))
    args = [[s.device_tensor(feeds[i.name]) for i in s.get_inputs()] for s in sessions]
    for s, a in zip(sessions, args):
        s.run_device(a)  # warm-up
    samples: list[list[float]] = [[] for _ in sessions]
    for _ in range(rounds):
        for i, (s, a) in enumerate(zip(sessions, args)):
            n, t0 = 0, time.perf_counter()
            while True:
                s.run_device(a)
                n += 1
                if time.perf_counter() - t0 >= min_seconds / rounds:
                    break
            samples[i].append((time.perf_counter() - t0) / n * 1e3)
    return [float(np.median(x)) for x in samples]


def time_artifact(path: Path) -> float:
    return time_artifacts([path])[0]
