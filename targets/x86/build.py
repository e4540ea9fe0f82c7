"""Build a lowered Relax module for the CPU and export ``module.so``."""

from __future__ import annotations

import logging

__all__ = ["build_library", "relax_pipeline", "pre_schedule_passes"]

log = logging.getLogger(__name__)


def pre_schedule_passes(target) -> list:
    """The passes before scheduling (legalize, fuse): MetaSchedule's tasks are the PrimFuncs they leave."""
    from tvm import relax  # noqa: PLC0415
    from tvm.relax.backend.cpu_generic import pipeline as cpu  # noqa: PLC0415

    return ([relax.transform.DecomposeOpsForInference()]
            + cpu.library_dispatch_passes(target)
            + _with_scalar_producers_unfused(cpu.legalize_passes(target)))


def relax_pipeline(target, tuned=()):
    """TVM's CPU pipeline with schedules for the legalized ops between legalization and lowering.

    ``tuned``: passes that give functions a tuned schedule first (:func:`qcompile.targets.tuning.apply_database_pass`).
    """
    import tvm  # noqa: PLC0415
    from tvm.relax.backend.cpu_generic import pipeline as cpu  # noqa: PLC0415

    from .schedule import default_schedule_pass  # noqa: PLC0415

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                pre_schedule_passes(target)
                + list(tuned)
                + [default_schedule_pass()]
                + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


def _with_scalar_producers_unfused(passes: list) -> list:
    """``passes`` with :func:`scalar_producers_opaque` right after ``AnnotateTIROpPattern``."""
    at = next(i for i, p in enumerate(passes) if p.info.name == "AnnotateTIROpPattern") + 1
    return [*passes[:at], scalar_producers_opaque(), *passes[at:]]


def scalar_producers_opaque():
    """Mark kernels that build a tensor from scalar arguments only (``shape_to_tensor(batch, n)``, a
    symbolic ``arange``) as opaque, so that ``FuseOps`` leaves them alone.

    Fused with kernels whose buffers define the same shape variables, they make ``FuseTIR`` define a
    variable twice ("Check failed: VarRemapGet(source) == nullptr" in RenewDefs, TVM 0.27): GatherND's
    negative-index normalization over a symbolic-shape tensor does this (torch.onnx dynamo exports of
    transformers decoders). They are tiny; an unfused launch costs nothing measurable.
    """
    import tvm  # noqa: PLC0415
    from tvm import tirx  # noqa: PLC0415

    @tvm.transform.module_pass(opt_level=0, name="ScalarProducersOpaque")
    def _pass(mod, _ctx):
        for gv, func in list(mod.functions.items()):
            if not isinstance(func, tirx.PrimFunc):
                continue
            scalars = [v for v in func.params if isinstance(v.ty, tvm.ir.PrimType)]
            if scalars and len(func.params) - len(scalars) == 1:  # only the output is a buffer
                mod[gv] = func.with_attr("op_pattern", 8)  # kOpaque
        return mod

    return _pass


def build_library(mod, tvm_target: dict, out_path: str, tuning_db=None) -> list[str] | None:
    """Build and export ``module.so``; with ``tuning_db`` (a ``qcompile tune --db`` folder), the names of
    the functions that got a tuned schedule from it."""
    import tvm  # noqa: PLC0415

    target = tvm.target.Target(tvm_target)
    tuned, applied = [], None
    if tuning_db is not None:
        from ..tuning import AppliedSchedules, apply_database_pass  # noqa: PLC0415

        applied = AppliedSchedules()
        tuned = [apply_database_pass(tuning_db, tvm_target, applied)]
    with target:
        ex = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target, tuned))
    ex.export_library(out_path)
    log.info("built %s for %s", out_path, tvm_target)
    return None if applied is None else applied.names
