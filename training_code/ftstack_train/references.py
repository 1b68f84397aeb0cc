"""``${name}`` references in a training config: ``seed: ${global_seed}`` stands for the value of
the top-level key ``global_seed``. Expansion is capped, since nested references grow
exponentially and staging expands the execution input before anything else."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class Value:
    """A config value and where it came from."""

    value: Any
    origin: str  # "config.yaml", "hyperparameter", "override", for messages


_REF = re.compile(r"\$\{([^}]+)\}")

MAX_REFERENCES = 1_000
"""Most ``${name}`` substitutions one config may take, nested ones included. The tutorial's YAML
takes one; SageMaker accepts at most 100 hyperparameters, so no real config comes near."""
MAX_EXPANDED_CHARS = 64 * 1024
"""Longest text one value may expand to: 26 times SageMaker's 2,500-character limit on a
hyperparameter value, and far above the longest real value (a prompt template)."""
MAX_TOTAL_EXPANDED_CHARS = 1024 * 1024
"""Most text the expansion of one config may build. Nested references grow exponentially (one
2,500-character value referring to another is 625 copies of it per level), and staging expands
the execution input before anything else; these caps keep that to milliseconds and kilobytes."""


class Budget:
    """What the expansion of one config has spent; raises ConfigError as soon as a cap is passed."""

    def __init__(self) -> None:
        self.references = 0
        self.chars = 0

    def spend(self, values: dict[str, Value], chain: tuple[str, ...], references: int = 0, chars: int = 0, size: int = 0) -> None:
        """Charges ``references`` substitutions and ``chars`` characters built; ``size`` is the
        length of the value being built so far. ``chain`` is the key first asked for, then the
        references followed from it."""
        self.references += references
        self.chars += chars
        if self.references > MAX_REFERENCES:
            what = f"more than {MAX_REFERENCES:,} ${{...}} substitutions"
        elif size > MAX_EXPANDED_CHARS:
            what = f"a value of more than {MAX_EXPANDED_CHARS:,} characters"
        elif self.chars > MAX_TOTAL_EXPANDED_CHARS:
            what = f"more than {MAX_TOTAL_EXPANDED_CHARS:,} characters in all"
        else:
            return
        through = f" (through {' -> '.join(chain)})" if len(chain) > 1 else ""
        raise ConfigError(
            f"{chain[0]} ({values[chain[0]].origin}): its references expand to {what}{through}; "
            "write the value out instead of nesting references"
        )


def resolve(values: dict[str, Value], key: str, budget: Budget, *, aliases: Mapping[str, str],
            default: Callable[[str], Any], seen: tuple[str, ...] = ()) -> Any:
    """Resolves ``${name}`` references in one value, recursively, against top-level keys, within
    ``budget`` (shared by the whole config). ``aliases`` maps a name to the key it stands for;
    ``default(name)`` is the value of a key that is not set (KeyError: there is no such key)."""
    if key in seen:
        raise ConfigError(f"{key}: circular reference through {' -> '.join(seen + (key,))}")
    value = values[key].value
    if not isinstance(value, str) or "${" not in value:
        return value
    chain = seen + (key,)

    def lookup(name: str) -> Any:
        name = aliases.get(name, name)
        budget.spend(values, chain, references=1)
        if name not in values:
            try:
                return default(name)
            except KeyError:
                raise ConfigError(f"{key} ({values[key].origin}): refers to ${{{name}}}, which is not set; "
                                  "write the value instead") from None
        return resolve(values, name, budget, aliases=aliases, default=default, seen=chain)

    whole = _REF.fullmatch(value)
    if whole:
        return lookup(whole.group(1))
    # Built piece by piece so that a cap stops the expansion before the text exists.
    pieces, size, end = [], 0, 0
    for match in _REF.finditer(value):
        piece = str(lookup(match.group(1)))
        pieces += [value[end:match.start()], piece]
        size += match.start() - end + len(piece)
        budget.spend(values, chain, chars=len(piece), size=size)
        end = match.end()
    pieces.append(value[end:])
    budget.spend(values, chain, size=size + len(value) - end)
    return "".join(pieces)
