"""The metric log lines and the regexes that read them back: one module, used by the trainer to
print and by the infrastructure for the training job's CloudWatch ``MetricDefinitions``.

A line is ``ftstack-metrics <kind> name=value name=value ...`` with ``kind`` ``train`` or ``eval``,
for example::

    ftstack-metrics train step=12 epoch=0.40 loss=2.3412 perplexity=10.41 lr=5.000e-06 tokens_per_s=1234.5 real_token_share=0.973
    ftstack-metrics eval step=12 epoch=0.40 cross_entropy=2.2011 perplexity=9.036 tokens=40960

Standard library only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PREFIX = "ftstack-metrics"

TRAIN_FIELDS = ("step", "epoch", "loss", "perplexity", "lr", "tokens_per_s", "real_token_share", "grad_norm")
EVAL_FIELDS = ("step", "epoch", "cross_entropy", "perplexity", "tokens")

_NUMBER = r"([-+]?(?:[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?|nan|inf))"


@dataclass(frozen=True)
class MetricDefinition:
    """A SageMaker metric: CloudWatch name and the regex whose first group is the value."""

    name: str
    regex: str


def _definition(kind: str, field: str, name: str) -> MetricDefinition:
    # Anchored on the prefix and kind so that a train line's perplexity never counts as eval's.
    return MetricDefinition(name, rf"{PREFIX} {kind} .*\b{field}={_NUMBER}")


METRIC_DEFINITIONS = (
    _definition("train", "loss", "train:cross_entropy"),
    _definition("train", "perplexity", "train:perplexity"),
    _definition("train", "lr", "train:learning_rate"),
    _definition("train", "tokens_per_s", "train:tokens_per_second"),
    _definition("train", "real_token_share", "train:real_token_share"),
    _definition("train", "epoch", "train:epoch"),
    _definition("eval", "cross_entropy", "eval:cross_entropy"),
    _definition("eval", "perplexity", "eval:perplexity"),
)
"""What the training job reports to CloudWatch; the infrastructure passes these as they are."""


def perplexity(cross_entropy: float) -> float:
    """exp(cross-entropy), inf instead of an overflow."""
    try:
        return math.exp(cross_entropy)
    except OverflowError:
        return math.inf


def format_line(kind: str, **values: float | int) -> str:
    """Formats one metrics line; ``values`` are printed in the order given."""
    parts = [PREFIX, kind]
    for name, value in values.items():
        if isinstance(value, int):
            parts.append(f"{name}={value}")
        elif name == "lr":
            parts.append(f"{name}={value:.3e}")
        else:
            parts.append(f"{name}={value:.6g}")
    return " ".join(parts)


def parse_line(line: str) -> tuple[str, dict[str, float]] | None:
    """Reads a metrics line back (kind and values), or None for any other line."""
    if not line.startswith(PREFIX + " "):
        return None
    kind, *pairs = line[len(PREFIX) + 1 :].split()
    values = {}
    for pair in pairs:
        name, _, text = pair.partition("=")
        values[name] = float(text)
    return kind, values


def json_safe(value):
    """``value`` with every non-finite float replaced by None: metrics.json must be strict JSON
    (Step Functions' StringToJson rejects NaN and Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
