"""Activation-aware per-channel scaling folded into the producer (AWQ, Lin et al. 2023; DESIGN §2).

A few input channels of a linear layer often carry much larger activations than the rest (outliers,
usually from a norm's gamma). Group-wise quantization gives every weight in a group the same absolute
step, so the weights that meet those large inputs are as coarse as the rest although their error is
amplified by the input. AWQ moves magnitude from the activation into the weight, exactly:

    y = a Wᵀ = (a S⁻¹) (W S)ᵀ,        S = diag(s), s [K] > 0

The consumers' weights become W' = W S (column k times s_k; for an ONNX MatMul B [K, N], row k) and the
producer of ``a`` is rewritten to emit a' = a S⁻¹, so the float model computes the same function:

    LayerNormalization / RMSNormalization(x, γ, β)   γ ← γ / s,  β ← β / s
    Mul(x, γ) or Mul(γ, x), γ an initializer          γ ← γ / s             (decomposed RMSNorm)
    MatMul(x, B), B [K_prev, K]                       B[:, k] ← B[:, k] / s_k
    Gemm(x, B, C)                                     output columns of B and C divided by s
    Add(MatMul/Gemm(x, B), bias)                      both of the above
    Mul(u, v), u and v activations                    the producer of u or v, by these rules
                                                      (gated MLP: act(gate) * up, up_proj absorbs s)

Only activations whose every consumer is a quantizable MatMul/Gemm reading it as ``A`` (or Shape/Size,
which see only the shape) are scaled; anything else (an activation function in between, a residual, a
graph input or output, an initializer used twice) is skipped and logged at DEBUG, with the reason kept
in :attr:`ActivationScalePass.skipped`.

Choice of s. With H = Σ xᵀx the consumer's Gram matrix, the scaled layer sees H' = S⁻¹ H S⁻¹, and
the output error of quantizing W' = W S is the same in either space:

    tr(ΔW' H' ΔW'ᵀ) = tr(D H Dᵀ),        D = W - Q(W S) S⁻¹

AWQ searches s = absmean^α (absmean = mean |x| per channel, floored at 1 % of its mean so that dead
channels do not get huge factors; normalized so that sqrt(max s · min s) = 1) over α in ``alphas`` and
keeps the α with the lowest Σ_t tr(D_t H D_tᵀ) over the consumers t, each quantized round-to-nearest in
the format it will get (``fmt.quantize`` with importance diag(H'), the static groups that GPTQ and the
imatrix RTN start from), on a deterministic sample of ``rows`` rows per consumer scaled to the whole
tensor. α = 0 (s = 1, no change) is always tried and is kept unless another α lowers that error by
at least ``min_gain``, so the search never makes the measured error worse. Activations are visited in
reverse graph order, so when one linear feeds another the search for the first activation sees the
second weight with its output rows already rescaled.

Afterwards the consumers' statistics are those of a' = a S⁻¹: :func:`scaled_stats` gives them without
recalibrating (H' = S⁻¹HS⁻¹, sq' = sq / s², absmean' = absmean / s).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from .calibrate import CalibrationStats, TensorStats
from .formats import PRESETS, WeightFormat
from .quantizable import QuantTarget

__all__ = ["ActivationScalePass", "ScaleReport", "scaled_stats", "ALPHAS", "DEFAULT_FORMAT", "SEARCH_ROWS", "MIN_GAIN"]

log = logging.getLogger(__name__)

ALPHAS: tuple[float, ...] = tuple(i / 10 for i in range(11))
"""The exponents α of s = absmean^α tried by the search (AWQ's grid: 0, 0.1, ..., 1)."""

DEFAULT_FORMAT = PRESETS["q4g128"]
"""The format searched with when no plan exists yet (the nearest group size that fits is used)."""

SEARCH_ROWS = 128
"""Output channels sampled per consumer in the search (evenly strided, deterministic)."""

MIN_GAIN = 0.01
"""An α > 0 is kept only if it lowers the searched error by at least this fraction: smaller gains are
within what the RTN proxy misjudges for GPTQ (measured: -0.8 % by RTN became +0.2 % with GPTQ)."""

_DEAD_FLOOR = 1e-2  # absmean is floored at this fraction of its mean before s = absmean^α

_DEFAULT_DOMAINS = ("", "ai.onnx")
_NORMS = {"LayerNormalization": (1, 2), "RMSNormalization": (1,)}  # op -> inputs holding γ (and β)
_MAX_DEPTH = 2  # nested products of activations looked through for a factor that absorbs s
_SHAPE_ONLY = {"Shape", "Size"}  # consumers that read only the shape, which scaling keeps
_FLOATS = {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}


@dataclass(frozen=True)
class ScaleReport:
    """The search for one activation: chosen α and the consumers' relative output error.

    Errors are Σ_t tr(ΔW_t H ΔW_tᵀ) / Σ_t tr(W_t H W_tᵀ) over the quantized consumers (round-to-nearest,
    sampled rows), before (α = 0) and after scaling. With forced scales α is None and errors are nan.
    """

    activation: str
    producer: str
    consumers: tuple[str, ...]
    alpha: float | None
    error_before: float
    error_after: float


@dataclass(frozen=True)
class _Edit:
    """Scale the channel axis ``axis`` of initializer ``value`` by s**power (axis -1 broadcasts)."""

    value: ir.Value
    axis: int
    power: int


@dataclass
class _Site:
    activation: ir.Value
    consumers: list[QuantTarget]
    producer: str
    edits: list[_Edit]


class ActivationScalePass(ir.passes.InPlacePass):
    """Fold AWQ per-channel scales into producer and consumers (module docstring).

    ``targets``: the quantizable weights; ``stats``: their calibration statistics (may be None when
    ``scales`` gives every factor); ``formats``: the plan (target name -> format; targets absent from it
    stay float and add no error) or one format for all, e.g. :data:`DEFAULT_FORMAT` before allocation.
    ``alphas``, ``rows`` and ``min_gain`` steer the search (module docstring).
    ``scales`` (activation name -> s [K]) skips the search and applies those factors, e.g. to replay a
    previous run. After the call, :attr:`scales` holds the applied factors by activation name,
    :attr:`report` one :class:`ScaleReport` per searched or forced activation, :attr:`skipped` why each
    other candidate activation was left alone.
    """

    def __init__(
        self,
        targets: Sequence[QuantTarget],
        stats: CalibrationStats | None,
        formats: Mapping[str, WeightFormat] | WeightFormat = DEFAULT_FORMAT,
        alphas: Sequence[float] = ALPHAS,
        *,
        rows: int = SEARCH_ROWS,
        min_gain: float = MIN_GAIN,
        scales: Mapping[str, np.ndarray] | None = None,
    ):
        super().__init__()
        alphas = [float(a) for a in alphas]
        if not all(math.isfinite(a) and a >= 0 for a in alphas):
            raise ValueError(f"alphas must be finite and >= 0, got {alphas!r}")
        if rows < 1:
            raise ValueError(f"rows must be positive, got {rows!r}")
        if not 0 <= min_gain < 1:
            raise ValueError(f"min_gain must be a fraction in [0, 1), got {min_gain!r}")
        if stats is None and scales is None:
            raise ValueError("ActivationScalePass needs calibration stats to search, or explicit scales")
        self.targets = list(targets)
        self.stats = stats
        self.formats = formats
        self.alphas = sorted(set(alphas) | {0.0})  # α = 0 is "no scaling": never worse than not running
        self.rows = rows
        self.min_gain = min_gain
        self.forced = None if scales is None else {k: _check_scales(k, v) for k, v in scales.items()}
        self.scales: dict[str, np.ndarray] = {}
        self.report: dict[str, ScaleReport] = {}
        self.skipped: dict[str, str] = {}

    # -- the pass ----------------------------------------------------------------------------------

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_node: dict[ir.Node, QuantTarget] = {}
        for t in self.targets:
            value = graph.initializers.get(t.name)
            if value is None or len(value.uses()) != 1:
                raise ValueError(f"target {t.name} is not a single-use initializer of this model; "
                                 f"recompute the targets with find_quantizable on this model")
            by_node[value.uses()[0].node] = t
        position = {node: i for i, node in enumerate(graph)}
        activations: dict[ir.Value, int] = {}
        for node, t in by_node.items():
            if t.op in ("MatMul", "Gemm") and node.inputs[0] is not None:
                a = node.inputs[0]
                activations[a] = max(activations.get(a, -1), position[node])
        if self.forced is not None:
            names = {a.name for a in activations}
            for name in self.forced.keys() - names:
                self._skip(name, "not the input of a quantizable MatMul/Gemm")

        for a in sorted(activations, key=activations.get, reverse=True):  # see the module docstring
            if self.forced is not None and a.name not in self.forced:
                continue
            site = self._site(a, by_node)
            if isinstance(site, str):
                self._skip(a.name, site)
                continue
            if self.forced is not None:
                s = self.forced[a.name]
                if s.shape != (site.consumers[0].shape[1],):
                    raise ValueError(f"scales for {a.name}: {s.shape[0]} values for K = "
                                     f"{site.consumers[0].shape[1]} input channels")
                rep = ScaleReport(a.name, site.producer, tuple(t.name for t in site.consumers), None,
                                  math.nan, math.nan)
            else:
                found = self._search(graph, site)
                if isinstance(found, str):
                    self._skip(a.name, found)
                    continue
                s, rep = found
            self.report[a.name] = rep
            if s is None:  # the search chose α = 0
                continue
            why = self._apply(graph, site, s)
            if why is not None:
                del self.report[a.name]
                self._skip(a.name, why)
                continue
            self.scales[a.name] = s

        searched = [r for r in self.report.values() if r.alpha is not None]
        before = sum(r.error_before for r in searched) / max(len(searched), 1)
        after = sum(r.error_after for r in searched) / max(len(searched), 1)
        log.info("activation scaling: %d of %d candidate activations scaled, %d skipped; mean relative "
                 "output error %.4g -> %.4g over %d searched", len(self.scales), len(activations),
                 len(self.skipped), before, after, len(searched))
        return ir.passes.PassResult(model, modified=bool(self.scales))

    def _skip(self, name: str, why: str) -> None:
        self.skipped[name] = why
        log.debug("activation %s not scaled: %s", name, why)

    # -- eligibility -------------------------------------------------------------------------------

    def _site(self, a: ir.Value, by_node: Mapping[ir.Node, QuantTarget]) -> _Site | str:
        consumers = []
        for use in a.uses():
            if use.node.op_type in _SHAPE_ONLY and use.node.domain in _DEFAULT_DOMAINS:
                continue
            t = by_node.get(use.node)
            if t is None or use.idx != 0 or t.op not in ("MatMul", "Gemm"):
                return f"also consumed by {use.node.op_type} {use.node.name!r} (input {use.idx})"
            consumers.append(t)
        if a.is_graph_output():
            return "it is a graph output"
        k = consumers[0].shape[1]
        if any(t.shape[1] != k for t in consumers):
            return "its consumers disagree on K"
        edits = _producer_edits(a, k)
        if isinstance(edits, str):
            return edits
        producer, edits = edits
        return _Site(a, consumers, producer, edits)

    # -- search ------------------------------------------------------------------------------------

    def _format(self, t: QuantTarget) -> WeightFormat | None:
        if isinstance(self.formats, WeightFormat):
            if self.formats.supports(t.shape):
                return self.formats
            fits = [f for f in PRESETS.values() if f.bits == self.formats.bits and f.supports(t.shape)]
            return max(fits, key=lambda f: f.group_size) if fits else None
        return self.formats.get(t.name)

    def _search(self, graph: ir.Graph, site: _Site) -> tuple[np.ndarray | None, ScaleReport] | str:
        stats = [self.stats.tensors.get(t.name) for t in site.consumers]
        missing = [t.name for t, ts in zip(site.consumers, stats) if ts is None]
        if missing:
            return f"no calibration statistics for {', '.join(missing)}"
        ts = stats[0]
        if ts.k != site.consumers[0].shape[1] or any(x.activation not in ("", site.activation.name)
                                                       for x in stats):
            return "calibration statistics do not match this activation"
        quantized = [(t, f) for t in site.consumers if (f := self._format(t)) is not None]
        if not quantized:
            return "none of its consumers is quantized"
        absmean = np.asarray(ts.absmean, dtype=np.float64)
        floor = _DEAD_FLOOR * float(absmean.mean())
        if not floor > 0:
            return "the activation is zero on the calibration data"
        base = np.maximum(absmean, floor)
        h = np.asarray(ts.H, dtype=np.float32)
        diag = np.diag(ts.H).astype(np.float64)
        samples = []
        reference = 0.0
        for t, fmt in quantized:
            w = t.matrix(graph.initializers[t.name].const_value.numpy())
            rows = np.unique(np.linspace(0, w.shape[0] - 1, min(self.rows, w.shape[0])).astype(np.int64))
            w = w[rows].astype(np.float64)
            weight = t.shape[0] / len(rows)  # the sample's error estimates the whole tensor's
            reference += weight * _h_trace(w.astype(np.float32), h)
            samples.append((w, fmt, weight))
        if not reference > 0:
            return "its consumers' output is zero on the calibration data"

        errors = []
        for alpha in self.alphas:
            s = _awq_scales(base, alpha)
            try:
                err = sum(weight * _scaled_error(w, s, fmt, h, diag) for w, fmt, weight in samples)
            except ValueError:  # W S beyond float16's range: this α is not storable
                err = math.inf
            errors.append(err)
        best = min(range(len(self.alphas)), key=lambda i: (errors[i], i))  # ties: the smaller α
        if not errors[best] < (1.0 - self.min_gain) * errors[0]:
            best = 0
        alpha = self.alphas[best]
        rep = ScaleReport(site.activation.name, site.producer, tuple(t.name for t in site.consumers), alpha,
                          errors[0] / reference, errors[best] / reference)
        log.debug("activation %s: α=%g, relative error %.4g -> %.4g", rep.activation, alpha,
                  rep.error_before, rep.error_after)
        return (None if alpha == 0.0 else _awq_scales(base, alpha)), rep

    # -- rewrite -----------------------------------------------------------------------------------

    def _apply(self, graph: ir.Graph, site: _Site, s: np.ndarray) -> str | None:
        edits = [*site.edits, *(_Edit(graph.initializers[t.name], 0 if t.transpose else 1, 1)
                                for t in site.consumers)]
        new = []
        for e in edits:
            old = e.value.const_value.numpy()
            a = _scale_axis(old, s, e.axis, e.power)
            if not np.isfinite(a).all():
                return f"scaling {e.value.name} overflows {old.dtype}"
            new.append(a)
        for e, a in zip(edits, new):
            e.value.const_value = ir.tensor(a, name=e.value.name)
            e.value.shape = ir.Shape(a.shape)
        return None


# -- producers -------------------------------------------------------------------------------------


def _producer_edits(a: ir.Value, k: int, depth: int = 0) -> tuple[str, list[_Edit]] | str:
    """(description, edits that divide ``a``'s channels by s) or why the producer cannot absorb s.

    For a = u * v (two activations), the factor whose own producer can absorb s does (``depth`` bounds
    that search).
    """
    node = a.producer()
    if node is None:
        return "it is a graph input" if a.is_graph_input() else "it has no producer"
    if node.domain not in _DEFAULT_DOMAINS:
        return f"producer {node.op_type} {node.name!r} is in domain {node.domain!r}"
    op = node.op_type
    if op in _NORMS:
        if a is not node.outputs[0]:
            return f"it is output {a.index()} of {op} {node.name!r}, not the normalized value"
        edits = []
        for i in _NORMS[op]:
            if i >= len(node.inputs) or node.inputs[i] is None:
                continue
            why = _own_initializer(node.inputs[i], k, -1, strict=True)
            if why:
                return f"{op} {node.name!r}: {why}"
            edits.append(_Edit(node.inputs[i], -1, -1))
        return op, edits
    if op == "Mul":
        consts = [v for v in node.inputs if v is not None and v.is_initializer()]
        if len(consts) == 1:
            why = _own_initializer(consts[0], k, -1)
            return f"Mul {node.name!r}: {why}" if why else ("Mul", [_Edit(consts[0], -1, -1)])
        if consts or depth >= _MAX_DEPTH:
            return f"Mul {node.name!r} has {len(consts)} initializer inputs and no factor to absorb s"
        # A product of two activations (gated MLP: act(gate) * up): a factor used only here may absorb s.
        reasons = []
        for v in node.inputs:
            if v is None or len(v.uses()) != 1 or v.is_graph_output():
                reasons.append(f"{getattr(v, 'name', None)} is used elsewhere")
                continue
            inner = _producer_edits(v, k, depth + 1)
            if not isinstance(inner, str):
                return f"Mul({inner[0]})", inner[1]
            reasons.append(inner)
        return f"Mul {node.name!r}: neither factor can absorb s ({'; '.join(reasons)})"
    if op in ("MatMul", "Gemm"):
        edits = _linear_edits(node, k)
        return edits if isinstance(edits, str) else (op, edits)
    if op == "Add":
        consts = [v for v in node.inputs if v is not None and v.is_initializer()]
        others = [v for v in node.inputs if v is not None and not v.is_initializer()]
        if len(consts) != 1 or len(others) != 1:
            return f"Add {node.name!r} is not a bias added to one activation"
        y = others[0]
        inner = y.producer()
        if inner is None or inner.op_type not in ("MatMul", "Gemm") or inner.domain not in _DEFAULT_DOMAINS:
            return f"Add {node.name!r} adds a bias to the output of {inner.op_type if inner else 'no node'}, " \
                   f"not of a MatMul/Gemm"
        if len(y.uses()) != 1 or y.is_graph_output():
            return f"the output of {inner.op_type} {inner.name!r} before the bias is used elsewhere too"
        why = _own_initializer(consts[0], k, -1)
        if why:
            return f"Add {node.name!r}: {why}"
        edits = _linear_edits(inner, k)
        if isinstance(edits, str):
            return edits
        return f"Add({inner.op_type})", [*edits, _Edit(consts[0], -1, -1)]
    return f"producer {op} {node.name!r} cannot absorb a per-channel scale"


def _linear_edits(node: ir.Node, k: int) -> list[_Edit] | str:
    """Edits dividing the output channels of MatMul(x, B) / Gemm(x, B, C) by s."""
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return f"{node.op_type} {node.name!r} has no weight"
    axis = 1
    if node.op_type == "Gemm":
        trans_b = node.attributes.get("transB")
        axis = 0 if trans_b is not None and trans_b.value else 1
    why = _own_initializer(node.inputs[1], k, axis)
    if why:
        return f"{node.op_type} {node.name!r}: {why}"
    edits = [_Edit(node.inputs[1], axis, -1)]
    if node.op_type == "Gemm" and len(node.inputs) > 2 and node.inputs[2] is not None:
        c = node.inputs[2]
        why = "bias C is not an initializer" if not c.is_initializer() else _own_initializer(c, k, -1)
        if why:
            return f"Gemm {node.name!r}: {why}"
        edits.append(_Edit(c, -1, -1))
    return edits


def _own_initializer(v: ir.Value, k: int, axis: int, strict: bool = False) -> str | None:
    """Why ``v`` cannot be rescaled along ``axis`` for this activation alone (None: it can).

    axis -1 is a broadcast operand (γ, bias): its last dimension must be K, or 1 / a scalar when not
    ``strict`` (it then becomes [..., K]); axis 0 or 1 is a 2-D weight's channel axis of length K.
    """
    if not v.is_initializer() or v.const_value is None:
        return f"{v.name} is not an initializer"
    if v.is_graph_input() or v.is_graph_output():
        return f"initializer {v.name} is also a graph input or output"
    if len(v.uses()) != 1:
        return f"initializer {v.name} has {len(v.uses())} uses"
    if v.const_value.dtype not in _FLOATS:
        return f"initializer {v.name} is {v.const_value.dtype}, not float"
    shape = tuple(int(d) for d in v.const_value.shape)
    if axis == -1:
        ok = (len(shape) > 0 and shape[-1] == k) or (not strict and (len(shape) == 0 or shape[-1] == 1))
    else:
        ok = len(shape) == 2 and shape[axis] == k
    return None if ok else f"initializer {v.name} has shape {list(shape)}, no axis of K = {k} channels"


# -- numerics --------------------------------------------------------------------------------------


def _check_scales(name: str, s) -> np.ndarray:
    s = np.asarray(s, dtype=np.float64)
    if s.ndim != 1 or not np.isfinite(s).all() or (s <= 0).any():
        raise ValueError(f"scales for {name} must be a 1-D array of finite positive values")
    return s


def _awq_scales(base: np.ndarray, alpha: float) -> np.ndarray:
    """s = base^α normalized so that sqrt(max s · min s) = 1 (α = 0 gives exactly 1)."""
    s = base**alpha
    return s / math.sqrt(float(s.max()) * float(s.min()))


def _scale_axis(a: np.ndarray, s: np.ndarray, axis: int, power: int) -> np.ndarray:
    f = s if power > 0 else 1.0 / s
    if axis != -1:
        shape = [1] * a.ndim
        shape[axis] = len(s)
        f = f.reshape(shape)
    return (a.astype(np.float64) * f).astype(a.dtype)


def _h_trace(d: np.ndarray, h: np.ndarray) -> float:
    """tr(D H Dᵀ) for D [n, K] float32 and H [K, K] float32, summed in float64."""
    return float(np.einsum("nk,nk->", d @ h, d, dtype=np.float64))


def _scaled_error(w: np.ndarray, s: np.ndarray, fmt: WeightFormat, h: np.ndarray, diag: np.ndarray) -> float:
    """tr(D H Dᵀ) with D = W - Q(W S) S⁻¹, Q round-to-nearest in ``fmt`` weighted by diag(H')."""
    q = fmt.quantize((w * s).astype(np.float32), importance=diag / (s * s))
    d = (w - q.dequantize() / s).astype(np.float32)
    return _h_trace(d, h)


# -- statistics ------------------------------------------------------------------------------------


def scaled_stats(stats: CalibrationStats, scales: Mapping[str, np.ndarray],
                 model_hash: str | None = None) -> CalibrationStats:
    """The statistics of the scaled model, without recalibrating.

    For every target whose activation a was scaled to a' = a S⁻¹ (``scales``: activation name -> s):
    H' = S⁻¹ H S⁻¹, sq' = sq / s², absmean' = absmean / s (new read-only arrays, shared again between
    the targets that shared the originals). Every other entry is the same object as in ``stats``; nothing
    is modified. ``model_hash`` names the scaled model (default: the original's, so do not save the
    result over the original stats file).
    """
    made: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    tensors: dict[str, TensorStats] = {}
    for name, ts in stats.tensors.items():
        s = scales.get(ts.activation) if ts.activation else None
        if s is None:
            tensors[name] = ts
            continue
        s = _check_scales(ts.activation, s)
        if s.shape != (ts.k,):
            raise ValueError(f"scales for {ts.activation}: {s.shape[0]} values, but {name} has K = {ts.k}")
        key = (id(ts.H), id(ts.sq), id(ts.absmean))
        if key not in made:
            inv = 1.0 / s
            arrays = (np.asarray(ts.H, np.float64) * np.outer(inv, inv),
                      np.asarray(ts.sq, np.float64) * (inv * inv),
                      np.asarray(ts.absmean, np.float64) * inv)
            for x in arrays:
                x.flags.writeable = False
            made[key] = arrays
        tensors[name] = TensorStats(name, ts.k, ts.rows, *made[key], ts.activation)
    return CalibrationStats(model_hash or stats.model_hash, stats.n_samples, tensors)
