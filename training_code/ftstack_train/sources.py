"""Where training config values come from (a YAML file, SageMaker hyperparameters, ``key=value``
overrides), and how each value becomes its field's type. Errors name the key, its source and
the fix."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from .durations import Duration
from .errors import ConfigError


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys; lists and scalars are leaves, an empty mapping is a leaf."""
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, key + "."))
        else:
            flat[key] = value
    return flat


def read_yaml(path: str) -> dict[str, Any]:
    """A YAML config file as dotted keys (``flatten``); ConfigError naming the file and line."""
    import yaml  # imported here so that the stdlib-only users of this package never need it

    try:
        with open(path, encoding="utf-8") as handle:
            tree = yaml.safe_load(handle)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} is not valid YAML ({getattr(exc, 'problem', exc)}); fix the syntax") from None
    if tree is None:
        return {}
    if not isinstance(tree, Mapping):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    return flatten(tree)


def parse_overrides(items: Iterable[str]) -> dict[str, str]:
    """``key=value`` arguments as a mapping (later ones win); raises ConfigError for a malformed one."""
    parsed = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{item!r}: write overrides as key=value, e.g. optimizer.lr=1e-4")
        parsed[key.strip()] = text.strip()
    return parsed


def unquote(text: str) -> Any:
    """A hyperparameter's value: JSON-decoded when it is a quoted string."""
    # The SageMaker Python SDK JSON-encodes every hyperparameter; a quoted string is one of those.
    if len(text) >= 2 and text[0] == text[-1] == '"':
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text
    return text


def coerce(key: str, annotation: str, value: Any, origin: str) -> Any:
    """Turns a YAML value or a hyperparameter string into the field's type."""

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{key} ({origin}): {value!r} is not {expected}")

    optional = "None" in annotation
    if optional and (value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null"))):
        return None
    if key == "device_train_microbatch_size" and isinstance(value, str) and value.strip().lower() == "auto":
        return None
    base = annotation.replace(" | None", "")
    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no", "1", "0", "on", "off"):
            return value.strip().lower() in ("true", "yes", "1", "on")
        raise bad("true or false")
    if base == "int":
        if isinstance(value, bool):
            raise bad("a whole number")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        try:
            return int(str(value).strip())
        except ValueError:
            raise bad("a whole number") from None
    if base == "float":
        if isinstance(value, bool):
            raise bad("a number")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad("a number, e.g. 5e-6") from None
    if base == "str":
        if isinstance(value, (Mapping, list)):
            raise bad("a single value")
        return str(value)
    if base == "Duration":
        if (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value.strip().isdigit()):
            value = f"{str(value).strip()}ep"  # llm-foundry reads a bare number as epochs
        try:
            return Duration.parse(str(value))
        except ValueError as exc:
            raise ConfigError(f"{key} ({origin}): {exc}") from None
    if base == "tuple[float, float]":
        items = value
        if isinstance(value, str):
            text = value.strip()
            try:
                items = json.loads(text) if text.startswith("[") else [float(x) for x in text.split(",")]
            except ValueError:
                raise bad("two numbers, e.g. [0.9, 0.95]") from None
        if not isinstance(items, (list, tuple)) or len(items) != 2:
            raise bad("two numbers, e.g. [0.9, 0.95]")
        try:
            return tuple(float(x) for x in items)
        except (TypeError, ValueError):
            raise bad("two numbers, e.g. [0.9, 0.95]") from None
    raise AssertionError(f"no coercion for {annotation}")
