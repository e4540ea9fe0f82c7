"""Whole models compiled with ``--target arm:...``, run under qemu, against the x86 build of the same model.

The MLP and the convnet of :mod:`tests.helpers` and a tiny fused Qwen2 decoder (prefill, then a decode
step on the in-place KV cache), at 4.25 bpw: ``arm:cortex-a76`` (sdot kernels) against x86 with its int8
kernels (the same integer sums on the same weight bytes), ``arm:cortex-a72`` (no dotprod: float kernels)
against x86's float kernels.  All ARM artifacts run in one emulated Python process.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import qcompile.runtime as rt
from qcompile.compiler.driver import CompileOptions, compile_model
from qcompile.runtime.errors import ArtifactError
from qcompile.runtime.manifest import read_manifest
from tests.arm_helpers import arm_python, run_on_arm  # noqa: F401  (fixture)
from tests.helpers import convnet_model, mlp_model, save

pytestmark = pytest.mark.arm

log = logging.getLogger(__name__)

MODELS = {
    "mlp": (mlp_model, lambda rng, b: {"x": rng.standard_normal((b, 256)).astype(np.float32)}, (1, 3)),
    "convnet": (convnet_model, lambda rng, b: {"x": rng.standard_normal((b, 16, 20, 20)).astype(np.float32)}, (2,)),
}
# arm preset -> the x86 build it must match (int8_dot of the x86 compile), and the models built for it
PAIRS = {"cortex-a76": (True, ("mlp", "convnet")), "cortex-a72": (False, ("mlp", "convnet")),
         "neoverse-v1": (True, ("mlp",))}  # SVE and i8mm in mattr: LLVM's code changes, our sdot kernels don't


def _rel(a, b):
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _cli_compile(model, out, target):
    """The command the issue names: ``qcompile m.onnx --target arm:cortex-a76 --bpw 4.25 -o m.qcm``."""
    exe = shutil.which("qcompile") or shutil.which("qcompile", path=str(Path(sys.executable).parent))
    assert exe, "the qcompile console script is not installed (pip install -e .)"
    cmd = [exe, str(model), "--target", target, "--bpw", "4.25", "-o", str(out), "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def ran(arm_python, tmp_path_factory):  # noqa: F811
    """Compile everything, run the x86 builds here and the ARM builds under qemu in one process."""
    d = tmp_path_factory.mktemp("arm-e2e")
    arm_jobs, x86_outs, arts = {}, {}, {}
    for name, (make, feeds_of, batches) in MODELS.items():
        path = save(make(), d / f"{name}.onnx")
        x86_builds = {}
        for preset, (int8, models) in PAIRS.items():
            if name not in models:
                continue
            if int8 not in x86_builds:
                x86_builds[int8] = compile_model(path, d / f"{name}-x86-{int8}.qcm",
                                                 CompileOptions(bpw=4.25, int8_dot=int8)).path
            x86 = x86_builds[int8]
            out = d / f"{name}-{preset}.qcm"
            if name == "mlp" and preset == "cortex-a76":
                arm = _cli_compile(path, out, f"arm:{preset}")
            else:
                arm = compile_model(path, out, CompileOptions(bpw=4.25, target=f"arm:{preset}")).path
            arts[(name, preset)] = (x86, arm)
            sess = rt.load(x86)
            names = [o.name for o in sess.outputs]
            for b in batches:
                feeds = feeds_of(np.random.default_rng(b), b)
                key = f"{name}-{preset}-b{b}"
                arm_jobs[key] = (arm, feeds)
                x86_outs[key] = dict(zip(names, sess.run(names, feeds)))
    _decoder(d, arm_jobs, x86_outs, arts)
    arm_outs, seconds = run_on_arm(arm_python, d, arm_jobs)
    return arm_outs, x86_outs, seconds, arts


def _decoder(d, arm_jobs, x86_outs, arts):
    """A tiny Qwen2 (our frontend, fused, in-place KV cache) on cortex-a76: prefill 6 tokens, decode 1."""
    from qcompile.passes.fuse_attention import PAST_POSITIONS
    from tests.test_llm_frontend import TINY, tiny_hf_model

    folder = d / "qwen2"
    tiny_hf_model("qwen2").save_pretrained(folder, safe_serialization=True)
    opts = CompileOptions(bpw=4.25, min_weights=0)
    x86 = compile_model(folder, d / "qwen2-x86.qcm", opts).path
    arm = compile_model(folder, d / "qwen2-a76.qcm", CompileOptions(bpw=4.25, min_weights=0,
                                                                     target="arm:cortex-a76")).path
    arts[("qwen2", "cortex-a76")] = (x86, arm)
    sess = rt.load(x86)
    names = [o.name for o in sess.outputs]
    ids = np.random.default_rng(5).integers(0, TINY["vocab_size"], size=(2, 7))
    capacity = 16  # the in-place cache's positions (a symbolic dim, "cache_capacity")
    caches = {i.name: np.zeros([2, *[v if isinstance(v, int) else capacity for v in i.shape[1:]]], np.float32)
              for i in sess.inputs if i.name.startswith("past_key_values")}
    steps = [(0, 6), (6, 7)]
    for lo, hi in steps:
        feeds = {"input_ids": ids[:, lo:hi], **caches, PAST_POSITIONS: np.arange(lo)}
        key = f"qwen2-cortex-a76-{lo}"
        arm_jobs[key] = (arm, feeds)
        outs = dict(zip(names, sess.run(names, feeds)))
        x86_outs[key] = outs
        caches = {n.replace("present", "past_key_values"): v for n, v in outs.items() if n != names[0]}


def _compare(ran, prefix, rtol):
    arm_outs, x86_outs, _, _ = ran
    keys = [k for k in x86_outs if k.startswith(prefix)]
    assert keys
    worst = 0.0
    for key in keys:
        for name, ref in x86_outs[key].items():
            got = arm_outs[key][name]
            assert got.shape == ref.shape and got.dtype == ref.dtype, (key, name)
            assert _rel(got, ref) <= rtol, (key, name, _rel(got, ref))
            worst = max(worst, _rel(got, ref))
    log.info("%s: largest relative difference to x86 %.3g (%d runs)", prefix, worst, len(keys))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sdot_build_matches_the_x86_int8_build(ran, name):
    """Same weight bytes, same integer sums: the outputs agree to float32 rounding."""
    _compare(ran, f"{name}-cortex-a76", 1e-5)
    _, _, _, arts = ran
    x86, arm = arts[(name, "cortex-a76")]
    assert (x86 / "params.safetensors").read_bytes() == (arm / "params.safetensors").read_bytes()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_float_kernel_build_matches_the_x86_float_build(ran, name):
    _compare(ran, f"{name}-cortex-a72", 1e-5)


def test_an_sve_cpu_build_matches_the_x86_int8_build(ran):
    _compare(ran, "mlp-neoverse-v1", 1e-5)


def test_fused_decoder_with_kv_cache_matches_x86(ran):
    _compare(ran, "qwen2-cortex-a76", 1e-5)


def test_manifest_records_the_arm_target(ran):
    _, _, _, arts = ran
    a76 = read_manifest(arts[("mlp", "cortex-a76")][1])
    assert a76["target"]["arch"] == "aarch64" and a76["target"]["cpu_flags"] == ["asimd", "asimddp"]
    assert a76["kernels"]["int8_dot"] and a76["kernels"]["quantized_matmuls"] == {"int8_dot": 3}
    a72 = read_manifest(arts[("mlp", "cortex-a72")][1])
    assert not a72["kernels"]["int8_dot"] and a72["kernels"]["quantized_matmuls"] == {"float": 3}
    dec = read_manifest(arts[("qwen2", "cortex-a76")][1])
    assert dec["fusion"]["attention"] == 3 and dec["fusion"]["kv_cache"]


def test_this_x86_host_refuses_an_arm_artifact(ran):
    _, _, _, arts = ran
    with pytest.raises(ArtifactError, match="aarch64"):
        rt.load(arts[("mlp", "cortex-a76")][1])


def test_qemu_run_times_are_logged(ran):
    """Not a performance test (qemu emulates): the seconds per artifact (load + run) for the record."""
    _, _, seconds, _ = ran
    assert all(s > 0 for s in seconds.values())
    log.info("qemu seconds (load + run) per artifact: %s", {k: round(s, 2) for k, s in seconds.items()})
