"""Build a lowered Relax module for the CPU and export ``module.so``."""

from __future__ import annotations

import logging

__all__ = ["build_library", "relax_pipeline"]

log = logging.getLogger(__name__)


def relax_pipeline(target):
    """TVM's CPU pipeline with schedules for the legalized ops between legalization and lowering."""
    import tvm  # noqa: PLC0415
    from tvm import relax  # noqa: PLC0415
    from tvm.relax.backend.cpu_generic import pipeline as cpu  # noqa: PLC0415

    from .schedule import default_schedule_pass  # noqa: PLC0415

    @tvm.transform.module_pass(opt_level=0)
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                [relax.transform.DecomposeOpsForInference()]
                + cpu.library_dispatch_passes(target)
                + cpu.legalize_passes(target)
                + [default_schedule_pass()]
                + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


def build_library(mod, tvm_target: dict, out_path: str) -> None:
    import tvm  # noqa: PLC0415

    target = tvm.target.Target(tvm_target)
    with target:
        ex = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target))
    ex.export_library(out_path)
    log.info("built %s for %s", out_path, tvm_target)
