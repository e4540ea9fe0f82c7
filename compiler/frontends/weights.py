"""Read a decoder's weights as float32 numpy arrays under transformers' names.

Two sources:

* a Hugging Face folder: ``model.safetensors``, or shards listed by ``model.safetensors.index.json``
  (its ``weight_map``: name -> shard file). A safetensors file is an 8-byte little-endian header length,
  a JSON header {name: {dtype, shape, data_offsets: [begin, end]}} and the raw little-endian data;
  we read it directly because numpy has no bfloat16: bf16 -> f32 is the 16 bits shifted left by 16.
* a GGUF file (llama.cpp), through the ``gguf`` package: every tensor type is dequantized by
  ``gguf.quants.dequantize``. GGUF lists dims innermost first (``ne``); the reader's arrays already
  have numpy's order, so a linear weight comes back [out, in] like transformers' ``nn.Linear``.
  Two transformations of llama.cpp's converter are undone, as transformers' GGUF loader does:

  - Llama q/k rows: llama.cpp's rotary pairs neighbours (x[2i], x[2i+1]), transformers' pairs halves
    (x[i], x[i + d/2]), so the converter permutes each head's rows, row (j, 2i + t) <- row (j, t·d/2 + i)
    for head j, i < d/2, t ∈ {0, 1}. Undone by viewing the rows as (head, d/2, 2) and swapping the
    last two axes (heads = num_heads for q, num_kv_heads for k).
  - Gemma norms: llama.cpp stores w + 1 for Gemma's (1 + w)-RMSNorm; we subtract 1.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np

from qcompile.compiler.frontend import ModelError

from .config import DecoderConfig, from_gguf_metadata

__all__ = [
    "GGUF_LAYER_NAMES",
    "GGUF_NAMES",
    "gguf_weights",
    "open_gguf",
    "read_gguf",
    "read_safetensors",
    "read_safetensors_folder",
]

log = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16}
_INDEX = "model.safetensors.index.json"

GGUF_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
"""llama.cpp's names of the tensors outside the layers -> transformers module names."""

GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
"""llama.cpp's ``blk.N.<name>`` -> transformers' ``model.layers.N.<module>``."""

_GGUF_TENSOR = re.compile(r"^(?:blk\.(?P<layer>\d+)\.)?(?P<name>\w+)\.(?P<kind>weight|bias)$")


# -- safetensors -------------------------------------------------------------------------------------


def read_safetensors_folder(folder: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a Hugging Face folder (single file or sharded), as float32."""
    folder = Path(folder)
    index = folder / _INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"{index}: not a readable safetensors index ({e})") from e
        files = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ModelError(f"{folder}: no model.safetensors or {_INDEX} (only safetensors checkpoints are read)")
    weights: dict[str, np.ndarray] = {}
    for name in files:
        weights.update(read_safetensors(folder / name))
    log.info("read %d tensors from %d safetensors file(s) in %s", len(weights), len(files), folder)
    return weights


def read_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """The tensors of one ``.safetensors`` file as float32 arrays (F64/F32/F16/BF16)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    except (OSError, ValueError) as e:
        raise ModelError(f"{path}: not a readable safetensors file ({e})") from e
    header.pop("__metadata__", None)
    bad = {name: h.get("dtype") for name, h in header.items() if h.get("dtype") not in _SAFETENSORS_DTYPES}
    if bad:
        raise ModelError(f"{path}: tensors of unsupported dtypes {bad} "
                         f"(expected float: {', '.join(_SAFETENSORS_DTYPES)})")
    out = {}
    for name, h in header.items():
        begin, end = h["data_offsets"]
        a = data[begin:end].view(_SAFETENSORS_DTYPES[h["dtype"]])
        if h["dtype"] == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)
        out[name] = np.array(a, dtype=np.float32).reshape(h["shape"])  # a copy, not a view of the file
    return out


# -- GGUF ----------------------------------------------------------------------------------------------


def read_gguf(path: str | Path) -> tuple[DecoderConfig, dict[str, np.ndarray]]:
    """The config (from the metadata) and the float32 weights under transformers' names of a GGUF file."""
    config, reader = open_gguf(path)
    return config, gguf_weights(reader, config)


def open_gguf(path: str | Path):
    """(config, ``gguf.GGUFReader``) of a GGUF file, its tensor names checked; nothing dequantized yet."""
    path = Path(path)
    try:
        import gguf  # noqa: PLC0415 - optional: only GGUF sources need it
    except ImportError as e:
        raise ModelError(f"{path}: reading GGUF needs the 'gguf' package (pip install gguf)") from e
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - the reader raises ValueError, struct errors, ...
        raise ModelError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e
    metadata, n_tokens = _gguf_metadata(reader, gguf.GGUFValueType)
    names = {t.name for t in reader.tensors}
    config = from_gguf_metadata(metadata, path, n_tokens=n_tokens, has_output_weight="output.weight" in names)
    unknown = sorted(n for n in names if _hf_name(n) is None)
    if unknown:
        hint = " (rope_freqs: llama3-style rope scaling is not supported)" if "rope_freqs.weight" in unknown else ""
        raise ModelError(f"{path}: tensors the LLM frontend does not know: {', '.join(unknown)}{hint}")
    return config, reader


def gguf_weights(reader, config: DecoderConfig) -> dict[str, np.ndarray]:
    """Every tensor of an :func:`open_gguf` reader, dequantized to float32, under transformers' names."""
    from gguf.quants import dequantize  # noqa: PLC0415

    weights = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        weights[name] = _undo_converter(config, name, w)
    types = sorted({t.tensor_type.name for t in reader.tensors})
    log.info("dequantized %d GGUF tensors (%s)", len(weights), ", ".join(types))
    return weights


def _gguf_metadata(reader, value_types) -> tuple[dict, int | None]:
    """Scalar and string metadata; arrays are skipped except the token list's length."""
    metadata, n_tokens = {}, None
    for key, field in reader.fields.items():
        if not field.types:
            continue
        if field.types[0] == value_types.ARRAY:
            if key == "tokenizer.ggml.tokens":
                n_tokens = len(field.data)
            continue
        metadata[key] = field.contents()
    return metadata, n_tokens


def _hf_name(gguf_name: str) -> str | None:
    """transformers' name of a llama.cpp tensor (``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``),
    or None for a tensor the decoder does not use."""
    m = _GGUF_TENSOR.match(gguf_name)
    if m is None:
        return None
    if m["layer"] is None:
        module = GGUF_NAMES.get(m["name"])
    else:
        module = GGUF_LAYER_NAMES.get(m["name"])
        module = module and f"model.layers.{m['layer']}.{module}"
    return module and f"{module}.{m['kind']}"


def _undo_converter(config: DecoderConfig, name: str, w: np.ndarray) -> np.ndarray:
    """Invert what llama.cpp's convert_hf_to_gguf.py did to this tensor (see the module docstring)."""
    if config.family == "llama" and (".q_proj." in name or ".k_proj." in name):
        heads = config.num_heads if ".q_proj." in name else config.num_kv_heads
        return np.ascontiguousarray(
            w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
        )
    if config.family == "gemma" and name.endswith("norm.weight"):
        return w - np.float32(1.0)
    return w
