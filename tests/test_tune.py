"""`qcompile tune`: records in a database, re-tuning only what is missing, compiles that apply the records;
our quantized kernels' knobs (declared, defaults = the code before knobs, records applied at compile) and,
in the slow tier, a tiny decoder tuned locally and over a loopback RPC tracker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import onnx
import pytest

from qcompile.compiler.driver import CompileOptions, compile_model, lower_model, quantize_model
from qcompile.compiler.tune import tune_model
from qcompile.targets import BackendOptions, make_backend, resolve_target
from qcompile.targets import kernel_tuning, tuning
from qcompile.targets.arm import kernels_dot as KD
from qcompile.targets.x86 import kernels as KF
from qcompile.targets.x86 import kernels_int8 as K8
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


# -- knobs of our hand-scheduled quantized kernels (targets/knobs.py, targets/kernel_tuning.py) ---------------

SPACES = {"x86 int8": K8.SCHEDULE, "x86 float": KF.SCHEDULE, "arm sdot": KD.SCHEDULE}


def test_knobs_default_to_the_kernels_constants():
    assert K8.SCHEDULE.default == {"nest": "fused", "tiles": 1, "row_block": K8.ROW_BLOCK}
    assert KF.SCHEDULE.default == {"nest": "fused", "accs": KF.ACCS, "row_block": KF.ROW_BLOCK,
                                   "panel_k": KF.PANEL_K}
    assert KD.SCHEDULE.default == {"row_block": KD.ROW_BLOCK}


@pytest.mark.parametrize("family", list(SPACES))
def test_settings_start_with_the_default_and_change_one_knob_before_two(family):
    space = SPACES[family]
    settings = space.settings(576, 1536)
    assert settings[0] == space.default
    assert len({tuple(c.items()) for c in settings}) == len(settings) == int(np.prod([len(v) for v in space.knobs.values()]))
    changed = [sum(c[k] != space.default[k] for k in c) for c in settings]
    assert changed == sorted(changed) and changed[1] == 1
    assert space.settings(576, 1536, limit=3) == settings[:3]
    assert set(space.doc) == set(space.knobs)  # every knob says what it does
    with pytest.raises(ValueError, match="unknown knobs"):
        space.resolve({"unroll": 2})
    with pytest.raises(ValueError, match="is not one of"):
        space.resolve({"row_block": 3})
    assert space.resolve({}) == space.default and space.is_default(None)


@pytest.mark.parametrize("kind", ["int8", "float"])
def test_every_setting_is_different_code(kind):
    import tvm_ffi

    space = K8.SCHEDULE if kind == "int8" else KF.SCHEDULE
    a = (4,) if kind == "int8" else (4, 32)
    hashes = {tvm_ffi.structural_hash(_make(kind, a, 32, 256, 64, c)) for c in space.settings(256, 64)}
    assert len(hashes) == len(space.settings(256, 64))  # no two settings measure the same kernel


def test_int8_tiles_must_divide_the_output_tiles():
    # N = 24: three tiles of 8, so only 1 tile per task applies
    assert {c["tiles"] for c in K8.SCHEDULE.settings(64, 24)} == {1}
    assert {c["tiles"] for c in K8.SCHEDULE.settings(64, 64)} == {1, 2, 4}
    with pytest.raises(ValueError, match="does not apply"):
        K8.int8_matmul((4,), 32, 64, 24, {"tiles": 2})


# structural hashes of the kernels as they were before they had knobs (commit 9d3375d): without a tuning
# record, a kernel is exactly that code. A deliberate change to a kernel's default code updates these.
BEFORE_KNOBS = {
    ("int8", (4,), 32, 576, 1536): 15391983222262476806,
    ("int8", (2, 1), 64, 1536, 576): 5528351307021733481,
    ("int8", (4,), 128, 256, 64): 17853108352004356360,
    ("sdot", (4,), 32, 576, 1536): 1891550166653465098,
    ("sdot", (2, 1), 64, 1536, 576): 2985026673874823492,
    ("float", (4, 32), None, 576, 1536): 8799286589949998302,
    ("float", (3, 64), None, 1536, 576): 765866355116658083,
    ("float", (8, 128), None, 256, 64): 3379662388120965195,
}


def _make(kind, a, g, k, n, config=None):
    from qcompile.passes.formats import WeightFormat

    if kind == "int8":
        return K8.int8_matmul(a, g, k, n, config)
    if kind == "sdot":
        return KD.int8_matmul(a, g, k, n, config)
    return KF.dequant_matmul(WeightFormat(*a), k, n, schedule=config)


@pytest.mark.parametrize("case", list(BEFORE_KNOBS), ids=lambda c: "-".join(map(str, c)))
def test_default_config_is_the_code_before_knobs(case):
    import tvm_ffi

    space = {"int8": K8.SCHEDULE, "sdot": KD.SCHEDULE, "float": KF.SCHEDULE}[case[0]]
    plain = _make(*case)
    assert tvm_ffi.structural_hash(plain) == BEFORE_KNOBS[case]
    assert tvm_ffi.structural_equal(_make(*case, config=space.default), plain)
    other = space.settings(case[3], case[4])[1]
    assert not tvm_ffi.structural_equal(_make(*case, config=other), plain)


def _build_kernel(func):
    import tvm

    target = tvm.target.Target(resolve_target("x86").tvm)
    return tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}), target=target)["main"]


def _t(a):
    import tvm

    return tvm.runtime.tensor(np.ascontiguousarray(a), tvm.cpu())


@pytest.mark.parametrize("config", [{"tiles": 2, "row_block": 8}, {"nest": "split", "tiles": 2},
                                    {"nest": "split", "tiles": 4, "row_block": 2}])
def test_int8_kernel_with_other_knobs_matches_numpy(config):
    from qcompile.passes.formats import PRESETS
    from qcompile.targets.x86 import X86Target, host_target

    if not X86Target(host_target()).int8_dot:
        pytest.skip("the host CPU has no AVX2")
    fmt = PRESETS["q3g64"]  # two bit planes
    rng = np.random.default_rng(5)
    n, k = 64, 128
    q = fmt.quantize(rng.standard_normal((n, k)).astype(np.float32))
    planes = K8.dot_planes(fmt.pack(q.codes), fmt.planes, k)
    fn = _build_kernel(K8.int8_matmul(fmt.planes, fmt.group_size, k, n, config))
    for m in (1, 3, 9):  # GEMV below the row block, GEMM with a ragged tail
        x = rng.standard_normal((m, k)).astype(np.float32)
        y = _t(np.zeros((m, n), np.float32))
        fn(_t(x), _t(planes[0]), _t(planes[-1]), _t(KF.tile_groups(q.scales, K8.TILE)),
           _t(KF.tile_groups(q.zeros, K8.TILE)), y)
        ref = K8.reference_int8_matmul(x, q.codes, q.scales, q.zeros, fmt.group_size)
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("config", [{"accs": 2, "row_block": 8, "panel_k": 256},
                                    {"nest": "split", "accs": 8, "row_block": 2}])
def test_float_kernel_with_other_knobs_matches_numpy(config):
    from qcompile.passes.formats import PRESETS

    fmt = PRESETS["q4g128"]
    rng = np.random.default_rng(6)
    n, k = 32, 512
    q = fmt.quantize(rng.standard_normal((n, k)).astype(np.float32))
    t = KF.tile_for(n)
    planes = KF.tile_planes(fmt.pack(q.codes), t)
    fn = _build_kernel(KF.dequant_matmul(fmt, k, n, schedule=config))
    for m in (1, 3, 10):
        x = rng.standard_normal((m, k)).astype(np.float32)
        y = _t(np.zeros((m, n), np.float32))
        fn(_t(x), _t(planes[0]), _t(planes[-1]), _t(KF.tile_groups(q.scales, t)), _t(KF.tile_groups(q.zeros, t)), y)
        ref = KF.reference_matmul(x, q.dequantize())
        np.testing.assert_allclose(y.numpy(), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_kernel_records_round_trip(tmp_path):
    target = {"kind": "llvm", "mcpu": "znver3"}
    kernel = type("K", (), {"k": 576, "n": 1536})()
    a = kernel_tuning.KernelTuning("qmatmul_i8_q4g32_576_1536", 3, [1, 64], {"tiles": 2, "row_block": 4},
                                   {1: 2e-5, 64: 4e-4}, {1: 1.5e-5, 64: 4e-4}, 9)
    kernel_tuning._save_record(tmp_path, target, a.name, a.to_record(kernel, [1, 64]))
    kernel_tuning._save_record(tmp_path, target, "qmatmul_q8g32_576_576",
                               {"config": {"accs": 8}, "rows": [1], "default_us": {"1": 9.0}, "tuned_us": {"1": 7.0}})
    path = kernel_tuning.records_path(tmp_path, target)
    assert path.parent == tuning.db_dir_for(tmp_path, target)  # beside MetaSchedule's files
    assert kernel_tuning.load_schedules(tmp_path, target) == {a.name: {"tiles": 2, "row_block": 4},
                                                              "qmatmul_q8g32_576_576": {"accs": 8}}
    rec = kernel_tuning.load_records(tmp_path, target)[a.name]
    assert rec["rows"] == [1, 64] and rec["default_us"] == {"1": 20.0, "64": 400.0}
    assert kernel_tuning.load_schedules(tmp_path, {"kind": "llvm", "mcpu": "skylake"}) == {}  # per target
    assert kernel_tuning.load_schedules(None, target) == {}
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # written atomically


def test_measured_rows_and_the_choice():
    k = type("K", (), {})()
    k.rows = {None}
    assert kernel_tuning.measure_rows(k) == [1, kernel_tuning.PREFILL_ROWS]  # decode and prefill
    k.rows = {1024, 256}
    assert kernel_tuning.measure_rows(k, 16) == [256, 1024]  # static rows as they are
    settings = [{"t": 1}, {"t": 2}, {"t": 4}]
    times = {(0, 1): 1.0, (0, 64): 10.0, (1, 1): 0.99, (1, 64): 9.9, (2, 1): 0.8}
    assert kernel_tuning._choose(settings, times, [1, 64]) == 0  # 1% is noise; setting 2 lacks M=64
    times[2, 64] = 9.0
    assert kernel_tuning._choose(settings, times, [1, 64]) == 2
    assert kernel_tuning._choose(settings, {(1, 1): 1.0}, [1]) is None  # no default time: no record


def test_compile_applies_kernel_records(tmp_path):
    """A hand-written record with other knobs: the compile builds those kernels with it, says so in the
    manifest, and computes what the untuned build computes (the same integer sums, in the same order)."""
    import qcompile.runtime as rt
    from qcompile.passes.reference import decode_to_float
    import onnxruntime as ort

    save(mlp_model(), tmp_path / "mlp.onnx")
    opts = CompileOptions(bpw=4.25)
    spec = resolve_target("x86")
    lowered = lower_model(quantize_model(tmp_path / "mlp.onnx", opts), make_backend(spec, BackendOptions()), opts)[0]
    assert lowered.quant_kernels and lowered.tuned_kernels == {}
    configs = {}
    for name, q in lowered.quant_kernels.items():
        assert q.rows == {None}  # the batch is symbolic
        configs[name] = q.space.settings(q.k, q.n)[-1]  # the setting farthest from the default
        kernel_tuning._save_record(tmp_path / "db", spec.tvm, name, {"config": configs[name], "rows": [1, 64],
                                                                     "default_us": {}, "tuned_us": {}})
    plain = compile_model(tmp_path / "mlp.onnx", tmp_path / "plain.qcm", opts)
    tuned = compile_model(tmp_path / "mlp.onnx", tmp_path / "tuned.qcm", replace(opts, tuning_db=str(tmp_path / "db")))
    manifest = json.loads((tmp_path / "tuned.qcm" / "manifest.json").read_text())
    assert manifest["tuning"]["tuned_kernels"] == configs
    rng = np.random.default_rng(2)
    for batch in (1, 3, 9):
        x = rng.standard_normal((batch, 256)).astype(np.float32)
        y0 = rt.load(plain.path).run(None, {"x": x})[0]
        y1 = rt.load(tuned.path).run(None, {"x": x})[0]
        np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-6 * np.abs(y0).max())
        fake = ort.InferenceSession(decode_to_float(tuned.quantized_model).SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        assert np.abs(y1 - fake).max() < 0.05 * np.abs(fake).max()  # int8 activations' rounding only


# -- slow tier: a tiny decoder tuned locally and over a loopback RPC tracker ------------------------------

DECODER_TRIALS = 2  # knob settings per kernel: the default and one other
PREFILL = 8  # the prefill M measured, and the timed prompt length (the tiny model has 64 positions)


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory):
    from tests.test_llm_frontend import tiny_hf_model

    d = tmp_path_factory.mktemp("tiny-decoder")
    tiny_hf_model("llama", seed=3).save_pretrained(d / "hf", safe_serialization=True)
    return d, CompileOptions(bpw=4.25, min_weights=0)


def _records_cover(db, report):
    records = kernel_tuning.load_records(db, resolve_target("x86").tvm)
    assert {k.name for k in report.quant_kernels} <= set(records)
    for k in report.quant_kernels:
        assert records[k.name]["rows"] == [1, PREFILL]  # a decode step and a prompt: the M is symbolic
        assert records[k.name]["config"] == k.config
    return records


@pytest.mark.slow
def test_tune_a_decoder_locally(tiny_decoder):
    import qcompile.runtime as rt

    d, opts = tiny_decoder
    report = tune_model(d / "hf", opts, d / "db", DECODER_TRIALS, prefill_rows=PREFILL, decode_steps=4)
    assert len(report.quant_kernels) >= 3 and not any(k.reused for k in report.quant_kernels)
    for k in report.quant_kernels:
        assert k.settings == DECODER_TRIALS and set(k.default_s) == set(k.tuned_s) == {1, PREFILL}
    records = _records_cover(d / "db", report)
    if report.model_default_ms is not None:  # some kernel took another setting: the model was timed
        assert report.decoder and report.prefill_default_ms and report.model_tuned_ms > 0
    # a second run measures nothing and reports the records
    again = tune_model(d / "hf", opts, d / "db", DECODER_TRIALS, prefill_rows=PREFILL, time_model=False)
    assert all(k.reused for k in again.quant_kernels) and again.kernel_seconds < 5
    # a compile with the database builds every recorded kernel with its config and decodes alike
    plain = compile_model(d / "hf", d / "plain.qcm", opts)
    tuned = compile_model(d / "hf", d / "tuned.qcm", replace(opts, tuning_db=str(d / "db")))
    assert tuned.manifest["tuning"]["tuned_kernels"] == {k: r["config"] for k, r in records.items()}
    prompt = [5, 77, 140, 3, 250, 31]
    assert rt.load(plain.path).generate(prompt, 8) == rt.load(tuned.path).generate(prompt, 8)


@pytest.mark.slow
def test_tune_a_decoder_over_a_loopback_tracker_with_two_servers(tiny_decoder):
    from qcompile.targets.rpc_local import LoopbackCluster

    import threading
    import time

    d, opts = tiny_decoder
    with LoopbackCluster(servers=2, key="qknobs") as cluster:
        killed_after = []

        def kill_server_0_mid_run():  # a device lost: its measurements fail, the run goes on
            deadline = time.monotonic() + 600
            while cluster.sessions(0) < 3 and time.monotonic() < deadline:
                time.sleep(0.2)
            killed_after.append(cluster.sessions(0))
            cluster.kill(0)

        killer = threading.Thread(target=kill_server_0_mid_run)
        killer.start()
        report = tune_model(d / "hf", opts, d / "db-rpc", DECODER_TRIALS, tracker=cluster.tracker, key="qknobs",
                            prefill_rows=PREFILL, time_model=False)
        killer.join()
        served = [cluster.sessions(0), cluster.sessions(1)]
    assert killed_after and killed_after[0] >= 3 and served[1] > 0  # both measured, then server 1 alone
    assert report.quant_kernels
    _records_cover(d / "db-rpc", report)  # what was measured is recorded; the rest is tuned by a later run
