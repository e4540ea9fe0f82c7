"""Token generation with a compiled decoder: prefill, then one token at a time with the KV cache.

A decoder artifact has the interface of :mod:`qcompile.compiler.frontends.decoder` (and of optimum's
``text-generation-with-past`` exports without attention_mask/position_ids):

    inputs   input_ids int64 [batch, seq], past_key_values.{i}.key/.value [batch, kv, past, head_dim]
    outputs  logits [batch, seq, vocab], present.{i}.key/.value [batch, kv, past + seq, head_dim]

The cache stays on the device between steps: each step's ``present`` tensors are passed back as the
next ``past`` without a copy to numpy; only the last position's logits come to the host, where the
next token is chosen (numba: greedy, temperature, top-k, top-p).  A module with a ``greedy`` function
(decoders compiled for CUDA: :mod:`qcompile.targets.cuda.sampling`) chooses greedy tokens on the
device: then one int32 per step comes to the host, and the token id goes back as the next input.

An artifact whose attention was fused with an in-place cache (``manifest["kv_cache"]``, see
:mod:`qcompile.passes.fuse_attention`) takes preallocated buffers instead:

    inputs   past_key_values.{i}.key/.value [batch, kv, capacity, head_dim]   (positions [0, past) valid)
             past_positions int64 [past]                                      (arange(past): its length)
    outputs  present.{i}.key/.value: the same buffers, positions [past, past + seq) written in place

The buffers are allocated once (capacity = prompt + max_new_tokens, or :meth:`Generator.reserve`), kept
by the generator across calls, and passed unchanged at every step: no per-token reallocation or copy.

numpy equivalent of :func:`sample` (temperature t > 0):

    z = logits / t;  keep the top_k largest (all if top_k == 0)
    p = softmax(z) over the kept, sorted descending; keep the shortest prefix with Σ p ≥ top_p
    return kept[searchsorted(cumsum(p) / Σ p, u)]          u ~ U[0, 1)
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence

import numba
import numpy as np

from .errors import QCompileError

__all__ = ["Sampling", "Generator", "sample", "GenerationStats"]

log = logging.getLogger(__name__)

_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
_EXTRA = ("attention_mask", "position_ids")  # optimum's exports: filled as for an unpadded sequence


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: ``temperature == 0`` is greedy (argmax)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got {self}")


@dataclasses.dataclass
class GenerationStats:
    """Timings of the last :meth:`Generator.generate` call."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first new token comes from the prefill; the others from decode steps
        steps = self.new_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds else 0.0


@numba.njit(cache=True)
def sample(logits: np.ndarray, temperature: float, top_k: int, top_p: float, u: float) -> int:
    """The next token id from float32 ``logits`` [vocab] (module docstring); greedy if temperature == 0."""
    v = logits.shape[0]
    if temperature <= 0.0:
        return int(np.argmax(logits))
    order = np.argsort(-logits)
    k = v if top_k <= 0 or top_k > v else top_k
    z = logits[order[:k]].astype(np.float64) / temperature
    p = np.exp(z - z[0])
    p /= p.sum()
    c = np.cumsum(p)
    n = k
    for i in range(k):
        if c[i] >= top_p:
            n = i + 1
            break
    target = u * c[n - 1]
    for i in range(n):
        if c[i] > target:
            return int(order[i])
    return int(order[n - 1])


class Generator:
    """Generation over a loaded decoder :class:`~qcompile.runtime.session.Session`."""

    def __init__(self, session):
        self.session = session
        names = [i.name for i in session.inputs]
        if "input_ids" not in names or session.outputs[0].name != "logits":
            raise QCompileError(f"{session.path}: not a decoder (expected inputs input_ids and "
                                f"past_key_values.*, first output logits; found {names})")
        self.past = [i for i in session.inputs if _PAST.match(i.name)]
        self.kv_cache = session.manifest.get("kv_cache")  # in-place buffers, or None: past/present tensors
        self.buffers: list | None = None  # the in-place cache buffers (device tensors), in self.past order
        self.capacity = 0
        positions = (self.kv_cache["past_positions"],) if self.kv_cache else ()
        other = [n for n in names if n != "input_ids" and not _PAST.match(n) and n not in _EXTRA + positions]
        if other:
            raise QCompileError(f"{session.path}: decoder inputs {other} are not supported by generate "
                                f"(input_ids, past_key_values.*, and optionally {', '.join(_EXTRA)})")
        self.extra = {i.name: np.dtype(i.dtype) for i in session.inputs if i.name in _EXTRA}
        presents = [o.name for o in session.outputs[1:]]
        expect = [p.name.replace("past_key_values", "present") for p in self.past]
        if presents != expect:
            raise QCompileError(f"{session.path}: outputs {presents} do not mirror the past inputs {expect}")
        self.stats = GenerationStats()
        device_function = getattr(session, "device_function", None)
        self._greedy = device_function("greedy") if device_function is not None else None

    @property
    def device_greedy(self) -> bool:
        """Whether greedy tokens are chosen on the device (only the token id comes to the host)."""
        return self._greedy is not None

    def _empty_past(self, batch: int) -> list:
        arrays = []
        for spec in self.past:
            shape = [batch, *spec.shape[1:]]
            shape[2] = 0
            if not all(isinstance(d, int) for d in shape):
                raise QCompileError(f"{self.session.path}: past input {spec.name} has symbolic dims "
                                    f"{list(spec.shape)} besides batch and past length")
            arrays.append(np.zeros(shape, dtype=spec.dtype))
        return arrays

    def reserve(self, capacity: int, batch: int = 1) -> list:
        """The in-place cache buffers, holding at least ``capacity`` positions (allocated only to grow)."""
        if not self.kv_cache:
            raise QCompileError(f"{self.session.path}: this artifact has no in-place KV cache")
        if self.buffers is None or self.capacity < capacity or self.buffers[0].shape[0] != batch:
            shapes = [[batch, spec.shape[1], capacity, spec.shape[3]] for spec in self.past]
            if not all(isinstance(d, int) for shape in shapes for d in shape):
                raise QCompileError(f"{self.session.path}: cache inputs {[p.name for p in self.past]} have "
                                    f"symbolic dims besides batch and capacity")
            self.buffers = [self.session.device_tensor(np.zeros(shape, spec.dtype))
                            for shape, spec in zip(shapes, self.past)]
            self.capacity = capacity
            log.debug("KV cache: %d buffers [%d, %d, %d, %d]", len(shapes), *shapes[0])
        return self.buffers

    def _args(self, ids: np.ndarray, cache: list, past_len: int) -> list:
        """The run's inputs in the model's order: ids, the cache, and the optional mask / positions."""
        s = self.session
        by_name = {"input_ids": s.device_tensor(ids)}
        by_name.update(zip((p.name for p in self.past), cache))
        total = past_len + ids.shape[1]
        if "attention_mask" in self.extra:
            by_name["attention_mask"] = s.device_tensor(np.ones((1, total), dtype=self.extra["attention_mask"]))
        if self.kv_cache:
            by_name[self.kv_cache["past_positions"]] = s.device_tensor(np.arange(past_len, dtype=np.int64))
        if "position_ids" in self.extra:
            by_name["position_ids"] = s.device_tensor(
                np.arange(past_len, total, dtype=self.extra["position_ids"])[None])
        return [by_name[i.name] for i in s.inputs]

    def stream(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: Sampling = Sampling(),
               stop_ids: Sequence[int] = ()) -> Iterator[int]:
        """Yield up to ``max_new_tokens`` new token ids after ``prompt_ids``, stopping after a stop id."""
        prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(1, -1)
        if prompt.shape[1] == 0:
            raise QCompileError("generate needs at least one prompt token")
        rng = np.random.default_rng(sampling.seed)
        stops = set(int(s) for s in stop_ids)
        self.stats = GenerationStats(prompt_tokens=prompt.shape[1])
        s = self.session
        t0 = time.perf_counter()
        if self.kv_cache:
            cache = self.reserve(max(self.capacity, prompt.shape[1] + max_new_tokens))
        else:
            cache = [s.device_tensor(a) for a in self._empty_past(1)]
        ids = prompt
        past_len = 0
        for step in range(max_new_tokens):
            outs = s.run_device(self._args(ids, cache, past_len))
            past_len += ids.shape[1]
            if self._greedy is not None and sampling.temperature <= 0:
                token = int(self._greedy(outs[0]).numpy()[0])  # 4 bytes to the host, not the logits
            else:
                logits = outs[0].numpy()[0, -1]
                token = sample(logits, sampling.temperature, sampling.top_k, sampling.top_p, float(rng.random()))
            if not self.kv_cache:
                cache = outs[1:]  # (with the in-place cache, outs[1:] are the same buffers)
            now = time.perf_counter()
            if step == 0:
                self.stats.prefill_seconds = now - t0
            else:
                self.stats.decode_seconds += now - t0
            t0 = now
            self.stats.new_tokens += 1
            yield token
            if token in stops:
                return
            ids = np.array([[token]], dtype=np.int64)
            t0 = time.perf_counter()

    def generate(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_ids: Sequence[int] = (), on_token: Callable[[int], None] | None = None) -> list[int]:
        """The new token ids (``on_token`` is called with each as it is produced)."""
        out = []
        for token in self.stream(prompt_ids, max_new_tokens, sampling, stop_ids):
            out.append(token)
            if on_token is not None:
                on_token(token)
        log.info("generated %d tokens: prefill %.1f tok/s, decode %.1f tok/s", self.stats.new_tokens,
                 self.stats.prefill_tok_s, self.stats.decode_tok_s)
        return out
