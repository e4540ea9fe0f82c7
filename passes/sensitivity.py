"""Whole-model sensitivity of each quantizable weight: output divergence per unit of layer error.

Why. The measurement (:mod:`.measure`) scores a format by the layer-local relative output error
e = tr(ΔW H ΔWᵀ) / tr(W H Wᵀ). Summing e over layers treats a 1% error in the first attention value
projection like a 1% error in the last MLP, which the model does not: errors are amplified or damped by
everything downstream (residual stream norms, attention, the head). EXL2 handles this by measuring the
error of whole blocks; we measure it one step further, at the model's output, once per weight:

    perturb W_t alone by a probe quantization (RTN at ``PROBE_FORMAT``), run the model on a few
    calibration samples, and record D_t = divergence(float outputs, perturbed outputs) and the probe's
    own layer error e_t;   sensitivity s_t = D_t / e_t.

To second order, independent small perturbations add up in the divergence (KL and squared error are
both quadratic at the optimum, and cross terms of independent quantization noise vanish in expectation),
so the allocation objective Σ_t s_t · e_t(format) estimates the model's output divergence: this is the
"whole-model error" the allocator minimizes when calibration data is available.

Divergence. Outputs with a class/vocabulary axis (float, rank ≥ 2, last dim ≥ ``KL_MIN_CLASSES``) are
logits: mean KL(softmax(float) || softmax(perturbed)) over all positions, the metric LM quality is
judged by. Otherwise: relative squared error ||ΔY||² / ||Y||² averaged over the float outputs.

Cost: one model run per (weight, sample), which dominates the compile of a large model: the samples are
few (``--sensitivity-samples``, default 4 of the calibration samples: 512 tokens at the default text
window of 128). With the weights fed as graph inputs one onnxruntime session serves every probe.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .calibrate import CalibrationStats
from .formats import PRESETS, WeightFormat, formats_for
from .gptq import h_error
from .keyed import load_keyed, save_keyed
from .quantizable import QuantTarget

__all__ = ["Sensitivity", "measure_sensitivity", "output_divergence", "probe_format",
           "save_sensitivity", "load_sensitivity", "KL_MIN_CLASSES", "PROBE_FORMAT"]

log = logging.getLogger(__name__)

PROBE_FORMAT = PRESETS["q3g64"]
"""The probe: coarse enough to move the output well above float noise, fine enough to stay in the
quadratic regime (a few % relative layer error)."""

KL_MIN_CLASSES = 1000
_FLOOR = 1e-3  # sensitivities are floored at this fraction of the median (a zero would make bits free)
_FILE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Sensitivity:
    """One weight's probe: layer error e of the probe, output divergence D, and s = D / e."""

    name: str
    probe: str
    layer_error: float
    divergence: float
    sensitivity: float


def probe_format(shape: Sequence[int]) -> WeightFormat:
    """``PROBE_FORMAT`` where it fits [N, K], else the 3-bit format with the largest group that does."""
    if PROBE_FORMAT.supports(shape):
        return PROBE_FORMAT
    fits = [f for f in formats_for(shape) if f.bits == PROBE_FORMAT.bits] or list(formats_for(shape))
    return max(fits, key=lambda f: (f.bits == PROBE_FORMAT.bits, f.group_size))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64, copy=False)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def _is_logits(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.floating) and a.ndim >= 2 and a.shape[-1] >= KL_MIN_CLASSES


class _Reference:
    """The float outputs of one sample, prepared for divergences.

    For logits z (float) with p = softmax(z): KL(p || softmax(z')) = Σ p log p - Σ p z' + logsumexp(z')
    (Σ p = 1), so a probe costs one pass for the dot product and the log-sum-exp of z' (float64).
    """

    def __init__(self, outputs: Sequence[np.ndarray]):
        self.kl = [i for i, a in enumerate(outputs) if _is_logits(a)]
        self.mse = [] if self.kl else [i for i, a in enumerate(outputs) if np.issubdtype(a.dtype, np.floating)]
        self.p, self.neg_entropy = {}, {}
        for i in self.kl:
            logp = _log_softmax(outputs[i])
            self.p[i] = np.exp(logp)
            self.neg_entropy[i] = np.sum(self.p[i] * logp, axis=-1)
        self.ref = {i: outputs[i].astype(np.float64) for i in self.mse}
        self.norm = {i: max(float(np.sum(r * r)), 1e-30) for i, r in self.ref.items()}

    def _kl(self, i: int, z: np.ndarray) -> float:
        z = z.astype(np.float64)
        top = z.max(axis=-1, keepdims=True)
        lse = np.log(np.exp(z - top).sum(axis=-1)) + top[..., 0]
        cross = np.einsum("...v,...v->...", self.p[i], z)
        return float(np.mean(self.neg_entropy[i] - cross + lse))

    def divergence(self, outputs: Sequence[np.ndarray]) -> float:
        if self.kl:
            return float(np.mean([max(self._kl(i, outputs[i]), 0.0) for i in self.kl]))
        if not self.mse:
            return 0.0
        return float(np.mean([np.sum((outputs[i] - self.ref[i]) ** 2) / self.norm[i] for i in self.mse]))


def output_divergence(reference: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> float:
    """The divergence of ``outputs`` from ``reference`` (module docstring): KL for logits, else rel. MSE."""
    return _Reference(reference).divergence(outputs)


def _weights_as_inputs(model: onnx.ModelProto, names: set[str]) -> tuple[bytes, dict[str, np.ndarray]]:
    """The model with the ``names`` initializers turned into graph inputs, and their float values."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    keep, values = [], {}
    for init in m.graph.initializer:
        if init.name in names:
            values[init.name] = onnx.numpy_helper.to_array(init)
            m.graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            keep.append(init)
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m.SerializeToString(), values


def measure_sensitivity(
    model: onnx.ModelProto,
    targets: Sequence[QuantTarget],
    stats: CalibrationStats,
    samples: Sequence[Mapping[str, np.ndarray]],
    progress: Callable[[int], None] | None = None,
) -> dict[str, Sensitivity]:
    """Probe every target of ``model`` (module docstring) on ``samples`` (onnxruntime feeds)."""
    if not samples:
        raise ValueError("sensitivity needs at least one calibration sample")
    started = time.perf_counter()
    data, values = _weights_as_inputs(model, {t.name for t in targets})
    missing = [t.name for t in targets if t.name not in values]
    if missing:
        raise ValueError(f"targets are not initializers of the model: {missing[:5]}")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    del data
    model_inputs = {i.name for i in sess.get_inputs()}
    feeds = [{k: v for k, v in s.items() if k in model_inputs} for s in samples]
    refs = [_Reference(sess.run(None, {**f, **values})) for f in feeds]

    out: dict[str, Sensitivity] = {}
    for i, t in enumerate(targets):
        w = t.matrix(values[t.name])
        fmt = probe_format(t.shape)
        ts = stats.tensors.get(t.name)
        q = fmt.quantize(w, importance=None if ts is None else ts.sq).dequantize()
        if ts is not None:
            err = h_error(w, q, ts.H)
        else:
            err = float(np.sum((w.astype(np.float64) - q) ** 2) / max(float(np.sum(w.astype(np.float64) ** 2)), 1e-30))
        probed = {**values, t.name: t.onnx_array(q).astype(values[t.name].dtype)}
        div = float(np.mean([r.divergence(sess.run(None, {**f, **probed})) for f, r in zip(feeds, refs)]))
        out[t.name] = Sensitivity(t.name, fmt.name, err, div, div / err if err > 0 else 0.0)
        if progress:
            progress(i + 1)
        if (i + 1) % max(1, len(targets) // 4) == 0:
            log.info("sensitivity: %d of %d weights probed (%.0f s)", i + 1, len(targets),
                     time.perf_counter() - started)
    positive = [s.sensitivity for s in out.values() if s.sensitivity > 0]
    floor = _FLOOR * float(np.median(positive)) if positive else 1.0
    for name, s in out.items():
        if s.sensitivity < floor:
            out[name] = Sensitivity(s.name, s.probe, s.layer_error, s.divergence, floor)
    log.info("sensitivity of %d weights on %d samples: %.1f s (range %.3g .. %.3g)", len(out), len(feeds),
             time.perf_counter() - started, min((s.sensitivity for s in out.values()), default=0),
             max((s.sensitivity for s in out.values()), default=0))
    return out


def save_sensitivity(path: str | Path, key: dict, table: Mapping[str, Sensitivity]) -> None:
    """Write the sensitivities (JSON, atomically); ``key`` says what they were measured on."""
    save_keyed(path, _FILE_FORMAT, key, [dataclasses.asdict(s) for s in table.values()])


def load_sensitivity(path: str | Path, key: dict) -> dict[str, Sensitivity] | None:
    """The table at ``path`` if it was measured with the same ``key``, else None."""
    rows = load_keyed(path, _FILE_FORMAT, key)
    return None if rows is None else {t["name"]: Sensitivity(**t) for t in rows}
