"""Tuning our hand-scheduled quantized matmul kernels: each knob setting measured on the target device.

MetaSchedule (:mod:`.tuning`) tunes what TVM schedules; our quantized matmuls are scheduled by hand and
instead declare knobs (:mod:`qcompile.targets.knobs`: the x86 int8 kernel's tiles per task and row
block, the float kernel's accumulators, row block and panel). For each distinct kernel of a model (its
function name is its key: kind, format, K, N, e.g. ``qmatmul_i8_q4g32_576_1536``) this module

1. builds every setting of :meth:`KnobSpace.settings` (at most ``trials``, the default first) with
   MetaSchedule's builder, here;
2. times each setting at the model's row counts M with MetaSchedule's runner, in :data:`ROUNDS` rounds over
   all settings (each setting's fastest round kept): locally, or on the servers registered with a TVM RPC
   tracker (the module is uploaded, the remote ``time_evaluator`` times it; a server that dies costs the
   measurements it held, not the run). A static M is measured as it is; a symbolic M (a decoder: M =
   batch x new tokens) at M = 1 (a decode step) and M = ``prefill_rows`` (a prompt; 64 by default,
   bench/decode_cpu.py's prompt length);
3. keeps the setting with the lowest mean time relative to the default over those M, if it beats the
   default by at least :data:`MIN_GAIN` (else the default: a noisy machine must not pick noise).

The records go into ``kernels.json`` in the target's database folder (:func:`.tuning.db_dir_for`: beside
MetaSchedule's JSON files), one entry per kernel name, written after each kernel (an interrupted run keeps
what it measured), and kernels already recorded are not measured again. A compile with ``--db`` builds each
recorded kernel with its config (:func:`load_schedules`); the manifest's ``tuning.tuned_kernels`` lists them.

The measured times are those of one kernel with its weights warm in the caches (no cache flush between
runs), so they rank settings; the whole model's time (``qcompile tune``'s report) is what a user sees.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .knobs import config_name
from .tuning import _builder, _remove_tree, db_dir_for, local_runner, tuning_target

__all__ = ["RECORDS_FILE", "PREFILL_ROWS", "MIN_GAIN", "KernelTuning", "records_path", "load_records",
           "load_schedules", "tune_kernels", "measure_rows"]

log = logging.getLogger(__name__)

RECORDS_FILE = "kernels.json"
PREFILL_ROWS = 64  # M of a prompt for kernels with a symbolic M (bench/decode_cpu.py's prompt length)
MIN_GAIN = 0.03  # a setting replaces the default only if its mean relative time is at least 3% lower
ROUNDS = 2  # measurement rounds over all settings (the fastest kept)
FORMAT_VERSION = 1


@dataclass
class KernelTuning:
    """One kernel's measurements: seconds per call at each M, for the default and the chosen setting."""

    name: str
    calls: int  # call sites in the model
    rows: list[int]  # the M measured
    config: dict  # the chosen setting (the default where nothing beat it)
    default_s: dict[int, float]  # M -> seconds
    tuned_s: dict[int, float]
    settings: int  # settings measured (valid measurements)
    reused: bool = False  # from an earlier run's record
    failed: list[str] = field(default_factory=list)  # settings x M without a valid measurement
    measured: dict[str, dict[int, float]] = field(default_factory=dict)  # setting (config_name) -> M -> seconds

    def speedup(self, rows: int) -> float | None:
        d, t = self.default_s.get(rows), self.tuned_s.get(rows)
        return d / t if d and t else None

    def to_record(self, kernel, target_rows: list[int]) -> dict:
        return {"config": self.config, "K": kernel.k, "N": kernel.n, "rows": target_rows,
                "default_us": {str(m): s * 1e6 for m, s in self.default_s.items()},
                "tuned_us": {str(m): s * 1e6 for m, s in self.tuned_s.items()},
                "settings_measured": self.settings,
                "measured_us": {c: {str(m): s * 1e6 for m, s in t.items()} for c, t in self.measured.items()}}


def records_path(db_root: str | Path, tvm_target: dict) -> Path:
    return db_dir_for(db_root, tvm_target) / RECORDS_FILE


def load_records(db_root: str | Path, tvm_target: dict) -> dict[str, dict]:
    """kernel name -> record (``config``, the M measured, default and tuned microseconds)."""
    path = records_path(db_root, tvm_target)
    if not path.is_file():
        return {}
    doc = json.loads(path.read_text())
    if doc.get("format") != FORMAT_VERSION:
        log.warning("%s: kernel records of format %s, expected %s: ignored", path, doc.get("format"), FORMAT_VERSION)
        return {}
    return doc.get("kernels", {})


def load_schedules(db_root: str | Path | None, tvm_target: dict) -> dict[str, dict]:
    """kernel name -> the recorded knob config, for :func:`qcompile.targets.x86.lower.lower_to_relax`."""
    if db_root is None:
        return {}
    return {name: rec["config"] for name, rec in load_records(db_root, tvm_target).items()}


def _save_record(db_root: str | Path, tvm_target: dict, name: str, record: dict) -> None:
    """Add one kernel's record to ``kernels.json`` (read, update, write to a temporary file, rename)."""
    path = records_path(db_root, tvm_target)
    path.parent.mkdir(parents=True, exist_ok=True)
    kernels = load_records(db_root, tvm_target)
    kernels[name] = record
    doc = {"format": FORMAT_VERSION, "target": tvm_target, "kernels": dict(sorted(kernels.items()))}
    fd, tmp = tempfile.mkstemp(prefix=".kernels-", suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(doc, f, indent=1)
    os.replace(tmp, path)


def measure_rows(kernel, prefill_rows: int = PREFILL_ROWS) -> list[int]:
    """The M a kernel is measured at: its static row counts, and 1 and ``prefill_rows`` for a symbolic M."""
    rows = {m for m in kernel.rows if m is not None}
    if None in kernel.rows:
        rows |= {1, prefill_rows}
    return sorted(rows)


def _arg_info(func, rows: int):
    """MetaSchedule's argument descriptions of ``func`` with its symbolic M bound to ``rows``."""
    from tvm import tirx  # noqa: PLC0415
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    args = []
    for p in func.params:
        buf = p.ty  # a tirx.BufferType: the param is the buffer
        shape = [int(d) if isinstance(d, tirx.IntImm) else rows for d in buf.shape]
        args.append(ms.arg_info.TensorInfo(str(buf.dtype), shape))
    return args


def _median(run_secs) -> float:
    return float(statistics.median(float(s) for s in run_secs))


def _choose(settings: list[dict], times: dict[tuple[int, int], float], rows: list[int]) -> int | None:
    """Index of the setting to keep (0 = the default), or None if the default has no measurement at
    some M (nothing to compare against: the kernel is tried again by a later run)."""
    if any((0, m) not in times for m in rows):
        return None
    best, best_score = 0, 1.0
    for i in range(1, len(settings)):
        if any((i, m) not in times for m in rows):
            continue  # a setting is judged on every M or not at all
        score = sum(times[i, m] / times[0, m] for m in rows) / len(rows)
        if score < best_score:
            best, best_score = i, score
    return best if best_score <= 1.0 - MIN_GAIN else 0


def _tune_one(kernel, tvm_target: dict, trials: int, runner, rows: list[int]) -> KernelTuning | None:
    import tvm  # noqa: PLC0415
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    target = tuning_target(tvm_target)
    settings = kernel.space.settings(kernel.k, kernel.n, limit=trials)
    funcs = [kernel.make(c).with_attr("global_symbol", "main") for c in settings]
    builds = _builder().build([ms.builder.BuilderInput(tvm.IRModule({"main": f}), target) for f in funcs])
    inputs, where, failed = [], [], []
    for i, (f, b) in enumerate(zip(funcs, builds)):
        if b.error_msg:
            log.warning("%s %s did not build: %s", kernel.name, config_name(settings[i]), b.error_msg[:300])
            failed += [f"{config_name(settings[i])} M={m}" for m in rows]
    built = [i for i, b in enumerate(builds) if not b.error_msg]
    for _ in range(ROUNDS):  # every setting once per round: a load change hits them alike; fastest round kept
        for i in built:
            for m in rows:
                inputs.append(ms.runner.RunnerInput(builds[i].artifact_path, "cpu", _arg_info(funcs[i], m)))
                where.append((i, m))
    times: dict[tuple[int, int], float] = {}
    for (i, m), fut in zip(where, runner.run(inputs)):
        res = fut.result()
        if res.error_msg or not res.run_secs:
            log.warning("%s %s M=%d did not run: %s", kernel.name, config_name(settings[i]), m,
                        (res.error_msg or "no time")[:300])
            failed.append(f"{config_name(settings[i])} M={m}")
        else:
            times[i, m] = min(times.get((i, m), float("inf")), _median(res.run_secs))
    for b in builds:
        if b.artifact_path:
            _remove_tree(Path(b.artifact_path).parent)
    chosen = _choose(settings, times, rows)
    if chosen is None:
        log.warning("%s: the default setting has no valid measurement; not recorded (tried again next run)",
                    kernel.name)
        return None
    per_setting: dict[str, dict[int, float]] = {}
    for (i, m), t in sorted(times.items()):
        per_setting.setdefault(config_name(settings[i]), {})[m] = t
    result = KernelTuning(kernel.name, kernel.calls, rows, settings[chosen], {m: times[0, m] for m in rows},
                          {m: times[chosen, m] for m in rows}, len(per_setting), failed=failed,
                          measured=per_setting)
    for name, t in per_setting.items():
        log.debug("%s %s: %s", kernel.name, name, ", ".join(f"M={m}: {s * 1e6:.1f} us" for m, s in t.items()))
    log.info("%s: %s of %d settings (%s)", kernel.name, config_name(settings[chosen]), len(per_setting),
             ", ".join(f"M={m}: {result.default_s[m] * 1e6:.1f} -> {result.tuned_s[m] * 1e6:.1f} us" for m in rows))
    return result


def tune_kernels(quant_kernels: dict, tvm_target: dict, db_root: str | Path, trials: int, runner=None,
                 prefill_rows: int = PREFILL_ROWS) -> list[KernelTuning]:
    """Measure the knob settings of each kernel in ``quant_kernels`` (name -> QuantKernel of a lowered
    model) that ``db_root`` has no record of for ``tvm_target``, record the best; kernels already recorded
    are reported from their records."""
    records = load_records(db_root, tvm_target)
    out = []
    todo = [k for name, k in quant_kernels.items() if name not in records]
    if todo:  # a local runner starts worker processes (seconds, more on a loaded machine): only when needed
        runner = runner or local_runner()
    log.info("kernel knobs: %d kernels to measure (%d already in %s), up to %d settings each",
             len(todo), len(quant_kernels) - len(todo), records_path(db_root, tvm_target), trials)
    for name, kernel in quant_kernels.items():
        if name in records:
            rec = records[name]
            out.append(KernelTuning(name, kernel.calls, list(rec["rows"]), rec["config"],
                                    {int(m): us * 1e-6 for m, us in rec["default_us"].items()},
                                    {int(m): us * 1e-6 for m, us in rec["tuned_us"].items()},
                                    rec.get("settings_measured", 0), reused=True,
                                    measured={c: {int(m): us * 1e-6 for m, us in t.items()}
                                              for c, t in rec.get("measured_us", {}).items()}))
            continue
        rows = measure_rows(kernel, prefill_rows)
        t0 = time.perf_counter()
        result = _tune_one(kernel, tvm_target, trials, runner, rows)
        if result is not None:
            _save_record(db_root, tvm_target, name, result.to_record(kernel, rows))
            out.append(result)
        log.debug("%s: %.1f s", name, time.perf_counter() - t0)
    return out
