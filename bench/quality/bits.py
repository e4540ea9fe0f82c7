"""Bits per weight, counted the same way for every method (DESIGN "Counting bits").

The counted weights are those of the transformer blocks' linear layers: q/k/v/o and gate/up/down
projections, 30 layers x 7 = 210 tensors, 106,168,320 weights for SmolLM2-135M. Their bpw is every bit
stored for them (codes, scales, mins, zero points, block headers, padding) divided by their number of
weights. Embedding and output head (tied in this model) are excluded; every method keeps them in float.

- qcompile formats / RTN: ``WeightFormat.storage_bits(shape)`` per tensor.
- llama.cpp: the byte size of each ``blk.N.{attn_q,attn_k,attn_v,attn_output,ffn_gate,ffn_up,ffn_down}``
  tensor in the quantized GGUF, as the ``gguf`` package reads it (k-quant super-block headers included).
- onnxruntime MatMulNBits: the bytes of each node's constant inputs (packed B, scales, zero points).
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "BLOCK_LINEARS",
    "GGUF_NAMES",
    "BitCount",
    "block_linears",
    "gguf_bits",
    "onnx_bits",
]

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""Suffixes of the counted torch modules (``model.layers.N.self_attn.q_proj`` ...)."""

GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}
"""torch module suffix -> llama.cpp tensor name (``blk.N.<name>.weight``)."""

_GGUF_BLOCK = re.compile(r"^blk\.(\d+)\.(" + "|".join(GGUF_NAMES.values()) + r")\.weight$")


@dataclasses.dataclass(frozen=True)
class BitCount:
    """Stored bits and weights of the counted tensors, and how many tensors each storage type has."""

    bits: int
    weights: int
    tensors: int
    types: dict[str, int]

    @property
    def bpw(self) -> float:
        return self.bits / self.weights

    def describe(self) -> str:
        kinds = ", ".join(f"{k} x{v}" for k, v in sorted(self.types.items(), key=lambda kv: -kv[1]))
        return f"{self.bpw:.4f} bpw over {self.tensors} tensors ({kinds})"

    @classmethod
    def total(cls, parts: Iterable[tuple[str, int, int]]) -> BitCount:
        """From (type, bits, weights) per tensor."""
        bits = weights = tensors = 0
        types: Counter[str] = Counter()
        for kind, b, w in parts:
            bits, weights, tensors = bits + int(b), weights + int(w), tensors + 1
            types[kind] += 1
        if not tensors:
            raise ValueError("no block linear weights were found to count")
        return cls(bits, weights, tensors, dict(types))


def block_linears(model) -> dict[str, object]:
    """``{qualified name: nn.Linear}`` of the counted layers of a transformers Llama model."""
    found = {name: m for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in BLOCK_LINEARS}
    layers = model.config.num_hidden_layers
    if len(found) != layers * len(BLOCK_LINEARS):
        raise ValueError(f"expected {layers} x {len(BLOCK_LINEARS)} block linears, found {len(found)}")
    return found


def gguf_name(torch_name: str) -> str:
    """``model.layers.3.mlp.down_proj`` -> ``blk.3.ffn_down.weight``."""
    match = re.search(r"layers\.(\d+)\..*?(\w+_proj)$", torch_name)
    if match is None or match.group(2) not in GGUF_NAMES:
        raise ValueError(f"{torch_name!r} is not a block linear layer")
    return f"blk.{match.group(1)}.{GGUF_NAMES[match.group(2)]}.weight"


def gguf_bits(path: Path) -> BitCount:
    """BitCount of the block linears of a GGUF file, from each tensor's stored byte size."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return BitCount.total(
        (t.tensor_type.name, 8 * int(t.n_bytes), int(t.n_elements))
        for t in reader.tensors
        if _GGUF_BLOCK.match(t.name)
    )


def onnx_bits(model, weight_count: int) -> BitCount:
    """BitCount of the block linears of an ONNX model (float MatMul or com.microsoft MatMulNBits).

    A node is counted when its weight is an initializer and it is not the head: MatMulNBits by its
    constant inputs' bytes (B, scales, zero points, g_idx), MatMul by its weight initializer's bytes.
    ``weight_count`` (the model's number of counted weights) checks that nothing was missed.
    """
    import numpy as np
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}

    def nbytes(name: str) -> int:
        return numpy_helper.to_array(inits[name]).nbytes if name in inits else 0

    parts = []
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            bits = attrs.get("bits", 4)
            parts.append((f"MatMulNBits b{bits} g{attrs['block_size']}",
                          8 * sum(nbytes(i) for i in node.input[1:] if i),
                          attrs["K"] * attrs["N"]))
        elif node.op_type == "MatMul" and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            if w.ndim == 2 and w.shape[1] != _vocab(model):
                parts.append((f"MatMul {np.dtype(w.dtype).name}", 8 * w.nbytes, w.size))
    count = BitCount.total(parts)
    if count.weights != weight_count:
        raise ValueError(f"counted {count.weights} weights in the ONNX model, expected {weight_count}")
    return count


def _vocab(model) -> int:
    out = model.graph.output[0].type.tensor_type.shape.dim
    return int(out[-1].dim_value)
