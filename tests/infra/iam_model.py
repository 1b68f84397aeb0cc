"""A small model of IAM policy evaluation and the synthesized app's resources, resolved, for the
tests that ask the stack's policies the questions AWS will ask."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Any

ACCOUNT = "123456789012"
"""Stands in for ``AWS::AccountId`` (the stack is account-agnostic)."""

# ---------------------------------------------------------------------------------------------
# A small model of IAM evaluation: enough for the statements this stack writes (Allow/Deny,
# Action and Resource wildcards, Service/AWS principals, ArnLike/StringLike/ArnEquals/
# StringEquals/Bool/Null conditions and their ForAllValues: forms). A condition key missing from the request never matches.
# ---------------------------------------------------------------------------------------------

def resolve(value: Any, stack) -> Any:
    """The template value with pseudo parameters filled in and resources as ``<LogicalId>`` /
    ``<LogicalId.Arn>``, so ARNs compare as plain strings."""
    if isinstance(value, list):
        return [resolve(v, stack) for v in value]
    if not isinstance(value, dict):
        return value
    if "Ref" in value:
        pseudo = {"AWS::AccountId": ACCOUNT, "AWS::Region": stack.region, "AWS::Partition": "aws",
                  "AWS::URLSuffix": "amazonaws.com", "AWS::StackName": stack.stack_name}
        return pseudo.get(value["Ref"], f"<{value['Ref']}>")
    if "Fn::GetAtt" in value:
        return f"<{'.'.join(value['Fn::GetAtt'])}>"
    if "Fn::Join" in value:
        separator, parts = value["Fn::Join"]
        return separator.join(str(resolve(p, stack)) for p in parts)
    return {k: resolve(v, stack) for k, v in value.items()}


def as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def _condition_holds(operator: str, key: str, expected, context: dict) -> bool:
    if operator == "Null":  # "true": the key must be absent; "false": present
        return (key not in context) == (str(expected).lower() == "true")
    if operator.startswith("ForAllValues:"):  # every value in the request is among the expected ones
        return all(_condition_holds(operator.split(":", 1)[1], key, expected, {key: value})
                   for value in as_list(context.get(key, [])))
    if key not in context:
        return False
    actual = str(context[key])
    if operator in ("ArnLike", "StringLike"):
        return any(fnmatchcase(actual, pattern) for pattern in as_list(expected))
    if operator in ("ArnEquals", "StringEquals"):
        return actual in as_list(expected)
    if operator == "Bool":
        return actual.lower() in [str(e).lower() for e in as_list(expected)]
    raise AssertionError(f"this model does not know the condition operator {operator}")


def _matches(statement: dict, action: str, resource: str, principal: tuple[str, str] | None, context: dict) -> bool:
    if not any(fnmatchcase(action.lower(), a.lower()) for a in as_list(statement["Action"])):
        return False
    if not any(fnmatchcase(resource, r) for r in as_list(statement["Resource"])):
        return False
    if principal is not None:
        kind, name = principal
        given = statement.get("Principal", {})
        if given != "*" and not (isinstance(given, dict) and name in as_list(given.get(kind, []))):
            return False
    return all(_condition_holds(op, key, expected, context)
               for op, keys in statement.get("Condition", {}).items() for key, expected in keys.items())


def allows(statements: list[dict], action: str, resource: str, *, principal=None, context=None) -> bool:
    """Whether ``statements`` allow the request: some Allow matches and no Deny does."""
    hits = [s["Effect"] for s in statements if _matches(s, action, resource, principal, context or {})]
    return "Allow" in hits and "Deny" not in hits


# ---------------------------------------------------------------------------------------------
# The synthesized app, resolved
# ---------------------------------------------------------------------------------------------

def resolved_resources(stack, template) -> dict[str, dict]:
    """The template's resources, resolved (``resolve``)."""
    return {k: resolve(v, stack) for k, v in template.to_json()["Resources"].items()}


def of_type(resources: dict, kind: str) -> dict[str, dict]:
    return {k: v for k, v in resources.items() if v["Type"] == kind}


def role_statements(resources: dict, role_id: str) -> list[dict]:
    """Every statement of the IAM policies attached to a role (inline and ``AWS::IAM::Policy``)."""
    statements = []
    for policy in resources[role_id]["Properties"].get("Policies", []):
        statements += policy["PolicyDocument"]["Statement"]
    for policy in of_type(resources, "AWS::IAM::Policy").values():
        if f"<{role_id}>" in policy["Properties"].get("Roles", []):
            statements += policy["Properties"]["PolicyDocument"]["Statement"]
    return statements


def role_assumed_by(resources: dict, service: str) -> str:
    """The logical id of the one role that ``service`` assumes, e.g. ``states.amazonaws.com``."""
    (role_id,) = [k for k, v in of_type(resources, "AWS::IAM::Role").items()
                  if service in as_list(v["Properties"]["AssumeRolePolicyDocument"]["Statement"][0]["Principal"].get("Service"))]
    return role_id


