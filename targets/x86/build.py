"""Build a lowered Relax module for the CPU and export ``module.so``."""

from __future__ import annotations

import logging

__all__ = ["build_library"]

log = logging.getLogger(__name__)


def build_library(mod, tvm_target: dict, out_path: str) -> None:
    import tvm  # noqa: PLC0415
    from tvm import relax  # noqa: PLC0415

    target = tvm.target.Target(tvm_target)
    mod = relax.transform.DecomposeOpsForInference()(mod)
    with target:
        ex = tvm.compile(mod, target=target)
    ex.export_library(out_path)
    log.info("built %s for %s", out_path, tvm_target)
