"""Tiny decoder LLMs exported to ONNX the ways users export them, for tests of "bring your own ONNX".

A random transformers ``LlamaForCausalLM`` / ``Qwen2ForCausalLM`` (GQA: 4 query heads, 2 KV heads, hidden
64, 2 layers, vocabulary 300; every parameter redrawn so that attention and norms matter) exported with its
KV cache, with the interface of optimum's ``text-generation-with-past``:

    inputs   input_ids int64 [batch, sequence], attention_mask int64 [batch, past + sequence],
             position_ids int64 [batch, sequence], past_key_values.{i}.key/.value float32 [batch, kv, past, head_dim]
    outputs  logits [batch, sequence, vocab], present.{i}.key/.value [batch, kv, past + sequence, head_dim]

Exporters (:data:`EXPORTERS`):

- ``"dynamo"``: ``torch.onnx.export(dynamo=True)`` (torch.export + onnxscript, the default in torch 2.13).
- ``"torchscript"``: ``torch.onnx.export(dynamo=False)``, the legacy tracer (shape-dependent Python branches
  are traced at the example's shapes: prefill of 3 tokens after a past of 4).
- ``"optimum"``: optimum-onnx's ``main_export(task="text-generation-with-past")``. optimum-onnx 0.1.0 needs
  transformers < 4.58, which would break the rest of the test environment (sentence-transformers needs
  transformers >= 5), so it runs in its own virtual environment: the Python named by
  ``$QCOMPILE_OPTIMUM_PYTHON``, else ``<repo>/.venv-optimum/bin/python`` (``.ci/run`` creates it). Without
  one, :func:`exported` raises :class:`ExporterUnavailable` (tests skip on it).

torch and transformers take both flat past tensors only through a ``DynamicCache``: :class:`FlatCacheLM`
wraps the model so that the exported graph has one tensor per past key / value.

Exports take 1-30 s each; :func:`exported` caches them per test session under ``tmp_path_factory``.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers

__all__ = ["ARCHS", "EXPORTERS", "TINY", "Exported", "ExporterUnavailable", "FlatCacheLM", "tiny_causal_lm",
           "export_torch", "export_optimum", "exported", "optimum_python", "io_names", "ort_feeds", "ort_run"]

log = logging.getLogger(__name__)

ARCHS = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM")}
EXPORTERS = ("dynamo", "torchscript", "optimum")
TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            num_hidden_layers=2, vocab_size=300, max_position_embeddings=128)
OPTIMUM_SPEC = "optimum-onnx==0.1.0"
REPO = Path(__file__).resolve().parents[1]


class ExporterUnavailable(RuntimeError):
    """The exporter cannot run here (e.g. no optimum environment)."""


def tiny_causal_lm(arch: str = "llama", seed: int = 0):
    """A random ``{Llama,Qwen2}ForCausalLM`` of :data:`TINY` size, in eval mode, float32.

    transformers initialises linears with std 0.02 and norms to 1, which leaves attention nearly uniform
    and logits nearly flat: every parameter is redrawn (std 0.15; norms 1 + 0.5 N(0, 1); biases 0.5 N(0, 1)).
    """
    config_cls, model_cls = ARCHS[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, config_cls)(**TINY)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            offset = 1.0 if "norm" in name else 0.0
            p.copy_(offset + torch.randn_like(p) * (0.5 if p.ndim == 1 else 0.15))
    return model


def io_names(n_layers: int) -> tuple[list[str], list[str]]:
    """(input names, output names) of an exported decoder with ``n_layers`` layers."""
    kv = [f"{i}.{k}" for i in range(n_layers) for k in ("key", "value")]
    return (["input_ids", "attention_mask", "position_ids", *(f"past_key_values.{x}" for x in kv)],
            ["logits", *(f"present.{x}" for x in kv)])


class FlatCacheLM(torch.nn.Module):
    """``model`` with its KV cache as flat tensors: (ids, mask, positions, k0, v0, k1, ...) -> (logits,
    present k0, v0, ...)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = transformers.DynamicCache(config=self.model.config)
        for i in range(len(past) // 2):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True)
        present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
        return (out.logits, *present)


def _example(model, batch: int = 1, seq: int = 3, past: int = 4, seed: int = 0):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)
    mask = torch.ones(batch, past + seq, dtype=torch.int64)
    pos = torch.arange(past, past + seq)[None].expand(batch, seq).contiguous()
    kv = [torch.randn(batch, cfg.num_key_value_heads, past, head_dim, generator=g)
          for _ in range(2 * cfg.num_hidden_layers)]
    return (ids, mask, pos, *kv)


def export_torch(model, path: str | Path, *, dynamo: bool = True, opset: int | None = None) -> Path:
    """Export ``model`` (a transformers causal LM) with its KV cache through ``torch.onnx.export``."""
    path = Path(path)
    wrapper = FlatCacheLM(model).eval()
    args = _example(model)
    inputs, outputs = io_names(model.config.num_hidden_layers)
    if dynamo:
        batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("past")
        shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: torch.export.Dim.DYNAMIC},
                  "position_ids": {0: batch, 1: seq}, "past": tuple({0: batch, 2: past} for _ in args[3:])}
        torch.onnx.export(wrapper, args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_shapes=shapes, dynamo=True, external_data=False, opset_version=opset)
    else:
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
                "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
        axes |= {n: {0: "batch", 2: "past"} for n in inputs[3:]} | {n: {0: "batch", 2: "total"} for n in outputs[1:]}
        with torch.no_grad():
            torch.onnx.export(wrapper, args, str(path), input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, dynamo=False, opset_version=opset or 17)
    log.info("exported %s with torch.onnx.export(dynamo=%s)", path, dynamo)
    return path


def optimum_python() -> str | None:
    """The Python with optimum-onnx installed (module docstring), or None."""
    env = os.environ.get("QCOMPILE_OPTIMUM_PYTHON")
    if env:
        return env
    venv = REPO / ".venv-optimum" / "bin" / "python"
    return str(venv) if venv.is_file() else None


_OPTIMUM_SCRIPT = """
import sys
from optimum.exporters.onnx import main_export
main_export(sys.argv[1], output=sys.argv[2], task="text-generation-with-past", do_validation=False)
"""


def export_optimum(model, folder: str | Path) -> Path:
    """Save ``model`` to ``folder/hf`` and export it with optimum-onnx into ``folder/onnx``; the ONNX path."""
    python = optimum_python()
    if python is None:
        raise ExporterUnavailable(f"optimum export needs a Python with {OPTIMUM_SPEC} (transformers < 4.58): set "
                                  "QCOMPILE_OPTIMUM_PYTHON or create .venv-optimum as .ci/run does")
    folder = Path(folder)
    model.save_pretrained(folder / "hf", safe_serialization=True)
    r = subprocess.run([python, "-c", _OPTIMUM_SCRIPT, str(folder / "hf"), str(folder / "onnx")],
                       capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"optimum export failed ({python}):\n{r.stderr[-4000:]}")
    log.info("exported %s with optimum-onnx", folder / "onnx" / "model.onnx")
    return folder / "onnx" / "model.onnx"


@dataclass
class Exported:
    """An exported decoder: the transformers model it came from and the ONNX file."""

    arch: str
    exporter: str
    model: object  # the transformers model (eval, float32)
    path: Path

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers


_CACHE: dict[tuple, Exported] = {}


def exported(tmp_path_factory, arch: str = "llama", exporter: str = "dynamo", seed: int = 0) -> Exported:
    """The tiny ``arch`` model exported by ``exporter`` (one of :data:`EXPORTERS`), once per test session."""
    key = (str(tmp_path_factory.getbasetemp()), arch, exporter, seed)
    if key not in _CACHE:
        if exporter not in EXPORTERS:
            raise ValueError(f"exporter {exporter!r}: expected one of {EXPORTERS}")
        model = tiny_causal_lm(arch, seed)
        folder = tmp_path_factory.mktemp(f"exported-{arch}-{exporter}")
        if exporter == "optimum":
            path = export_optimum(model, folder)
        else:
            path = export_torch(model, folder / "model.onnx", dynamo=exporter == "dynamo")
        _CACHE[key] = Exported(arch, exporter, model, path)
    return _CACHE[key]


def ort_feeds(session, ids: np.ndarray, past: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Feeds for an onnxruntime session (or anything with ``get_inputs()``) of an exported decoder: ``ids``
    [batch, seq] after ``past`` (name -> array; None: an empty past), mask of ones and positions following on."""
    ids = np.asarray(ids, np.int64)
    batch, seq = ids.shape
    specs = session.get_inputs()
    past = dict(past or {})
    past_len = next(iter(past.values())).shape[2] if past else 0
    feeds = {}
    for s in specs:
        if s.name == "input_ids":
            feeds[s.name] = ids
        elif s.name == "attention_mask":
            feeds[s.name] = np.ones((batch, past_len + seq), np.int64)
        elif s.name == "position_ids":
            feeds[s.name] = np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy()
        elif s.name in past:
            feeds[s.name] = past[s.name]
        elif s.name.startswith("past_key_values."):
            _, kv, _, d = s.shape
            feeds[s.name] = np.zeros((batch, kv, 0, d), np.float32)
        else:
            raise ValueError(f"unexpected decoder input {s.name!r}")
    return feeds


def ort_run(session, ids: np.ndarray, past: dict[str, np.ndarray] | None = None):
    """(logits, the next step's past: presents renamed to past_key_values.*) of one decoder step."""
    outs = session.run(None, ort_feeds(session, ids, past))
    names = [o.name for o in session.get_outputs()]
    return outs[0], {n.replace("present", "past_key_values", 1): v for n, v in zip(names[1:], outs[1:])}


if __name__ == "__main__":  # python -m tests.exported OUT_DIR: write every export (for inspection)
    logging.basicConfig(level=logging.INFO)
    out = Path(sys.argv[1])
    for arch in ARCHS:
        for how in ("dynamo", "torchscript"):
            (out / arch).mkdir(parents=True, exist_ok=True)
            export_torch(tiny_causal_lm(arch), out / arch / f"{how}.onnx", dynamo=how == "dynamo")
