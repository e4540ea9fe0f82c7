"""Fuse the elementwise blocks of decoder LLMs into qcompile ops: RMSNorm, rotary embedding, gated MLP.

Each block is 5-12 small ONNX ops that TVM would turn into as many kernels (and as many VM calls per
layer and token); fused, each is one op (see :mod:`qcompile.passes.qops`) with one kernel.

**RMSNorm** (Llama, Qwen2, Gemma with γ = 1 + w folded)::

    y = x · 1/sqrt(mean(x², -1) + ε) · γ          ->  qcompile::RMSNorm(x, γ; epsilon=ε)

x² is ``Mul(x, x)`` or ``Pow(x, 2)``; the mean a ``ReduceMean`` over the last axis (axes as an attribute
before opset 18, as an input after) keeping dims; the inverse ``Reciprocal(Sqrt(·))`` (torch's rsqrt),
``Div(1, Sqrt(·))`` (the TorchScript exporter's) or a ``Div(x, Sqrt(·))``.  γ is any value of shape
[D].  A residual add feeding the norm is folded in too, its sum being the norm's second output (the
residual stream goes on from there)::

    s = a + b;  y = RMSNorm(s, γ)                  ->  y, s = qcompile::AddRMSNorm(a, b, γ; epsilon=ε)

**Rotary embedding**, transformers' non-interleaved form::

    y = x · cos + rotate_half(x) · sin,   rotate_half([x₁, x₂]) = [-x₂, x₁]   (halves of the head dim d)
                                          ->  qcompile::Rotary(x, cos, sin; heads_axis=1)

with x [B, H, S, d] and the halves taken by ``Split`` (our frontend) or two ``Slice`` (torch's
``x[..., :d/2]``, ``x[..., d/2:]``).  cos/sin (gathered by position) broadcast over the heads: [S, d],
[1, S, d] or [B|1, 1, S, d].  When x is ``Transpose(x', perm=[0, 2, 1, 3])`` of the heads split from a
projection and read by nothing else, the transpose is folded in: ``Rotary(x'; heads_axis=2)`` reads
[B, S, H, d] and writes [B, H, S, d].

**Gated activations** of the MLP, down(act(gate(x)) · up(x))::

    SwiGLU  silu(g) · u = g·sigmoid(g) · u                              ->  GatedAct(g, u; activation=silu)
    GeGLU   gelu_tanh(g) · u = g/2·(1 + tanh(√(2/π)(g + 0.044715g³))) · u          (activation=gelu_tanh)
            gelu(g) · u = g/2·(1 + erf(g/√2)) · u                                  (activation=gelu)

silu as ``Mul(g, Sigmoid(g))``; gelu as opset-20 ``Gelu`` (what torch's exporter writes) or spelled out
the way our frontend writes it (:mod:`qcompile.compiler.frontends.decoder`).

Only float32 tensors are fused (casts of float32 to float32 are dropped first); a form not listed here
is left as it is (DEBUG logging names each near match that a ``check`` refused, and why).  Model-local
functions (an exporter's ``Silu``, say) should be inlined first (``onnx_ir.passes.common.InlinePass``)
and shapes inferred; :class:`DecoderFusionPass` does both.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import onnx
import onnx_ir as ir
from onnx_ir.passes import PassResult
from onnx_ir.passes.common import InlinePass, ShapeInferencePass
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter.rules.common import no_op_cast_rule
from onnxscript.rewriter._basics import MatchingTracer, MatchResult, MatchStatus

from . import qops

__all__ = ["AddRMSNormFusion", "DecoderFusionPass", "GatedActFusion", "RMSNormFusion", "RotaryFusion",
           "decoder_fusion_rules",
           "fuse_decoder"]

log = logging.getLogger(__name__)

_GELU_APPROXIMATE = {"tanh": "gelu_tanh", "none": "gelu"}


def _last_dim(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is None or shape.rank() == 0 or not isinstance(shape[-1], int):
        return None
    return shape[-1]


def _is_float32(value: ir.Value) -> bool:
    return value.dtype == ir.DataType.FLOAT


def _ints(value: ir.Value | None) -> list[int] | None:
    array = _ir_utils.get_numpy_value(value)
    return None if array is None else [int(v) for v in array.reshape(-1)]


def _attr(node: ir.Node, name: str, default=None):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


# -- RMSNorm ---------------------------------------------------------------------------------------------


class RMSNormFusion(pattern.RewriteRuleClassBase):
    """x / sqrt(mean(x², -1) + ε) · γ  ->  RMSNorm(x, γ; epsilon=ε)."""

    def __init__(self, square: str, inverse: str):
        super().__init__(f"RMSNorm_{square}_{inverse}")
        self._square, self._inverse = square, inverse

    def pattern(self, op, x, gamma, eps):
        sq = op.Mul(x, x) if self._square == "mul" else op.Pow(x, 2.0)
        mean = op.ReduceMean(sq, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["mean"])
        rms = op.Sqrt(op.Add(mean, eps))
        if self._inverse == "reciprocal":
            normalized = op.Mul(x, op.Reciprocal(rms))
        elif self._inverse == "one_div":
            normalized = op.Mul(x, op.Div(1.0, rms))
        else:
            normalized = op.Div(x, rms)
        return op.Mul(normalized, gamma)

    def check(self, context, x, gamma, eps, mean, **_) -> MatchResult:
        result = MatchResult()
        d = _last_dim(x)
        if not _is_float32(x) or d is None:
            return result.fail("x must be float32 with a static last dim", x)
        if gamma.shape is None or list(gamma.shape) != [d]:
            return result.fail(f"gamma must have shape [{d}]", gamma)
        if not _is_float32(gamma):
            return result.fail("gamma must be float32", gamma)
        if not isinstance(_ir_utils.get_singleton_value(eps), float):
            return result.fail("epsilon must be a float constant", eps)
        reduce = mean.producer()
        axes = _attr(reduce, "axes")
        if axes is None and len(reduce.inputs) > 1:
            axes = _ints(reduce.inputs[1])
        rank = x.shape.rank()
        if axes is None or [a % rank for a in axes] != [rank - 1]:
            return result.fail(f"ReduceMean must reduce the last axis only (axes {axes})", mean)
        if _attr(reduce, "keepdims", 1) != 1:
            return result.fail("ReduceMean must keep dims", mean)
        return result

    def rewrite(self, op, x, gamma, eps, **_):
        return op.RMSNorm(x, gamma, epsilon=float(_ir_utils.get_singleton_value(eps)), _domain=qops.DOMAIN)


class AddRMSNormFusion(pattern.RewriteRuleClassBase):
    """s = a + b; y = RMSNorm(s)  ->  y, s = AddRMSNorm(a, b, γ) (applied after :class:`RMSNormFusion`)."""

    def __init__(self):
        super().__init__("AddRMSNorm")

    def pattern(self, op, a, b, gamma):
        s = op.Add(a, b)
        y = op.RMSNorm(s, gamma, _domain=qops.DOMAIN, _allow_other_attributes=True, _outputs=["y"])
        return y, s

    def check(self, context, a, b, **_) -> MatchResult:
        result = MatchResult()
        if not (_is_float32(a) and _is_float32(b)):
            return result.fail("the residual add must be float32", a)
        if a.shape is None or b.shape is None or a.shape.rank() != b.shape.rank():
            return result.fail("the residual add's operands need shapes of one rank", a)
        for x, z in zip(a.shape, b.shape):
            static = isinstance(x, int) and isinstance(z, int)
            if (static and x != z) or (not static and 1 in (x, z)):
                return result.fail("the residual add must not broadcast", b)
        return result

    def rewrite(self, op, a, b, gamma, y, **_):
        eps = y.producer().attributes["epsilon"].value
        return op.AddRMSNorm(a, b, gamma, epsilon=eps, _domain=qops.DOMAIN, _outputs=2)


# -- rotary embedding ----------------------------------------------------------------------------------------


class RotaryFusion(pattern.RewriteRuleClassBase):
    """x·cos + rotate_half(x)·sin  ->  Rotary(x, cos, sin; heads_axis), x optionally still [B, S, H, d]."""

    def __init__(self, halves: str, heads_axis: int):
        super().__init__(f"Rotary_{halves}_heads{heads_axis}")
        self._halves, self._heads_axis = halves, heads_axis

    def pattern(self, op, x, cos, sin):
        xt = op.Transpose(x, perm=[0, 2, 1, 3]) if self._heads_axis == 2 else x
        if self._halves == "split":
            x1, x2 = op.Split(xt, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["x1", "x2"])
        else:
            x1 = op.Slice(xt, _allow_other_inputs=True, _outputs=["x1"])
            x2 = op.Slice(xt, _allow_other_inputs=True, _outputs=["x2"])
        rotated = op.Concat(op.Neg(x2), x1, _allow_other_attributes=True, _outputs=["rotated"])
        return op.Add(op.Mul(xt, cos), op.Mul(rotated, sin))

    def check(self, context, x, cos, sin, x1, x2, rotated, **_) -> MatchResult:
        result = MatchResult()
        shape = x.shape
        if not _is_float32(x) or shape is None or shape.rank() != 4:
            return result.fail("x must be a float32 tensor of rank 4", x)
        d = shape[3]
        if not isinstance(d, int) or d % 2:
            return result.fail("x needs an even static head dim", x)
        half = d // 2
        seq = shape[3 - self._heads_axis]
        if _attr(rotated.producer(), "axis") not in (-1, 3):
            return result.fail("rotate_half must concatenate along the last axis", rotated)
        why = self._split_problem(x1, x2, half) if self._halves == "split" else self._slice_problem(x1, x2, half, d)
        if why:
            return result.fail(why, x1)
        for table in (cos, sin):
            why = _table_problem(table, seq, d)
            if why:
                return result.fail(why, table)
        return result

    @staticmethod
    def _split_problem(x1: ir.Value, x2: ir.Value, half: int) -> str | None:
        split = x1.producer()
        if len(split.outputs) != 2 or _attr(split, "axis", 0) not in (-1, 3):
            return "the halves must be a 2-way Split along the last axis"
        sizes = _ints(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
        sizes = sizes if sizes is not None else _attr(split, "split")
        if sizes is not None and list(sizes) != [half, half]:
            return f"the halves must be {half} wide, found {list(sizes)}"
        return None

    @staticmethod
    def _slice_problem(x1: ir.Value, x2: ir.Value, half: int, d: int) -> str | None:
        first, second = x1.producer(), x2.producer()
        for node, (lo, hi_ok) in ((first, (0, lambda e: e == half)), (second, (half, lambda e: e >= d))):
            ins = list(node.inputs) + [None] * (5 - len(node.inputs))
            starts, ends, axes, steps = (_ints(v) if v is not None else None for v in ins[1:5])
            if starts != [lo] or ends is None or len(ends) != 1 or not hi_ok(ends[0]):
                return f"the halves must be slices [0, {half}) and [{half}, {d})"
            if axes is None or axes[0] not in (-1, 3) or (ins[4] is not None and steps != [1]):
                return "the halves must be unit-step slices of the last axis"
        return None

    def rewrite(self, op, x, cos, sin, **_):
        return op.Rotary(x, cos, sin, heads_axis=self._heads_axis, _domain=qops.DOMAIN)


def _table_problem(table: ir.Value, seq, d: int) -> str | None:
    """Why ``table`` (cos or sin) is not [S, d], [1, S, d] or [B|1, 1, S, d] for x's S and d, or None."""
    shape = table.shape
    if not _is_float32(table) or shape is None:
        return "cos/sin must be float32 with a known shape"
    dims = list(shape)
    ok = (len(dims) == 2 or (len(dims) == 3 and dims[0] == 1) or (len(dims) == 4 and dims[1] == 1))
    if not ok or dims[-1] != d:
        return f"cos/sin must be [S, {d}], [1, S, {d}] or [B, 1, S, {d}], found {dims}"
    if dims[-2] == 1 and seq != 1:
        return "cos/sin broadcast along the sequence"
    return None


# -- gated activations -----------------------------------------------------------------------------------


def _silu(op, g, sigmoid_first: bool):
    return op.Mul(op.Sigmoid(g), g) if sigmoid_first else op.Mul(g, op.Sigmoid(g))


def _gelu_op(op, g):
    return op.Gelu(g, _allow_other_attributes=True, _outputs=["gelu"])


def _frontend_gelu_tanh(op, g):
    """g/2 · (1 + tanh(√(2/π)·(g + 0.044715·g³))), as :mod:`qcompile.compiler.frontends.decoder` writes it."""
    cube = op.Mul(op.Mul(g, g), g)
    inner = op.Mul(op.Add(g, op.Mul(cube, 0.044715)), 0.7978845608028654)
    return op.Mul(op.Mul(g, 0.5), op.Add(op.Tanh(inner), 1.0))


def _frontend_gelu(op, g):
    """g/2 · (1 + erf(g/√2)), as :mod:`qcompile.compiler.frontends.decoder` writes it."""
    return op.Mul(op.Mul(g, 0.5), op.Add(op.Erf(op.Mul(g, 0.7071067811865476)), 1.0))


_ACT_FORMS: dict[str, tuple[str | None, Callable]] = {
    # form -> (activation, or None when the matched node says; pattern of act(g))
    "silu": ("silu", lambda op, g: _silu(op, g, False)),
    "silu_sigmoid_first": ("silu", lambda op, g: _silu(op, g, True)),
    "gelu_op": (None, _gelu_op),
    "gelu_tanh": ("gelu_tanh", _frontend_gelu_tanh),
    "gelu_erf": ("gelu", _frontend_gelu),
}


class GatedActFusion(pattern.RewriteRuleClassBase):
    """act(gate) · up  ->  GatedAct(gate, up; activation)."""

    def __init__(self, form: str, up_first: bool):
        super().__init__(f"GatedAct_{form}{'_up_first' if up_first else ''}")
        self._form, self._up_first = form, up_first
        self._activation, self._act = _ACT_FORMS[form]

    def pattern(self, op, gate, up):
        act = self._act(op, gate)
        return op.Mul(up, act) if self._up_first else op.Mul(act, up)

    def check(self, context, gate, up, **bindings) -> MatchResult:
        result = MatchResult()
        if not (_is_float32(gate) and _is_float32(up)):
            return result.fail("gate and up must be float32", gate)
        if gate.shape is None or up.shape is None or gate.shape.rank() != up.shape.rank():
            return result.fail("gate and up need shapes of one rank", gate)
        n = _last_dim(gate)
        if n is None or _last_dim(up) != n:
            return result.fail("gate and up need the same static last dim", up)
        for a, b in zip(gate.shape, up.shape):
            if isinstance(a, int) and isinstance(b, int) and a != b:
                return result.fail("gate and up must not broadcast", up)
        if self._activation is None and self._gelu_activation(bindings["gelu"]) is None:
            return result.fail("Gelu's approximate must be 'none' or 'tanh'", bindings["gelu"])
        return result

    @staticmethod
    def _gelu_activation(gelu: ir.Value) -> str | None:
        approximate = _attr(gelu.producer(), "approximate", "none")
        return _GELU_APPROXIMATE.get(approximate)

    def rewrite(self, op, gate, up, **bindings):
        activation = self._activation or self._gelu_activation(bindings["gelu"])
        return op.GatedAct(gate, up, activation=activation, _domain=qops.DOMAIN)


# -- the rule sets and the pass ------------------------------------------------------------------------------


def decoder_fusion_rules() -> dict[str, pattern.RewriteRuleSet]:
    """One rule set per fused op (keyed by the op's name), each with the forms it recognises.

    RMSNorm and rotary rules are tried with their commutative operands in both orders; the gated
    activations list their orders explicitly (commuting every product of a gelu would make hundreds).
    The sets apply in order: AddRMSNorm rewrites RMSNorm ops (the RMSNorm count includes them).
    """
    rms = [RMSNormFusion.rule(square, inverse)
           for square in ("mul", "pow") for inverse in ("reciprocal", "one_div", "div")]
    # the transposed-input form first: when it matches, the Transpose is folded in too
    rotary = [RotaryFusion.rule(halves, axis) for axis in (2, 1) for halves in ("split", "slice")]
    gated = [GatedActFusion.rule(form, up_first) for form in _ACT_FORMS for up_first in (False, True)]
    return {
        qops.RMSNORM: pattern.RewriteRuleSet(rms, commute=True),
        qops.ADD_RMSNORM: pattern.RewriteRuleSet([AddRMSNormFusion.rule()]),
        qops.ROTARY: pattern.RewriteRuleSet(rotary, commute=True),
        qops.GATED_ACT: pattern.RewriteRuleSet(gated),
    }


class DecoderFusionPass(ir.passes.InPlacePass):
    """Rewrite RMSNorm, rotary and gated-activation blocks into qcompile ops (in place).

    ``counts`` holds the number of rewrites per op after the pass ran.  Model-local functions are
    inlined first, and shapes inferred (the checks need them; shapes the model already records, such as
    those of qcompile ops' outputs, are kept).
    """

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> PassResult:
        inlined = False
        if model.functions:
            inlined = InlinePass()(model).modified
        ShapeInferencePass()(model)
        # the TorchScript exporter casts float32 to float32 around every norm (transformers' .to(float32))
        pattern.RewriteRuleSet([no_op_cast_rule]).apply_to_model(model)
        self.counts = {}
        for name, rules in decoder_fusion_rules().items():
            self.counts[name] = rules.apply_to_model(model)
            if log.isEnabledFor(logging.DEBUG):
                _log_near_misses(rules, model)
        if any(self.counts.values()) and qops.DOMAIN not in model.opset_imports:
            model.opset_imports[qops.DOMAIN] = qops.OPSET
        log.info("decoder fusion: %s", ", ".join(f"{n} {name}" for name, n in self.counts.items()))
        return PassResult(model, modified=inlined or any(self.counts.values()))


def _log_near_misses(rules: pattern.RewriteRuleSet, model: ir.Model) -> None:
    """DEBUG: every remaining subgraph that matched a rule's pattern but failed its check, and why."""
    tracer = MatchingTracer()
    rules.apply_to_model(model, tracer=tracer)  # with a tracer nothing is rewritten
    seen = set()  # the commuted variants of a rule report the same miss
    for rule, matches in tracer.best_matches_map.items():
        for m in matches:
            where = m.root_node.name or m.root_node.outputs[0].name
            if m.status == MatchStatus.CONDITION_FAILED and (rule.name, where) not in seen:
                seen.add((rule.name, where))
                log.debug("%s not fused at %s: %s", rule.name, where, m.match_result.reason)


def fuse_decoder(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """:class:`DecoderFusionPass` on a ModelProto: the fused copy and the rewrites per op."""
    ir_model = ir.from_proto(model)
    fusion = DecoderFusionPass()
    fusion(ir_model)
    return ir.to_proto(ir_model), fusion.counts
