"""Cross-entropy on the target tokens only, with the LM head run in chunks.

The full-vocabulary logits of every position (prompt and padding included), upcast to fp32, are
the largest activation of a fine-tuning step: rows x seq x vocab x 6 bytes, about 5 GiB for MPT-7B
at 4 x 2048 tokens. Only response tokens carry loss. So the output layer is given the labels and
returns the summed loss instead of logits: it gathers the target positions, and computes the
logits and their loss a chunk of ``CHUNK_TOKENS`` at a time under activation checkpointing, so
that one chunk's logits exist at a time in the forward and in the backward pass.

The hook is the class of the model's output layer (``nn.Linear`` -> ``TargetsOnlyHead``, same
parameters, names and tying), so FSDP, checkpoints and the export see the model unchanged. Without
labels set it is a plain ``nn.Linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from .contract import LOSS_CHUNK_TOKENS as CHUNK_TOKENS
from .contract import VERIFIED_MODEL_TYPES as VERIFIED
from .data import IGNORE_INDEX


class TargetsOnlyHead(torch.nn.Linear):
    """An output layer that, while ``targets`` is set, returns the summed cross-entropy over the
    positions whose label is not IGNORE_INDEX (a 0-dim fp32 tensor) instead of logits."""

    targets: torch.Tensor | None = None
    chunk_tokens: int = CHUNK_TOKENS

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.targets is None:
            return super().forward(hidden)
        labels = self.targets.reshape(-1)
        where = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        states, labels = hidden.reshape(-1, hidden.shape[-1])[where], labels[where]
        total = hidden.new_zeros((), dtype=torch.float32)
        # At least one chunk, empty if need be: a micro batch without targets (the end of an
        # epoch gives some ranks one) must still return a loss in the graph, or its backward has
        # nothing to run and FSDP's reduce-scatters on the other ranks wait for it.
        for start in range(0, max(labels.numel(), 1), self.chunk_tokens):
            end = start + self.chunk_tokens
            total = total + checkpoint(_chunk_loss, states[start:end], self.weight, self.bias, labels[start:end], use_reentrant=False)
        return total


def _chunk_loss(states, weight, bias, labels):
    return F.cross_entropy(F.linear(states, weight, bias).float(), labels, reduction="sum")


def use_targets_only_loss(model: torch.nn.Module) -> TargetsOnlyHead | None:
    """Turns the model's output layer into a TargetsOnlyHead, for model types whose logits are
    the output layer's plain product (``VERIFIED``); None where it is left as is."""
    head = model.get_output_embeddings()
    if model.config.model_type not in VERIFIED or type(head) is not torch.nn.Linear:
        return None
    head.__class__ = TargetsOnlyHead
    return head
