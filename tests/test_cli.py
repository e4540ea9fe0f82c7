"""The qcompile command line: compile / info / run, exit statuses and messages, atomic artifacts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from tests.helpers import mlp_model, save


def qcompile(*args, cwd=None):
    env = dict(os.environ)
    return subprocess.run([sys.executable, "-m", "qcompile.compiler.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=600)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    save(mlp_model(), d / "mlp.onnx")
    r = qcompile(d / "mlp.onnx", "--target", "x86", "--bpw", "4.25", "-o", d / "m.qcm")
    assert r.returncode == 0, r.stderr
    return d


def test_compile_prints_the_bpw_report(workdir):
    r = qcompile("compile", workdir / "mlp.onnx", "--bpw", "3.3", "-o", workdir / "m33.qcm", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "achieved / 3.3 target" in r.stdout
    manifest = json.loads((workdir / "m33.qcm" / "manifest.json").read_text())
    assert 3.0 < manifest["bpw"]["achieved"] <= 3.3


def test_target_json_is_accepted(workdir):
    r = qcompile(workdir / "mlp.onnx", "--target", '{"kind": "llvm"}', "--bpw", "5", "-o", workdir / "j.qcm")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((workdir / "j.qcm" / "manifest.json").read_text())
    assert manifest["target"]["tvm"] == {"kind": "llvm"}


def test_info_text_and_json(workdir):
    r = qcompile("info", workdir / "m.qcm")
    assert r.returncode == 0 and "4.2500 achieved" in r.stdout and "W1" in r.stdout
    r = qcompile("info", workdir / "m.qcm", "--json")
    data = json.loads(r.stdout)
    assert data["bpw"]["target"] == 4.25 and len(data["tensors"]) == 3


def test_run_writes_npy_outputs(workdir):
    x = np.random.default_rng(0).standard_normal((2, 256)).astype(np.float32)
    np.save(workdir / "x.npy", x)
    r = qcompile("run", workdir / "m.qcm", "--input", f"x={workdir / 'x.npy'}", "-o", workdir / "out")
    assert r.returncode == 0, r.stderr
    y = np.load(workdir / "out" / "y.npy")
    import qcompile.runtime as rt

    np.testing.assert_array_equal(y, rt.load(workdir / "m.qcm").run(None, {"x": x})[0])


def _assert_usage_error(r, *needles):
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in r.stderr, (n, r.stderr)


def test_bad_inputs_exit_2_with_a_message(workdir, tmp_path):
    _assert_usage_error(qcompile(tmp_path / "missing.onnx", "-o", tmp_path / "a.qcm"), "no such model file")
    (tmp_path / "junk.onnx").write_bytes(b"not a model at all")
    _assert_usage_error(qcompile(tmp_path / "junk.onnx", "-o", tmp_path / "a.qcm"), "junk.onnx", "not a readable ONNX")
    _assert_usage_error(qcompile(workdir / "mlp.onnx", "--bpw", "four", "-o", tmp_path / "a.qcm"), "--bpw")
    _assert_usage_error(qcompile(workdir / "mlp.onnx", "--bpw", "1.5", "-o", tmp_path / "a.qcm"), "not reachable", "2.25")
    _assert_usage_error(qcompile(workdir / "mlp.onnx", "--target", "sparc", "-o", tmp_path / "a.qcm"), "sparc")
    _assert_usage_error(qcompile("run", tmp_path / "nothing.qcm"), "not a qcompile artifact")
    _assert_usage_error(qcompile("run", workdir / "m.qcm", "--input", "x=nofile.npy"), "nofile.npy")
    assert not (tmp_path / "a.qcm").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".a.qcm")]  # no temporaries left


def test_unsupported_ops_are_listed_together(tmp_path):
    model = onnx.parser.parse_model("""
    <ir_version: 8, opset_import: ["" : 17, "custom" : 1]>
    g (float[4] x) => (float[4] y) {
        a = custom.Frobnicate(x)
        b = custom.Twiddle(a)
        y = Relu(b)
    }
    """)
    save(model, tmp_path / "bad.onnx")
    r = qcompile(tmp_path / "bad.onnx", "-o", tmp_path / "b.qcm")
    _assert_usage_error(r, "custom::Frobnicate", "custom::Twiddle", "bad.onnx")
    assert not (tmp_path / "b.qcm").exists()


def test_damaged_or_foreign_artifacts_are_refused(workdir, tmp_path):
    import shutil

    import qcompile.runtime as rt

    art = tmp_path / "copy.qcm"
    shutil.copytree(workdir / "m.qcm", art)
    with open(art / "params.safetensors", "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(rt.ArtifactError, match="does not match its manifest hash"):
        rt.load(art)
    _assert_usage_error(qcompile("run", art, "--input", "x=x.npy"), "manifest hash")

    shutil.rmtree(art)
    shutil.copytree(workdir / "m.qcm", art)
    m = json.loads((art / "manifest.json").read_text())
    (art / "manifest.json").write_text(json.dumps(dict(m, format_version=99)))
    with pytest.raises(rt.ArtifactError, match="format version 99"):
        rt.load(art)
    m["target"] = dict(m["target"], arch="riscv64")
    (art / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(rt.ArtifactError, match="riscv64"):
        rt.load(art)


def test_existing_artifact_is_replaced_atomically(workdir):
    out = workdir / "re.qcm"
    for bpw in ("4.25", "3"):
        r = qcompile(workdir / "mlp.onnx", "--bpw", bpw, "-o", out)
        assert r.returncode == 0, r.stderr
    assert json.loads((out / "manifest.json").read_text())["bpw"]["target"] == 3.0
    assert not [p for p in workdir.iterdir() if p.name.startswith(".re.qcm")]
