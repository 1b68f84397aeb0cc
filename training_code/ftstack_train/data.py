"""From validated records to training rows: prompt template, tokenization with prompt-masked
labels, truncation and drop accounting, packing, and batches with per-example attention.

A row holds one example (padded mode) or several (packing). Each token carries a segment id (its
example's index in the row, from 1; padding is 0), so attention stays inside one example and
positions restart per example. Labels are already shifted: ``labels[t]`` is the token that
position ``t`` must predict, or -100 where no loss is taken (prompt, padding, across examples).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import TEMPLATE_FIELD, batch_split
from .errors import DatasetError
from .contract import DATA_SUFFIXES
from .validation import Record, read_records

IGNORE_INDEX = -100


def list_data_files(channel: Path) -> list[Path]:
    """The JSONL files of a data channel, sorted; any other file there is an error, because
    skipping it would silently drop data."""
    if not channel.is_dir():
        raise DatasetError(f"{channel}: the data channel is missing; give the job this channel")
    files = sorted(p for p in channel.rglob("*") if p.is_file())
    others = [p for p in files if not p.name.endswith(DATA_SUFFIXES)]
    if others:
        names = ", ".join(str(p.relative_to(channel)) for p in others[:5])
        raise DatasetError(f"{channel}: holds files that are not JSONL ({names}); remove them or rename them to .jsonl")
    if not files:
        raise DatasetError(f"{channel}: no .jsonl file; put the data there as JSON Lines")
    return files


def format_prompt(template: str, prompt: str) -> str:
    """The prompt as the model sees it. Plain replacement, so braces in prompts or the template
    need no escaping."""
    return template.replace(TEMPLATE_FIELD, prompt, 1)


@dataclass
class TokenizedSplit:
    """Token ids of one split, one array per kept example, with its accounting."""

    name: str
    ids: list[np.ndarray] = field(default_factory=list)
    prompt_lens: list[int] = field(default_factory=list)
    records: int = 0
    truncated: int = 0
    dropped: list[str] = field(default_factory=list)  # "file:line" of each dropped example

    def summary(self) -> str:
        """One line for the log: what was kept, truncated and dropped."""
        kept = len(self.ids)
        tokens = sum(len(a) for a in self.ids)
        line = f"{self.name}: {self.records} records -> {kept} examples, {tokens} tokens; {self.truncated} truncated, {len(self.dropped)} dropped"
        if self.dropped:
            line += " (" + ", ".join(self.dropped[:5]) + (", ..." if len(self.dropped) > 5 else "") + ")"
        return line


def tokenize_files(
    name: str, files: Sequence[Path], tokenizer, template: str, max_seq_len: int, max_dropped_fraction: float,
    base: Path | None = None,
) -> TokenizedSplit:
    """Reads (validating as it goes), tokenizes and truncates one split; raises DatasetError when
    more than ``max_dropped_fraction`` of the examples cannot keep a single response token.
    Dropped examples are reported as ``file:line``, the file relative to ``base`` when given."""
    split = TokenizedSplit(name)
    for path in files:
        shown = str(path.relative_to(base)) if base else path.name
        batch: list[Record] = []
        for record in read_records(path):
            batch.append(record)
            if len(batch) == 1024:
                _tokenize_batch(split, shown, batch, tokenizer, template, max_seq_len)
                batch = []
        _tokenize_batch(split, shown, batch, tokenizer, template, max_seq_len)
    share = len(split.dropped) / max(split.records, 1)
    if share > max_dropped_fraction:
        raise DatasetError(
            f"{split.summary()}: {share:.1%} of the {name} examples have no room for a response within "
            f"max_seq_len={max_seq_len}, more than max_dropped_fraction={max_dropped_fraction}; "
            "raise max_seq_len, shorten those prompts, or raise max_dropped_fraction"
        )
    if not split.ids:
        raise DatasetError(f"{split.summary()}: no example left to train on; raise max_seq_len")
    return split


def _tokenize_batch(split: TokenizedSplit, shown: str, batch: list[Record], tokenizer, template: str, max_seq_len: int) -> None:
    if not batch:
        return
    prompts = tokenizer([format_prompt(template, r.prompt) for r in batch], add_special_tokens=True)["input_ids"]
    responses = tokenizer([r.response for r in batch], add_special_tokens=False)["input_ids"]
    for record, prompt, response in zip(batch, prompts, responses):
        split.records += 1
        response = response + [tokenizer.eos_token_id]
        room = max_seq_len - len(prompt)
        if room <= 0:
            split.dropped.append(f"{shown}:{record.line}")
            continue
        if len(response) > room:
            response = response[:room]
            split.truncated += 1
        split.ids.append(np.asarray(prompt + response, dtype=np.int32))
        split.prompt_lens.append(len(prompt))


def pack_rows(lengths: Sequence[int], max_seq_len: int, packing: bool) -> list[list[int]]:
    """Groups example indexes into rows of at most ``max_seq_len`` tokens: best-fit decreasing
    when packing (few, full rows), one example per row otherwise. Deterministic."""
    if not packing:
        return [[i] for i in range(len(lengths))]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at < len(free):
            room, row = free.pop(at)
        else:
            room, row = max_seq_len, len(rows)
            rows.append([])
        rows[row].append(i)
        if room - lengths[i] > 0:
            bisect.insort(free, (room - lengths[i], row))
    return rows


@dataclass(frozen=True)
class Batch:
    """Tensors for one forward pass; ``segment_ids`` drive the attention mask."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    segment_ids: torch.Tensor
    position_ids: torch.Tensor

    @property
    def real_tokens(self) -> int:
        return int((self.segment_ids > 0).sum())

    @property
    def label_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def collate(split: TokenizedSplit, rows: Iterable[Sequence[int]], max_seq_len: int, pad_id: int, min_rows: int = 1) -> Batch:
    """Builds a batch from rows of example indexes. Pads with empty rows up to ``min_rows``, so
    that every rank runs the same number of passes (FSDP's collectives need it)."""
    rows = list(rows)
    n = max(len(rows), min_rows)
    input_ids = torch.full((n, max_seq_len), pad_id, dtype=torch.long)
    labels = torch.full((n, max_seq_len), IGNORE_INDEX, dtype=torch.long)
    segment_ids = torch.zeros((n, max_seq_len), dtype=torch.long)
    position_ids = torch.zeros((n, max_seq_len), dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for seg, i in enumerate(row, start=1):
            ids = torch.from_numpy(split.ids[i]).long()
            end = start + len(ids)
            input_ids[r, start:end] = ids
            segment_ids[r, start:end] = seg
            position_ids[r, start:end] = torch.arange(len(ids))
            # Position t predicts token t+1; only response tokens are targets.
            first_target = max(split.prompt_lens[i], 1)
            labels[r, start + first_target - 1 : end - 1] = ids[first_target:]
            start = end
    return Batch(input_ids, labels, segment_ids, position_ids)


def attention_bias(segment_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (batch, 1, seq, seq) additive mask: 0 where a token may attend (earlier or same position
    in its own example), the dtype's minimum elsewhere. Padding attends to padding, so no row is
    fully masked (that would make NaNs). Works for eager, SDPA and MPT's boolean conversion."""
    seq = segment_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    allowed = (same & causal)[:, None]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=segment_ids.device)
    return bias.masked_fill_(~allowed, torch.finfo(dtype).min)


@dataclass(frozen=True)
class StepPlan:
    """How rows are split into optimizer steps, ranks and micro batches."""

    rows_per_step: int
    micro_batch: int
    accumulation: int
    world_size: int

    @classmethod
    def from_config(cls, cfg, world_size: int, device_type: str) -> StepPlan:
        """The plan for ``world_size`` processes; raises ConfigError when the sizes do not divide."""
        micro, accumulation = batch_split(cfg, world_size, device_type)
        return cls(cfg.global_train_batch_size, micro, accumulation, world_size)

    def steps_per_epoch(self, n_rows: int) -> int:
        """Every row is used each epoch; the last step may be short (its loss is still weighted
        by its real target tokens)."""
        return max(1, math.ceil(n_rows / self.rows_per_step))

    def micro_batches(self, order: Sequence[int], step_in_epoch: int, rank: int) -> list[list[int]]:
        """Row indexes of this rank's micro batches for one step: ``accumulation`` lists, some
        possibly empty at the end of an epoch."""
        rows = order[step_in_epoch * self.rows_per_step : (step_in_epoch + 1) * self.rows_per_step]
        mine = list(rows[rank :: self.world_size])
        return [mine[k * self.micro_batch : (k + 1) * self.micro_batch] for k in range(self.accumulation)]


def epoch_order(n_rows: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The row order of one epoch: a function of seed and epoch only, so a resumed run replays it."""
    if not shuffle:
        return list(range(n_rows))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_rows, generator=generator).tolist()
