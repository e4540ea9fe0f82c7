"""Build a decoder LLM (config + float32 weights) as an opset-17 ONNX graph with a KV cache.

Interface (L layers, K = num_kv_heads, d = head_dim; dims batch, seq, past_seq, total_seq)::

    input_ids                 int64   [batch, seq]
    past_key_values.{i}.key   float32 [batch, K, past_seq, d]      (past_seq may be 0)
    past_key_values.{i}.value float32 [batch, K, past_seq, d]
    ->
    logits                    float32 [batch, seq, vocab]
    present.{i}.key / .value  float32 [batch, K, total_seq, d]     (total_seq = past_seq + seq)

Math, with the token at absolute position p = past_seq + t (t < seq):

* positions p = past_seq + arange(seq): a slice of an int64 arange table [max_positions].
* rotary (transformers' non-interleaved "rotate_half" form): θ_j = rope_theta^(-2j/d), j < d/2;
  cos[p] = cos(p·[θ, θ]), sin[p] likewise (tables [max_positions, d], gathered by p);
  rope(x) = x·cos[p] + rotate_half(x)·sin[p], rotate_half([x₁, x₂]) = [-x₂, x₁] (halves of d).
* attention: softmax(q·kᵀ/√d + mask)·v with mask[t, s] = 0 if s ≤ p else -3.4e38 (float32's lowest,
  finite, as transformers uses), keys/values = concat(past, new) along the sequence; each of the K
  key/value heads serves num_heads/K query heads (Unsqueeze -> Expand -> Reshape, transformers'
  ``repeat_kv``).
* RMSNorm: x · 1/sqrt(mean(x², -1) + eps) · γ with γ = w + norm_offset folded into the initializer
  (Gemma's (1 + w) is computed once in float32, exactly as transformers does per call).
* MLP: down(act(gate(x)) · up(x)); silu(x) = x·Sigmoid(x); gelu_tanh and gelu from Tanh / Erf.

Only standard ops (no com.microsoft, no opset-23 RMSNormalization), so onnxruntime runs it and TVM's
Relax ONNX frontend converts it. Every linear weight is its own initializer, used once as a MatMul's B
in [in, out] layout (the transposed transformers weight) under the transformers name, which is what
qcompile's quantizer picks up; a tied head gets a transposed copy of the embedding named
``lm_head.weight``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from qcompile.compiler.frontend import ModelError

from .config import DecoderConfig

__all__ = [
    "MASK_VALUE",
    "OPSET",
    "PROTOBUF_LIMIT",
    "build_decoder",
    "check_protobuf_size",
    "expected_weights",
    "rope_tables",
]

log = logging.getLogger(__name__)

OPSET = 17
MASK_VALUE = float(np.finfo(np.float32).min)
"""Additive mask of a key a query may not see (finite: a row of -inf would give NaN)."""
PROTOBUF_LIMIT = 2**31
"""A serialized ONNX model (without external data) must stay below 2 GB."""

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def expected_weights(config: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """The transformers name and [out, in] shape of every weight the decoder reads."""
    c = config
    h, q, kv = c.hidden_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, h), "model.norm.weight": (h,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, h)
    for i in range(c.num_layers):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (h,),
            f"{p}.post_attention_layernorm.weight": (h,),
            f"{p}.self_attn.q_proj.weight": (q, h),
            f"{p}.self_attn.k_proj.weight": (kv, h),
            f"{p}.self_attn.v_proj.weight": (kv, h),
            f"{p}.self_attn.o_proj.weight": (h, q),
            f"{p}.mlp.gate_proj.weight": (c.intermediate_size, h),
            f"{p}.mlp.up_proj.weight": (c.intermediate_size, h),
            f"{p}.mlp.down_proj.weight": (h, c.intermediate_size),
        }
        if c.attention_bias:
            shapes |= {f"{p}.self_attn.q_proj.bias": (q,), f"{p}.self_attn.k_proj.bias": (kv,),
                       f"{p}.self_attn.v_proj.bias": (kv,)}
    return shapes


def rope_tables(config: DecoderConfig, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin [max_positions, head_dim] of the rotary embedding (computed in float64)."""
    d = config.head_dim
    inv_freq = 1.0 / config.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d)
    angles = np.outer(np.arange(max_positions, dtype=np.float64), inv_freq)
    angles = np.concatenate([angles, angles], axis=1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def build_decoder(config: DecoderConfig, weights: Mapping[str, np.ndarray],
                  max_positions: int | None = None, *, external_data: bool = False) -> onnx.ModelProto:
    """The ONNX decoder of ``config`` with ``weights`` (transformers names, [out, in] linear weights).

    ``max_positions`` (default ``config.max_positions``) sizes the rotary tables: positions past it fail.
    A model over protobuf's 2 GB is refused unless ``external_data`` (the caller saves it with
    ``onnx.save(..., save_as_external_data=True)``; :func:`qcompile.compiler.frontend.load_onnx` reads it).
    """
    max_positions = int(max_positions or config.max_positions)
    if not external_data:
        check_protobuf_size(config, max_positions)
    _check_weights(config, weights)
    b = _Builder()
    _Decoder(config, weights, b, max_positions).build()
    graph = helper.make_graph(b.nodes, f"{config.family}_decoder", b.inputs, b.outputs, b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="qcompile.compiler.frontends", ir_version=8)
    log.info("built a %s decoder: %d layers, %d nodes, %.1fM weights", config.family, config.num_layers,
             len(b.nodes), sum(np.prod(t.dims) for t in b.initializers) / 1e6)
    return model


def _check_weights(config: DecoderConfig, weights: Mapping[str, np.ndarray]) -> None:
    """Every missing or misshapen weight, in one error."""
    problems = []
    for name, shape in expected_weights(config).items():
        if name not in weights:
            problems.append(f"{name} is missing")
        elif tuple(weights[name].shape) != shape:
            problems.append(f"{name} has shape {tuple(weights[name].shape)}, expected {shape}")
    if problems:
        raise ModelError(f"{len(problems)} weights do not match the {config.family} config: "
                         + "; ".join(problems[:8]) + ("; …" if len(problems) > 8 else ""))


def check_protobuf_size(config: DecoderConfig, max_positions: int | None = None) -> None:
    """Refuse a model whose float32 ONNX would not fit in one protobuf (2 GB); cheap, before any weights."""
    max_positions = int(max_positions or config.max_positions)
    n = sum(int(np.prod(shape)) for shape in expected_weights(config).values())
    n += 2 * max_positions * config.head_dim  # rotary tables
    if config.tie_word_embeddings:
        n += config.vocab_size * config.hidden_size  # the head's transposed copy
    if 4 * n >= PROTOBUF_LIMIT:
        raise ModelError(
            f"the float32 ONNX of this {config.family} model would hold {4 * n / 2**30:.1f} GiB of weights, "
            "over protobuf's 2 GB limit; models this large are not supported by the LLM frontend yet"
        )


class _Builder:
    """Nodes, initializers and graph inputs/outputs, with unique readable names."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._names: set[str] = set()
        self._consts: dict[tuple, str] = {}

    def weight(self, name: str, array: np.ndarray) -> str:
        """A float32 initializer called ``name``."""
        self._claim(name)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def const(self, value, dtype=np.int64, name: str | None = None) -> str:
        """A ``Constant`` node, shared by value; named after its value unless ``name`` is given.

        Constant nodes, not initializers: TVM's ``from_onnx(keep_params_in_input=True)`` turns every
        initializer into a parameter, and shape arithmetic on a parameter is no longer symbolic.
        """
        a = np.asarray(value, dtype=dtype)
        key = (a.dtype.str, a.shape, a.tobytes())
        if key not in self._consts:
            text = "_".join(str(v) for v in a.ravel()[:6]) if a.size else "empty"
            name = self._unique(name or f"const/{a.dtype.name}_{text}".replace("-", "m"))
            self.nodes.append(helper.make_node("Constant", [], [name], name=name,
                                               value=numpy_helper.from_array(a, name)))
            self._consts[key] = name
        return self._consts[key]

    def op(self, op_type: str, inputs: list[str], name: str, *, outputs: list[str] | int = 1, **attrs):
        """Add node ``name``; returns its output (or outputs when there are several)."""
        node_name = self._unique(name)
        if isinstance(outputs, int):
            outputs = [node_name] if outputs == 1 else [f"{node_name}:{i}" for i in range(outputs)]
        for o in outputs:
            if o != node_name:
                self._claim(o)
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=node_name, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def input(self, name: str, elem_type: int, shape: list) -> str:
        self._claim(name)
        self.inputs.append(helper.make_tensor_value_info(name, elem_type, shape))
        return name

    def output(self, name: str, elem_type: int, shape: list) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, elem_type, shape))

    def _unique(self, name: str) -> str:
        base, i = name, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def _claim(self, name: str) -> None:
        if name in self._names:
            raise ValueError(f"duplicate name {name!r}")
        self._names.add(name)


class _Decoder:
    """Emits the decoder into a :class:`_Builder`; one method per block of the math."""

    def __init__(self, config: DecoderConfig, weights: Mapping[str, np.ndarray], b: _Builder, max_positions: int):
        self.c, self.w, self.b, self.max_positions = config, weights, b, max_positions

    def build(self) -> None:
        c, b = self.c, self.b
        ids = b.input("input_ids", TensorProto.INT64, ["batch", "seq"])
        cache_shape = ["batch", c.num_kv_heads, "past_seq", c.head_dim]
        past = [(b.input(f"past_key_values.{i}.key", TensorProto.FLOAT, cache_shape),
                 b.input(f"past_key_values.{i}.value", TensorProto.FLOAT, cache_shape))
                for i in range(c.num_layers)]
        b.output("logits", TensorProto.FLOAT, ["batch", "seq", c.vocab_size])
        cos, sin, mask = self.positions(ids, past[0][0])
        x = b.op("Gather", [b.weight("model.embed_tokens.weight", self.w["model.embed_tokens.weight"]), ids],
                 "model.embed_tokens/Gather")
        if c.embedding_scale != 1.0:
            x = b.op("Mul", [x, b.const(c.embedding_scale, np.float32)], "model.embed_tokens/Scale")
        for i in range(c.num_layers):
            x = self.layer(i, x, past[i], cos, sin, mask)
        x = self.rms_norm("model.norm", x)
        head = self.w["model.embed_tokens.weight"] if c.tie_word_embeddings else self.w["lm_head.weight"]
        b.op("MatMul", [x, b.weight("lm_head.weight", head.T)], "lm_head/MatMul", outputs=["logits"])

    def positions(self, ids: str, past_key: str) -> tuple[str, str, str]:
        """cos/sin [seq, d] of positions past_seq + arange(seq), and the causal mask [seq, total_seq].

        Positions are slices of an arange table, not ``Range``: TVM's ``from_onnx`` gives Range a
        data-dependent shape, while a Slice bounded by shape dims keeps seq and past_seq + seq symbolic.
        """
        b = self.b
        axis0 = b.const([0])
        seq = b.op("Gather", [b.op("Shape", [ids], "positions/ids_shape"), b.const(1)], "positions/seq", axis=0)
        past_seq = b.op("Gather", [b.op("Shape", [past_key], "positions/past_shape"), b.const(2)],
                        "positions/past_seq", axis=0)
        total = b.op("Add", [past_seq, seq], "positions/total_seq")
        start = b.op("Unsqueeze", [past_seq, axis0], "positions/start")
        stop = b.op("Unsqueeze", [total, axis0], "positions/stop")
        table = b.const(np.arange(self.max_positions), name="positions.arange")
        pos = b.op("Slice", [table, start, stop, axis0], "positions/query")
        keys = b.op("Slice", [table, b.const([0]), stop, axis0], "positions/key")
        cos_table, sin_table = rope_tables(self.c, self.max_positions)
        cos = b.op("Gather", [b.weight("rope.cos", cos_table), pos], "rope/cos", axis=0)
        sin = b.op("Gather", [b.weight("rope.sin", sin_table), pos], "rope/sin", axis=0)
        query_col = b.op("Unsqueeze", [pos, b.const([1])], "mask/query_column")
        visible = b.op("LessOrEqual", [keys, query_col], "mask/visible")
        mask = b.op("Where", [visible, b.const(0.0, np.float32), b.const(MASK_VALUE, np.float32)],
                    "mask/additive")
        return cos, sin, mask

    def layer(self, i: int, x: str, past: tuple[str, str], cos: str, sin: str, mask: str) -> str:
        p = f"model.layers.{i}"
        h = self.rms_norm(f"{p}.input_layernorm", x)
        x = self.b.op("Add", [x, self.attention(i, h, past, cos, sin, mask)], f"{p}/attn_residual")
        h = self.rms_norm(f"{p}.post_attention_layernorm", x)
        return self.b.op("Add", [x, self.mlp(f"{p}.mlp", h)], f"{p}/mlp_residual")

    def linear(self, prefix: str, x: str, bias: bool = False) -> str:
        """x @ Wᵀ (+ b): the weight as its own [in, out] initializer, read once."""
        b = self.b
        y = b.op("MatMul", [x, b.weight(f"{prefix}.weight", self.w[f"{prefix}.weight"].T)], f"{prefix}/MatMul")
        if bias:
            y = b.op("Add", [y, b.weight(f"{prefix}.bias", self.w[f"{prefix}.bias"])], f"{prefix}/Add")
        return y

    def rms_norm(self, prefix: str, x: str) -> str:
        b = self.b
        gamma = self.w[f"{prefix}.weight"].astype(np.float32) + np.float32(self.c.norm_offset)
        sq = b.op("Mul", [x, x], f"{prefix}/Square")
        mean = b.op("ReduceMean", [sq], f"{prefix}/MeanSquare", axes=[-1], keepdims=1)
        var = b.op("Add", [mean, b.const(self.c.rms_norm_eps, np.float32)], f"{prefix}/AddEps")
        inv = b.op("Reciprocal", [b.op("Sqrt", [var], f"{prefix}/Sqrt")], f"{prefix}/Reciprocal")
        y = b.op("Mul", [x, inv], f"{prefix}/Normalize")
        return b.op("Mul", [y, b.weight(f"{prefix}.weight", gamma)], f"{prefix}/Scale")

    def attention(self, i: int, x: str, past: tuple[str, str], cos: str, sin: str, mask: str) -> str:
        c, b, p = self.c, self.b, f"model.layers.{i}.self_attn"
        q = self.heads(f"{p}.q_proj", self.linear(f"{p}.q_proj", x, c.attention_bias), c.num_heads)
        k = self.heads(f"{p}.k_proj", self.linear(f"{p}.k_proj", x, c.attention_bias), c.num_kv_heads)
        v = self.heads(f"{p}.v_proj", self.linear(f"{p}.v_proj", x, c.attention_bias), c.num_kv_heads)
        q, k = self.rope(f"{p}/q_rope", q, cos, sin), self.rope(f"{p}/k_rope", k, cos, sin)
        k = b.op("Concat", [past[0], k], f"{p}/key_cache", outputs=[f"present.{i}.key"], axis=2)
        v = b.op("Concat", [past[1], v], f"{p}/value_cache", outputs=[f"present.{i}.value"], axis=2)
        for name in (k, v):
            b.output(name, TensorProto.FLOAT, ["batch", c.num_kv_heads, "total_seq", c.head_dim])
        k, v = self.repeat_kv(f"{p}/repeat_key", k), self.repeat_kv(f"{p}/repeat_value", v)
        kt = b.op("Transpose", [k], f"{p}/key_transpose", perm=[0, 1, 3, 2])
        scores = b.op("MatMul", [q, kt], f"{p}/scores")
        scores = b.op("Mul", [scores, b.const(c.head_dim ** -0.5, np.float32)], f"{p}/scale")
        scores = b.op("Add", [scores, mask], f"{p}/causal_mask")
        probs = b.op("Softmax", [scores], f"{p}/softmax", axis=-1)
        out = b.op("MatMul", [probs, v], f"{p}/context")
        out = b.op("Transpose", [out], f"{p}/merge_heads_transpose", perm=[0, 2, 1, 3])
        out = b.op("Reshape", [out, b.const([0, 0, c.num_heads * c.head_dim])], f"{p}/merge_heads")
        return self.linear(f"{p}.o_proj", out)

    def heads(self, prefix: str, x: str, n: int) -> str:
        """[batch, seq, n·d] -> [batch, n, seq, d]."""
        x = self.b.op("Reshape", [x, self.b.const([0, 0, n, self.c.head_dim])], f"{prefix}/split_heads")
        return self.b.op("Transpose", [x], f"{prefix}/split_heads_transpose", perm=[0, 2, 1, 3])

    def rope(self, prefix: str, x: str, cos: str, sin: str) -> str:
        b, half = self.b, self.c.head_dim // 2
        x1, x2 = b.op("Split", [x, b.const([half, half])], f"{prefix}/halves", outputs=2, axis=-1)
        rotated = b.op("Concat", [b.op("Neg", [x2], f"{prefix}/neg"), x1], f"{prefix}/rotate_half", axis=-1)
        x_cos = b.op("Mul", [x, cos], f"{prefix}/mul_cos")
        return b.op("Add", [x_cos, b.op("Mul", [rotated, sin], f"{prefix}/mul_sin")], f"{prefix}/add")

    def repeat_kv(self, prefix: str, x: str) -> str:
        """[batch, K, T, d] -> [batch, K·g, T, d], each head repeated g times in a row."""
        c, b = self.c, self.b
        if c.num_groups == 1:
            return x
        # The target shape from Shape pieces, not a constant [1, 1, g, 1, 1]: TVM's Expand needs static
        # input dims for a constant target but converts a (symbolic) shape expression.
        outer = b.op("Shape", [x], f"{prefix}/outer_dims", start=0, end=2)
        inner = b.op("Shape", [x], f"{prefix}/inner_dims", start=2, end=4)
        target = b.op("Concat", [outer, b.const([c.num_groups]), inner], f"{prefix}/target", axis=0)
        x = b.op("Unsqueeze", [x, b.const([2])], f"{prefix}/unsqueeze")
        x = b.op("Expand", [x, target], f"{prefix}/expand")
        return b.op("Reshape", [x, b.const([0, c.num_heads, -1, c.head_dim])], f"{prefix}/reshape")

    def mlp(self, prefix: str, x: str) -> str:
        gate = self.activation(prefix, self.linear(f"{prefix}.gate_proj", x))
        up = self.linear(f"{prefix}.up_proj", x)
        return self.linear(f"{prefix}.down_proj", self.b.op("Mul", [gate, up], f"{prefix}/gate_mul_up"))

    def activation(self, prefix: str, x: str) -> str:
        b, f32, act = self.b, np.float32, self.c.activation
        if act == "silu":
            return b.op("Mul", [x, b.op("Sigmoid", [x], f"{prefix}/act_sigmoid")], f"{prefix}/act_silu")
        if act == "gelu":  # x/2 · (1 + erf(x/√2))
            scaled = b.op("Mul", [x, b.const(1 / math.sqrt(2), f32)], f"{prefix}/act_scale")
            t = b.op("Erf", [scaled], f"{prefix}/act_erf")
        else:  # gelu_tanh: x/2 · (1 + tanh(√(2/π)·(x + 0.044715·x³)))
            x3 = b.op("Mul", [b.op("Mul", [x, x], f"{prefix}/act_square"), x], f"{prefix}/act_cube")
            inner = b.op("Add", [x, b.op("Mul", [x3, b.const(0.044715, f32)], f"{prefix}/act_cubic_term")],
                         f"{prefix}/act_inner")
            inner = b.op("Mul", [inner, b.const(math.sqrt(2 / math.pi), f32)], f"{prefix}/act_scale")
            t = b.op("Tanh", [inner], f"{prefix}/act_tanh")
        half_x = b.op("Mul", [x, b.const(0.5, f32)], f"{prefix}/act_half")
        one_plus = b.op("Add", [t, b.const(1.0, f32)], f"{prefix}/act_one_plus")
        return b.op("Mul", [half_x, one_plus], f"{prefix}/act_gelu")
