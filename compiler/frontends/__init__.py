"""LLM frontends: a decoder LLM (GGUF file, or a Hugging Face folder) -> an ONNX decoder with a KV cache.

    source ──weights.read_gguf / read_safetensors_folder──▶ (DecoderConfig, {HF name: float32})
           ──decoder.build_decoder──▶ onnx.ModelProto (opset 17, standard ops)

Supported: Llama, Qwen2 and Gemma decoders (:mod:`.config` lists what each family changes).
:func:`qcompile.compiler.frontend.load_onnx` accepts these sources too.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import onnx

from qcompile.compiler.frontend import ModelError

from .config import DecoderConfig, from_gguf_metadata, from_hf_config
from .decoder import build_decoder, check_protobuf_size
from .weights import gguf_weights, open_gguf, read_gguf, read_safetensors_folder

__all__ = [
    "DecoderConfig",
    "build_decoder",
    "from_gguf_metadata",
    "from_hf_config",
    "is_llm_source",
    "load_llm",
    "read_gguf",
    "read_safetensors_folder",
]

log = logging.getLogger(__name__)


def is_llm_source(path: str | Path) -> bool:
    """True for a ``.gguf`` file or a folder with ``config.json`` and safetensors weights."""
    path = Path(path)
    if path.is_file():
        return path.suffix.lower() == ".gguf"
    return path.is_dir() and (path / "config.json").is_file() and any(path.glob("*.safetensors*"))


def load_llm(path: str | Path, max_positions: int | None = None) -> onnx.ModelProto:
    """The float32 ONNX decoder of a GGUF file or a Hugging Face folder (see :mod:`.decoder`)."""
    path = Path(path)
    if not is_llm_source(path):
        raise ModelError(f"{path}: not an LLM source (expected a .gguf file or a folder with config.json "
                         "and .safetensors weights)")
    config, reader = open_gguf(path) if path.is_file() else (_hf_folder_config(path), None)
    log.info("%s: %s", path, config)
    _about(path, check_protobuf_size, config, max_positions)  # before reading gigabytes of weights
    weights = gguf_weights(reader, config) if reader is not None else read_safetensors_folder(path)
    return _about(path, build_decoder, config, weights, max_positions)


def _about(path: Path, fn, *args):
    """``fn(*args)``, a :class:`ModelError` from it prefixed with the source's path."""
    try:
        return fn(*args)
    except ModelError as e:
        raise ModelError(f"{path}: {e}") from e


def _hf_folder_config(folder: Path) -> DecoderConfig:
    config_file = folder / "config.json"
    try:
        hf_config = json.loads(config_file.read_text())
    except (OSError, ValueError) as e:
        raise ModelError(f"{config_file}: not a readable JSON config ({e})") from e
    return from_hf_config(hf_config, config_file)
