"""Where things live in the stack's bucket. No third-party import: the CDK constructs, the
data-staging Lambda and the tests all import it.

S3 lifecycle rules can only match a key prefix, not ``executions/*/checkpoints/``, so what must
expire (staged data, checkpoints) lives under ``scratch/`` and what must stay (models) under
``executions/``.
"""

from __future__ import annotations

# Shared with the operator CLI, which uploads under them: defined once, in the training package's
# contract (the CLI is installed without infra/).
from ftstack_train.contract import BASE_MODELS, INCOMING  # noqa: F401

EXECUTIONS = "executions/"
"""Exported models, one folder per execution; never expired."""

SCRATCH = "scratch/"
"""Staged data and checkpoints, one folder per execution; expired by a lifecycle rule."""


def staged_data_prefix(execution: str, attempt: str, channel: str) -> str:
    """``scratch/<execution>/data/<attempt>/<channel>/``: the job's input channel, as staged by
    one invocation of the staging function (``attempt``); each writes a new folder, and the
    workflow uses the one whose invocation returned."""
    return f"{SCRATCH}{execution}/data/{attempt}/{channel}/"


def checkpoint_prefix(execution: str) -> str:
    """``scratch/<execution>/checkpoints/``: SageMaker syncs the job's checkpoints here; every
    attempt of one execution shares it, so a retry on another instance type resumes."""
    return f"{SCRATCH}{execution}/checkpoints/"


def model_prefix(execution: str) -> str:
    """``executions/<execution>/model/``: the jobs' output path (S3OutputPath)."""
    return f"{EXECUTIONS}{execution}/model/"


JOB_MODEL_DIR = "output/model/"
"""Where SageMaker puts a job's uncompressed model under ``<S3OutputPath><job name>/``."""
