"""The baseline of ``bench/throughput_cpu.py``: transformers' ``Trainer`` fed the tutorial's way.
Each example is padded to max_seq_len, one per row, with its prompt tokens (and the padding)
masked with -100; DDP over gloo, fp32 on CPU, no evaluation, no saving. Started under torchrun by
``bench/throughput_cpu.py``, which compares it with ``ftstack local`` on the same model and data:

    python -m torch.distributed.run --nproc_per_node 2 bench/trainer_baseline.py \\
        --model DIR --data FILE --max-seq-len 512 --steps 8 --micro-batch 4 --accumulation 1 --out FILE

Rank 0 writes ``--out``: for every optimizer step after the first, its wall time (from the end of
the step before, so data loading counts, as it does in ftstack's figure) and the real
(non-padding) tokens it trained over all processes.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, default_data_collator,
)

from ftstack_train.config import DEFAULT_PROMPT_TEMPLATE, TrainConfig  # noqa: E402
from ftstack_train.data import IGNORE_INDEX, tokenize_files  # noqa: E402
from ftstack_train.model import load_tokenizer  # noqa: E402
from ftstack_train.train import exit_now  # noqa: E402


def padded_examples(data: Path, tokenizer, max_seq_len: int) -> list[dict[str, torch.Tensor]]:
    """One row per example, padded to ``max_seq_len``. The tokens are ftstack's own (same template,
    same truncation, same dropped examples), so both sides of the bench train the same examples."""
    split = tokenize_files("train", [data], tokenizer, DEFAULT_PROMPT_TEMPLATE, max_seq_len, TrainConfig().max_dropped_fraction)
    rows = []
    for ids, prompt_len in zip(split.ids, split.prompt_lens):
        ids = torch.from_numpy(ids).long()
        n = len(ids)
        input_ids = torch.full((max_seq_len,), tokenizer.pad_token_id, dtype=torch.long)
        input_ids[:n] = ids
        attention_mask = torch.zeros(max_seq_len, dtype=torch.long)
        attention_mask[:n] = 1
        # The model shifts labels itself; only response tokens are targets, as in ftstack.
        labels = torch.full((max_seq_len,), IGNORE_INDEX, dtype=torch.long)
        labels[prompt_len:n] = ids[prompt_len:]
        rows.append({"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels})
    return rows


class StepClock(TrainerCallback):
    """Ends of optimizer steps and this process's real tokens per step."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.tokens: list[int] = []
        self.pending = 0

    def count(self, inputs: dict[str, torch.Tensor]) -> None:
        """Adds one micro batch's non-padding tokens to the current step."""
        self.pending += int(inputs["attention_mask"].sum())

    def on_step_end(self, args, state, control, **kwargs):
        self.ends.append(time.perf_counter())
        self.tokens.append(self.pending)
        self.pending = 0


class CountingTrainer(Trainer):
    """``Trainer`` that reports each micro batch it trains to a ``StepClock``; nothing else changes.
    Counted here, not in the collator: accelerate's data loader fetches one batch ahead."""

    def __init__(self, *args, clock: StepClock, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.clock = clock

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.clock.count(inputs)
        return super().training_step(model, inputs, num_items_in_batch)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The worker's arguments (all given by ``bench/throughput_cpu.py``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--max-seq-len", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--micro-batch", type=int, required=True)
    parser.add_argument("--accumulation", type=int, required=True)
    parser.add_argument("--lr", type=float, default=TrainConfig().lr)
    parser.add_argument("--seed", type=int, default=TrainConfig().seed)
    parser.add_argument("--out", type=Path, required=True)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Trains ``--steps`` steps with ``Trainer`` and writes the per-step figures (rank 0)."""
    args = parse_args(argv)
    tokenizer = load_tokenizer(str(args.model))
    rows = padded_examples(args.data, tokenizer, args.max_seq_len)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.config.use_cache = False
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix="trainer-baseline-") as scratch:
        training = TrainingArguments(
            output_dir=scratch, use_cpu=True, ddp_backend="gloo", max_steps=args.steps,
            per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=args.accumulation,
            learning_rate=args.lr, optim="adamw_torch", max_grad_norm=1.0, seed=args.seed,
            eval_strategy="no", save_strategy="no", logging_strategy="no", report_to="none",
            disable_tqdm=True, dataloader_num_workers=0, dataloader_drop_last=True,
        )
        trainer = CountingTrainer(
            model=model, args=training, train_dataset=rows, data_collator=default_data_collator, callbacks=[clock], clock=clock,
        )
        trainer.train()
    per_rank: list[list[int] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, clock.tokens)
    if dist.get_rank() == 0:
        tokens = [sum(step) for step in zip(*per_rank)]
        seconds = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
        slots = args.micro_batch * args.accumulation * dist.get_world_size() * args.max_seq_len
        result = {"seconds": seconds, "real_tokens": tokens[1:], "slots_per_step": slots, "examples": len(rows)}
        args.out.write_text(json.dumps(result))
    dist.barrier()


if __name__ == "__main__":
    main()
    # DDP's gloo threads can abort a normal interpreter exit (see exit_now): leave the way ftstack does.
    exit_now(0)
