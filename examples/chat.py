"""Stream text from a compiled decoder LLM.

    qcompile smollm2.gguf --target x86 --bpw 4.25 --calib text.txt -o s.qcm
    python examples/chat.py s.qcm "Once upon a time" [--max-new-tokens 64] [--temperature 0.7 --top-k 40 --top-p 0.9]

The artifact carries the model's tokenizer (tokenizer.json, converted from the GGUF or copied from the
Hugging Face folder); tokens are printed as they are produced, then prefill and decode speed.
"""

from __future__ import annotations

import argparse
import sys

import qcompile.runtime as rt
from qcompile.runtime.generate import Sampling


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("artifact")
    p.add_argument("prompt")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (the default): greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    args = p.parse_args(argv)

    session = rt.load(args.artifact)
    tok = session.tokenizer()
    if tok is None:
        print(f"{args.artifact} has no tokenizer.json: compile with --tokenizer", file=sys.stderr)
        return 2
    prompt = tok.encode(args.prompt).ids
    eos = [i for i in (tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_end|>", "</s>", "<eos>")) if i is not None]
    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.seed)
    print(args.prompt, end="", flush=True)
    produced: list[int] = []
    shown = ""
    for token in session.generator().stream(prompt, args.max_new_tokens, sampling, eos):
        produced.append(token)
        text = tok.decode(produced)  # decode the whole suffix: multi-byte characters span tokens
        print(text[len(shown):], end="", flush=True)
        shown = text
    stats = session.generator().stats
    print(f"\n[{stats.prompt_tokens} prompt tokens: {stats.prefill_tok_s:.1f} tok/s; "
          f"{stats.new_tokens} new: {stats.decode_tok_s:.1f} tok/s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
