"""The contract between the training container and everything around it (the infrastructure, the
CLI, local mode): where SageMaker puts inputs, where the job writes, and what the files are called.

Standard library only: the infrastructure imports this without torch.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

ROOT_ENV = "FTSTACK_SM_ROOT"
"""Moves the ``/opt/ml`` root, so that local runs and tests use a folder of their own."""

DEFAULT_ROOT = "/opt/ml"

TRAIN_CHANNEL = "train"
TEST_CHANNEL = "test"
MODEL_CHANNEL = "model"
CONFIG_CHANNEL = "config"
CHANNELS = (TRAIN_CHANNEL, TEST_CHANNEL, MODEL_CHANNEL, CONFIG_CHANNEL)
"""Input channels: JSONL training and test data, an optional base model directory, and an optional
YAML config (the first ``*.yaml``/``*.yml`` file in it)."""

DATA_SUFFIXES = (".jsonl", ".json")
"""Files a data channel may hold; anything else there is an error, never skipped."""

VERIFIED_MODEL_TYPES = ("mpt", "llama")
"""Model types whose packed attention and targets-only loss are checked against their eager path in
the tests, so the job uses them (``attention``, ``loss``); the memory estimate (``ftstack.estimate``,
also in the staging step) follows the same rule."""

LOSS_CHUNK_TOKENS = 1024
"""Target tokens per chunk of the targets-only loss (``loss``): with a 50k vocabulary, about 300 MB
of bf16 and fp32 logits. The memory estimate counts one chunk."""

INCOMING = "incoming/"
"""Bucket prefix of the users' uploads: the stack's workflow reads data only from here, and
``ftstack start`` uploads here."""

BASE_MODELS = "base-models/"
"""Bucket prefix of base models in S3 (for jobs without network access): ``ftstack stage-model``
writes here, and the workflow reads base models only from here."""

DEFAULT_TEST_SPLIT = 0.05
"""Share of the training records held out for evaluation when no test data is given, by
``ftstack local`` and by the workflow's staging step alike."""


def hold_out_every(test_split: float) -> int:
    """Holding out ``test_split`` means every this-many-th record (20 for 0.05), counted from 1."""
    return round(1 / test_split)


METRICS_FILE = "metrics.json"
"""Final train and eval figures and the eval history, in the exported model directory."""

FINAL_METRICS_FILE = "final-metrics.json"
"""Only the final figures (``metrics.json``'s ``final``): what the workflow reads for its quality
gate. Its size does not grow with the run, as the eval history does."""

FINAL_EVAL_CE = "eval_cross_entropy"
"""The key of the final eval cross-entropy in ``final``: the workflow's quality gate reads it."""

CHAT_TEMPLATE_FILE = "chat_template.jinja"
"""Where transformers' ``save_pretrained`` writes the tokenizer's chat template in the exported
model (the export sets it to the training prompt template); the serving container is pointed at it
(``ftstack.serving``) and the model card names it."""

MANIFEST_FILE = "model-manifest.json"
"""In the exported model directory: the SHA-256 and size of every file of the model
(``ftstack_train.manifest``)."""

MANIFEST_SHA256 = "model_manifest_sha256"
"""The key in ``final`` of the manifest's own SHA-256: the workflow registers it with the model
package, and deployment and ``ftstack verify`` check the model against it before use."""

FAILURE_FILE = "failure"
"""SageMaker shows this file's text as the job's FailureReason."""

_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_ID = re.compile(rf"(?:{_HUB_PART}/)?{_HUB_PART}")


def is_hub_id(value: object) -> bool:
    """Whether ``value`` is a Hugging Face hub repository id (``owner/name`` or ``name``), by the
    hub's own rules: letters, digits, ``.``, ``_`` and ``-``, at most 96 per part, no ``--`` or
    ``..``, starting and ending with a letter or digit. The staging step and the job both ask this."""
    return isinstance(value, str) and bool(_HUB_ID.fullmatch(value)) and "--" not in value and ".." not in value


TINY_MODELS = ("tiny-mpt", "tiny-llama")
"""Base model names that mean a small random model, made at start-up (demo and tests)."""

CHECKPOINT_BASE_MODEL = "base-model"
"""Under the checkpoint directory: a generated tiny base model, kept so that a resumed run reuses it."""


@dataclass(frozen=True)
class SageMakerPaths:
    """The folders of a SageMaker training container under one root."""

    root: Path

    @classmethod
    def from_env(cls) -> SageMakerPaths:
        """The root from ``FTSTACK_SM_ROOT``, else ``/opt/ml``."""
        return cls(Path(os.environ.get(ROOT_ENV, DEFAULT_ROOT)))

    @property
    def hyperparameters(self) -> Path:
        return self.root / "input" / "config" / "hyperparameters.json"

    @property
    def resource_config(self) -> Path:
        return self.root / "input" / "config" / "resourceconfig.json"

    def channel(self, name: str) -> Path:
        """The folder of an input channel; it exists only when the job was given that channel."""
        return self.root / "input" / "data" / name

    @property
    def model_dir(self) -> Path:
        """Uploaded as the job's model artifacts (uncompressed, with ``CompressionType: NONE``)."""
        return self.root / "model"

    @property
    def checkpoints(self) -> Path:
        """Synced to the job's checkpoint S3 prefix, and restored from it when the job restarts."""
        return self.root / "checkpoints"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def failure_file(self) -> Path:
        return self.output / FAILURE_FILE


FLEX_SHARED_MEMORY = 128 * 1024
"""Shared memory FlexAttention's forward kernel takes for bf16 and a head dimension of 128 (MPT-7B,
Llama) with the configuration inductor picks on every GPU of compute capability 8.x (its A100
table, torch/_inductor/template_heuristics/triton.py: 128 x 64 blocks, 3 stages, so (128 x 128 +
3 x 2 x 64 x 128) x 2 bytes). A GPU that opts in to no more per block cannot compile it (pytorch
issue 133254: 131,074 bytes asked for, 101,376 available on compute capability 8.9): the A10G,
L4 and L40S. ``attn_impl: auto`` takes sdpa there."""


def flex_fits(shared_memory: int) -> bool:
    """Whether a GPU that opts in to ``shared_memory`` bytes per block compiles FlexAttention's
    kernels for the models ftstack verifies. The job asks the driver; the estimator
    (``ftstack.instances``) its table of GPUs."""
    return shared_memory > FLEX_SHARED_MEMORY
