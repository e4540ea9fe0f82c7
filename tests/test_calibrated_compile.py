"""The full quality pipeline: calibrate -> measure (GPTQ, H-weighted) -> allocate -> quantize (GPTQ)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import qcompile.runtime as rt
from qcompile.compiler.driver import CompileOptions, compile_model
from qcompile.passes.formats import formats_for
from qcompile.passes.salient import split_formats_for
from tests.helpers import mlp_model, save


def _inputs(rng, n, mix):
    """Correlated inputs with a few outlier channels: what real activations look like to GPTQ."""
    x = rng.standard_normal((n, 256)) @ mix
    x[:, :4] *= 8.0
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    model = mlp_model(seed=3)
    path = save(model, d / "mlp.onnx")
    rng = np.random.default_rng(0)
    mix = rng.standard_normal((256, 256)) / 16 + np.eye(256)
    np.savez(d / "calib.npz", x=_inputs(rng, 512, mix))
    held_out = _inputs(np.random.default_rng(1), 256, mix)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": held_out})[0]
    return d, path, held_out, ref


def _err(art, x, ref):
    y = rt.load(art).run(None, {"x": x})[0]
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def test_calibrated_gptq_beats_uncalibrated_rtn(setup):
    d, path, x, ref = setup
    work = d / "work"
    calib = compile_model(path, d / "c.qcm", CompileOptions(bpw=3.5, calib=str(d / "calib.npz"), workdir=work))
    plain = compile_model(path, d / "p.qcm", CompileOptions(bpw=3.5, workdir=d / "work-rtn"))
    m = calib.manifest
    assert m["bpw"]["achieved"] <= 3.5 and m["bpw"]["achieved"] > 3.0
    assert "GPTQ H-weighted" in m["error_measure"]
    # every format that fits, and the split formats (salient channels at more bits) of the matmuls
    assert all({c["format"] for c in t["candidates"]}
               == {f.name for f in formats_for(t["shape"]) + split_formats_for(t["shape"])} for t in m["tensors"])
    assert "sensitivity" in m["error_measure"] and set(m["sensitivity"]) == {t["name"] for t in m["tensors"]}
    e_calib, e_plain = _err(calib.path, x, ref), _err(plain.path, x, ref)
    # measured: about 0.55x on this model (GPTQ + output-error allocation vs RTN + weight-error allocation)
    assert e_calib < 0.8 * e_plain, (e_calib, e_plain)
    # the manifest's per-tensor error is the H-weighted output error of the stored weight
    assert all(0 < t["rel_error"] < 0.1 for t in m["tensors"])


def test_new_bpw_reuses_stats_and_measurement(setup):
    d, path, x, ref = setup
    work = d / "work2"
    compile_model(path, d / "a.qcm", CompileOptions(bpw=4.25, calib=str(d / "calib.npz"), workdir=work))
    cached = {p.name: p.stat().st_mtime_ns for p in work.iterdir()}
    assert any(n.startswith("stats-") for n in cached) and any(n.startswith("measurement-") for n in cached)
    r = compile_model(path, d / "b.qcm", CompileOptions(bpw=3.0, calib=str(d / "calib.npz"), workdir=work))
    assert {p.name: p.stat().st_mtime_ns for p in work.iterdir()} == cached  # nothing recomputed
    assert r.seconds["calibrate"] < 1.0
    assert r.manifest["bpw"]["achieved"] <= 3.0
    # a non-uniform allocation: several formats at one target
    assert len({t["format"] for t in r.manifest["tensors"]}) > 1
    assert _err(r.path, x, ref) > _err(d / "a.qcm", x, ref)


def test_report_html_is_in_the_artifact(setup):
    d, path, _, _ = setup
    r = compile_model(path, d / "h.qcm", CompileOptions(bpw=3.5, calib=str(d / "calib.npz"), workdir=d / "work"))
    html = (r.path / "report.html").read_text()
    assert "<svg" in html and "Bits per layer" in html and "W2" in html
    manifest = json.loads((r.path / "manifest.json").read_text())
    assert "report.html" in manifest["files"]


LN_TEXT = """
<ir_version: 8, opset_import: ["" : 17]>
ln (float[batch, 256] x) => (float[batch, 512] y) {
    n = LayerNormalization<axis = -1>(x, gamma, beta)
    q = MatMul(n, Wq)
    k = MatMul(n, Wk)
    y = Concat<axis = -1>(q, k)
}
"""


def test_activation_scaling_is_folded_and_helps(tmp_path):
    """Outlier channels after a norm: AWQ scales fold into gamma/beta and cut the quantized error."""
    from onnx import numpy_helper

    model = onnx.parser.parse_model(LN_TEXT)
    rng = np.random.default_rng(7)
    gamma = np.ones(256, np.float32)
    gamma[[3, 50, 100, 200]] = 40.0  # activation outliers, as in LLM norms
    for name, a in {"gamma": gamma, "beta": np.zeros(256, np.float32),
                    "Wq": rng.standard_normal((256, 256)) / 16, "Wk": rng.standard_normal((256, 256)) / 16}.items():
        model.graph.initializer.append(numpy_helper.from_array(np.asarray(a, np.float32), name))
    path = save(model, tmp_path / "ln.onnx")
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((256, 256)).astype(np.float32))
    x = np.random.default_rng(8).standard_normal((64, 256)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    errs = {}
    for awq in (False, True):
        r = compile_model(path, tmp_path / f"a{awq}.qcm", CompileOptions(
            bpw=9, overrides=[(".*", "q3g128")], calib=str(tmp_path / "c.npz"), awq=awq, gptq=False,
            workdir=tmp_path / f"w{awq}"))
        errs[awq] = _err(r.path, x, ref)
        scaled = r.manifest["outliers"]["activation_scaling"]
        assert bool(scaled) == awq
    (act, info), = scaled.items()
    assert sorted(info["consumers"]) == ["Wk", "Wq"] and info["alpha"] > 0
    # measured: about 0.5x with RTN at 3 bits
    assert errs[True] < 0.8 * errs[False], errs

    # auto: both settings measured and allocated; the lower objective (here: with the scaling) is applied
    r = compile_model(path, tmp_path / "auto.qcm", CompileOptions(bpw=3.5, calib=str(tmp_path / "c.npz"),
                                                                  gptq=False, workdir=tmp_path / "wauto"))
    choice = r.manifest["outliers"]["awq"]
    assert choice["setting"] == "auto" and set(choice["objective"]) == {"on", "off"}
    assert choice["applied"] == (choice["objective"]["on"] < choice["objective"]["off"])
    assert choice["applied"] and bool(r.manifest["outliers"]["activation_scaling"])
