"""What a loaded decoder artifact offers besides ``run``, for every runtime (TVM, Vulkan): its tokenizer
and token generation with the KV cache on the device (:mod:`.generate`).

A session class gets these by inheriting :class:`DecoderMethods`; it must have ``manifest``, ``path``,
``inputs``/``outputs``, ``device_tensor(a)`` and ``run_device(args)`` (outputs with ``.numpy()``), and set
``self._generator = None``.
"""

from __future__ import annotations

__all__ = ["DecoderMethods"]


class DecoderMethods:
    def tokenizer(self):
        """The artifact's ``tokenizers.Tokenizer`` (from its tokenizer.json), or None if it has none."""
        if "tokenizer.json" not in self.manifest["files"]:
            return None
        from tokenizers import Tokenizer  # noqa: PLC0415

        return Tokenizer.from_file(str(self.path / "tokenizer.json"))

    def generator(self):
        """The session's :class:`~qcompile.runtime.generate.Generator` (a decoder artifact only)."""
        from .generate import Generator  # noqa: PLC0415

        if self._generator is None:
            self._generator = Generator(self)
        return self._generator

    def generate(self, prompt_ids, max_new_tokens: int, sampling=None, stop_ids=(), on_token=None) -> list[int]:
        """Greedy or sampled decoding with the KV cache (:mod:`qcompile.runtime.generate`)."""
        from .generate import Sampling  # noqa: PLC0415

        return self.generator().generate(prompt_ids, max_new_tokens, sampling or Sampling(), stop_ids, on_token)
