"""The ``qcompile`` command line.

    qcompile MODEL.onnx --target x86 --bpw 4.25 -o OUT.qcm     (also: qcompile compile ...)
    qcompile info OUT.qcm [--json]
    qcompile run OUT.qcm --input NAME=FILE.npy ... [-o DIR]
    qcompile report OUT.qcm [--html FILE]
    qcompile tune MODEL.onnx --target x86 [--trials N] [--db DIR] [--tracker HOST:PORT --key KEY]

Exit status: 0 success, 2 bad input (model, flag, artifact) with a one-paragraph message, 1 internal error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from qcompile.runtime.errors import QCompileError

__all__ = ["main"]

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE = 0, 1, 2
SUBCOMMANDS = ("compile", "info", "run", "report", "tune")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's default exits 2 with usage; keep that, one paragraph
        self.print_usage(sys.stderr)
        print(f"qcompile: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _bpw(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--bpw expects a number of bits per weight, found {text!r}") from None
    if not 1.0 < value <= 64:
        raise argparse.ArgumentTypeError(f"--bpw {text}: expected a value in (1, 64]")
    return value


def _override(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--override expects REGEX=BITS or REGEX=FORMAT, found {text!r}")
    rx, spec = text.rsplit("=", 1)
    return rx, spec


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qcompile", description="Compile a float ONNX model into a quantized module.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log INFO (-v) or DEBUG (-vv)")
    common = argparse.ArgumentParser(add_help=False)  # -v after the subcommand too
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS, help="log INFO (-v) or DEBUG (-vv)")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    c = sub.add_parser("compile", parents=[common], help="compile an ONNX model (the default command)")
    c.add_argument("model", help="float ONNX model")
    c.add_argument("-o", "--output", required=True, help="artifact directory to write (.qcm)")
    c.add_argument("--target", default="x86",
                   help="x86 (the host CPU), arm[:cpu], cuda[:sm_XX], vulkan, or a TVM target JSON")
    c.add_argument("--bpw", type=_bpw, default=4.25,
                   help="average bits per weight over the quantized weights, all storage counted; "
                        ">= 16 keeps float weights")
    c.add_argument("--float", action="store_true", help="keep float weights (same as --bpw 16)")
    c.add_argument("--min-weights", type=int, default=None,
                   help="smallest weight (elements) to quantize (default 16384)")
    c.add_argument("--override", type=_override, action="append", default=[], metavar="REGEX=BITS",
                   help="force a format for weights whose name matches (repeatable)")
    c.add_argument("--keep-float", action="append", default=[], metavar="REGEX",
                   help="weights whose name matches stay float (repeatable)")
    c.add_argument("--head-bits", type=int, default=None, metavar="BITS",
                   help="quantize the output projection at this width, outside the --bpw average")
    c.add_argument("--calib", default="auto", metavar="FILE",
                   help="calibration data: text (.txt, with a tokenizer), .npy/.npz arrays, 'random', 'self' "
                        "(a decoder LLM's own sampled text) or 'none'; enables GPTQ and the measured (H-weighted) "
                        "allocation. Default auto: 'self' for a decoder LLM, else none")
    c.add_argument("--tokenizer", default=None, help="tokenizer.json for --calib text (default: beside the model)")
    c.add_argument("--calib-samples", type=int, default=32, help="calibration samples (default 32)")
    c.add_argument("--seq-len", type=int, default=128, help="tokens per text calibration sample (default 128)")
    c.add_argument("--no-gptq", action="store_true", help="with --calib: round to nearest instead of GPTQ")
    c.add_argument("--awq", choices=["auto", "on", "off"], default="auto",
                   help="with --calib: activation-aware scaling folded into producers; auto (the default) "
                        "measures with and without it and keeps the allocation with the lower error")
    c.add_argument("--no-awq", action="store_true",
                   help="with --calib: no activation-aware scaling of input channels (folded into producers)")
    c.add_argument("--no-salient", action="store_true",
                   help="with --calib: no split formats (salient input channels stored at more bits)")
    c.add_argument("--no-sensitivity", action="store_true",
                   help="with --calib: allocate by layer error alone, without probing each layer's effect on "
                        "the model's output")
    c.add_argument("--sensitivity-samples", type=int, default=4,
                   help="calibration samples each sensitivity probe runs on (default 4)")
    c.add_argument("--workdir", default=None,
                   help="where calibration stats and measurements are kept and reused "
                        "(default: $QCOMPILE_CACHE or ~/.cache/qcompile, per model)")
    c.add_argument("--no-int8-dot", action="store_true",
                   help="keep quantized matmuls on float kernels (default: int8-activation dot products "
                        "where the CPU has them, e.g. AVX2)")
    c.add_argument("--no-fuse", action="store_true",
                   help="no decoder fusions (RMSNorm, rotary, gated MLP, attention): lower the graph as quantized")
    c.add_argument("--db", default=None, metavar="DIR",
                   help="tuning records from `qcompile tune --db DIR`: tuned kernels keep their tuned schedule")
    c.add_argument("--no-progress", action="store_true", help="no progress bars")
    i = sub.add_parser("info", parents=[common], help="describe an artifact")
    i.add_argument("artifact")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    r = sub.add_parser("run", parents=[common], help="run an artifact on .npy inputs")
    r.add_argument("artifact")
    r.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy")
    r.add_argument("-o", "--output-dir", default=None, help="write outputs as NAME.npy here")
    rp = sub.add_parser("report", parents=[common], help="bits and error per layer, as a table and an HTML page")
    rp.add_argument("artifact")
    rp.add_argument("--html", default=None, help="write the HTML report here (default: ARTIFACT.report.html)")
    t = sub.add_parser("tune", parents=[common],
                       help="tune the model's kernels (MetaSchedule, our quantized kernels' knobs) into a database")
    t.add_argument("model", help="float ONNX model, GGUF file or Hugging Face folder (quantized and lowered as "
                                 "`qcompile compile` would)")
    t.add_argument("--target", default="x86", help="x86 (the host CPU) or a TVM llvm target JSON")
    t.add_argument("--bpw", type=_bpw, default=4.25, help="bits per weight, as for compile (default 4.25)")
    t.add_argument("--float", action="store_true", help="keep float weights (same as --bpw 16)")
    t.add_argument("--trials", type=int, default=32,
                   help="schedules measured per kernel, and knob settings per quantized kernel (default 32)")
    t.add_argument("--prefill-rows", type=int, default=None, metavar="M",
                   help="rows of a prompt for quantized kernels with a symbolic M (decoders, measured at M=1 and "
                        "M), and a decoder's timed prompt length (default 64)")
    t.add_argument("--db", default=str(_default_db()), metavar="DIR",
                   help="tuning database (default: $QCOMPILE_CACHE/tuning or ~/.cache/qcompile/tuning); "
                        "kernels it already holds are not tuned again")
    t.add_argument("--tracker", default=None, metavar="HOST:PORT",
                   help="measure on the devices registered with this TVM RPC tracker (python -m tvm.exec.rpc_tracker)")
    t.add_argument("--key", default=None, help="with --tracker: the devices' key (rpc_server --key)")
    t.add_argument("--no-model-timing", action="store_true",
                   help="skip compiling and timing the whole model without and with the tuned schedules")
    t.add_argument("--no-int8-dot", action="store_true", help="as for compile")
    t.add_argument("--no-fuse", action="store_true", help="as for compile")
    t.add_argument("--workdir", default=None, help="as for compile")
    return p


def _default_db() -> Path:
    import os  # noqa: PLC0415

    return Path(os.environ.get("QCOMPILE_CACHE") or Path.home() / ".cache" / "qcompile") / "tuning"


def _cmd_tune(args, console) -> int:
    from qcompile.compiler.driver import CompileOptions  # noqa: PLC0415
    from qcompile.compiler.tune import tune_model  # noqa: PLC0415

    opts = CompileOptions(target=args.target, bpw=16.0 if args.float else args.bpw, workdir=args.workdir,
                          fuse=not args.no_fuse, int8_dot=not args.no_int8_dot)
    Path(args.db).mkdir(parents=True, exist_ok=True)
    report = tune_model(args.model, opts, args.db, args.trials, tracker=args.tracker, key=args.key,
                        time_model=not args.no_model_timing, prefill_rows=args.prefill_rows)
    res = report.result
    console.print(f"{len(res.tuned)} kernels tuned ({args.trials} trials each) in {report.seconds:.1f} s, "
                  f"{len(res.reused)} already in {res.db_dir}, {len(res.failed)} without a valid measurement; "
                  f"{len(res.skipped)} not tunable", highlight=False)
    for name, why in sorted(res.skipped.items()):
        console.print(f"  not tuned: {name} ({why})", highlight=False)
    from rich.table import Table  # noqa: PLC0415

    table = Table("kernel", "calls", "default ms", "tuned ms", "speedup")
    for k in report.kernels:
        table.add_row(k.name, str(k.weight), _ms(k.default_s), _ms(k.tuned_s),
                      f"{k.speedup:.2f}x" if k.speedup else "-")
    console.print(table)
    if report.quant_kernels:
        fresh = [k for k in report.quant_kernels if not k.reused]
        console.print(f"quantized kernels: {len(fresh)} measured (up to {args.trials} settings each) in "
                      f"{report.kernel_seconds:.1f} s, {len(report.quant_kernels) - len(fresh)} from earlier records",
                      highlight=False)
        qt = Table("quantized kernel", "calls", "M", "default us", "tuned us", "speedup", "config")
        for k in report.quant_kernels:
            for m in k.rows:
                sp = k.speedup(m)
                qt.add_row(k.name, str(k.calls), str(m), _us(k.default_s.get(m)), _us(k.tuned_s.get(m)),
                           f"{sp:.2f}x" if sp else "-", ",".join(f"{a}={b}" for a, b in k.config.items()))
        console.print(qt)
    if report.model_speedup and report.decoder:
        d, t = report.model_default_ms, report.model_tuned_ms
        console.print(f"whole model, decode step: {d:.3f} ms ({1e3 / d:.1f} tok/s) default, {t:.3f} ms "
                      f"({1e3 / t:.1f} tok/s) tuned ({report.model_speedup:.2f}x); prefill of {report.prefill_rows} "
                      f"tokens: {report.prefill_default_ms:.2f} ms default, {report.prefill_tuned_ms:.2f} ms tuned; "
                      f"compile with --db {args.db} to use the records", highlight=False)
    elif report.model_speedup:
        console.print(f"whole model: {report.model_default_ms:.3f} ms default, {report.model_tuned_ms:.3f} ms tuned "
                      f"({report.model_speedup:.2f}x); compile with --db {args.db} to use the records",
                      highlight=False)
    return EXIT_OK


def _us(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e6:.1f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.4f}"


def _cmd_compile(args, console) -> int:
    from qcompile.compiler.driver import CompileOptions, compile_model  # noqa: PLC0415

    opts = CompileOptions(target=args.target, bpw=16.0 if args.float else args.bpw,
                          overrides=list(args.override), keep_float=list(args.keep_float),
                          head_bits=args.head_bits, calib=args.calib,
                          tokenizer=args.tokenizer, calib_samples=args.calib_samples,
                          calib_seq_len=args.seq_len, gptq=not args.no_gptq, awq="off" if args.no_awq else args.awq,
                          salient=not args.no_salient, sensitivity=not args.no_sensitivity, sensitivity_samples=args.sensitivity_samples,
                          workdir=args.workdir, fuse=not args.no_fuse,
                          int8_dot=not args.no_int8_dot, tuning_db=args.db)
    if args.min_weights is not None:
        opts.min_weights = args.min_weights
    out = Path(args.output)
    if args.no_progress or not console.is_terminal:
        result = compile_model(args.model, out, opts)
    else:
        from rich.progress import BarColumn, Progress, TimeElapsedColumn  # noqa: PLC0415

        with Progress("[progress.description]{task.description}", BarColumn(), "{task.completed}/{task.total}",
                      TimeElapsedColumn(), console=console, transient=True) as bar:
            tasks: dict[str, int] = {}

            def progress(step: str, done: int, total: int) -> None:
                if step not in tasks:
                    tasks[step] = bar.add_task(step, total=total)
                bar.update(tasks[step], completed=done)

            result = compile_model(args.model, out, opts, progress=progress)
    from qcompile.compiler.report import summary_lines, tensor_table  # noqa: PLC0415

    for line in summary_lines(result.manifest):
        console.print(line, highlight=False)
    if result.manifest["tensors"]:
        console.print(tensor_table(result.manifest))
    console.print(f"wrote {result.path} in {sum(result.seconds.values()):.1f} s "
                  f"(report: {result.path / 'report.html'})", highlight=False)
    return EXIT_OK


def _cmd_report(args, console) -> int:
    from qcompile.compiler.report import summary_lines, tensor_table  # noqa: PLC0415
    from qcompile.compiler.report_html import html_report  # noqa: PLC0415
    from qcompile.runtime.manifest import read_manifest  # noqa: PLC0415

    manifest = read_manifest(args.artifact)
    for line in summary_lines(manifest):
        console.print(line, highlight=False)
    console.print(tensor_table(manifest))
    out = Path(args.html) if args.html else Path(str(Path(args.artifact)).rstrip("/") + ".report.html")
    out.write_text(html_report(manifest, f"qcompile: {Path(args.artifact).name}"))
    console.print(f"HTML report: {out}", highlight=False)
    return EXIT_OK


def _cmd_info(args, console) -> int:
    from qcompile.compiler.report import summary_lines, tensor_table  # noqa: PLC0415
    from qcompile.runtime.manifest import read_manifest  # noqa: PLC0415

    manifest = read_manifest(args.artifact)
    if args.json:
        print(json.dumps(manifest, indent=1))
        return EXIT_OK
    for line in summary_lines(manifest):
        console.print(line, highlight=False)
    console.print(tensor_table(manifest))
    return EXIT_OK


def _cmd_run(args, console) -> int:
    import numpy as np  # noqa: PLC0415

    import qcompile.runtime as rt  # noqa: PLC0415

    session = rt.load(args.artifact)  # checks the artifact before anything else
    feeds = {}
    for item in args.input:
        if "=" not in item:
            raise QCompileError(f"--input expects NAME=FILE.npy, found {item!r}")
        name, fname = item.split("=", 1)
        try:
            feeds[name] = np.load(fname, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise QCompileError(f"--input {name}: cannot read {fname!r} as a .npy array ({e})") from e
    outputs = session.run(None, feeds)
    out_dir = Path(args.output_dir) if args.output_dir else None
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
    for spec, value in zip(session.outputs, outputs):
        console.print(f"{spec.name}: {value.dtype} {list(value.shape)}", highlight=False)
        if out_dir:
            safe = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in spec.name)
            np.save(out_dir / f"{safe}.npy", value)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `qcompile MODEL.onnx ...` is `qcompile compile MODEL.onnx ...`
    first = next((a for a in argv if not a.startswith("-")), None)
    if first is not None and first not in SUBCOMMANDS:
        argv.insert(argv.index(first), "compile")
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # -v is about qcompile's own steps, not the chatter of the libraries it drives
    logging.getLogger("qcompile").setLevel([logging.WARNING, logging.INFO, logging.DEBUG][min(args.verbose, 2)])
    from rich.console import Console  # noqa: PLC0415

    console = Console()
    handler = {"compile": _cmd_compile, "info": _cmd_info, "run": _cmd_run, "report": _cmd_report,
               "tune": _cmd_tune}[args.command]
    try:
        return handler(args, console)
    except QCompileError as e:
        print(f"qcompile: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("qcompile: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the CLI's last line of defence
        logging.getLogger("qcompile").debug("internal error", exc_info=True)
        print(f"qcompile: internal error: {type(e).__name__}: {e} (run with -vv for the traceback; "
              "please report it)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
