"""A decoder's decode step (batch = sequence = 1) as a Relax function of its own beside ``main``.

After its prompt, a decoder with a KV cache runs one token at a time.  ``main`` with the symbolic dims
of its first input (batch, sequence) bound to 1 (:func:`decode_binding`) has static shapes wherever the
cache length does not enter: the CUDA target replays those parts as CUDA graphs (TVM's
``RewriteCUDAGraph``: one graph launch instead of a launch per kernel), the Vulkan target's plan gets a
variant with its GEMV kernels.  The runtime calls the step function when the inputs have those dims
(manifest ``decode_step``: the function and the dims).
"""

from __future__ import annotations

import logging

__all__ = ["DECODE_STEP", "decode_binding", "add_decode_step", "is_shape_var"]

log = logging.getLogger(__name__)

DECODE_STEP = "decode_step"


def is_shape_var(e) -> bool:
    """Whether a Relax shape entry is a symbolic dim (a TIR Var or SizeVar)."""
    return type(e).__name__ in ("Var", "SizeVar")


def decode_binding(mod, num_inputs: int) -> dict[str, int]:
    """Symbolic dims to specialize to 1 for a decode step: those of the first input (batch, sequence)
    when the model takes a KV cache (an input named ``past...``); empty otherwise."""
    main = mod["main"]
    names = [str(p.name) for p in main.params[:num_inputs]]
    if not any(n.startswith("past") for n in names):
        return {}
    dims = main.params[0].ty.shape.values
    return {str(d.name): 1 for d in dims if is_shape_var(d)}


def bind_decode_step(mod, binding: dict[str, int]):
    """``mod`` with ``main``'s dims bound as ``binding`` says."""
    from tvm import relax, tirx  # noqa: PLC0415

    return relax.transform.BindSymbolicVars({k: tirx.const(v, "int64") for k, v in binding.items()}, "main")(mod)


def add_decode_step(mod, num_inputs: int):
    """(``mod`` with a public function :data:`DECODE_STEP`: ``main`` specialized by :func:`decode_binding`,
    the binding); ``mod`` unchanged and ``{}`` for a model without a KV cache."""
    import tvm  # noqa: PLC0415
    from tvm.relax.utils import copy_with_new_vars  # noqa: PLC0415

    binding = decode_binding(mod, num_inputs)
    if not binding:
        return mod, {}
    # its own variables (a module defines each Relax variable once)
    step = copy_with_new_vars(bind_decode_step(mod, binding)["main"]).with_attr("global_symbol", DECODE_STEP)
    out = tvm.IRModule({gv: f for gv, f in mod.functions.items()}, attrs=mod.attrs)
    out[DECODE_STEP] = step
    log.info("added %s: main with %s", DECODE_STEP, binding)
    return out, binding
