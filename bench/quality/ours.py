"""qcompile's rows of the quality benchmark: the full pipeline on the float ONNX export.

For each target bpw: calibrate on the calibration windows (onnxruntime runs the float export), AWQ
scaling, GPTQ measurement, allocation, GPTQ quantization — ``qcompile.compiler.driver.quantize_model``,
exactly what ``qcompile --calib`` runs.  The quantized IR is decoded to float (``decode_to_float``: the
numpy reference the x86 kernels are tested against) and scored in onnxruntime on the evaluation windows.
One build is also compiled for x86 and run with qcompile's runtime on a window, and its logits are
compared with the decoded reference (recorded in the row's note).

bpw is counted like every other row: all stored bits of the 210 block linears / their weights; the
export keeps the tied embedding/head in float (Gather and an Identity-routed head are not quantized).
"""

from __future__ import annotations

import logging
import re
import time

import numpy as np

from .context import Context, Row

__all__ = ["qcompile_rows", "TARGETS"]

log = logging.getLogger(__name__)

TARGETS = (2.5, 3.0, 3.5, 4.25, 5.0)
CHECK_BPW = 4.25  # the build that is also compiled and run by the runtime
SENSITIVITY_SAMPLES = 1


def _check_compiled(ctx: Context, options, ref_logits_fn) -> str:
    """Compile one build for x86 and compare its logits with the decoded reference on one window."""
    from qcompile.compiler.driver import compile_model
    import qcompile.runtime as rt

    try:
        t0 = time.perf_counter()
        art = compile_model(ctx.float_onnx, ctx.workdir / "qcompile-check.qcm", options).path
        ids = ctx.calibration[0][None].astype(np.int64)  # any window: this checks the kernels
        got = rt.load(art).run(["logits"], {"input_ids": ids})[0][0]
        ref = ref_logits_fn(ids[0])
        diff = float(np.max(np.abs(got - ref)))
        return f"x86 build run by the runtime matches the decoded reference to max |dlogit| {diff:.2e} " \
               f"(compile {time.perf_counter() - t0:.0f} s)"
    except Exception as e:  # noqa: BLE001 - the note records it; the rows stand on the reference
        log.warning("x86 build check failed: %s", e)
        return f"x86 build check failed: {type(e).__name__}: {str(e)[:200]}"


def _head_weight(path) -> str:
    """The initializer the export routes through ``keep_head_float`` (the tied head stays float)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    node = next(n for n in proto.graph.node if n.name == "keep_head_float")
    return node.input[0]


def qcompile_rows(ctx: Context) -> list[Row]:
    from qcompile.compiler.driver import CompileOptions, quantize_model
    from qcompile.passes.reference import decode_to_float

    from .ort import session_logits_fn

    head = _head_weight(ctx.float_onnx)
    calib = ctx.workdir / "qcompile-calib.npz"
    np.savez(calib, input_ids=ctx.calibration.astype(np.int64))
    work = ctx.workdir / "qcompile-work"
    rows = []
    for bpw in TARGETS:
        t0 = time.perf_counter()
        # sensitivity probes on one window (512 tokens: what the CLI's default 4 x 128 gives)
        options = CompileOptions(bpw=bpw, calib=str(calib), calib_samples=len(ctx.calibration),
                                 calib_seq_len=ctx.calibration.shape[1], workdir=work,
                                 sensitivity_samples=SENSITIVITY_SAMPLES, keep_float=[f"^{re.escape(head)}$"])
        q = quantize_model(ctx.float_onnx, options)
        weights = sum(int(np.prod(r.onnx_shape)) for r in q.records)
        if weights != ctx.linear_weight_count:
            raise RuntimeError(f"qcompile quantized {weights} weights, the block linears hold "
                               f"{ctx.linear_weight_count}: the rows would not count the same weights")
        achieved = sum(r.storage.total for r in q.records) / weights
        logits_fn = session_logits_fn(decode_to_float(q.qproto), ctx.threads)
        metrics = ctx.evaluator.evaluate(logits_fn)
        counts: dict[str, int] = {}
        for r in q.records:
            counts[r.format.name] = counts.get(r.format.name, 0) + 1
        formats = ", ".join(f"{n} x{c}" for n, c in sorted(counts.items(), key=lambda kv: -kv[1]))
        note = (f"GPTQ + AWQ + split formats + sensitivity-weighted allocation "
                f"({q.seconds.get('sensitivity', 0):.0f} s of probes, cached across bpw); formats {formats}")
        if bpw == CHECK_BPW:
            note += "; " + _check_compiled(ctx, options, logits_fn)
        rows.append(Row.of("qcompile", achieved, metrics, note, time.perf_counter() - t0))
        log.info("qcompile %.2f -> %.4f bpw: ppl %.3f kld %.4f", bpw, achieved, metrics.ppl, metrics.kld)
    return rows
