"""Run jobs inside the emulated arm64 Python (``qemu-aarch64-static``, :mod:`qcompile.targets.arm.rootfs`).

Needs only the TVM runtime, numpy and ``qcompile.runtime`` (staged on PYTHONPATH): never the compiler.
Usage: ``python3 arm_runner.py jobs.json``; jobs.json is a list of jobs, each one of

    {"kind": "artifact", "path": "m.qcm", "feeds": "in.npz", "out": "out.npz"}
        load the artifact with qcompile.runtime and run it on the feeds; outputs by name
    {"kind": "library", "path": "k.so", "args": "args.npz", "outputs": [[[shape], "dtype"], ...], "out": "out.npz"}
        call the library's ``main`` on args arg0, arg1, ... followed by fresh output tensors

and writes each job's outputs to its ``out`` npz, and ``{"seconds": [...], "machine": ...}`` (load + run
of each job) to ``jobs.json``'s name with ``.result.json``.
"""

import json
import logging
import os
import platform
import sys
import time

import numpy as np

log = logging.getLogger("arm_runner")


def _artifact(job):
    from qcompile.runtime import load

    sess = load(job["path"])
    feeds = dict(np.load(job["feeds"]))
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run(names, feeds)
    np.savez(job["out"], **{n: np.asarray(o) for n, o in zip(names, outs)})


def _library(job):
    os.environ["TVM_USE_RUNTIME_LIB"] = "1"
    import tvm

    dev = tvm.cpu(0)
    fn = tvm.runtime.load_module(job["path"])["main"]
    args = np.load(job["args"])
    ins = [tvm.runtime.tensor(np.ascontiguousarray(args[f"arg{i}"]), dev) for i in range(len(args.files))]
    outs = [tvm.runtime.empty(tuple(shape), dtype, dev) for shape, dtype in job["outputs"]]
    fn(*ins, *outs)
    np.savez(job["out"], *[o.numpy() for o in outs])


def main(path):
    with open(path) as f:
        jobs = json.load(f)
    seconds = []
    for job in jobs:
        t0 = time.perf_counter()
        {"artifact": _artifact, "library": _library}[job["kind"]](job)
        seconds.append(time.perf_counter() - t0)
        log.info("%s %s: %.2f s", job["kind"], job["path"], seconds[-1])
    with open(os.path.splitext(path)[0] + ".result.json", "w") as f:
        json.dump({"seconds": seconds, "machine": platform.machine()}, f)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    main(sys.argv[1])
