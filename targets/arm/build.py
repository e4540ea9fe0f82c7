"""Cross-compile a lowered Relax module for aarch64 and export ``module.so`` with ``aarch64-linux-gnu-g++``."""

from __future__ import annotations

import logging
import shutil

from qcompile.runtime.errors import QCompileError

__all__ = ["build_library"]

log = logging.getLogger(__name__)


def build_library(mod, tvm_target: dict, out_path: str) -> None:
    """TVM's CPU pipeline with our schedules (:func:`qcompile.targets.x86.build.relax_pipeline`), LLVM's
    AArch64 backend, and the cross linker (Debian ``g++-aarch64-linux-gnu``)."""
    import tvm  # noqa: PLC0415
    from tvm.support import cc  # noqa: PLC0415

    from ..x86.build import relax_pipeline  # noqa: PLC0415
    from . import CROSS_CXX  # noqa: PLC0415

    if shutil.which(CROSS_CXX) is None:
        raise QCompileError(f"--target arm: the cross compiler {CROSS_CXX} is not installed "
                            f"(Debian/Ubuntu: apt-get install g++-aarch64-linux-gnu)")
    target = tvm.target.Target(tvm_target)
    with target:
        ex = tvm.compile(mod, target=target, relax_pipeline=relax_pipeline(target))
    ex.export_library(out_path, fcompile=cc.cross_compiler(CROSS_CXX))
    log.info("built %s for %s", out_path, tvm_target)
