"""Time spans in llm-foundry's notation: ``3ep`` (epochs), ``500ba`` (batches, i.e. optimizer
steps) and ``0.1dur`` (a fraction of the whole run)."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_UNITS = ("ep", "ba", "dur")
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ep|ba|dur)\s*$")


@dataclass(frozen=True)
class Duration:
    """An amount of training time: ``value`` in ``unit`` (``ep``, ``ba`` or ``dur``)."""

    value: float
    unit: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "value", float(self.value))

    @classmethod
    def parse(cls, text: str) -> Duration:
        """Parses ``3ep``, ``500ba`` or ``0.1dur``; raises ValueError with the accepted forms."""
        match = _PATTERN.match(text)
        if not match:
            raise ValueError(f"{text!r} is not a duration; write a number and a unit, e.g. 3ep, 500ba or 0.1dur")
        value, unit = float(match.group(1)), match.group(2)
        if unit == "ba" and not value.is_integer():
            raise ValueError(f"{text!r}: batches must be a whole number, e.g. 500ba")
        return cls(value, unit)

    def to_steps(self, steps_per_epoch: int, total_steps: int | None = None) -> int:
        """Converts to optimizer steps; ``dur`` needs ``total_steps``. Rounds up so that a
        non-zero span never becomes zero steps."""
        if self.unit == "ba":
            return int(self.value)
        if self.unit == "ep":
            return math.ceil(self.value * steps_per_epoch)
        if total_steps is None:
            raise ValueError(f"{self} is relative to the run's length and cannot set the length itself")
        return math.ceil(self.value * total_steps)

    def __str__(self) -> str:
        value = int(self.value) if self.value.is_integer() else self.value
        return f"{value}{self.unit}"
