"""The shape and numerics of a decoder-only LLM (Llama, Qwen2, Gemma), read from its source's metadata.

All three families are the same pre-norm decoder; per layer, with x of shape [batch, seq, hidden]::

    h = x + o_proj(attention(rope(q_proj(norm₁(x))), rope(k_proj(norm₁(x))), v_proj(norm₁(x))))
    y = h + down_proj(act(gate_proj(norm₂(h))) * up_proj(norm₂(h)))

    norm(x)   = x / sqrt(mean(x², -1) + rms_norm_eps) * (w + norm_offset)
    logits    = lm_head(norm(y_last_layer)),   x_0 = embed_tokens[ids] * embedding_scale

and they differ only in the fields of :class:`DecoderConfig`:

========  ==========  ============  ===============  ==============  ==========================
family    activation  q/k/v bias    embedding_scale  norm_offset     head tied by default
========  ==========  ============  ===============  ==============  ==========================
llama     silu        no            1                0               no (SmolLM2: yes)
qwen2     silu        yes           1                0               no (small ones: yes)
gemma     gelu_tanh   no            sqrt(hidden)     1               yes
========  ==========  ============  ===============  ==============  ==========================

``act`` is silu(x) = x·σ(x), gelu_tanh(x) = x/2·(1 + tanh(√(2/π)(x + 0.044715x³))) or exact
gelu(x) = x/2·(1 + erf(x/√2)); a Gemma config's ``"gelu"`` means gelu_tanh (as in transformers).

Anything that changes the math in other ways (rope scaling, partial rotary, sliding windows, biases
on other projections, bidirectional attention) is refused with a :class:`ModelError` naming the key.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qcompile.compiler.frontend import ModelError

__all__ = ["DecoderConfig", "FAMILIES", "ACTIVATIONS", "from_hf_config", "from_gguf_metadata"]

log = logging.getLogger(__name__)

FAMILIES = ("llama", "qwen2", "gemma")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")

_HF_ACTIVATIONS = {
    "silu": "silu",
    "swish": "silu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu": "gelu",
}
"""transformers' ACT2FN names -> ours (only those that compute exactly our formulas)."""

_GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "gemma": "gemma"}
"""GGUF ``general.architecture`` -> family."""


@dataclass(frozen=True)
class DecoderConfig:
    """Everything the ONNX builder needs to know about a decoder; derived fields from the family.

    ``embedding_scale`` and ``norm_offset`` default to the family's values (None -> derived).
    """

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float = 10000.0
    max_positions: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool | None = None
    activation: str | None = None
    embedding_scale: float | None = None
    norm_offset: float | None = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r}: expected one of {FAMILIES}")
        defaults = {
            "attention_bias": self.family == "qwen2",
            "activation": "gelu_tanh" if self.family == "gemma" else "silu",
            "embedding_scale": math.sqrt(self.hidden_size) if self.family == "gemma" else 1.0,
            "norm_offset": 1.0 if self.family == "gemma" else 0.0,
        }
        for key, value in defaults.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation {self.activation!r}: expected one of {ACTIVATIONS}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "max_positions"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{key} = {getattr(self, key)}: must be at least 1")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads = {self.num_heads} is not a multiple of "
                             f"num_kv_heads = {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim = {self.head_dim}: rotary embeddings need an even head dimension")

    @property
    def num_groups(self) -> int:
        """Query heads per key/value head (grouped-query attention)."""
        return self.num_heads // self.num_kv_heads


def from_hf_config(config: Mapping[str, Any], source: str | Path = "config.json") -> DecoderConfig:
    """The :class:`DecoderConfig` of a transformers ``config.json`` (Llama/Qwen2/Gemma ForCausalLM).

    ``source`` names the file in error messages. Every unsupported setting is listed in one error.
    """
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise ModelError(
            f"{source}: model_type {model_type!r} is not supported; the LLM frontend builds "
            f"{', '.join(FAMILIES)} decoders (export other models to ONNX with torch or optimum)"
        )
    problems = _unsupported_hf_settings(config, model_type)
    act = config.get("hidden_act", "gelu_pytorch_tanh" if model_type == "gemma" else "silu")
    if model_type == "gemma" and act == "gelu":
        act = "gelu_pytorch_tanh"  # as transformers' GemmaConfig: the official releases' "gelu" means tanh
    if act not in _HF_ACTIVATIONS:
        problems.append(f"hidden_act {act!r} (supported: {', '.join(_HF_ACTIVATIONS)})")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in config]
    if missing:
        problems.append(f"missing keys {missing}")
    if problems:
        raise ModelError(f"{source}: unsupported {model_type} config: {'; '.join(problems)}")
    heads = int(config["num_attention_heads"])
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or int(config["hidden_size"]) // heads
    try:
        return DecoderConfig(
            family=model_type,
            vocab_size=int(config["vocab_size"]),
            hidden_size=int(config["hidden_size"]),
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=float(_rope_theta(config)),
            max_positions=int(config.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", model_type == "gemma")),
            activation=_HF_ACTIVATIONS[act],
        )
    except ValueError as e:
        raise ModelError(f"{source}: inconsistent config: {e}") from e


def _rope_theta(config: Mapping[str, Any]) -> float:
    params = config.get("rope_parameters") or {}
    return params.get("rope_theta", config.get("rope_theta", 10000.0))


def _unsupported_hf_settings(config: Mapping[str, Any], model_type: str) -> list[str]:
    """Every key whose value changes the math away from :class:`DecoderConfig`'s decoder."""
    problems = []
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key)
        if rope and rope.get("rope_type", rope.get("type", "default")) != "default":
            problems.append(f"{key} {dict(rope)} (only plain rotary embeddings, rope_type 'default')")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        problems.append(f"partial_rotary_factor {config['partial_rotary_factor']} (only full rotary)")
    if model_type in ("llama", "gemma") and config.get("attention_bias"):
        problems.append("attention_bias true (biases on q/k/v/o projections)")
    if config.get("mlp_bias"):
        problems.append("mlp_bias true")
    if config.get("use_sliding_window") or "sliding_attention" in (config.get("layer_types") or ()):
        problems.append("sliding-window attention layers (use_sliding_window / layer_types)")
    if config.get("use_bidirectional_attention"):
        problems.append("use_bidirectional_attention true (only causal decoders)")
    return problems


def from_gguf_metadata(metadata: Mapping[str, Any], source: str | Path, *, n_tokens: int | None,
                       has_output_weight: bool) -> DecoderConfig:
    """The :class:`DecoderConfig` of a GGUF file's key/value metadata (scalars only).

    ``n_tokens``: length of ``tokenizer.ggml.tokens`` (the vocabulary when ``<arch>.vocab_size`` is
    absent); ``has_output_weight``: the file has ``output.weight`` (else the head is tied).
    """
    arch = metadata.get("general.architecture")
    if arch not in _GGUF_ARCHITECTURES:
        raise ModelError(
            f"{source}: GGUF architecture {arch!r} is not supported; the LLM frontend reads "
            f"{', '.join(_GGUF_ARCHITECTURES)}"
        )

    def get(key: str, default: Any = None) -> Any:
        return metadata.get(f"{arch}.{key}", default)

    problems = [f"{arch}.{k}" for k in ("embedding_length", "block_count", "attention.head_count",
                                        "feed_forward_length") if get(k) is None]
    if problems:
        raise ModelError(f"{source}: GGUF metadata lacks {', '.join(problems)}")
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", hidden // heads))
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", None):
        problems.append(f"{arch}.rope.scaling.type {scaling!r} (only plain rotary embeddings)")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        problems.append(f"{arch}.rope.dimension_count {get('rope.dimension_count')} != head dim {head_dim} "
                        "(only full rotary)")
    if int(get("attention.value_length", head_dim)) != head_dim:
        problems.append(f"{arch}.attention.value_length {get('attention.value_length')} != {head_dim}")
    vocab = get("vocab_size", n_tokens)
    if vocab is None:
        problems.append(f"{arch}.vocab_size and tokenizer.ggml.tokens are both missing")
    if problems:
        raise ModelError(f"{source}: unsupported GGUF model: {'; '.join(problems)}")
    family = _GGUF_ARCHITECTURES[arch]
    try:
        return DecoderConfig(
            family=family,
            vocab_size=int(vocab),
            hidden_size=hidden,
            intermediate_size=int(get("feed_forward_length")),
            num_layers=int(get("block_count")),
            num_heads=heads,
            num_kv_heads=int(get("attention.head_count_kv", heads)),
            head_dim=head_dim,
            rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
            rope_theta=float(get("rope.freq_base", 10000.0)),
            max_positions=int(get("context_length", 2048)),
            tie_word_embeddings=not has_output_weight,
        )
    except ValueError as e:
        raise ModelError(f"{source}: inconsistent GGUF metadata: {e}") from e
