"""``qcompile tune``: MetaSchedule over a model's kernels, with records that later compiles reuse.

    qcompile tune MODEL --target x86 --trials 32 --db DIR [--tracker HOST:PORT --key KEY]
    qcompile MODEL --target x86 --db DIR -o OUT.qcm        # builds with the tuned schedules

The model is quantized and lowered as ``qcompile compile`` would (same flags), the kernels TVM schedules
(the legalized, fused ops) are tuned where the database has no record yet, then each kernel is timed
with its default and its tuned schedule, and the whole model is compiled and timed both ways.
The tuning itself is :mod:`qcompile.targets.tuning`.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from qcompile.runtime.errors import QCompileError

from .driver import CompileOptions, compile_model, lower_model, quantize_model

__all__ = ["TuneReport", "tune_model", "time_artifact"]

log = logging.getLogger(__name__)


@dataclass
class TuneReport:
    result: object  # qcompile.targets.tuning.TuningResult
    kernels: list  # qcompile.targets.tuning.KernelTiming, one per tunable kernel
    model_default_ms: float | None  # the whole model compiled without / with the database (None: not timed)
    model_tuned_ms: float | None
    seconds: float  # tuning time (search, builds, measurements)

    @property
    def model_speedup(self) -> float | None:
        if self.model_default_ms and self.model_tuned_ms:
            return self.model_default_ms / self.model_tuned_ms
        return None


def tune_model(model_path: str | Path, opts: CompileOptions, db: str | Path, trials: int,
               tracker: str | None = None, key: str | None = None, time_model: bool = True,
               seed: int = 0) -> TuneReport:
    """Tune the kernels of ``model_path`` compiled with ``opts`` into the database ``db``."""
    from qcompile.targets import BackendOptions, make_backend, resolve_target  # noqa: PLC0415
    from qcompile.targets import tuning  # noqa: PLC0415

    if trials < 1:
        raise QCompileError(f"--trials {trials}: must be at least 1")
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
    seconds = time.perf_counter() - t0
    # the default schedules of the kernels tuned now enter the database as candidates
    kernels = tuning.time_kernels(result.tasks, spec.tvm, db, backend.default_schedule_of, runner=runner,
                                  enter_defaults=set(result.tuned))
    default_ms = tuned_ms = None
    if time_model and result.tasks:  # nothing tunable: both builds would be the same
        with tempfile.TemporaryDirectory(prefix="qcompile-tune-") as tmp:
            plain = compile_model(model_path, Path(tmp) / "default.qcm", replace(opts, tuning_db=None))
            tuned = compile_model(model_path, Path(tmp) / "tuned.qcm", replace(opts, tuning_db=str(db)))
            log.info("compiled with %d tuned functions", len(tuned.manifest["tuning"]["tuned_functions"]))
            try:
                default_ms, tuned_ms = time_artifacts([plain.path, tuned.path])
            except QCompileError as e:
                log.warning("whole-model timing skipped: %s", e)
    return TuneReport(result, kernels, default_ms, tuned_ms, seconds)


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
