"""Schedules for the TIR that TVM legalizes from standard ops (everything but our kernels).

dlight's CPU rules cover GEMV and reductions (softmax, norms); :class:`ParallelSpatial` is the fallback
for the rest (elementwise, convolutions and matmuls left in float, layout changes): each top-level
block's leading spatial loops are fused and run in parallel, and an injective block's innermost loop is
vectorized.  Rules return ``None`` when they don't apply, like dlight's.
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx
from tvm.error import InternalError
from tvm.s_tir import dlight as dl
from tvm.s_tir.dlight.analysis import normalize_prim_func
from tvm.s_tir.dlight.base import get_extent
from tvm.target import Target

__all__ = ["ParallelSpatial", "default_rules", "default_schedule_pass"]

log = logging.getLogger(__name__)

VECTOR_LANES = 8  # float32 lanes of an AVX2 register; LLVM widens for AVX-512
MIN_PARALLEL = 64  # fewer iterations than this are not worth a thread pool launch


class ParallelSpatial(dl.ScheduleRule):
    """Parallelize the leading spatial loops of every top-level block; vectorize injective ones."""

    def apply(self, func: tirx.PrimFunc, target: Target, _tunable: bool):
        if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
            return None
        try:
            sch = s_tir.Schedule(func)
            infos = normalize_prim_func(sch)
            if not infos:
                return None
            changed = False
            for info in infos:
                changed |= self._schedule_block(sch, info)
        except (s_tir.ScheduleError, InternalError) as e:
            log.debug("ParallelSpatial: %s", e)
            return None
        return sch if changed else None

    @staticmethod
    def _schedule_block(sch, info) -> bool:
        kinds = info.dom_kind()
        lead = len(kinds) - len(kinds.lstrip("S"))
        loops = sch.get_loops(info.block_rv)
        if lead == 0 or len(loops) != len(kinds):
            return False
        if info.is_injective() and lead >= 2:
            inner = loops[lead - 1]
            extent = get_extent(sch, inner)
            if isinstance(extent, int) and extent % VECTOR_LANES == 0 and extent >= VECTOR_LANES:
                _, vec = sch.split(inner, factors=[None, VECTOR_LANES])
                sch.vectorize(vec)
                loops = sch.get_loops(info.block_rv)
            outer = loops[: lead - 1]
        else:
            outer = loops[:lead]
        if not outer:
            return False
        fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        extent = get_extent(sch, fused)
        if isinstance(extent, int) and extent < MIN_PARALLEL:
            return False
        sch.parallel(fused)
        return True


def default_rules() -> list:
    """dlight's CPU rules first, then the spatial fallback."""
    return [dl.cpu.GEMV(), dl.cpu.Reduction(), ParallelSpatial()]


def default_schedule_pass():
    """The :func:`default_rules` on every function not yet scheduled."""
    return dl.ApplyDefaultSchedule(*default_rules())
