"""The default job: build a small model, compile it at a fractional bpw, run it, compare with onnxruntime.

    python examples/quickstart.py [--bpw 4.25] [--workdir DIR]

The model is a small convnet + MLP head written with onnx.parser and seeded random weights (the repo
builds it, nothing is downloaded).  Prints the bpw report and the agreement with onnxruntime running the
float model.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

MODEL = """
<ir_version: 8, opset_import: ["" : 17]>
quickstart (float[batch, 32, 16, 16] image) => (float[batch, 100] logits) {
    c1 = Conv<kernel_shape = [3, 3], pads = [1, 1, 1, 1]>(image, K1, B1)
    r1 = Relu(c1)
    c2 = Conv<kernel_shape = [3, 3], strides = [2, 2], pads = [1, 1, 1, 1]>(r1, K2, B2)
    r2 = Relu(c2)
    p = GlobalAveragePool(r2)
    f = Flatten(p)
    h = Gemm<transB = 1>(f, W1, C1)
    a = Relu(h)
    logits = MatMul(a, W2)
}
"""


def build_model() -> onnx.ModelProto:
    model = onnx.parser.parse_model(MODEL)
    rng = np.random.default_rng(2026)
    shapes = {"K1": (128, 32, 3, 3), "B1": (128,), "K2": (256, 128, 3, 3), "B2": (256,),
              "W1": (512, 256), "C1": (512,), "W2": (512, 100)}
    for name, shape in shapes.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) == 4 else shape[-1] if name == "W1" else shape[0]
        a = rng.standard_normal(shape) * (np.sqrt(2.0 / fan_in) if len(shape) > 1 else 0.05)
        model.graph.initializer.append(numpy_helper.from_array(a.astype(np.float32), name))
    onnx.checker.check_model(model)
    return model


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bpw", default="4.25")
    p.add_argument("--workdir", default=None)
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="qcompile-quickstart-"))
    work.mkdir(parents=True, exist_ok=True)
    onnx_path, out = work / "quickstart.onnx", work / "quickstart.qcm"
    onnx.save(build_model(), str(onnx_path))

    cmd = [sys.executable, "-m", "qcompile.compiler.cli", str(onnx_path), "--target", "x86",
           "--bpw", args.bpw, "-o", str(out)]
    print("$ qcompile", " ".join(cmd[3:]))
    subprocess.run(cmd, check=True)

    import onnxruntime as ort

    import qcompile.runtime as rt

    x = np.random.default_rng(0).standard_normal((4, 32, 16, 16)).astype(np.float32)
    got = rt.load(out).run(None, {"image": x})[0]
    ref = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    cos = np.sum(got * ref, 1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    top1 = np.mean(got.argmax(1) == ref.argmax(1))
    print(f"agreement with onnxruntime (float model), batch of 4: relative L2 error {rel:.4f}, "
          f"min cosine {cos.min():.5f}, top-1 agreement {top1:.0%}")
    return 0 if rel < 0.25 else 1


if __name__ == "__main__":
    sys.exit(main())
