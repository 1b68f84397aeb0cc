"""Tests for ftstack_train.metrics: the log line the trainer prints and the regexes SageMaker reads
it back with (the training job's MetricDefinitions) are one contract, checked here line by line."""

import math
import re

import pytest

from ftstack_train.metrics import (
    EVAL_FIELDS, METRIC_DEFINITIONS, PREFIX, TRAIN_FIELDS, format_line, parse_line, perplexity,
)

# A line of each kind as the trainer prints it (trainer.py passes the fields in this order).
TRAIN_VALUES = dict(step=12, epoch=0.4, loss=2.3412, perplexity=10.3946, lr=5e-6, tokens_per_s=1234.5,
                    real_token_share=0.973, grad_norm=0.8125)
EVAL_VALUES = dict(step=12, epoch=0.4, cross_entropy=2.2011, perplexity=9.0352, tokens=40960)

# The field each definition reads, by the name CloudWatch shows.
FIELD_OF = {
    "train:cross_entropy": ("train", "loss"),
    "train:perplexity": ("train", "perplexity"),
    "train:learning_rate": ("train", "lr"),
    "train:tokens_per_second": ("train", "tokens_per_s"),
    "train:real_token_share": ("train", "real_token_share"),
    "train:epoch": ("train", "epoch"),
    "eval:cross_entropy": ("eval", "cross_entropy"),
    "eval:perplexity": ("eval", "perplexity"),
}

DEFINITIONS = {d.name: d for d in METRIC_DEFINITIONS}


def line_of(kind: str, **changes: float) -> str:
    values = dict(TRAIN_VALUES if kind == "train" else EVAL_VALUES)
    values.update(changes)
    return format_line(kind, **values)


def captured(regex: str, line: str) -> float | None:
    """The value SageMaker would record: the first group of the first match."""
    match = re.search(regex, line)
    return None if match is None else float(match.group(1))


# --- the line format ---------------------------------------------------------------------------

def test_format_line_prints_the_documented_form():
    assert format_line("eval", step=12, epoch=0.4, cross_entropy=2.2011, perplexity=9.036, tokens=40960) == (
        "ftstack-metrics eval step=12 epoch=0.4 cross_entropy=2.2011 perplexity=9.036 tokens=40960"
    )
    assert format_line("train", lr=5e-6) == "ftstack-metrics train lr=5.000e-06"


@pytest.mark.parametrize("kind, values", [("train", TRAIN_VALUES), ("eval", EVAL_VALUES)])
def test_parse_line_reads_back_what_format_line_wrote(kind, values):
    parsed_kind, parsed = parse_line(format_line(kind, **values))
    assert parsed_kind == kind
    assert list(parsed) == list(values)
    for name, value in values.items():
        assert parsed[name] == pytest.approx(value, rel=1e-5 if name != "lr" else 1e-3), name


def test_parse_line_round_trips_nan_and_inf():
    _, parsed = parse_line(format_line("eval", cross_entropy=math.nan, perplexity=math.inf))
    assert math.isnan(parsed["cross_entropy"]) and parsed["perplexity"] == math.inf


@pytest.mark.parametrize("line", [
    "", "step 12 loss=2.3", "ftstack-metricsX train loss=1", f" {PREFIX} train loss=1", "[rank0]: something else",
])
def test_parse_line_ignores_other_lines(line):
    assert parse_line(line) is None


# --- the MetricDefinitions regexes -------------------------------------------------------------

def test_every_definition_is_one_the_trainer_prints_and_names_are_unique():
    assert set(DEFINITIONS) == set(FIELD_OF), "a definition was added or renamed: update FIELD_OF"
    assert len(DEFINITIONS) == len(METRIC_DEFINITIONS)
    for name, (kind, field) in FIELD_OF.items():
        assert field in (TRAIN_FIELDS if kind == "train" else EVAL_FIELDS), name


@pytest.mark.parametrize("definition", METRIC_DEFINITIONS, ids=lambda d: d.name)
def test_definition_fits_sagemaker_metric_definition_limits(definition):
    # CreateTrainingJob's MetricDefinition: Name 1-255 characters, Regex 1-500, both pattern .+
    assert 1 <= len(definition.name) <= 255 and "\n" not in definition.name
    assert 1 <= len(definition.regex) <= 500 and "\n" not in definition.regex
    assert re.compile(definition.regex).groups >= 1


@pytest.mark.parametrize("name", sorted(FIELD_OF))
def test_definition_captures_its_field_from_a_printed_line(name):
    kind, field = FIELD_OF[name]
    values = TRAIN_VALUES if kind == "train" else EVAL_VALUES
    assert captured(DEFINITIONS[name].regex, line_of(kind)) == pytest.approx(values[field], rel=1e-3)


@pytest.mark.parametrize("value", [1e-30, 3.2e-12, 7.5e-7, 0.0, 1.5e12, 4.2e+250, 1e300, -2.5, -1e-9])
@pytest.mark.parametrize("name", sorted(FIELD_OF))
def test_definition_captures_tiny_and_huge_values_in_scientific_notation(name, value):
    kind, field = FIELD_OF[name]
    line = line_of(kind, **{field: value})
    assert captured(DEFINITIONS[name].regex, line) == pytest.approx(value, rel=1e-3), line


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", sorted(FIELD_OF))
def test_definition_captures_nan_and_inf(name, value):
    kind, field = FIELD_OF[name]
    line = line_of(kind, **{field: value})
    got = captured(DEFINITIONS[name].regex, line)
    assert got is not None, line
    assert (math.isnan(got) if math.isnan(value) else got == value), line


@pytest.mark.parametrize("name", sorted(FIELD_OF))
def test_definition_never_matches_the_other_kind(name):
    kind, _ = FIELD_OF[name]
    other = "eval" if kind == "train" else "train"
    # perplexity, step and epoch are in both kinds: the other kind's line has them, and must not count.
    every_field = {f: 1.0 for f in (*TRAIN_FIELDS, *EVAL_FIELDS)}
    assert re.search(DEFINITIONS[name].regex, line_of(other)) is None
    assert re.search(DEFINITIONS[name].regex, format_line(other, **every_field)) is None


def test_train_and_eval_perplexity_read_their_own_value():
    train = line_of("train", perplexity=11.0)
    evaluation = line_of("eval", perplexity=22.0)
    log = f"{train}\n{evaluation}\n"
    assert [float(m.group(1)) for m in re.finditer(DEFINITIONS["train:perplexity"].regex, log)] == [11.0]
    assert [float(m.group(1)) for m in re.finditer(DEFINITIONS["eval:perplexity"].regex, log)] == [22.0]


def test_definitions_read_a_field_not_a_longer_name_ending_in_it():
    # `lr=` must not be read out of `xlr=`, nor `loss=` out of `eval_loss=`.
    line = f"{PREFIX} train xlr=9.0 eval_loss=8.0 lr=1.000e-04 loss=2.5"
    assert captured(DEFINITIONS["train:learning_rate"].regex, line) == 1e-4
    assert captured(DEFINITIONS["train:cross_entropy"].regex, line) == 2.5


def test_definitions_match_a_line_behind_a_log_prefix():
    # CloudWatch lines may carry a prefix (torchrun's [rank0]:, a timestamp); the regex still reads them.
    line = "[default0]:2024-05-01 12:00:00 " + line_of("eval", cross_entropy=1.25)
    assert captured(DEFINITIONS["eval:cross_entropy"].regex, line) == 1.25


# --- perplexity --------------------------------------------------------------------------------

def test_perplexity_is_exp_of_cross_entropy():
    assert perplexity(0.0) == 1.0
    assert perplexity(2.0) == pytest.approx(math.exp(2.0))


@pytest.mark.parametrize("cross_entropy", [710.0, 1e6, math.inf])
def test_perplexity_of_a_huge_cross_entropy_is_inf_not_an_overflow(cross_entropy):
    assert perplexity(cross_entropy) == math.inf
    assert captured(DEFINITIONS["eval:perplexity"].regex, line_of("eval", perplexity=perplexity(cross_entropy))) == math.inf


def test_perplexity_of_nan_is_nan():
    assert math.isnan(perplexity(math.nan))


def test_json_safe_makes_metrics_strict_json():
    import json

    from ftstack_train.metrics import json_safe

    doc = {"final": {"eval_perplexity": float("inf"), "train_cross_entropy": float("nan"), "step": 3}, "history": [{"x": 1.5}]}
    assert json.loads(json.dumps(json_safe(doc), allow_nan=False)) == {
        "final": {"eval_perplexity": None, "train_cross_entropy": None, "step": 3}, "history": [{"x": 1.5}]
    }
