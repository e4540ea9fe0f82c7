"""MetaSchedule tuning of the TIR that TVM legalizes and fuses (everything our default schedules cover).

A *task* is one fused PrimFunc of the lowered module after the passes that run before scheduling
(:func:`qcompile.targets.x86.build.pre_schedule_passes`: legalize, ``FuseOps``, ``FuseTIR``), exactly
what MetaSchedule's relax integration extracts. Two kinds are not tuned:

- our own kernels (quantized matmuls, decoder and attention kernels): they are hand-scheduled TIR
  marked ``tirx.is_scheduled``;
- functions with symbolic shapes (a decoder's sequence length, a dynamic batch): MetaSchedule cannot
  build random arguments for them (``ArgInfoFromPrimFunc`` needs static shapes), so they keep the default
  schedules. Static-shape models (CNNs, MLPs with a fixed batch) tune completely.

The records live in a MetaSchedule ``JSONDatabase`` in ``DIR/<target key>/`` (one folder per target,
so a database serves any model compiled for the same target; workloads are keyed by structural hash).
At compile time :func:`apply_database_pass` runs ``MetaScheduleApplyDatabase`` before the default
schedules: a tuned function keeps its tuned schedule (and is marked scheduled), the rest get defaults.

Measurements run locally (``LocalRunner``) or on devices registered with a TVM RPC tracker
(:func:`rpc_runner`). A measurement that fails (a server killed mid-trial) costs that trial only: its
record is not committed, and the task scheduler goes on with the others.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["TuneTask", "TuningResult", "KernelTiming", "db_dir_for", "open_database", "extract_tunable",
           "tune", "time_kernels", "apply_database_pass", "AppliedSchedules", "rpc_runner", "local_runner", "build_without_intrinsics",
           "tuning_target"]

log = logging.getLogger(__name__)

DEFAULT_TRIALS = 32  # measured schedules per kernel


@dataclass
class TuneTask:
    """One tunable kernel: its name (``fused_conv2d_add_relu``), how often the model calls it, its TIR."""

    name: str
    weight: int
    mod: object  # tvm.IRModule with one PrimFunc, "main"
    extracted: object  # ms.ExtractedTask


@dataclass
class KernelTiming:
    name: str
    weight: int
    default_s: float | None  # the default schedule (targets/x86/schedule.py), None if it failed to run
    tuned_s: float | None  # the best schedule in the database, None without a record

    @property
    def speedup(self) -> float | None:
        return self.default_s / self.tuned_s if self.default_s and self.tuned_s else None


@dataclass
class TuningResult:
    db_dir: Path
    tasks: list[TuneTask]
    tuned: list[str]  # tuned in this run
    reused: list[str]  # already had a record
    skipped: dict[str, str] = field(default_factory=dict)  # kernel -> why it is not tunable
    failed: list[str] = field(default_factory=list)  # tuned but no valid measurement: no record


def tuning_target(tvm_target: dict):
    """The TVM target MetaSchedule tunes for: ``tvm_target`` with ``num-cores`` (its rules need it)."""
    import tvm  # noqa: PLC0415

    t = dict(tvm_target)
    t.setdefault("num-cores", _usable_cpus())
    return tvm.target.Target(t)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def db_dir_for(root: str | Path, tvm_target: dict) -> Path:
    """The database folder of ``tvm_target`` under ``root``: ``llvm-znver5-<hash of the target JSON>``."""
    canon = json.dumps(tvm_target, sort_keys=True)
    name = "-".join(str(tvm_target.get(k)) for k in ("kind", "mcpu", "mtriple") if tvm_target.get(k))
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
    return Path(root) / f"{safe}-{hashlib.sha256(canon.encode()).hexdigest()[:8]}"


def open_database(root: str | Path, tvm_target: dict):
    """The ``JSONDatabase`` of ``tvm_target`` under ``root`` (created empty if missing)."""
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    path = db_dir_for(root, tvm_target)
    path.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(path), module_equality="structural")


def has_record(db, mod) -> bool:
    """Whether ``db`` holds a valid measured schedule for ``mod`` (without committing a new workload)."""
    if not db.has_workload(mod):
        return False
    return bool(db.get_top_k(db.commit_workload(mod), 1))


def extract_tunable(mod, tvm_target: dict, prepare) -> tuple[list[TuneTask], dict[str, str]]:
    """The tunable kernels of a lowered Relax module, and the others with the reason they are skipped.

    ``prepare(mod, target)`` runs the target's passes up to scheduling (legalize + fuse).
    """
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    import tvm  # noqa: PLC0415

    target = tuning_target(tvm_target)
    prepared = prepare(mod, tvm.target.Target(tvm_target))  # as the build does: the same workloads
    tasks, skipped = [], {}
    for t in ms.relax_integration.extract_tasks(prepared, target):
        func = t.dispatched[0]["main"]
        if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
            skipped[t.task_name] = "hand-scheduled kernel"
            continue
        try:
            ms.arg_info.ArgInfo.from_prim_func(func)
        except TypeError:  # "Cannot convert from type Array[ir.Var] to Array<ir.IntImm>"
            skipped[t.task_name] = "symbolic shape"
            continue
        except ValueError:  # "Unsupported argument type: past_seq": a shape variable passed as a scalar
            skipped[t.task_name] = "symbolic shape (scalar argument)"
            continue
        tasks.append(TuneTask(t.task_name, int(t.weight), t.dispatched[0], t))
    for name, why in skipped.items():
        log.debug("not tuned: %s (%s)", name, why)
    return tasks, skipped


def _quiet_metaschedule() -> None:
    """MetaSchedule prints its task tables to stdout at INFO; they go to its log files (``DIR/<target>/logs``)
    and the console gets warnings only, unless qcompile logs at DEBUG."""
    level = logging.INFO if log.isEnabledFor(logging.DEBUG) else logging.WARNING
    logging.getLogger("tvm.s_tir.meta_schedule").setLevel(level)


def _register_cpu_intrinsics_only() -> None:
    """Register the x86 and ARM tensor intrinsics without the rest of ``tvm.s_tir.tensor_intrin``.

    ``TuneContext()`` imports ``tvm.s_tir.tensor_intrin``, whose ``__init__`` parses every intrinsic of every
    backend (CUDA, ROCm, Hexagon, RISC-V...) as TVMScript: 27 s on an idle core, 218 s measured on this
    loaded 2-core machine. The CPU schedule rules only need the x86 (VNNI, AVX-512) and ARM (sdot, i8mm)
    ones, 0.7 s. The package is entered in ``sys.modules`` as a namespace holding just those submodules,
    so TuneContext's import finds it loaded; a later real import of a GPU submodule still works.
    """
    import importlib  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import types  # noqa: PLC0415

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    import tvm.s_tir  # noqa: PLC0415

    pkg = types.ModuleType(name, "CPU tensor intrinsics only (qcompile.targets.tuning)")
    pkg.__path__ = [str(Path(tvm.s_tir.__file__).parent / "tensor_intrin")]
    sys.modules[name] = pkg
    try:
        for sub in ("x86", "arm_cpu"):
            importlib.import_module(f"{name}.{sub}")
    except BaseException:
        del sys.modules[name]
        raise


def build_without_intrinsics(mod, target, _params):
    """MetaSchedule's default build without ``import tvm.s_tir.tensor_intrin`` (27 s in every builder
    worker, which then times out: DESIGN.md §4)."""
    from tvm.driver import build as tvm_build  # noqa: PLC0415
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock  # noqa: PLC0415

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def _search(trials: int):
    """Evolutionary search sized for a few dozen trials a kernel: MetaSchedule's defaults (population 512,
    50 unmeasured samples to start) spend 10-50 s of search per round on a 2-core machine."""
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    return ms.search_strategy.EvolutionarySearch(population_size=max(64, 4 * trials),
                                                 init_min_unmeasured=min(50, max(8, trials)),
                                                 genetic_num_iters=2)


def _builder():
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    return ms.builder.LocalBuilder(f_build=build_without_intrinsics, max_workers=_usable_cpus(), timeout_sec=60)


def _evaluator(number: int = 3, repeat: int = 3):
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    return ms.runner.EvaluatorConfig(number=number, repeat=repeat, min_repeat_ms=20, enable_cpu_cache_flush=False)


def local_runner():
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    return ms.runner.LocalRunner(evaluator_config=_evaluator(), timeout_sec=60)


def tracker_servers(tracker: str, key: str) -> int:
    """How many servers are registered with the tracker ``HOST:PORT`` under ``key`` (free or busy)."""
    from tvm import rpc  # noqa: PLC0415

    host, port = _host_port(tracker)
    summary = rpc.connect_tracker(host, port).summary()
    return sum(1 for s in summary["server_info"] if s.get("key") == f"server:{key}")


def _host_port(tracker: str) -> tuple[str, int]:
    from qcompile.runtime.errors import QCompileError  # noqa: PLC0415

    host, _, port = tracker.rpartition(":")
    if not host or not port.isdigit():
        raise QCompileError(f"--tracker {tracker!r}: expected HOST:PORT (e.g. 127.0.0.1:9190)")
    return host, int(port)


def rpc_runner(tracker: str, key: str, parallel: int | None = None, session_timeout_s: int = 60):
    """An ``RPCRunner`` measuring on the servers registered with ``tracker`` under ``key``.

    One worker per server (``parallel`` defaults to the servers registered now): each measurement asks the
    tracker for a session, and the tracker hands each request the next free server, so concurrent trials
    spread over the servers. A failed session (a server killed mid-trial) is an error result for that
    trial only.
    """
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    from qcompile.runtime.errors import QCompileError  # noqa: PLC0415

    host, port = _host_port(tracker)
    if parallel is None:
        try:
            parallel = tracker_servers(tracker, key)
        except (OSError, RuntimeError) as e:
            raise QCompileError(f"--tracker {tracker}: cannot reach the RPC tracker ({e})") from e
        if parallel == 0:
            raise QCompileError(f"--tracker {tracker} --key {key}: no RPC server is registered under that key "
                                f"(start one with: python -m tvm.exec.rpc_server --tracker {tracker} --key {key})")
    config = ms.runner.RPCConfig(tracker_host=host, tracker_port=port, tracker_key=key,
                                 session_priority=1, session_timeout_sec=session_timeout_s)
    log.info("RPC runner: tracker %s, key %s, %d parallel sessions", tracker, key, parallel)
    return ms.runner.RPCRunner(rpc_config=config, evaluator_config=_evaluator(), max_workers=parallel)


def tune(mod, tvm_target: dict, db_root: str | Path, prepare, trials: int = DEFAULT_TRIALS, runner=None,
         seed: int = 0) -> TuningResult:
    """Tune the kernels of ``mod`` that have no record in the database yet, ``trials`` schedules each.

    Already-tuned kernels (same target, structurally equal TIR) are not measured again.
    """
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    db = open_database(db_root, tvm_target)
    tasks, skipped = extract_tunable(mod, tvm_target, prepare)
    reused = [t.name for t in tasks if has_record(db, t.mod)]
    todo = [t for t in tasks if t.name not in reused]
    log.info("tuning %d kernels (%d already in %s, %d not tunable), %d trials each", len(todo), len(reused),
             db_dir_for(db_root, tvm_target), len(skipped), trials)
    if todo:
        _quiet_metaschedule()
        _register_cpu_intrinsics_only()
        work = db_dir_for(db_root, tvm_target) / "logs"
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            [t.extracted for t in todo], work_dir=str(work), seed=seed, num_threads=_usable_cpus(),
            strategy=_search(trials))
        ms.tune.tune_tasks(tasks=contexts, task_weights=weights, work_dir=str(work),
                           max_trials_global=trials * len(todo), max_trials_per_task=trials,
                           num_trials_per_iter=min(trials, 16), builder=_builder(),
                           runner=runner or local_runner(), database=db, cost_model="xgb")
    failed = [t.name for t in todo if not has_record(db, t.mod)]
    for name in failed:
        log.warning("%s: no valid measurement in %d trials; it keeps the default schedule", name, trials)
    return TuningResult(db_dir_for(db_root, tvm_target), tasks, [t.name for t in todo if t.name not in failed],
                        reused, skipped, failed)


def time_kernels(tasks: list[TuneTask], tvm_target: dict, db_root: str | Path, default_schedule_of,
                 runner=None, enter_defaults=()) -> list[KernelTiming]:
    """Each task measured in one round with its default schedule and with its best tuned one (same runner).

    ``default_schedule_of(func, target)`` gives the default schedule (a traced ``s_tir.Schedule``) or None.
    The default schedules of the tasks named in ``enter_defaults`` (those just tuned) also go into the
    database as records with their measured time: where a short search found nothing faster than the
    default, the compile then keeps the default.
    """
    import tvm  # noqa: PLC0415
    from tvm.s_tir import meta_schedule as ms  # noqa: PLC0415

    if not tasks:
        return []
    target = tuning_target(tvm_target)
    db = open_database(db_root, tvm_target)
    builds, slots, traces = [], [], {}
    for i, t in enumerate(tasks):
        with target:
            sch = default_schedule_of(t.mod["main"], target)
        default = t.mod if sch is None else sch.mod
        traces[i] = None if sch is None else sch.trace
        builds.append(ms.builder.BuilderInput(tvm.IRModule({"main": default["main"]}), target))
        slots.append((i, "default"))
        if has_record(db, t.mod):
            best = db.query_schedule(t.mod, target, "main")
            if best is not None:
                builds.append(ms.builder.BuilderInput(best.mod, target))
                slots.append((i, "tuned"))
    results = _builder().build(builds)
    runner = runner or local_runner()
    inputs, where = [], []
    for b, r, slot in zip(builds, results, slots):
        if r.error_msg:
            log.warning("%s (%s schedule) did not build: %s", tasks[slot[0]].name, slot[1], r.error_msg[:300])
            continue
        args = ms.arg_info.ArgInfo.from_prim_func(b.mod["main"])
        inputs.append(ms.runner.RunnerInput(r.artifact_path, "cpu", args))
        where.append(slot)
    times: dict[tuple[int, str], float] = {}
    for slot, fut in zip(where, runner.run(inputs)):
        res = fut.result()
        if res.error_msg:
            log.warning("%s (%s schedule) did not run: %s", tasks[slot[0]].name, slot[1], res.error_msg[:300])
        else:
            times[slot] = float(sum(float(s) for s in res.run_secs) / len(res.run_secs))
    for r in results:
        if r.artifact_path:
            _remove_tree(Path(r.artifact_path).parent)
    timings = []
    for i, t in enumerate(tasks):
        default_s, tuned_s = times.get((i, "default")), times.get((i, "tuned"))
        if t.name in enter_defaults and default_s is not None and traces[i] is not None:
            best = db.get_top_k(db.commit_workload(t.mod), 1)
            # the records' times come from the search's rounds, under that moment's load: the default enters
            # at its time relative to the best schedule measured beside it in this round
            secs = default_s * _mean(best[0].run_secs) / tuned_s if best and tuned_s else default_s
            db.commit_tuning_record(ms.database.TuningRecord(
                traces[i], db.commit_workload(t.mod), [secs], target,
                ms.arg_info.ArgInfo.from_prim_func(t.mod["main"])))
            if tuned_s is None or default_s < tuned_s:
                log.info("%s: the default schedule is faster than the search's best: kept", t.name)
                tuned_s = default_s  # what a compile with the database now uses
        timings.append(KernelTiming(t.name, t.weight, default_s, tuned_s))
    return timings


def _mean(run_secs) -> float:
    return float(sum(float(s) for s in run_secs) / len(run_secs))


def _remove_tree(path: Path) -> None:
    import shutil  # noqa: PLC0415

    shutil.rmtree(path, ignore_errors=True)


class AppliedSchedules:
    """How many functions the last :func:`apply_database_pass` gave a tuned schedule."""

    def __init__(self):
        self.names: list[str] = []


def apply_database_pass(db_root: str | Path, tvm_target: dict, applied: AppliedSchedules | None = None):
    """``MetaScheduleApplyDatabase`` with the target's database: tuned functions get their best schedule
    (and ``tirx.is_scheduled``, so the default schedules skip them). Names of those go to ``applied``."""
    import tvm  # noqa: PLC0415
    from tvm import relax, tirx  # noqa: PLC0415

    from qcompile.runtime.errors import QCompileError  # noqa: PLC0415

    path = db_dir_for(db_root, tvm_target)
    if not Path(db_root).is_dir():
        raise QCompileError(f"--db {db_root}: no such directory (create it with `qcompile tune MODEL --db {db_root}`)")
    if not path.is_dir():
        log.warning("--db %s: no records for target %s (expected %s); default schedules only", db_root,
                    tvm_target, path.name)

    @tvm.transform.module_pass(opt_level=0, name="ApplyTuningDatabase")
    def _pass(mod, _ctx):
        if not path.is_dir():
            return mod
        db = open_database(db_root, tvm_target)

        def scheduled(m):
            return {gv.name_hint for gv, f in m.functions.items() if isinstance(f, tirx.PrimFunc)
                    and f.attrs is not None and f.attrs.get("tirx.is_scheduled", False)}

        before = scheduled(mod)
        with db:
            mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        names = sorted(scheduled(mod) - before)
        log.info("tuning database %s: %d functions with a tuned schedule %s", path, len(names), names)
        if applied is not None:
            applied.names = names
        return mod

    return _pass
