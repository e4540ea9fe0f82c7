"""Fuse decoder attention over the KV cache into ``qcompile::CausalAttention``; keep the cache in place.

**The math.** With Q [B, H, S, Dh] (the S new positions, rotated), K/V [B, KV, S, Dh] (new keys and
values) and the past P positions K_past/V_past [B, KV, P, Dh], a decoder layer computes::

    K_all = Concat(K_past, K, axis=2)                       (= present.key, a graph output)
    K_rep = repeat_kv(K_all)                                 GQA: each of the KV heads serves H/KV
                                                             query heads (Unsqueeze -> Expand -> Reshape)
    Y     = Softmax(Q · K_repᵀ · scale + mask) · V_rep       scale: Mul(c) or Div(1/c), or none (1)

and ``mask[t, s] = 0 if s <= P + t else (a very negative number)``: the causal mask. That whole
subgraph is :class:`CausalAttention`'s pattern; it becomes (see :mod:`qcompile.passes.qops`)::

    Y = qcompile::CausalAttention(Q, K, V, K_past, V_past; num_heads=H, num_kv_heads=KV, scale)

whose kernel reads past keys from K_past and new keys from K (no concatenated copy), computes the
mask from indices and the key head of query head h as h // (H/KV) (no expanded copy). The rule
accepts the mask only if it is causal: the mask's subgraph must read graph inputs through ``Shape``
only, and evaluated (onnxruntime) at a few (P, S) it must equal the causal mask.

**The in-place cache** (:class:`KVCachePass`, after the rewrite). If every past input of the graph
feeds only CausalAttention ops, the Concat that makes its ``present`` output, and ``Shape`` nodes, the
model's interface changes from "past in, past + new out" to preallocated buffers::

    past_key_values.{i}.key/.value  [B, KV, cache_capacity, Dh]  buffers; positions [0, P) are valid
    past_positions                  int64 [P]   arange(P): only its length is read (it carries the
                                                symbolic P, as the past's dim did)
    present.{i}.key/.value          [B, KV, cache_capacity, Dh]  the same buffers, with positions
                                                [P, P + S) written

    present = qcompile::CacheUpdate(past, K, past_positions)     (replaces each Concat)
    Y       = qcompile::CausalAttention(Q, K, V, K_cache, V_cache, past_positions)
    Shape(past)  ->  Concat(Shape(past)[0:2], Shape(past_positions), Shape(past)[3:4])

The lowering updates the buffer in place (``call_tir_inplace``: the past input is dead after its
update), so ``present`` *is* the input buffer: the runtime allocates every buffer once per generation
(capacity = prompt + new tokens) and passes the same buffers at every step. :attr:`KVCachePass.cache`
describes the interface for the artifact's manifest (``manifest["kv_cache"]``).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes import PassResult
from onnx_ir.passes.common import RemoveUnusedNodesPass
from onnxscript.rewriter import _ir_utils, pattern
from onnxscript.rewriter._basics import MatchResult

from . import qops

__all__ = ["CausalAttention", "attention_rules", "KVCachePass", "fuse_attention", "CAPACITY_DIM",
           "PAST_POSITIONS"]

log = logging.getLogger(__name__)

PAST_POSITIONS = "past_positions"
CAPACITY_DIM = "cache_capacity"
_PROBES = ((0, 3), (4, 2), (5, 1))  # (P, S) at which a mask is checked to be causal


def _repeat_kv(op, x, axes, target, shape):
    """transformers' repeat_kv: [B, KV, T, Dh] -> [B, KV, g, T, Dh] -> [B, KV·g, T, Dh]."""
    return op.Reshape(op.Expand(op.Unsqueeze(x, axes), target), shape)


def _scaled(op, x, scale, tag: str):
    return pattern.OrValue([op.Mul(x, scale), op.Div(x, scale), x], tag_var=tag, tag_values=["Mul", "Div", "None"])


class CausalAttention(pattern.RewriteRuleClassBase):
    """softmax(Q·Kᵀ·scale + causal mask)·V over Concat(past, new), with or without GQA repeats.

    Forms: our frontend's (scores scaled); torch.onnx / optimum exports of transformers (Q and Kᵀ each
    scaled by √scale, Kᵀ possibly through a 3-D reshape, repeat shapes computed from ``Shape``, a NaN
    guard after the softmax, and a mask that also hides the padding keys of ``attention_mask``, which
    then becomes the op's key mask).
    """

    def __init__(self):
        # matched nodes are not removed here: the Concats stay (they make the present outputs), the rest
        # is dead after the rewrite and removed by RemoveUnusedNodesPass
        super().__init__("CausalAttention", remove_nodes=False)
        self._masks: dict[int, tuple[str | None, ir.Value | None]] = {}  # id(mask) -> (problem, key mask)

    def pattern(self, op, query, past_k, k, past_v, v, k_axes, k_target, k_shape, v_axes, v_target,
                v_shape, q_scale, k_scale, qk_scale, mask, nan_fill):
        present_k = op.Concat(past_k, k)  # also the graph's present outputs; axis checked
        present_v = op.Concat(past_v, v)
        key = pattern.OrValue([_repeat_kv(op, present_k, k_axes, k_target, k_shape), present_k],
                              tag_var="key_repeat", tag_values=[True, False])
        value = pattern.OrValue([_repeat_kv(op, present_v, v_axes, v_target, v_shape), present_v],
                                tag_var="value_repeat", tag_values=[True, False])
        key_t = pattern.OrValue([
            op.Transpose(key, perm=[0, 1, 3, 2]),
            op.Reshape(op.Transpose(op.Reshape(key, pattern.ANY_VALUE), perm=[0, 2, 1]), pattern.ANY_VALUE),
        ])
        scores = op.MatMul(_scaled(op, query, q_scale, "q_scaling"), _scaled(op, key_t, k_scale, "k_scaling"))
        probs = op.Softmax(op.Add(_scaled(op, scores, qk_scale, "scaling"), mask), axis=-1)
        probs = pattern.OrValue([op.Where(op.IsNaN(probs), nan_fill, probs), probs],
                                tag_var="nan_guard", tag_values=[True, False])
        return op.MatMul(probs, value)

    def check(self, context, query, past_k, k, past_v, v, mask, key_repeat, value_repeat, nan_guard,
              **bindings) -> MatchResult:
        result = MatchResult()
        model = context.model
        kv, dh = _dim(past_k, 1), _dim(past_k, 3)
        if kv is None or dh is None or (_dim(past_v, 1), _dim(past_v, 3)) != (kv, dh):
            return result.fail("the past keys/values need static heads and head size", past_k)
        past_dim = _sym(past_k, 2)
        if past_dim is None or _sym(past_v, 2) != past_dim:
            return result.fail("the past length is not one symbolic dim", past_k)
        for past, new in ((past_k, k), (past_v, v)):
            concat = next(u.node for u in past.uses() if u.node.op_type == "Concat" and u.idx == 0
                          and len(u.node.inputs) == 2 and u.node.inputs[1] is new)
            if concat.attributes.get_int("axis") not in (2, -2):
                return result.fail("past and new keys/values must be concatenated on the sequence axis", concat)
        heads = {_dim(query, 1)} - {None}
        present = {}
        for past, new in ((past_k, k), (past_v, v)):
            (present[past],) = (u.node.outputs[0] for u in past.uses() if u.node.op_type == "Concat"
                                and u.idx == 0 and u.node.inputs[1] is new)
        known = {x: (lambda p, s: (s, kv, p + s, dh)) for x in present.values()}
        for tag, prefix in ((key_repeat, "k"), (value_repeat, "v")):
            if not tag:
                heads.add(kv)
                continue
            axes = _ir_utils.get_numpy_value(bindings[f"{prefix}_axes"])
            if axes is None or axes.tolist() not in ([2], [-3]):
                return result.fail("repeat_kv must unsqueeze axis 2", bindings[f"{prefix}_axes"])
            try:  # the repeat's shapes at P = 4, S = 2: [B, KV, g, 6, Dh] and [B, KV·g, 6 | -1, Dh]
                target = _ShapeProgram(model, bindings[f"{prefix}_target"], past_dim, known=known)(4, 2)
                shape = _ShapeProgram(model, bindings[f"{prefix}_shape"], past_dim, known=known)(4, 2)
            except _NotEvaluable as e:
                return result.fail(f"repeat_kv shapes: {e}", bindings[f"{prefix}_shape"])
            if target.shape != (5,) or target[1] not in (kv, 1, -1) or target[4] not in (dh, 1, -1) or \
                    shape.shape != (4,) or shape[3] not in (dh, -1) or shape[1] != kv * target[2]:
                return result.fail(f"repeat_kv shapes {target.tolist()} -> {shape.tolist()} do not repeat "
                                   f"{kv} heads", bindings[f"{prefix}_shape"])
            heads.add(int(shape[1]))
        if len(heads) != 1 or next(iter(heads)) % kv:
            return result.fail(f"query heads {sorted(heads)} do not agree or are not a multiple of {kv}", query)
        self._heads, self._kv = next(iter(heads)), kv
        self._scale = 1.0
        for tag, name in (("q_scaling", "q_scale"), ("k_scaling", "k_scale"), ("scaling", "qk_scale")):
            if bindings.get(tag, "None") == "None":
                continue
            c = _ir_utils.get_singleton_value(bindings[name])
            if c is None:
                return result.fail(f"the {name} is not a constant scalar", bindings[name])
            self._scale *= float(c) if bindings[tag] == "Mul" else 1.0 / float(c)
        if nan_guard and _ir_utils.get_singleton_value(bindings["nan_fill"]) != 0:
            return result.fail("the softmax NaN guard must fill zeros", bindings["nan_fill"])
        if id(mask) not in self._masks:
            self._masks[id(mask)] = _mask_kind(model, mask, past_dim)
        why, self._key_mask = self._masks[id(mask)]
        if why:
            return result.fail(why, mask)
        return result

    def rewrite(self, op, query, past_k, k, past_v, v, **_):
        extra = [None, self._key_mask] if self._key_mask is not None else []
        return op.CausalAttention(query, k, v, past_k, past_v, *extra, num_heads=self._heads,
                                  num_kv_heads=self._kv, scale=self._scale, _domain=qops.DOMAIN)


def _dim(value: ir.Value, axis: int) -> int | None:
    shape = value.shape
    if shape is None or shape.rank() <= axis or not isinstance(shape[axis], int):
        return None
    return shape[axis]


def _sym(value: ir.Value, axis: int) -> str | None:
    shape = value.shape
    if shape is None or shape.rank() <= axis or isinstance(shape[axis], int):
        return None
    return shape[axis].value


KEY_MASK_INPUT = "attention_mask"
"""The one graph input whose values a mask may read: transformers' key padding mask [B, P + S]."""


POSITIONS_INPUT = "position_ids"
"""A graph input a mask may read too: fed as arange(P, P + S) (an unpadded sequence, as generate() does)."""


class _NotEvaluable(Exception):
    pass


class _ShapeProgram:
    """A value of the model that depends on the graph inputs' shapes only (and, if allowed, on the values
    of :data:`KEY_MASK_INPUT`), cut out with its producers and run by onnxruntime at chosen (P, S).

    Every symbolic dim is S (batch included: what is checked must not depend on it), but the past's
    (P) and the key mask's length (P + S). ``known`` values (e.g. the concatenated keys, whose shape is
    known but whose values come from the model's data) become inputs of that shape: (p, s) -> shape.
    """

    def __init__(self, model: ir.Model, value: ir.Value, past_dim: str, key_mask: bool = False,
                 known: dict | None = None):
        self.known = known or {}
        forced: set = set()  # computed tensors whose values (not only shapes) the result depends on
        for _ in range(64):
            nodes, inputs, standins = self._cut(model, value, forced)
            relevant = _value_relevant(nodes, value)
            if not (standins & relevant):
                break
            forced |= standins & relevant
        else:
            raise _NotEvaluable("depends on too many computed tensors")
        self.reads_key_mask = False
        for v in inputs - standins - set(self.known):
            if v in relevant and v.name != POSITIONS_INPUT:  # positions: fed as arange(P, P + S)
                if not (key_mask and v.name == KEY_MASK_INPUT and v.shape is not None and v.shape.rank() == 2):
                    raise _NotEvaluable(f"reads the values of input {v.name} (only its shape may be read)")
                self.reads_key_mask = True
        members = {id(n) for n in nodes}
        self.inputs, self.past_dim = sorted(inputs, key=lambda v: v.name), past_dim
        mask_input = next((v for v in model.graph.inputs if v.name == KEY_MASK_INPUT), None)
        self.total_dim = _sym(mask_input, 1) if mask_input is not None else None
        order = [n for n in model.graph if id(n) in members]  # topological
        try:
            import onnxruntime as ort  # noqa: PLC0415

            proto = _cut_model(order, self.inputs, value, model.opset_imports.get("", 17))
            self.session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception as e:  # noqa: BLE001 - what cannot be cut out and compiled is not evaluable
            raise _NotEvaluable(f"{type(e).__name__}: {e}") from e

    def _cut(self, model: ir.Model, value: ir.Value, forced: set) -> tuple[list, set, set]:
        """(producers of ``value``, the inputs they read, stand-ins: computed tensors of a shape known in
        the input dims, cut off unless ``forced``)."""
        dims = {d.value for v in model.graph.inputs for d in (v.shape or []) if not isinstance(d, int)}
        nodes, inputs, standins, seen, stack = [], set(), set(), set(), [value]
        graph_inputs = set(model.graph.inputs) | set(self.known)
        while stack:
            v = stack.pop()
            if v in graph_inputs:
                inputs.add(v)
                continue
            if v is not value and v not in forced and v.shape is not None and v.dtype is not None and all(
                    isinstance(d, int) or d.value in dims for d in v.shape):
                inputs.add(v)
                standins.add(v)
                continue
            node = v.producer()
            if node is None or id(node) in seen:
                continue
            if node.domain not in ("", "ai.onnx"):
                raise _NotEvaluable(f"computed by {node.domain}::{node.op_type}")
            seen.add(id(node))
            nodes.append(node)
            stack.extend(x for x in node.inputs if x is not None)
        return nodes, inputs, standins

    def __call__(self, p: int, s: int, key_mask: np.ndarray | None = None) -> np.ndarray:
        feeds = {}
        for v in self.inputs:
            if v in self.known:
                feeds[v.name] = np.zeros(self.known[v](p, s), v.dtype.numpy())
                continue
            if v.name == POSITIONS_INPUT:
                feeds[v.name] = np.broadcast_to(np.arange(p, p + s), (s, s)).astype(v.dtype.numpy())
                continue
            if v.name == KEY_MASK_INPUT and self.reads_key_mask:
                feeds[v.name] = key_mask.astype(v.dtype.numpy())
                continue
            shape = [d if isinstance(d, int) else p if d.value == self.past_dim else
                     p + s if d.value == self.total_dim else s for d in v.shape]
            feeds[v.name] = np.zeros(shape, v.dtype.numpy())
        try:
            return self.session.run(None, feeds)[0]
        except Exception as e:  # noqa: BLE001
            raise _NotEvaluable(f"{type(e).__name__}: {e}") from e


_SHAPE_ARGS = {"Expand": (1,), "Reshape": (1,), "ConstantOfShape": (0,), "Tile": (1,), "Slice": (1, 2, 3, 4),
               "Range": (0, 1, 2), "Pad": (1,), "Unsqueeze": (1,), "Squeeze": (1,), "Split": (1,), "TopK": (1,),
               "OneHot": (1,), "NonZero": (0,), "Compress": (1,), "Resize": (1, 2, 3), "Upsample": (1,)}
"""Inputs (by position) whose values, not only shapes, set an op's output shape; other ops' output
shapes follow from their inputs' shapes alone."""


def _value_relevant(nodes: list[ir.Node], output: ir.Value) -> set:
    """The values among ``nodes``' inputs whose contents (not only their shapes) ``output`` depends on.

    Two kinds of dependence are followed: on a value's contents, and on its shape alone (through
    ``Shape``); a shape depends on the contents of an op's shape arguments (:data:`_SHAPE_ARGS`:
    Expand's target, Reshape's shape, ...) and on the shapes of its other inputs."""
    producers = {id(n) for n in nodes}
    relevant, shaped = {output}, set()
    stack = [(output, True)]
    while stack:
        value, contents = stack.pop()
        node = value.producer()
        if node is None or id(node) not in producers:
            continue
        for i, x in enumerate(node.inputs):
            if x is None:
                continue
            if contents and node.op_type != "Shape" or not contents and i in _SHAPE_ARGS.get(node.op_type, ()):
                if x not in relevant:
                    relevant.add(x)
                    stack.append((x, True))
            elif x not in relevant and x not in shaped:
                shaped.add(x)
                stack.append((x, False))
    return relevant


def _mask_kind(model: ir.Model, mask: ir.Value, past_dim: str) -> tuple[str | None, ir.Value | None]:
    """(why ``mask`` is not causal, or None; the key mask input it also applies, or None).

    The mask must equal the causal mask of (P, S) — query t sees keys s <= P + t — at a few (P, S), and,
    if it reads :data:`KEY_MASK_INPUT` [B, P + S], additionally hide exactly the keys where that is 0
    (random masks); hidden entries must be <= -1e30 (finite lowest or -inf) and visible ones 0.
    """
    try:
        program = _ShapeProgram(model, mask, past_dim, key_mask=True)
        rng = np.random.default_rng(0)
        for p, s in _PROBES:
            causal = np.arange(p + s)[None, :] <= (p + np.arange(s))[:, None]
            if program.reads_key_mask:
                km = (rng.random((s, p + s)) < 0.7).astype(np.int64)
                want = causal[None] & (km[:, None, :] != 0)  # [B = S, S, P + S]
                got = program(p, s, km)
                if got.ndim < 3 or got.shape[0] != s or got.shape[-2:] != causal.shape:
                    return f"the mask at P={p}, S={s} has shape {list(got.shape)}", None
                got, want = got.reshape(s, -1, *causal.shape), want[:, None]
            else:
                got, want = program(p, s), causal
                if got.shape[-2:] != causal.shape:
                    return f"the mask at P={p}, S={s} has shape {list(got.shape)}", None
                got, want = got.reshape(-1, *causal.shape), want[None]
            want = np.broadcast_to(want, got.shape)
            if not (np.all(got[want] == 0) and np.all(got[~want] <= -1e30)):
                return f"the mask at P={p}, S={s} is not causal" + (" and padding" if program.reads_key_mask else ""), None
    except _NotEvaluable as e:
        return f"the mask {e}", None
    key_mask = next((v for v in program.inputs if v.name == KEY_MASK_INPUT), None) if program.reads_key_mask else None
    return None, key_mask


def _cut_model(nodes: list[ir.Node], inputs: list[ir.Value], output: ir.Value, opset: int) -> onnx.ModelProto:
    from onnx_ir import serde  # noqa: PLC0415

    protos, inits, done = [], [], set()
    for node in nodes:
        protos.append(serde.serialize_node(node))
        for v in node.inputs:
            if v is not None and v.is_initializer() and v.name not in done:
                inits.append(serde.serialize_tensor(v.const_value))
                done.add(v.name)
    graph = onnx.helper.make_graph(protos, "cut", [serde.serialize_value(v) for v in inputs],
                                   [onnx.ValueInfoProto(name=output.name)], inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=8)


def attention_rules() -> pattern.RewriteRuleSet:
    return pattern.RewriteRuleSet([CausalAttention.rule()])


@dataclass
class CacheLayer:
    key: str  # the input buffer (its output has the ``present`` name)
    value: str
    key_out: str
    value_out: str


@dataclass
class CacheInterface:
    """What the runtime must allocate: ``manifest["kv_cache"]``."""

    past_positions: str = PAST_POSITIONS
    capacity_dim: str = CAPACITY_DIM
    num_kv_heads: int = 0
    head_dim: int = 0
    dtype: str = "float32"
    layers: list[CacheLayer] = field(default_factory=list)

    def to_manifest(self) -> dict:
        return {"layout": "batch, kv_heads, capacity, head_dim", "past_positions": self.past_positions,
                "capacity_dim": self.capacity_dim, "num_kv_heads": self.num_kv_heads, "head_dim": self.head_dim,
                "dtype": self.dtype, "layers": [vars(layer) for layer in self.layers]}


class KVCachePass(ir.passes.InPlacePass):
    """Turn the past/present interface of fused attention into preallocated in-place buffers."""

    def __init__(self):
        super().__init__()
        self.cache: CacheInterface | None = None

    def call(self, model: ir.Model) -> PassResult:
        graph = model.graph
        attention = [n for n in graph if n.domain == qops.DOMAIN and n.op_type == qops.ATTENTION]
        if not attention:
            return PassResult(model, False)
        why = self._problem(model, attention)
        if why:
            log.info("attention fused, KV cache left as past/present tensors: %s", why)
            return PassResult(model, False)
        pasts = {n.inputs[i] for n in attention for i in (3, 4)}
        first = next(iter(pasts))
        past_dim = first.shape[2]
        positions = ir.Value(name=PAST_POSITIONS, type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([past_dim]))
        graph.inputs.append(positions)
        interface = CacheInterface(num_kv_heads=_dim(first, 1), head_dim=_dim(first, 3))
        outputs = {v.name: v for v in graph.outputs}
        for past in pasts:
            b, kv, _, dh = past.shape
            past.shape = ir.Shape([b, kv, CAPACITY_DIM, dh])
            for use in list(past.uses()):
                node = use.node
                if node.op_type == "Concat":
                    self._replace_concat(graph, node, past, positions)
                elif node.op_type == "Shape":
                    self._replace_shape(graph, node, past, positions)
        for node in attention:
            if len(node.inputs) < 6:
                node.resize_inputs(6)
            node.replace_input_with(5, positions)
        layers = {}
        for past in pasts:
            (present,) = [u.node.outputs[0] for u in past.uses() if u.node.op_type == qops.CACHE_UPDATE]
            layer, kind = _layer_key(past.name)
            layers.setdefault(layer, {})[kind] = (past.name, outputs[present.name].name)
        for layer in sorted(layers):
            (k_in, k_out), (v_in, v_out) = layers[layer]["key"], layers[layer]["value"]
            interface.layers.append(CacheLayer(k_in, v_in, k_out, v_out))
        self.cache = interface
        log.info("KV cache in place: %d layers, buffers [batch, %d, %s, %d]", len(interface.layers),
                 interface.num_kv_heads, CAPACITY_DIM, interface.head_dim)
        return PassResult(model, True)

    @staticmethod
    def _problem(model: ir.Model, attention: list[ir.Node]) -> str | None:
        graph = model.graph
        inputs, outputs = set(graph.inputs), set(graph.outputs)
        pasts = {n.inputs[i] for n in attention for i in (3, 4)}
        if not pasts <= inputs:
            return "an attention's past is not a graph input"
        shapes = {(_dim(p, 1), _dim(p, 3), p.dtype) for p in pasts}
        if len(shapes) != 1 or None in next(iter(shapes)) or next(iter(shapes))[2] != ir.DataType.FLOAT:
            return f"the past inputs differ in heads, head size or dtype (float32 expected): {shapes}"
        if len({p.shape[2] for p in pasts}) != 1 or _sym(next(iter(pasts)), 2) is None:
            return "the past inputs do not share one symbolic length"
        if any(_layer_key(p.name) is None for p in pasts):
            return "the past inputs are not named past_key_values.{i}.key/.value"
        if any(v.name == PAST_POSITIONS for v in graph.inputs):
            return f"the model already has an input {PAST_POSITIONS}"
        for past in pasts:
            concats = 0
            for use in past.uses():
                node = use.node
                if node.op_type == "Concat" and use.idx == 0 and len(node.inputs) == 2 and \
                        node.attributes.get_int("axis") in (2, -2) and node.outputs[0] in outputs:
                    concats += 1
                elif node.op_type == "Shape":
                    pass
                elif node in attention and use.idx in (3, 4):
                    pass
                else:
                    return f"past input {past.name} is also read by {node.op_type} {node.name}"
            if concats != 1:
                return f"past input {past.name} has {concats} present outputs (one expected)"
        return None

    @staticmethod
    def _replace_concat(graph: ir.Graph, node: ir.Node, past: ir.Value, positions: ir.Value) -> None:
        old = node.outputs[0]
        update = ir.node(qops.CACHE_UPDATE, [past, node.inputs[1], positions], domain=qops.DOMAIN,
                         name=f"{node.name}/cache_update", num_outputs=1)
        new = update.outputs[0]
        new.shape, new.type = ir.Shape(past.shape), ir.TensorType(past.dtype)
        graph.insert_before(node, update)
        name = old.name
        ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        new.name = name

    @staticmethod
    def _replace_shape(graph: ir.Graph, node: ir.Node, past: ir.Value, positions: ir.Value) -> None:
        """Shape(past)[start:end] keeps meaning [B, KV, P, Dh][start:end] (P from past_positions)."""
        start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", 4)
        axes = range(4)[slice(start, end)]
        prefix = f"{node.name}/logical"
        pieces, new_nodes, run = [], [], []  # runs of the past's own dims, and P, in order

        def flush():
            if run:
                new_nodes.append(ir.node("Shape", [past], attributes={"start": run[0], "end": run[-1] + 1},
                                         name=f"{prefix}_{run[0]}"))
                pieces.append(new_nodes[-1].outputs[0])
                run.clear()

        for axis in axes:
            if axis == 2:
                flush()
                new_nodes.append(ir.node("Shape", [positions], name=f"{prefix}_past"))
                pieces.append(new_nodes[-1].outputs[0])
            else:
                run.append(axis)
        flush()
        if len(pieces) > 1:
            new_nodes.append(ir.node("Concat", pieces, attributes={"axis": 0}, name=prefix))
        graph.insert_before(node, new_nodes)
        ir.convenience.replace_all_uses_with(node.outputs[0], new_nodes[-1].outputs[0])
        graph.remove(node, safe=True)


def _layer_key(name: str) -> tuple[int, str] | None:
    parts = name.split(".")
    if len(parts) == 3 and parts[0] == "past_key_values" and parts[1].isdigit() and parts[2] in ("key", "value"):
        return int(parts[1]), parts[2]
    return None


@dataclass
class FusionResult:
    model: onnx.ModelProto
    attention: int  # fused attention subgraphs
    cache: CacheInterface | None  # the in-place cache interface, or None (past/present tensors)


def fuse_attention(proto: onnx.ModelProto, cache: bool = True) -> FusionResult:
    """Rewrite every causal attention of ``proto`` and (``cache``) move the KV cache in place."""
    model = ir.from_proto(proto)
    count = attention_rules().apply_to_model(model)
    interface = None
    if count:
        model.opset_imports.setdefault(qops.DOMAIN, qops.OPSET)
        RemoveUnusedNodesPass()(model)
        if cache:
            pass_ = KVCachePass()
            pass_(model)
            interface = pass_.cache
            RemoveUnusedNodesPass()(model)
    log.info("fused %d attention subgraphs%s", count, ", KV cache in place" if interface else "")
    return FusionResult(ir.to_proto(model), count, interface)
