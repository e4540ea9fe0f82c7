"""Calibration samples from the user's files (``--calib FILE``): one feed dict per model run.

- ``.npz``: one array per model input, keyed by input name. An array of the input's rank is split
  along its first (batch) axis into runs of the model's batch (1 where the batch is symbolic); an
  array of rank + 1 holds one whole feed per entry of its first axis. With ``input_ids`` given, a
  decoder's ``attention_mask``, ``token_type_ids``, ``position_ids`` and ``past_*`` inputs may be left
  out: they are filled as for text (below), so token ids alone calibrate an exported decoder.
- ``.npy``: the same, for a model with a single input.
- ``.txt``: text for a language model, tokenized with a Hugging Face ``tokenizer.json`` (``tokenizer``
  or beside the model), cut into ``n_samples`` evenly spaced windows of ``seq_len`` tokens. Inputs are
  filled by name: ``input_ids``, ``attention_mask`` (ones), ``token_type_ids`` (zeros),
  ``position_ids`` (0..L-1), and ``past_*`` KV-cache inputs with an empty past (length 0).
- ``"self"``: a decoder LLM's own sampled text (:mod:`.selfcalib`), fed like token ids in a .npz.
- ``None`` / ``"random"``: data shaped and typed like the inputs (floats standard normal, integers in
  [0, 100)): enough to exercise the pipeline, weak as calibration, hence a warning.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from qcompile.runtime.errors import QCompileError

__all__ = ["CalibrationDataError", "load_samples", "InputSpec", "model_inputs", "RANDOM_INT_HIGH"]

log = logging.getLogger(__name__)

RANDOM_INT_HIGH = 100
"""Random integer inputs are drawn from [0, RANDOM_INT_HIGH)."""

_TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


class CalibrationDataError(QCompileError):
    """A calibration file cannot be turned into inputs for this model."""


@dataclass(frozen=True)
class InputSpec:
    """A model input: name, numpy dtype, and dims (int, or a str/None for a symbolic dim)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]

    def describe(self) -> str:
        return f"{self.dtype}[{', '.join('?' if d is None else str(d) for d in self.dims)}]"

    @property
    def past(self) -> bool:
        """A KV-cache input (``past_key_values.0.key``, ``past_key_0``, ...): fed an empty past."""
        return self.name.startswith("past")


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a run must feed (graph inputs that are not initializers)."""
    inits = {i.name for i in model.graph.initializer}
    out = []
    for v in model.graph.input:
        if v.name in inits:
            continue
        tt = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim)
        out.append(InputSpec(v.name, np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)), dims))
    return out


def load_samples(
    spec: str | Path | None,
    model: onnx.ModelProto,
    *,
    model_path: str | Path | None = None,
    n_samples: int = 32,
    seq_len: int = 128,
    tokenizer: str | Path | None = None,
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Calibration feeds for ``model`` from ``spec`` (a file, ``"random"`` or ``None``); see the module doc."""
    if n_samples < 1 or seq_len < 1:
        raise CalibrationDataError(f"n_samples ({n_samples}) and seq_len ({seq_len}) must be positive")
    inputs = model_inputs(model)
    if spec is None or str(spec) == "random":
        return _random(inputs, n_samples, seq_len, seed)
    if str(spec) == "self":
        from .selfcalib import generate_ids  # noqa: PLC0415

        ids = generate_ids(model, n_samples, seq_len, seed)
        return _split(Path("self-generated text"), {"input_ids": ids}, inputs, n_samples)
    path = Path(spec)
    if not path.is_file():
        raise CalibrationDataError(f"{path}: no such calibration file (expected .npz, .npy, .txt or 'random')")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        return _split(path, arrays, inputs, n_samples)
    if suffix == ".npy":
        if len(inputs) != 1:
            raise CalibrationDataError(
                f"{path}: a .npy file can feed a model with one input; this model has {len(inputs)} "
                f"({', '.join(i.name for i in inputs)}): write a .npz with one array per input name")
        return _split(path, {inputs[0].name: np.load(path, allow_pickle=False)}, inputs, n_samples)
    if suffix == ".txt":
        tok = _tokenizer_file(path, tokenizer, model_path)
        return _text(path, tok, inputs, n_samples, seq_len)
    raise CalibrationDataError(f"{path}: unknown calibration file type {suffix!r}; expected .npz (arrays by input "
                               "name), .npy (single-input model), .txt (text for a language model) or 'random'")


# -- arrays ---------------------------------------------------------------------------------------------


def _cast(path: Path, inp: InputSpec, a: np.ndarray) -> np.ndarray:
    same_kind = (np.issubdtype(a.dtype, np.floating) and np.issubdtype(inp.dtype, np.floating)) or (
        np.issubdtype(a.dtype, np.integer) and np.issubdtype(inp.dtype, np.integer)) or a.dtype == inp.dtype
    if not same_kind:
        raise CalibrationDataError(f"{path}: input {inp.name!r} expects {inp.dtype}, found an array of {a.dtype}")
    return np.ascontiguousarray(a, dtype=inp.dtype)


def _check_shape(path: Path, inp: InputSpec, sample: np.ndarray, what: str) -> None:
    ok = sample.ndim == len(inp.dims) and all(
        not isinstance(d, int) or d == 0 or d == s for d, s in zip(inp.dims, sample.shape))
    if not ok:
        raise CalibrationDataError(f"{path}: input {inp.name!r} expects {inp.describe()}; {what} has shape "
                                   f"{list(sample.shape)}")


def _fillable(inp: InputSpec) -> bool:
    """An input filled from input_ids' shape when a calibration file leaves it out (module doc)."""
    return inp.past or (inp.name in _TEXT_INPUTS and inp.name != "input_ids")


def _fill(inp: InputSpec, ids: np.ndarray) -> np.ndarray:
    """``inp`` for a run whose input_ids are ``ids`` [batch, seq]: an empty past, or mask / types / positions."""
    if inp.past:
        return np.zeros((ids.shape[0], *_empty_past(inp).shape[1:]), inp.dtype)
    return _text_value(inp.name, list(ids.shape), inp.dtype)


def _split(path: Path, arrays: dict[str, np.ndarray], inputs: list[InputSpec], n_samples: int):
    filled = [i for i in inputs if i.name not in arrays and _fillable(i)] if "input_ids" in arrays else []
    if filled:
        log.info("%s: filling %s from input_ids", path, [i.name for i in filled])
    inputs = [i for i in inputs if i not in filled]
    names = [i.name for i in inputs]
    missing = [n for n in names if n not in arrays]
    unknown = [n for n in arrays if n not in names]
    if missing or unknown:
        raise CalibrationDataError(
            f"{path}: arrays must be keyed by the model's input names {names}; "
            f"missing {missing}, unknown {unknown}")
    per_input: dict[str, list[np.ndarray]] = {}
    for inp in inputs:
        a = _cast(path, inp, arrays[inp.name])
        rank = len(inp.dims)
        if a.ndim == rank + 1:  # axis 0 lists whole feeds
            runs = [a[i] for i in range(a.shape[0])]
        elif a.ndim == rank and rank > 0:  # axis 0 is the model's batch axis: split it into runs
            if isinstance(inp.dims[0], int) and inp.dims[0] > 0:
                batch = inp.dims[0]
                if a.shape[0] % batch:
                    raise CalibrationDataError(f"{path}: input {inp.name!r} has a fixed batch of {batch}; "
                                               f"found {a.shape[0]} rows, not a multiple of it")
                runs = [a[i:i + batch] for i in range(0, a.shape[0], batch)]
            else:  # a symbolic batch: every row is used, in n_samples runs
                runs = [r for r in np.array_split(a, min(n_samples, a.shape[0])) if len(r)]
        else:
            raise CalibrationDataError(
                f"{path}: input {inp.name!r} expects {inp.describe()} (rank {rank}); found shape {list(a.shape)}: "
                f"give rank {rank} (split along the batch axis) or {rank + 1} (one feed per entry of axis 0)")
        if runs:
            _check_shape(path, inp, runs[0], "each sample")
        per_input[inp.name] = runs
    counts = {n: len(r) for n, r in per_input.items()}
    if len(set(counts.values())) > 1:
        raise CalibrationDataError(f"{path}: inputs hold different numbers of samples: {counts}")
    total = next(iter(counts.values()), 0)
    if total == 0:
        raise CalibrationDataError(f"{path}: holds no samples")
    if total > n_samples:
        log.info("%s: using the first %d of %d samples", path, n_samples, total)
    feeds = [{n: per_input[n][i] for n in names} for i in range(min(total, n_samples))]
    for feed in feeds:
        feed.update({i.name: _fill(i, feed["input_ids"]) for i in filled})
    return feeds


# -- text -----------------------------------------------------------------------------------------------


def _tokenizer_file(text: Path, tokenizer: str | Path | None, model_path: str | Path | None) -> Path:
    if tokenizer is not None:
        p = Path(tokenizer)
        p = p / "tokenizer.json" if p.is_dir() else p
        if not p.is_file():
            raise CalibrationDataError(f"{text}: tokenizer {p} does not exist (expected a Hugging Face tokenizer.json)")
        return p
    beside = Path(model_path).parent / "tokenizer.json" if model_path is not None else None
    if beside is not None and beside.is_file():
        return beside
    where = f" (none found beside the model, at {beside})" if beside is not None else ""
    raise CalibrationDataError(
        f"{text}: text calibration needs a tokenizer{where}: pass a Hugging Face tokenizer.json "
        "(--tokenizer PATH) or put tokenizer.json beside the model")


def _encode(path: Path, tokenizer: Path) -> np.ndarray:
    try:
        from tokenizers import Tokenizer  # noqa: PLC0415
    except ImportError as e:
        raise CalibrationDataError(f"{path}: text calibration needs the 'tokenizers' package: "
                                   "pip install tokenizers") from e
    try:
        tok = Tokenizer.from_file(str(tokenizer))
    except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception
        raise CalibrationDataError(f"{tokenizer}: not a readable Hugging Face tokenizer.json ({e})") from e
    tok.no_truncation()  # a tokenizer.json often truncates to the model's length: we cut windows ourselves
    tok.no_padding()
    text = path.read_text(encoding="utf-8", errors="replace")
    return np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def _text(path: Path, tokenizer: Path, inputs: list[InputSpec], n_samples: int, seq_len: int):
    by_name = {i.name: i for i in inputs}
    if "input_ids" not in by_name:
        raise CalibrationDataError(f"{path}: text calibration needs a model input named 'input_ids'; the model's "
                                   f"inputs are {list(by_name)}: give a .npz instead")
    other = [i.name for i in inputs if i.name not in _TEXT_INPUTS and not i.past]
    if other:
        raise CalibrationDataError(
            f"{path}: text calibration fills {', '.join(_TEXT_INPUTS)} and past_* inputs; the model also "
            f"needs {other}: give a .npz with every input instead")
    seq_dim = by_name["input_ids"].dims[-1]
    if isinstance(seq_dim, int) and seq_dim > 0 and seq_dim != seq_len:
        log.info("input_ids has a fixed length of %d tokens; using it instead of seq_len=%d", seq_dim, seq_len)
        seq_len = seq_dim
    ids = _encode(path, tokenizer)
    if len(ids) < seq_len:
        raise CalibrationDataError(f"{path}: {len(ids)} tokens, fewer than one window of {seq_len}; "
                                   "give more text or a smaller sequence length")
    n = min(n_samples, len(ids) // seq_len)
    if n < n_samples:
        log.warning("%s: %d tokens make only %d windows of %d (asked for %d)", path, len(ids), n, seq_len,
                    n_samples)
    starts = np.linspace(0, len(ids) - seq_len, n).round().astype(np.int64) if n > 1 else np.zeros(1, np.int64)
    log.info("%s: %d tokens -> %d windows of %d", path, len(ids), n, seq_len)
    return [_text_feed(inputs, ids[s:s + seq_len]) for s in starts]


def _text_value(name: str, shape: list[int], dtype: np.dtype) -> np.ndarray:
    """attention_mask (ones), token_type_ids (zeros) or position_ids (0..L-1) of ``shape``."""
    if name == "attention_mask":
        return np.ones(shape, dtype)
    if name == "token_type_ids":
        return np.zeros(shape, dtype)
    return np.ascontiguousarray(np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape))


def _text_feed(inputs: list[InputSpec], window: np.ndarray) -> dict[str, np.ndarray]:
    feed = {}
    for inp in inputs:
        if inp.past:
            feed[inp.name] = _empty_past(inp)
        elif inp.name == "input_ids":
            feed[inp.name] = window[None].astype(inp.dtype)
        else:
            feed[inp.name] = _text_value(inp.name, [1, len(window)], inp.dtype)
    return feed


def _empty_past(inp: InputSpec) -> np.ndarray:
    """A KV-cache input with past length 0: batch 1, the symbolic non-batch dim 0, fixed dims as given."""
    shape = [1 if i == 0 and not isinstance(d, int) else (d if isinstance(d, int) and d > 0 else 0)
             for i, d in enumerate(inp.dims)]
    return np.zeros(shape, inp.dtype)


# -- random -----------------------------------------------------------------------------------------------


def _random(inputs: list[InputSpec], n_samples: int, seq_len: int, seed: int):
    rng = np.random.default_rng(seed)
    log.warning("calibrating on random data: fine to exercise the pipeline, weak as calibration "
                "(give real samples with --calib FILE)")
    filled = set(_TEXT_INPUTS) - {"input_ids"}  # filled by name, as for text
    ints = [i.name for i in inputs if not np.issubdtype(i.dtype, np.floating) and i.name not in filled
            and not i.past]
    if ints:
        log.warning("random integer inputs %s are drawn from [0, %d): token ids or indices this random make "
                    "calibration statistics weak", ints, RANDOM_INT_HIGH)
    samples = []
    for _ in range(n_samples):
        feed = {}
        for inp in inputs:
            shape = [d if isinstance(d, int) and d > 0 else (1 if i == 0 else seq_len) for i, d in enumerate(inp.dims)]
            if inp.past:
                feed[inp.name] = _empty_past(inp)
            elif inp.name in filled:
                feed[inp.name] = _text_value(inp.name, shape, inp.dtype)
            elif np.issubdtype(inp.dtype, np.floating):
                feed[inp.name] = rng.standard_normal(shape).astype(inp.dtype)
            elif inp.dtype == np.bool_:
                feed[inp.name] = rng.integers(0, 2, shape).astype(np.bool_)
            else:
                feed[inp.name] = rng.integers(0, RANDOM_INT_HIGH, shape).astype(inp.dtype)
        samples.append(feed)
    return samples
