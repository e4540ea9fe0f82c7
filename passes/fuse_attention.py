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


class CausalAttention(pattern.RewriteRuleClassBase):
    """softmax(Q·Kᵀ·scale + causal mask)·V over Concat(past, new), with or without GQA repeats."""

    def __init__(self):
        # matched nodes are not removed here: the Concats stay (they make the present outputs), the rest
        # is dead after the rewrite and removed by RemoveUnusedNodesPass
        super().__init__("CausalAttention", remove_nodes=False)
        self._masks: dict[int, str | None] = {}  # id(mask value) -> why it is not causal (None: it is)

    def pattern(self, op, query, past_k, k, past_v, v, k_axes, k_target, k_shape, v_axes, v_target,
                v_shape, qk_scale, mask):
        present_k = op.Concat(past_k, k, axis=2)  # also the graph's present outputs
        present_v = op.Concat(past_v, v, axis=2)
        key = pattern.OrValue([_repeat_kv(op, present_k, k_axes, k_target, k_shape), present_k],
                              tag_var="key_repeat", tag_values=[True, False])
        value = pattern.OrValue([_repeat_kv(op, present_v, v_axes, v_target, v_shape), present_v],
                                tag_var="value_repeat", tag_values=[True, False])
        scores = op.MatMul(query, op.Transpose(key, perm=[0, 1, 3, 2]))
        scores = pattern.OrValue([op.Mul(scores, qk_scale), op.Div(scores, qk_scale), scores],
                                 tag_var="scaling", tag_values=["Mul", "Div", "None"])
        probs = op.Softmax(op.Add(scores, mask), axis=-1)
        return op.MatMul(probs, value)

    def check(self, context, query, past_k, k, past_v, v, mask, key_repeat, value_repeat, scaling,
              **bindings) -> MatchResult:
        result = MatchResult()
        kv, dh = _dim(past_k, 1), _dim(past_k, 3)
        if kv is None or dh is None or (_dim(past_v, 1), _dim(past_v, 3)) != (kv, dh):
            return result.fail("the past keys/values need static heads and head size", past_k)
        heads = set()
        for tag, prefix in ((key_repeat, "k"), (value_repeat, "v")):
            if not tag:
                heads.add(kv)
                continue
            axes = _ir_utils.get_numpy_value(bindings[f"{prefix}_axes"])
            shape = _ir_utils.get_numpy_value(bindings[f"{prefix}_shape"])
            if axes is None or axes.tolist() != [2]:
                return result.fail("repeat_kv must unsqueeze axis 2", bindings[f"{prefix}_axes"])
            if shape is None or shape.shape != (4,) or shape[0] != 0 or shape[3] not in (dh, -1):
                return result.fail("repeat_kv must reshape to a constant [0, H, -1, Dh]", bindings[f"{prefix}_shape"])
            heads.add(int(shape[1]))
        q_heads = _dim(query, 1)
        if q_heads is not None:
            heads.add(q_heads)
        if len(heads) != 1 or next(iter(heads)) % kv:
            return result.fail(f"query heads {sorted(heads)} do not agree or are not a multiple of {kv}", query)
        self._heads, self._kv, self._dh = next(iter(heads)), kv, dh
        self._scale = 1.0
        if scaling != "None":
            c = _ir_utils.get_singleton_value(bindings["qk_scale"])
            if c is None:
                return result.fail("the score scale is not a constant scalar", bindings["qk_scale"])
            self._scale = float(c) if scaling == "Mul" else 1.0 / float(c)
        why = self._mask_problem(context.model, mask, query, past_k)
        if why:
            return result.fail(why, mask)
        return result

    def rewrite(self, op, query, past_k, k, past_v, v, **_):
        return op.CausalAttention(query, k, v, past_k, past_v, num_heads=self._heads, num_kv_heads=self._kv,
                            scale=self._scale, _domain=qops.DOMAIN)

    def _mask_problem(self, model: ir.Model, mask: ir.Value, query: ir.Value, past: ir.Value) -> str | None:
        if id(mask) not in self._masks:
            self._masks[id(mask)] = _causal_mask_problem(model, mask, query, past)
        return self._masks[id(mask)]


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


def _causal_mask_problem(model: ir.Model, mask: ir.Value, query: ir.Value, past: ir.Value) -> str | None:
    """Why ``mask`` is not the causal mask of (P, S) = (past's dim 2, the new positions), or None.

    The mask's producers are cut out as a model of the graph inputs they read (through ``Shape``
    only: a mask computed from input values, e.g. a padding mask, is refused) and run at a few (P, S).
    """
    past_dim = _sym(past, 2)
    if past_dim is None:
        return "the past length is not a symbolic dim"
    nodes, inputs, seen, stack = [], set(), set(), [mask]
    graph_inputs = set(model.graph.inputs)
    while stack:
        value = stack.pop()
        if value in graph_inputs:
            inputs.add(value)
            continue
        node = value.producer()
        if node is None or id(node) in seen:
            continue
        if node.domain not in ("", "ai.onnx"):
            return f"the mask is computed by {node.domain}::{node.op_type}"
        seen.add(id(node))
        nodes.append(node)
        stack.extend(v for v in node.inputs if v is not None)
    members = {id(n) for n in nodes}
    for value in inputs:
        for use in value.uses():
            if id(use.node) in members and use.node.op_type != "Shape":
                return f"the mask reads the values of input {value.name} (only its shape may be read)"
    order = [n for n in model.graph if id(n) in members]  # topological
    try:
        import onnxruntime as ort  # noqa: PLC0415

        proto = _mask_model(order, inputs, mask)
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        for p, s in _PROBES:
            want = np.arange(p + s)[None, :] <= (p + np.arange(s))[:, None]
            got = _probe(sess, inputs, past_dim, p, s)
            if got.shape[-2:] != want.shape:
                return f"the mask at P={p}, S={s} has shape {list(got.shape)}, expected [..., {s}, {p + s}]"
            got = got.reshape(-1, *want.shape)
            if not (np.all(got[:, want] == 0) and np.all(got[:, ~want] <= -1e30)):
                return f"the mask at P={p}, S={s} is not causal"
    except Exception as e:  # noqa: BLE001 - a mask that cannot be evaluated is not proven causal
        return f"the mask could not be evaluated ({type(e).__name__}: {e})"
    return None


def _mask_model(nodes: list[ir.Node], inputs: set[ir.Value], mask: ir.Value) -> onnx.ModelProto:
    from onnx_ir import serde  # noqa: PLC0415

    protos, inits, done = [], [], set()
    for node in nodes:
        protos.append(serde.serialize_node(node))
        for v in node.inputs:
            if v is not None and v.is_initializer() and v.name not in done:
                inits.append(serde.serialize_tensor(v.const_value))
                done.add(v.name)
    graph = onnx.helper.make_graph(
        protos, "mask", [serde.serialize_value(v) for v in sorted(inputs, key=lambda v: v.name)],
        [onnx.helper.make_tensor_value_info(mask.name, onnx.TensorProto.FLOAT, None)], inits)
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)


def _probe(sess, inputs: set[ir.Value], past_dim: str, p: int, s: int) -> np.ndarray:
    """The mask at P = p and every other symbolic dim = s (batch included: the mask must not care)."""
    feeds = {}
    for v in inputs:
        shape = [d if isinstance(d, int) else (p if d.value == past_dim else s) for d in v.shape]
        feeds[v.name] = np.zeros(shape, v.dtype.numpy())
    return sess.run(None, feeds)[0]


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
                elif node.op_type == "Shape" and (node.attributes.get_int("start", 0),
                                                  node.attributes.get_int("end")) in ((0, None), (2, 3)):
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
        """Shape(past) keeps meaning [B, KV, P, Dh] (P from past_positions), not the capacity."""
        span = (node.attributes.get_int("start", 0), node.attributes.get_int("end"))
        prefix = f"{node.name}/logical"
        if span == (2, 3):
            new_nodes = [ir.node("Shape", [positions], name=prefix)]
        else:
            head = ir.node("Shape", [past], attributes={"start": 0, "end": 2}, name=f"{prefix}_head")
            mid = ir.node("Shape", [positions], name=f"{prefix}_past")
            tail = ir.node("Shape", [past], attributes={"start": 3, "end": 4}, name=f"{prefix}_tail")
            cat = ir.node("Concat", [head.outputs[0], mid.outputs[0], tail.outputs[0]], attributes={"axis": 0},
                          name=prefix)
            new_nodes = [head, mid, tail, cat]
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
