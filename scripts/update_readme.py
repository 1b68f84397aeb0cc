"""Regenerates the README's reference sections from their sources: the training config's field
docs, the deployment config's field docs, the pipeline construct's props and extension points, the
execution input's JSON schema and the workflow diagram (drawn from the synthesized state machine by
scripts/workflow_diagram.py)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def sections() -> dict[str, str]:
    """Section name -> its generated Markdown."""
    sys.path.insert(0, str(ROOT))
    from ftstack_train.config import reference_table as training_table
    from ftstack.infra.config import reference_table as infra_table
    from ftstack.infra.extensions import contract_table
    from ftstack.infra.props import reference_table as props_table

    sys.path.insert(0, str(ROOT / "scripts"))
    from workflow_diagram import readme_section as workflow_diagram

    schema = (ROOT / "infra" / "execution_input.schema.json").read_text().strip()
    return {"config-reference": training_table(), "infra-config-reference": infra_table(), "execution-input-schema": f"```json\n{schema}\n```",
            "workflow-diagram": workflow_diagram(), "pipeline-props-reference": props_table(),
            "extension-points": contract_table()}


def render(text: str) -> str:
    """README text with every generated section replaced by its current content."""
    for name, body in sections().items():
        pattern = re.compile(rf"(<!-- {name}:[^\n]*-->\n).*?(<!-- /{name} -->)", re.DOTALL)
        if not pattern.search(text):
            sys.exit(f"README.md has no {name} markers")
        text = pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), text)
    return text


if __name__ == "__main__":
    README.write_text(render(README.read_text()))
