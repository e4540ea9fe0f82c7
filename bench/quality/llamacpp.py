"""llama.cpp's quantization types on the same float weights, evaluated by llama.cpp itself.

1. The float HF folder becomes an F32 GGUF with ``convert_hf_to_gguf.py`` from the llama-cpp-python
   source package of the installed version (the wheel does not ship it; the sdist is fetched with
   ``pip download`` once and its Python files are cached).
2. An importance matrix is computed from the float torch model on the calibration windows, as
   llama.cpp's ``llama-imatrix`` defines it: for every block linear, the mean over calibration tokens of
   x² per input channel, keyed by the GGUF tensor name (``blk.N.attn_q.weight`` ...).
3. ``llama_model_quantize`` (C API through llama_cpp's ctypes bindings) writes each type, once without
   and once with the imatrix (``llama_model_quantize_params.imatrix``, an array of
   ``llama_model_imatrix_data`` ending in a NULL name). The embedding (= tied head) is kept F32 like
   every other method's, so the rows compare the block linears only.
4. Logits come from ``Llama(logits_all=True)`` evaluating our token ids (the same tokens as everyone;
   KV cache in F32). llama.cpp multiplies quantized weights with int8-quantized activations: that error
   is part of its rows.

Rows of 576 are not multiples of 256, so the k- and IQ-types fall back to Q4_0/Q5_0/Q5_1/Q8_0/IQ4_NL on
most tensors (llama-quant.cpp's shape fallback); bpw is read from the file, and the note lists the
types actually used.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

from .bits import block_linears, gguf_bits, gguf_name
from .context import Context, Row
from .data import cache_dir

__all__ = ["QUICK_TYPES", "TYPES", "compute_imatrix", "convert_f32", "llamacpp_rows", "quantize"]

log = logging.getLogger(__name__)

TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_XS", "Q8_0")
QUICK_TYPES = ("Q4_K_M",)
IMATRIX_WINDOWS = 16  # calibration windows for the imatrix (llama-imatrix's default is 100 x 512)


# -- conversion ------------------------------------------------------------------------------------


def _source_dir() -> Path:
    """vendor/llama.cpp Python files (converter + gguf-py) of the installed llama-cpp-python's sdist."""
    import llama_cpp

    version = llama_cpp.__version__
    root = Path(os.environ.get("LLAMA_CPP_SOURCE", cache_dir() / f"llama.cpp-{version}"))
    if (root / "convert_hf_to_gguf.py").is_file():
        return root
    sdists = cache_dir() / "sdist"
    archive = sdists / f"llama_cpp_python-{version}.tar.gz"
    if not archive.is_file():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(sdists)], check=True)
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    tmp = root.with_name(root.name + ".tmp")
    with tarfile.open(archive) as tar:
        members = []
        for m in tar.getmembers():
            rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
            if rel and m.isfile() and (rel.endswith(".py") or rel.startswith("gguf-py/")):
                m.name = rel
                members.append(m)
        tar.extractall(tmp, members=members, filter="data")
    tmp.rename(root)
    return root


def convert_f32(model_dir: Path, out: Path) -> Path:
    """F32 GGUF of the HF folder ``model_dir`` (``convert_hf_to_gguf.py --outtype f32``), made once."""
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.gguf")
    src = _source_dir()
    done = subprocess.run([sys.executable, str(src / "convert_hf_to_gguf.py"), str(model_dir), "--outtype", "f32",
                           "--outfile", str(tmp)], capture_output=True, text=True)
    if done.returncode != 0:  # e.g. ModuleNotFoundError: sentencepiece (it is imported before any fallback)
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({done.returncode}):\n{done.stderr[-3000:]}")
    tmp.rename(out)
    return out


# -- importance matrix -----------------------------------------------------------------------------


def compute_imatrix(model, windows: np.ndarray) -> dict[str, np.ndarray]:
    """{GGUF tensor name: float32 [K]}: mean of x² per input channel of each block linear."""
    import torch

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def pre(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]

        return pre

    handles = [m.register_forward_pre_hook(hook(gguf_name(n))) for n, m in block_linears(model).items()]
    try:
        with torch.inference_mode():
            for ids in windows:
                model(input_ids=torch.from_numpy(np.asarray(ids, dtype=np.int64))[None], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {name: (sums[name] / counts[name]).float().numpy() for name in sums}


# -- quantization ----------------------------------------------------------------------------------


def quantize(f32: Path, out: Path, type_name: str, imatrix: dict[str, np.ndarray] | None, threads: int) -> Path:
    """``llama_model_quantize`` of ``f32`` to ``type_name`` (e.g. "Q4_K_M"), embedding kept F32."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{type_name}")
    params.nthread = threads
    params.token_embedding_type = llama_cpp.GGML_TYPE_F32
    params.output_tensor_type = llama_cpp.GGML_TYPE_F32
    keep = []
    if imatrix is not None:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for entry, (name, values) in zip(entries, sorted(imatrix.items())):
            values = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(values)
            entry.name = name.encode()
            entry.data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = values.size
        entries[len(imatrix)].name = None  # terminator
        params.imatrix = entries
    tmp = out.with_suffix(".tmp.gguf")
    log_path = out.with_suffix(".log")
    with _stderr_to(log_path):  # one fallback warning per tensor, printed by C straight to stderr
        rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({type_name}) failed with {rc}; llama.cpp's log: {log_path}")
    tmp.rename(out)
    return out


@contextlib.contextmanager
def _stderr_to(path: Path):
    """Send file descriptor 2 (C code's stderr) to ``path`` for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def gguf_logits_fn(path: Path, length: int, threads: int):
    """A LogitsFn evaluating a GGUF with llama.cpp (all positions' logits, F32 KV cache)."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=length, n_batch=length, n_ubatch=length,
                          n_threads=threads, n_threads_batch=threads, logits_all=True,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, verbose=False)

    def logits(ids: np.ndarray) -> np.ndarray:
        llm.reset()
        llm.eval([int(t) for t in ids])
        return np.array(llm.scores[: len(ids)], dtype=np.float32)

    logits.llm = llm  # keeps the model alive as long as the function
    return logits


def llamacpp_rows(ctx: Context) -> list[Row]:
    length = ctx.evaluator.windows.shape[1]
    t0 = time.perf_counter()
    f32 = convert_f32(ctx.model_dir, ctx.workdir / "f32.gguf")
    metrics = ctx.evaluator.evaluate(gguf_logits_fn(f32, length, ctx.threads))
    count = gguf_bits(f32)
    rows = [Row.of("llama.cpp F32", count.bpw, metrics, "the unquantized GGUF: llama.cpp's own floor",
                   time.perf_counter() - t0)]

    t0 = time.perf_counter()
    windows = ctx.calibration[: 4 if ctx.quick else IMATRIX_WINDOWS]
    imatrix = compute_imatrix(ctx.model, windows)
    imatrix_seconds = time.perf_counter() - t0
    log.info("imatrix on %d x %d calibration tokens: %.1f s", *windows.shape, imatrix_seconds)

    for type_name in QUICK_TYPES if ctx.quick else TYPES:
        for im in (None, imatrix):
            t0 = time.perf_counter()
            method = f"llama.cpp {type_name}" + (" imatrix" if im is not None else "")
            out = ctx.workdir / f"{type_name}{'-imatrix' if im is not None else ''}.gguf"
            quantize(f32, out, type_name, im, ctx.threads)
            count = gguf_bits(out)
            metrics = ctx.evaluator.evaluate(gguf_logits_fn(out, length, ctx.threads))
            note = f"{count.describe()}; embedding/head F32"
            if im is not None:
                note += f"; imatrix from {windows.shape[0]} x {windows.shape[1]} calibration tokens"
            rows.append(Row.of(method, count.bpw, metrics, note, time.perf_counter() - t0))
            out.unlink()
            out.with_suffix(".log").unlink()
            log.info("%s: %s", method, rows[-1])
    return rows
