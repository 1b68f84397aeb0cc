"""ftstack's CDK constructs for platform teams (``pip install ftstack[infra]``).

    from ftstack.infra import FineTuningPipeline, FineTuningPipelineProps, TrainingOptions

``FineTuningPipeline`` is the whole stack as one construct; ``FineTuningStack`` is the app's stack
around one. The names below load on first use: the staging Lambda imports ``ftstack.infra.stage_data``
from the same package and has no CDK.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "FineTuningPipeline": "pipeline",
    "FineTuningPipelineProps": "props",
    "BuiltImage": "props",
    "EcrImage": "props",
    "ExistingNetwork": "props",
    "CreatedNetwork": "props",
    "GateCondition": "settings",
    "ExtraMetric": "settings",
    "TrainingOptions": "options",
    "PropsError": "options",
    "FineTuningStack": "stack",
    "InfraConfig": "config",
    "InfraConfigError": "config",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
