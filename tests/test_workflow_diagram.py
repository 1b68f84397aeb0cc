"""scripts/workflow_diagram.py: the Mermaid drawing of a state machine, on hand-written definitions
with each construct, and its place in the README (tests/test_readme.py checks the README's copy
against the synthesized app)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import workflow_diagram as wd  # noqa: E402

from ftstack.infra.definition import build_definition  # noqa: E402
from ftstack.infra.settings import WorkflowSettings  # noqa: E402

SMALL = {
    "StartAt": "Is it big?",
    "States": {
        "Is it big?": {"Type": "Choice", "Choices": [
            {"Variable": "$.input.size", "NumericGreaterThan": 10, "Next": "Fan out"},
            {"Not": {"Variable": "$.input.name", "IsPresent": True}, "Next": "No name"},
        ], "Default": "Each item"},
        "Fan out": {"Type": "Parallel", "Next": "Done", "Catch": [{"ErrorEquals": ["States.Timeout", "Oops"], "Next": "No name"}],
                    "Branches": [
                        {"StartAt": "Work", "States": {"Work": {"Type": "Task", "Resource": "arn:x", "End": True}}},
                        {"StartAt": "Work", "States": {"Work": {"Type": "Wait", "Seconds": 1, "Next": "Stop"},
                                                       "Stop": {"Type": "Succeed"}}},
                    ]},
        "Each item": {"Type": "Map", "ItemProcessor": {"StartAt": "One", "States": {"One": {"Type": "Pass", "End": True}}},
                      "End": True},
        "No name": {"Type": "Fail", "Error": "NoName", "Cause": "give a name"},
        "Done": {"Type": "Succeed"},
    },
}
"""Choice (a rule, a negated rule, Default), Parallel (two branches, each with its own "Work"),
Map, Catch with two errors, End inside and outside subgraphs, and names with spaces and "?"."""

EXPECTED = """\
flowchart TD
  s__start_(("start")):::terminal
  s__end_(("end")):::terminal
  s_Is_it_big_{"Is it big?"}
  subgraph s_Fan_out ["Fan out (Parallel)"]
    subgraph b_Fan_out_0 ["branch 1"]
      s_b_Fan_out_0___start_(("start")):::terminal
      s_b_Fan_out_0___end_(("end")):::terminal
      s_b_Fan_out_0__Work["Work"]
    end
    subgraph b_Fan_out_1 ["branch 2"]
      s_b_Fan_out_1___start_(("start")):::terminal
      s_b_Fan_out_1__Work[/"Work"/]
      s_b_Fan_out_1__Stop(["Stop"]):::succeed
    end
  end
  subgraph s_Each_item ["Each item (Map)"]
    s_b_Each_item_0___start_(("start")):::terminal
    s_b_Each_item_0___end_(("end")):::terminal
    s_b_Each_item_0__One("One")
  end
  s_No_name(["No name: NoName"]):::fail
  s_Done(["Done"]):::succeed
  s__start_ --> s_Is_it_big_
  s_Is_it_big_ -->|"size #gt; 10"| s_Fan_out
  s_Is_it_big_ -->|"name absent"| s_No_name
  s_Is_it_big_ -->|"otherwise"| s_Each_item
  s_b_Fan_out_0___start_ --> s_b_Fan_out_0__Work
  s_b_Fan_out_0__Work --> s_b_Fan_out_0___end_
  s_b_Fan_out_1___start_ --> s_b_Fan_out_1__Work
  s_b_Fan_out_1__Work --> s_b_Fan_out_1__Stop
  s_Fan_out --> s_Done
  s_Fan_out -.->|"States.Timeout, Oops"| s_No_name
  s_b_Each_item_0___start_ --> s_b_Each_item_0__One
  s_b_Each_item_0__One --> s_b_Each_item_0___end_
  s_Each_item --> s__end_
  classDef fail fill:#fde2e2,stroke:#c62828
  classDef succeed fill:#e3f4e1,stroke:#2e7d32
  classDef terminal fill:#eeeeee,stroke:#616161"""


def test_each_construct_is_drawn():
    assert wd.to_mermaid(SMALL) == EXPECTED


def test_ids_are_mermaid_safe_and_unique_whatever_the_names():
    names = ["a b", "a-b", "a_b", "end", "x|y", 'say "hi"', "(start)", "subgraph"]
    states = {n: {"Type": "Pass", "Next": names[i + 1]} for i, n in enumerate(names[:-1])} | {names[-1]: {"Type": "Succeed"}}
    drawing = wd.to_mermaid({"StartAt": names[0], "States": states})
    ids = re.findall(r"^  (\S+?)[(\[{]", drawing, re.M)
    assert len(ids) == len(set(ids)) == len(names) + 1  # and the start node
    assert all(re.fullmatch(r"s_[A-Za-z0-9_]+", i) for i in ids)
    assert '("x#124;y")' in drawing and '("say #quot;hi#quot;")' in drawing


@pytest.mark.parametrize(("rule", "text"), [
    ({"Variable": "$.poll.status", "StringEquals": "Completed"}, "status == 'Completed'"),
    ({"Not": {"Variable": "$.s3_uri", "StringEquals": ""}}, "s3_uri != ''"),
    ({"Variable": "$.attempt.index", "NumericLessThanPath": "$.attempt.count"}, "index < count"),
    ({"Or": [{"Variable": "$.a", "IsNull": True}, {"And": [{"Variable": "$.b", "BooleanEquals": True},
                                                         {"Not": {"Variable": "$.c", "IsNumeric": True}}]}]},
     "a null or (b == true and c not a number)"),
    ({"Not": {"And": [{"Variable": "$.a", "IsPresent": True}, {"Variable": "$.b", "StringMatches": "x*"}]}},
     "not (a present and b matches 'x*')"),
])
def test_conditions_read_as_short_text(rule, text):
    assert wd.condition(rule) == text


def test_a_long_condition_is_clipped():
    rule = {"Variable": "$.x", "StringEquals": "y" * 100, "Next": "B"}
    drawing = wd.to_mermaid({"StartAt": "A", "States": {"A": {"Type": "Choice", "Choices": [rule], "Default": "B"}, "B": {"Type": "Succeed"}}})
    (label,) = re.findall(r'-->\|"(x == [^"]*)"\|', drawing)
    assert len(label) == wd.MAX_LABEL and label.endswith("…")


@pytest.mark.parametrize(("definition", "message"), [
    ({"StartAt": "A", "States": {"A": {"Type": "Pass", "Next": "Nowhere"}}}, "A.Next names state 'Nowhere'"),
    ({"StartAt": "A", "States": {"A": {"Type": "Choice", "Choices": [], "Default": "B"}}}, "A.Default names state 'B'"),
    ({"StartAt": "A", "States": {"A": {"Type": "Pause"}}}, "state 'A' has Type 'Pause'"),
    ({"StartAt": "B", "States": {"A": {"Type": "Succeed"}}}, "StartAt naming one of them"),
])
def test_a_broken_definition_is_named(definition, message):
    with pytest.raises(wd.DiagramError, match=re.escape(message)):
        wd.to_mermaid(definition)


def test_every_transition_of_the_real_definition_is_an_edge():
    settings = WorkflowSettings(region="us-east-1", volume_size_gb=500, max_runtime_s=86400, max_wait_s=172800, max_instance_count=4,
                                network_isolation=False, subnets=(), security_groups=(), approval_status="PendingManualApproval",
                                quality_threshold=1.5, volume_kms_instance_types=("ml.p3.2xlarge",))
    definition = build_definition(settings)
    drawing = wd.to_mermaid(definition)
    edges = re.findall(r"^  (s_\w+) -\.?->(?:\|[^|]*\|)? (s_\w+)$", drawing, re.M)
    labels = dict(re.findall(r'^  (s_\w+)[(\[{/]+"([^"]*)"', drawing, re.M))
    named = {(labels[a].split(":")[0], labels[b].split(":")[0]) for a, b in edges if a in labels and b in labels}
    expected = {(name, target) for name, state in definition["States"].items()
                for target in [state.get("Next"), state.get("Default"), *(c["Next"] for c in state.get("Choices", []) + state.get("Catch", []))]
                if target} | {("start", definition["StartAt"])}
    assert named == expected
    assert set(labels.values()) >= {"Train", "QualityGate", "Succeeded"}


def test_the_cli_draws_a_file_and_names_a_bad_one(tmp_path):
    good, bad = tmp_path / "machine.asl.json", tmp_path / "bad.json"
    good.write_text(json.dumps(SMALL))
    bad.write_text('{"StartAt": "A",\n "States": }')
    script = [sys.executable, str(ROOT / "scripts" / "workflow_diagram.py")]
    drawn = subprocess.run([*script, "--definition", str(good)], capture_output=True, text=True)
    assert drawn.returncode == 0 and drawn.stdout == EXPECTED + "\n"
    broken = subprocess.run([*script, "--definition", str(bad)], capture_output=True, text=True)
    assert broken.returncode == 2 and f"{bad}, line 2: not JSON" in broken.stderr and "Traceback" not in broken.stderr
    missing = subprocess.run([*script, "--definition", str(tmp_path / "none.json")], capture_output=True, text=True)
    assert missing.returncode == 2 and "cannot read" in missing.stderr and "Traceback" not in missing.stderr
    assert "examples:" in subprocess.run([*script, "--help"], capture_output=True, text=True).stdout


def test_make_docs_puts_the_diagram_between_the_markers(monkeypatch):
    """The README's section is what update_readme.render writes: a stale diagram is replaced (and so
    tests/test_readme.py, which compares render's output with the README, fails on it)."""
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(wd, "synthesized_definition", lambda: SMALL)  # no synth here: test_readme does that one
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"<!-- workflow-diagram:[^\n]*-->\n(.*?)<!-- /workflow-diagram -->", readme, re.S)
    assert section and section.group(1).startswith("```mermaid\nflowchart TD\n")
    rendered = module.render(readme)
    assert f"```mermaid\n{EXPECTED}\n```\n<!-- /workflow-diagram -->" in rendered
    assert rendered != readme
