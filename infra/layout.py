"""Where things live in a pipeline's bucket. No third-party import: the CDK constructs, the
data-staging Lambda and the tests all import it.

Everything one pipeline writes lives under its ``prefix`` ('' for a bucket of its own, e.g.
``team-a/`` in a shared one): IAM is scoped to it, so that pipelines sharing a bucket cannot read
each other's data or models.

S3 lifecycle rules can only match a key prefix, not ``executions/*/checkpoints/``, so what must
expire (staged data, checkpoints) lives under ``scratch/`` and what must stay (models) under
``executions/``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# The staging function, the CLI (which uploads under them, through Layout) and the training
# package's contract share these; defined once, in the contract.
from ftstack_train.contract import BASE_MODELS, INCOMING

EXECUTIONS = "executions/"
"""Exported models, one folder per execution; never expired."""

SCRATCH = "scratch/"
"""Staged data and checkpoints, one folder per execution; expired by a lifecycle rule."""

JOB_MODEL_DIR = "output/model/"
"""Where SageMaker puts a job's uncompressed model under ``<S3OutputPath><job name>/``."""

PREFIX = re.compile(r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?/)*$")
"""A pipeline's prefix: empty, or folders of lower-case letters, digits and hyphens, each ending
in ``/``. No wildcard characters (``*``, ``?``), which IAM would read as patterns, and no ``.``
or ``..``, which cannot name a folder."""
MAX_PREFIX = 100
"""Long enough for any team's folder, short enough to leave room in S3 keys and IAM policies."""


@dataclass(frozen=True)
class Layout:
    """The keys of one pipeline's objects, under ``prefix``."""

    prefix: str = ""

    def __post_init__(self) -> None:
        if not PREFIX.match(self.prefix) or len(self.prefix) > MAX_PREFIX:
            raise ValueError(f"prefix {self.prefix!r}: use '' or folders of lower-case letters, digits and hyphens, "
                             f"each ending with '/', e.g. 'team-a/', at most {MAX_PREFIX} characters")

    @property
    def incoming(self) -> str:
        """``<prefix>incoming/``: the operator's uploads, which the staging function reads."""
        return self.prefix + INCOMING

    @property
    def base_models(self) -> str:
        """``<prefix>base-models/``: base models for jobs that cannot reach the hub."""
        return self.prefix + BASE_MODELS

    @property
    def scratch(self) -> str:
        """``<prefix>scratch/``: staged data and checkpoints, expired by a lifecycle rule."""
        return self.prefix + SCRATCH

    @property
    def executions(self) -> str:
        """``<prefix>executions/``: exported models, kept."""
        return self.prefix + EXECUTIONS

    def staged_data_prefix(self, execution: str, attempt: str, channel: str) -> str:
        """``scratch/<execution>/data/<attempt>/<channel>/``: the job's input channel, as staged by
        one invocation of the staging function (``attempt``); each writes a new folder, and the
        workflow uses the one whose invocation returned."""
        return f"{self.scratch}{execution}/data/{attempt}/{channel}/"

    def checkpoint_prefix(self, execution: str) -> str:
        """``scratch/<execution>/checkpoints/``: SageMaker syncs the job's checkpoints here; every
        attempt of one execution shares it, so a retry on another instance type resumes."""
        return f"{self.scratch}{execution}/checkpoints/"

    def model_prefix(self, execution: str) -> str:
        """``executions/<execution>/model/``: the jobs' output path (S3OutputPath)."""
        return f"{self.executions}{execution}/model/"
