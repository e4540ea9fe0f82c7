"""Schedule knobs of our hand-scheduled kernels, declared as data next to each kernel.

A kernel family (the x86 int8 matmul, the float dequantizing matmul, ARM's sdot matmul) declares one
:class:`KnobSpace`: each knob's valid values, the first being the default, and which settings apply to a
kernel's shape. A *config* is a plain dict ``{knob: value}``; no knob changes the result or the weight
layout (only loop structure and blocking), so a tuned config applies to params packed without one.
The defaults are the kernels' code as it was before knobs existed: with no config, or the default one,
a kernel is the same TIR (``tests/test_tune.py`` checks its structural hash).

``qcompile tune`` measures :meth:`KnobSpace.settings` of each kernel (:mod:`qcompile.targets.kernel_tuning`)
and a compile with ``--db`` builds each kernel with its recorded config.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["KnobSpace", "config_name"]


@dataclass(frozen=True)
class KnobSpace:
    """The knobs of one kernel family: ``knobs[name]`` lists the valid values, the default first;
    ``applies(config, k, n)`` says whether a setting is valid for a [K, N] weight (e.g. a tile count that
    must divide N/8)."""

    family: str  # the kernel names' prefix, e.g. "qmatmul_i8"
    knobs: dict[str, tuple]
    applies: Callable[[dict, int, int], bool] = field(default=lambda config, k, n: True, compare=False)
    doc: dict[str, str] = field(default_factory=dict, compare=False)  # knob -> what it does

    def __post_init__(self):
        for name, values in self.knobs.items():
            if not values or len(set(values)) != len(values):
                raise ValueError(f"{self.family}: knob {name!r} needs distinct values, got {values}")

    @property
    def default(self) -> dict:
        return {name: values[0] for name, values in self.knobs.items()}

    def resolve(self, config: dict | None) -> dict:
        """``config`` completed with the defaults; unknown knobs or values are a ``ValueError``."""
        config = dict(config or {})
        unknown = sorted(set(config) - set(self.knobs))
        if unknown:
            raise ValueError(f"{self.family}: unknown knobs {unknown} (knobs: {sorted(self.knobs)})")
        for name, value in config.items():
            if value not in self.knobs[name]:
                raise ValueError(f"{self.family}: {name}={value!r} is not one of {self.knobs[name]}")
        return self.default | config

    def is_default(self, config: dict | None) -> bool:
        return self.resolve(config) == self.default

    def settings(self, k: int, n: int, limit: int | None = None) -> list[dict]:
        """The valid settings for a [K, N] weight: the default first, then by how many knobs differ from
        it (every single-knob change before any pair), the first-declared knob's changes first; at most
        ``limit``."""
        default = self.default
        combos = [dict(zip(self.knobs, values)) for values in itertools.product(*self.knobs.values())]
        valid = [c for c in combos if self.applies(c, k, n)]
        names = list(self.knobs)

        def order(c):  # fewest changes first; then the earlier-declared knob's changes, in value order
            changed = [i for i, name in enumerate(names) if c[name] != default[name]]
            return (len(changed), changed, [self.knobs[name].index(c[name]) for name in names])

        valid.sort(key=order)
        if default not in valid:
            valid.insert(0, default)
        return valid[:limit] if limit is not None else valid


def config_name(config: dict) -> str:
    """``tiles=2,row_block=4``: a config as text (reports, logs)."""
    return ",".join(f"{name}={value}" for name, value in config.items())
