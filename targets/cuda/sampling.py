"""Greedy token choice on the GPU: a decoder's module gets a second function, ``greedy``, so that a
decode step brings one token id per sequence to the host instead of the logits.

    greedy(logits: float32 [batch, seq, vocab]) -> int32 [batch]
    numpy: np.argmax(logits[:, -1, :], axis=-1)            (the first index of the maximum)

:func:`argmax_last` is one block per sequence: each thread scans a strided slice of the vocabulary
(coalesced loads, the first maximum of its slice), then the block reduces (value, index) pairs through
shared memory, keeping the smaller index on ties.
"""

from __future__ import annotations

import logging

__all__ = ["argmax_last", "add_greedy", "GREEDY", "THREADS"]

log = logging.getLogger(__name__)

GREEDY = "greedy"
THREADS = 1024
OPAQUE = 8


def argmax_last(vocab: int, threads: int = THREADS):
    """Scheduled CUDA TIR: ``y[b] = argmax(x[b, s - 1, :])`` for x float32 [b, s, vocab] (b, s symbolic)."""
    from tvm.script import tirx as T  # noqa: PLC0415

    steps = (vocab + threads - 1) // threads
    levels = threads.bit_length() - 1
    if 1 << levels != threads:
        raise ValueError(f"argmax_last: threads={threads} must be a power of two")

    def other(lv, tx):
        """The partner of ``tx`` at level ``lv``: tx + threads / 2**(lv+1), wrapped (upper half: don't-care)."""
        return (tx + T.shift_right(threads, lv + 1)) % threads

    def better(val, idx, lv, tx):
        o = other(lv, tx)
        return T.Or(val[lv % 2, o] > val[lv % 2, tx],
                    T.And(val[lv % 2, o] == val[lv % 2, tx], idx[lv % 2, o] < idx[lv % 2, tx]))

    @T.prim_func(private=True)
    def kernel(x_h: T.handle, y_h: T.handle):
        T.func_attr({"tirx.noalias": True, "op_pattern": OPAQUE, "tirx.is_scheduled": True})
        b = T.int64()
        s = T.int64()
        x = T.match_buffer(x_h, (b, s, vocab), "float32")
        y = T.match_buffer(y_h, (b,), "int32")
        for bi in T.thread_binding(b, thread="blockIdx.x"):
            for tx in T.thread_binding(threads, thread="threadIdx.x"):
                val = T.alloc_buffer((2, threads), "float32", scope="shared")
                idx = T.alloc_buffer((2, threads), "int32", scope="shared")
                best = T.alloc_buffer((1,), "float32", scope="local")
                at = T.alloc_buffer((1,), "int32", scope="local")
                best[0] = T.float32(-3.4028234663852886e38)
                at[0] = T.int32(0)
                for it in range(steps):
                    if it * threads + tx < vocab:
                        if x[bi, s - 1, it * threads + tx] > best[0] or it == 0:
                            best[0] = x[bi, s - 1, it * threads + tx]
                            at[0] = T.Cast("int32", it * threads + tx)
                val[0, tx] = best[0]
                idx[0, tx] = at[0]
                T.tvm_storage_sync("shared")
                for lv in T.unroll(levels):
                    # selects, not a branch: the barrier below may not sit under a condition
                    val[(lv + 1) % 2, tx] = T.if_then_else(better(val, idx, lv, tx), val[lv % 2, other(lv, tx)],
                                                           val[lv % 2, tx])
                    idx[(lv + 1) % 2, tx] = T.if_then_else(better(val, idx, lv, tx), idx[lv % 2, other(lv, tx)],
                                                           idx[lv % 2, tx])
                    T.tvm_storage_sync("shared")
                if tx == 0:
                    y[bi] = idx[levels % 2, 0]

    return kernel


def add_greedy(mod, vocab: int):
    """``mod`` (a lowered Relax module whose ``main`` returns logits [batch, seq, vocab] first) with a
    public Relax function ``greedy(logits) -> int32 [batch]`` calling :func:`argmax_last`."""
    from tvm import relax, tirx  # noqa: PLC0415

    b, s = tirx.Var("batch", "int64"), tirx.Var("seq", "int64")
    bb = relax.BlockBuilder(mod)
    logits = relax.Var("logits", relax.TensorType([b, s, vocab], "float32"))
    with bb.function(GREEDY, [logits]):
        gv = bb.add_func(argmax_last(vocab), "argmax_last")
        with bb.dataflow():
            out = bb.emit_output(relax.call_tir(gv, [logits], relax.TensorType([b], "int32")))
        bb.emit_func_output(out)
    log.info("added %s(logits) -> token ids (argmax on the device, vocab %d)", GREEDY, vocab)
    return bb.get()
