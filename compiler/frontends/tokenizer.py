"""The tokenizer that ships with an LLM source, as a Hugging Face ``tokenizer.json`` string.

- a Hugging Face folder: its ``tokenizer.json``;
- a GGUF file: the vocabulary and merges in its metadata, converted by transformers' GGUF tokenizer
  converter (``AutoTokenizer.from_pretrained(folder, gguf_file=name)``) when transformers is installed
  (compile time only; the runtime reads the JSON with the ``tokenizers`` package).

The compiler puts it into the artifact (``tokenizer.json``) and uses it for text calibration.
"""

from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["source_tokenizer"]

log = logging.getLogger(__name__)


def source_tokenizer(path: str | Path) -> str | None:
    """The tokenizer.json text of an ONNX model's folder, an HF folder or a GGUF file; None if none."""
    path = Path(path)
    if path.is_dir():
        candidate = path / "tokenizer.json"
    elif path.suffix.lower() == ".gguf":
        return _from_gguf(path)
    else:
        candidate = path.parent / "tokenizer.json"
    return candidate.read_text() if candidate.is_file() else None


def _from_gguf(path: Path) -> str | None:
    try:
        from transformers import AutoTokenizer  # noqa: PLC0415
    except ImportError:
        log.warning("%s: transformers is not installed, so the GGUF's tokenizer is not converted; pass "
                    "--tokenizer tokenizer.json", path)
        return None
    try:
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return tok.backend_tokenizer.to_str()
    except Exception as e:  # noqa: BLE001 - many kinds from the converter; the model still compiles
        log.warning("%s: could not convert the GGUF tokenizer (%s: %s); pass --tokenizer tokenizer.json",
                    path, type(e).__name__, e)
        return None
