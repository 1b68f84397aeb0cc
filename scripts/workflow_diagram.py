"""Draws a Step Functions state machine (Amazon States Language) as a Mermaid flowchart.

The README's workflow diagram is drawn from the state machine of the synthesized app
(``synthesized_definition``), so it cannot drift from what ``cdk deploy`` creates;
``scripts/update_readme.py`` puts it between its markers and tests/test_readme.py fails when it is stale.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DIAGRAM_CONTEXT = {"quality_threshold": 2.0}
"""Context on top of cdk.json's: the default deployment has no quality gate, and the diagram
should show the gate's state and where it leads."""
MAX_LABEL = 48
"""Longest edge label: a condition is summarized, not printed whole (the definition has those)."""
RESERVED = {"end", "graph", "flowchart", "subgraph", "style", "class", "classDef", "click", "linkStyle", "direction"}
SHAPES = {
    "Task": ("[", "]"), "Pass": ("(", ")"), "Choice": ("{", "}"), "Wait": ("[/", "/]"),
    "Succeed": ("([", "])"), "Fail": ("([", "])"), "terminal": ("((", "))"),
}
CLASSES = ("classDef fail fill:#fde2e2,stroke:#c62828", "classDef succeed fill:#e3f4e1,stroke:#2e7d32",
           "classDef terminal fill:#eeeeee,stroke:#616161")
_OPERATORS = {"Equals": "==", "LessThan": "<", "LessThanEquals": "<=", "GreaterThan": ">", "GreaterThanEquals": ">=", "Matches": "matches"}
_NEGATED = {"==": "!=", "<": ">=", "<=": ">", ">": "<=", ">=": "<", "matches": "does not match"}
_COMPARISON = re.compile(r"^(String|Numeric|Boolean|Timestamp)(Equals|LessThan|LessThanEquals|GreaterThan|GreaterThanEquals|Matches)(Path)?$")
_TESTS = {"IsPresent": ("present", "absent"), "IsNull": ("null", "not null"), "IsString": ("a string", "not a string"),
          "IsNumeric": ("a number", "not a number"), "IsBoolean": ("a boolean", "not a boolean"),
          "IsTimestamp": ("a timestamp", "not a timestamp")}


class DiagramError(ValueError):
    """The definition cannot be drawn; the message names the state, the key and the fix."""


def text(value: str) -> str:
    """``value`` as a quoted Mermaid label: characters that Mermaid parses are written as its entity codes."""
    for char, code in (("#", "#35;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;"), ("|", "#124;"), ("`", "#96;")):
        value = value.replace(char, code)
    return '"' + " ".join(value.split()) + '"'


def _short_path(path: str) -> str:
    return path.rstrip(".").rsplit(".", 1)[-1] if path not in ("$", "$$") else path


def _leaf(rule: dict[str, Any], negated: bool) -> str:
    variable = _short_path(rule["Variable"])
    for key, value in rule.items():
        if key in _TESTS:
            yes, no = _TESTS[key]
            return f"{variable} {yes if value != negated else no}"
        match = _COMPARISON.match(key)
        if match:
            operator = _OPERATORS[match.group(2)]
            shown = _short_path(value) if match.group(3) else (f"'{value}'" if isinstance(value, str) else json.dumps(value))
            return f"{variable} {_NEGATED[operator] if negated else operator} {shown}"
    raise DiagramError(f"choice rule on {rule['Variable']} has no comparison this script knows: {sorted(rule)}")


def condition(rule: dict[str, Any], negated: bool = False) -> str:
    """A short text for a Choice rule (``$.a.status == 'Failed'`` reads ``status == 'Failed'``)."""
    if "Condition" in rule:  # JSONata
        return ("not " if negated else "") + str(rule["Condition"]).strip("{%} ")
    if "Not" in rule:
        return condition(rule["Not"], not negated)
    for key, word in (("And", " and "), ("Or", " or ")):
        if key in rule:
            parts = [condition(r) if "Variable" in r or "Not" in r else f"({condition(r)})" for r in rule[key]]
            joined = word.join(parts)
            return f"not ({joined})" if negated else joined
    return _leaf(rule, negated)


def _clip(label: str) -> str:
    return label if len(label) <= MAX_LABEL else label[:MAX_LABEL - 1] + "…"


class _Drawing:
    """Collects node lines (nested in subgraphs as the states are) and edge lines, drawn after all nodes
    so that a node first named by an edge is not placed outside its subgraph."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.edges: list[str] = []
        self.ids: dict[tuple[str, str, bool], str] = {}

    def node_id(self, scope: str, name: str, terminal: bool = False) -> str:
        """A Mermaid-safe id, unique across scopes: ``s_`` + the name's letters, digits and ``_``
        (a scope's start and end nodes are keyed apart: a state may be named "(start)")."""
        key = (scope, name, terminal)
        if key not in self.ids:
            base = "s_" + (f"{scope}__" if scope else "") + re.sub(r"[^A-Za-z0-9_]", "_", name)
            candidate, n = base, 1
            while candidate in self.ids.values():
                n += 1
                candidate = f"{base}_{n}"
            self.ids[key] = candidate
        return self.ids[key]

    def edge(self, source: str, target: str, label: str | None = None, dashed: bool = False) -> None:
        arrow = "-.->" if dashed else "-->"
        self.edges.append(f"{source} {arrow}{f'|{text(_clip(label))}|' if label else ''} {target}")

    def scope(self, machine: dict[str, Any], scope: str, indent: str) -> None:
        """Draws one state machine or branch: its start and end, its states and their transitions."""
        states = machine.get("States")
        if not isinstance(states, dict) or machine.get("StartAt") not in states:
            where = f"branch {scope}" if scope else "the definition"
            raise DiagramError(f"{where} needs States (an object) and StartAt naming one of them")
        start, end = self.node_id(scope, "(start)", terminal=True), self.node_id(scope, "(end)", terminal=True)
        self.lines.append(f'{indent}{start}(("start")):::terminal')
        self.edge(start, self.target(scope, states, machine["StartAt"], "StartAt"))
        if any(s.get("End") for s in states.values()):
            self.lines.append(f'{indent}{end}(("end")):::terminal')
        for name, state in states.items():
            self.state(scope, states, name, state, indent)

    def target(self, scope: str, states: dict[str, Any], name: str, where: str) -> str:
        if name not in states:
            raise DiagramError(f"{where} names state {name!r}, which is not in {'branch ' + scope if scope else 'States'}")
        return self.node_id(scope, name)

    def state(self, scope: str, states: dict[str, Any], name: str, state: dict[str, Any], indent: str) -> None:
        kind, me = state.get("Type"), self.node_id(scope, name)
        if kind in ("Parallel", "Map"):
            self.lines.append(f"{indent}subgraph {me} [{text(f'{name} ({kind})')}]")
            branches = state.get("Branches", []) if kind == "Parallel" else [state.get("ItemProcessor") or state.get("Iterator") or {}]
            for i, branch in enumerate(branches):
                inner = f"b_{me[2:]}_{i}"  # branch ids start with b_, node ids with s_: never equal
                if kind == "Parallel":
                    self.lines.append(f"{indent}  subgraph {inner} [{text(f'branch {i + 1}')}]")
                self.scope(branch, inner, indent + ("    " if kind == "Parallel" else "  "))
                if kind == "Parallel":
                    self.lines.append(f"{indent}  end")
            self.lines.append(f"{indent}end")
        elif kind in SHAPES:
            opening, closing = SHAPES[kind]
            label = f"{name}: {state['Error']}" if kind == "Fail" and state.get("Error") not in (None, name) else name
            style = {"Fail": ":::fail", "Succeed": ":::succeed"}.get(kind, "")
            self.lines.append(f"{indent}{me}{opening}{text(label)}{closing}{style}")
        else:
            raise DiagramError(f"state {name!r} has Type {kind!r}; the types are {', '.join(sorted(SHAPES)[:-1])}, Parallel and Map")
        self.transitions(scope, states, name, state, me)

    def transitions(self, scope: str, states: dict[str, Any], name: str, state: dict[str, Any], me: str) -> None:
        for i, choice in enumerate(state.get("Choices", [])):
            self.edge(me, self.target(scope, states, choice["Next"], f"{name}.Choices[{i}].Next"), condition(choice))
        if "Default" in state:
            self.edge(me, self.target(scope, states, state["Default"], f"{name}.Default"), "otherwise")
        if "Next" in state:
            self.edge(me, self.target(scope, states, state["Next"], f"{name}.Next"))
        for i, catch in enumerate(state.get("Catch", [])):
            self.edge(me, self.target(scope, states, catch["Next"], f"{name}.Catch[{i}].Next"), ", ".join(catch["ErrorEquals"]), dashed=True)
        if state.get("End"):
            self.edge(me, self.node_id(scope, "(end)", terminal=True))


def to_mermaid(definition: dict[str, Any]) -> str:
    """The state machine as a Mermaid flowchart: a node per state (Parallel and Map as subgraphs
    holding their states), edges for Next, Choice rules, Default, Catch (dashed) and End."""
    drawing = _Drawing()
    drawing.scope(definition, "", "  ")
    return "\n".join(["flowchart TD", *drawing.lines, *("  " + e for e in drawing.edges), *("  " + c for c in CLASSES)])


def synthesized_definition() -> dict[str, Any]:
    """The state machine of the app as ``cdk synth`` builds it (cdk.json's context and
    ``DIAGRAM_CONTEXT``), read from the synthesized template; its ``${...}`` placeholders stay."""
    node = ROOT / "node_modules" / ".bin" / "node"
    if node.is_file():  # as tests/infra/conftest.py: the pinned node 22, not the system's end-of-life one
        os.environ.setdefault("JSII_NODE", str(node))
    os.environ.setdefault("JSII_SILENCE_WARNING_END_OF_LIFE_NODE_VERSION", "20")
    sys.path.insert(0, str(ROOT))
    import aws_cdk as cdk

    import app as ftstack_app

    context = json.loads((ROOT / "cdk.json").read_text())["context"]
    with tempfile.TemporaryDirectory() as outdir:
        cdk_app = cdk.App(outdir=outdir, context=context | DIAGRAM_CONTEXT)
        stack = ftstack_app.build_app(cdk_app)
        template = cdk_app.synth().get_stack_artifact(stack.artifact_id).template
    (machine,) = [r for r in template["Resources"].values() if r["Type"] == "AWS::StepFunctions::StateMachine"]
    return json.loads(machine["Properties"]["DefinitionString"])


def readme_section() -> str:
    """The README's generated workflow section: the synthesized state machine in a Mermaid block."""
    return f"```mermaid\n{to_mermaid(synthesized_definition())}\n```"


def main(argv: list[str] | None = None) -> int:
    """Prints the Mermaid flowchart of a definition file, or of the synthesized app's state machine."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python scripts/workflow_diagram.py                  # the app's state machine (synthesizes it, ~10 s)\n"
               "  python scripts/workflow_diagram.py --definition machine.asl.json\n"
               "  make docs                                           # puts it into README.md",
    )
    parser.add_argument("--definition", type=Path, help="an Amazon States Language JSON file to draw instead of the app's state machine")
    args = parser.parse_args(argv)
    try:
        definition = json.loads(args.definition.read_text()) if args.definition else synthesized_definition()
        if not isinstance(definition, dict):
            raise DiagramError("the top level must be a JSON object with StartAt and States")
        print(to_mermaid(definition))
    except OSError as exc:
        print(f"error: cannot read {args.definition}: {exc.strerror}; give an existing ASL JSON file", file=sys.stderr)
        return 2
    except json.JSONDecodeError as exc:
        print(f"error: {args.definition}, line {exc.lineno}: not JSON ({exc.msg}); give an ASL JSON file", file=sys.stderr)
        return 2
    except (DiagramError, KeyError) as exc:
        where = args.definition or "the synthesized state machine"
        print(f"error: {where}: {exc if isinstance(exc, DiagramError) else f'missing key {exc}'}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
