"""Registry of the quality benchmark's methods: name -> callable(Context) -> list[Row].

``bench/quality.py --methods a,b`` runs the named entries in order (``all``: every entry). A new method
registers itself here, e.g. qcompile's rows:

    from bench.quality.methods import METHODS
    METHODS["qcompile"] = qcompile_rows          # def qcompile_rows(ctx: Context) -> list[Row]

It gets the float torch model, its HF folder and its ONNX export (``ctx.float_onnx``), the calibration
windows, and ``ctx.evaluator.evaluate(logits_fn)``; it must count bpw as ``bits`` says (block linears
only, every stored bit) and name its rows ``"<family> <setting>"`` (the family is the plot's series).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from .context import Context, Row
from .metrics import torch_logits_fn

__all__ = ["METHODS", "Method", "float_rows", "register"]

Method = Callable[[Context], list[Row]]


def float_rows(ctx: Context) -> list[Row]:
    """The float32 model itself: kld is the floor of the float16 reference cache (about 3e-7)."""
    t0 = time.perf_counter()
    metrics = ctx.evaluator.evaluate(torch_logits_fn(ctx.model))
    return [Row.of("float", 32.0, metrics, "float32 torch; kld = noise floor of the float16 reference cache",
                   time.perf_counter() - t0)]


def _rtn(ctx: Context) -> list[Row]:
    from .rtn import rtn_rows

    return rtn_rows(ctx)


def _llamacpp(ctx: Context) -> list[Row]:
    from .llamacpp import llamacpp_rows

    return llamacpp_rows(ctx)


def _ort(ctx: Context) -> list[Row]:
    from .ort import ort_rows

    return ort_rows(ctx)


METHODS: dict[str, Method] = {"float": float_rows, "rtn": _rtn, "llamacpp": _llamacpp, "ort": _ort}
"""In run order. Peers import lazily: a run of one method needs only that method's packages."""


def register(name: str, method: Method) -> Method:
    """Add (or replace) a method; returns it, so it can be used as a decorator's body."""
    METHODS[name] = method
    return method


def _qcompile(ctx: Context) -> list[Row]:
    from .ours import qcompile_rows

    return qcompile_rows(ctx)


METHODS["qcompile"] = _qcompile
