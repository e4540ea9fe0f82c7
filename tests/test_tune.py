"""`qcompile tune`: records in a database, re-tuning only what is missing, compiles that apply the records."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from qcompile.compiler.driver import CompileOptions, compile_model, lower_model, quantize_model
from qcompile.compiler.tune import tune_model
from qcompile.targets import BackendOptions, make_backend, resolve_target
from qcompile.targets import tuning
from tests.helpers import convnet_model, mlp_model, save

TRIALS = 2  # a tiny search: these tests check the plumbing, not the speedup (bench/tuning.py measures that)
# the tests on a tuned database are `slow`: the tuning run behind them takes 1-4 minutes on 2 shared cores


def static_mlp() -> onnx.ModelProto:
    """The test MLP with batch 1 (MetaSchedule tunes static shapes only): 3 tunable kernels, fast to build."""
    return _fixed_batch(mlp_model(), 1)


def static_convnet(batch: int | None = 1) -> onnx.ModelProto:
    """The test convnet with a fixed batch, or symbolic if None."""
    return _fixed_batch(convnet_model(), batch)


def _fixed_batch(model: onnx.ModelProto, batch: int | None) -> onnx.ModelProto:
    if batch is not None:
        for value in (model.graph.input[0], model.graph.output[0]):
            dim = value.type.tensor_type.shape.dim[0]
            dim.ClearField("dim_param")
            dim.dim_value = batch
    onnx.checker.check_model(model)
    return model


def tasks_of(model_path, opts: CompileOptions):
    spec = resolve_target(opts.target)
    backend = make_backend(spec, BackendOptions())
    lowered = lower_model(quantize_model(model_path, opts), backend, opts)[0]
    return tuning.extract_tunable(lowered.mod, spec.tvm, backend.prepare_for_tuning)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """The CLI tunes the float static MLP into a fresh database."""
    d = tmp_path_factory.mktemp("tune")
    save(static_mlp(), d / "mlp.onnx")
    r = subprocess.run([sys.executable, "-m", "qcompile.compiler.cli", "tune", d / "mlp.onnx", "--float",
                        "--trials", str(TRIALS), "--db", d / "db", "--no-model-timing"],
                       capture_output=True, text=True, timeout=900, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-3000:]
    return d, r.stdout


@pytest.mark.slow
def test_tune_fills_the_database(tuned):
    d, stdout = tuned
    tasks, skipped = tasks_of(d / "mlp.onnx", CompileOptions(bpw=16))
    assert len(tasks) >= 2 and not skipped  # the matmuls with their bias/activation epilogues
    assert f"{len(tasks)} kernels tuned" in stdout
    db = tuning.open_database(d / "db", resolve_target("x86").tvm)
    assert all(tuning.has_record(db, t.mod) for t in tasks)
    for t in tasks:  # the report has a row per kernel with both timings
        assert t.name in stdout


@pytest.mark.slow
def test_second_tune_retunes_nothing(tuned):
    d, _ = tuned
    report = tune_model(d / "mlp.onnx", CompileOptions(bpw=16), d / "db", TRIALS, time_model=False)
    assert report.result.tuned == [] and report.result.failed == []
    assert len(report.result.reused) == len(report.result.tasks) >= 2
    assert all(k.tuned_s is not None and k.default_s is not None for k in report.kernels)


@pytest.mark.slow
def test_compile_with_db_applies_the_tuned_schedules(tuned):
    d, _ = tuned
    tasks, _ = tasks_of(d / "mlp.onnx", CompileOptions(bpw=16))
    plain = compile_model(d / "mlp.onnx", d / "plain.qcm", CompileOptions(bpw=16))
    fast = compile_model(d / "mlp.onnx", d / "tuned.qcm", CompileOptions(bpw=16, tuning_db=str(d / "db")))
    assert "tuning" not in plain.manifest
    manifest = json.loads((d / "tuned.qcm" / "manifest.json").read_text())
    assert sorted(manifest["tuning"]["tuned_functions"]) == sorted(t.name for t in tasks)

    import qcompile.runtime as rt

    x = np.random.default_rng(0).standard_normal((1, 256)).astype(np.float32)
    y0 = rt.load(plain.path).run(None, {"x": x})[0]
    y1 = rt.load(fast.path).run(None, {"x": x})[0]
    np.testing.assert_allclose(y1, y0, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_cli_compile_takes_db(tuned):
    d, _ = tuned
    r = subprocess.run([sys.executable, "-m", "qcompile.compiler.cli", d / "mlp.onnx", "--float", "--db", d / "db",
                        "-o", d / "cli.qcm", "--no-progress"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((d / "cli.qcm" / "manifest.json").read_text())["tuning"]["tuned_functions"]


def test_symbolic_shapes_are_not_tuned(tmp_path):
    save(static_convnet(batch=None), tmp_path / "dyn.onnx")
    tasks, skipped = tasks_of(tmp_path / "dyn.onnx", CompileOptions(bpw=16))
    # the batch is symbolic in every activation: only the weight transpose is static
    assert all(why == "symbolic shape" for why in skipped.values())
    assert any(k.startswith("fused_conv2d") for k in skipped)
    assert all(not t.name.startswith("fused_conv2d") for t in tasks)


def test_our_kernels_are_not_tuned(tmp_path):
    save(static_convnet(), tmp_path / "q.onnx")
    _, skipped = tasks_of(tmp_path / "q.onnx", CompileOptions(bpw=4.25))
    assert "hand-scheduled kernel" in skipped.values()


def test_database_is_per_target(tmp_path):
    a = tuning.db_dir_for(tmp_path, {"kind": "llvm", "mcpu": "znver3"})
    b = tuning.db_dir_for(tmp_path, {"kind": "llvm", "mcpu": "skylake"})
    assert a != b and a.parent == b.parent == tmp_path and a.name.startswith("llvm-znver3-")


def test_compile_with_missing_db_is_an_error(tmp_path):
    from qcompile.runtime.errors import QCompileError

    save(static_convnet(), tmp_path / "m.onnx")
    with pytest.raises(QCompileError, match="--db"):
        compile_model(tmp_path / "m.onnx", tmp_path / "m.qcm", CompileOptions(bpw=16, tuning_db=str(tmp_path / "no")))


def test_cli_tracker_needs_a_key(tmp_path):
    save(static_mlp(), tmp_path / "m.onnx")
    r = subprocess.run([sys.executable, "-m", "qcompile.compiler.cli", "tune", tmp_path / "m.onnx",
                        "--tracker", "127.0.0.1:9190", "--db", tmp_path / "db"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "--tracker and --key go together" in r.stderr
