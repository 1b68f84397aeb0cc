"""Packing against padding, in one process on CPU: rows per epoch, real-token share, and real
(non-padding) tokens trained per second, for the same examples and the same tiny model.

    .venv/bin/python bench/packing.py [--examples 256] [--max-seq-len 512]

Both modes run back to back in this process, so the ratio is what to read: absolute times on a
shared machine are noise.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from pathlib import Path

import numpy
import torch

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from ftstack_train.config import DEFAULT_PROMPT_TEMPLATE  # noqa: E402
from ftstack_train.data import TokenizedSplit, collate, format_prompt, pack_rows  # noqa: E402
from ftstack_train.model import load_model, load_tokenizer, make_tiny_model  # noqa: E402
from ftstack_train.trainer import Model  # noqa: E402


def synthetic_split(tokenizer, n: int, max_seq_len: int, seed: int) -> TokenizedSplit:
    """Prompt/response pairs with the long-tailed lengths of instruction data."""
    rng = random.Random(seed)
    words = "the of model data train answer question value token sequence batch packing example".split()
    split = TokenizedSplit("bench")
    for _ in range(n):
        prompt = " ".join(rng.choice(words) for _ in range(int(rng.lognormvariate(2.5, 0.6))))
        response = " ".join(rng.choice(words) for _ in range(int(rng.lognormvariate(3.0, 0.8))))
        prompt_ids = tokenizer(format_prompt(DEFAULT_PROMPT_TEMPLATE, prompt))["input_ids"]
        target = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt_ids + target)[:max_seq_len]
        split.ids.append(numpy.asarray(ids, dtype=numpy.int32))
        split.prompt_lens.append(min(len(ids) - 1, len(prompt_ids)))
    return split


def epoch(model: Model, split: TokenizedSplit, rows: list[list[int]], max_seq_len: int, batch: int) -> tuple[float, int, int]:
    """One forward/backward pass over every row; returns seconds, real tokens, token slots."""
    real = slots = 0
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        b = collate(split, rows[i : i + batch], max_seq_len, model.pad_id)
        model.loss_sum(b, torch.device("cpu")).backward()
        real, slots = real + b.real_tokens, slots + b.input_ids.numel()
    return time.perf_counter() - start, real, slots


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        source = make_tiny_model("tiny-mpt", ["the of model data train answer question value token sequence"] * 4, Path(folder) / "m", seed=0)
        tokenizer = load_tokenizer(str(source))
        model = Model(load_model(str(source), True, len(tokenizer)), torch.float32, tokenizer.pad_token_id)
    split = synthetic_split(tokenizer, args.examples, args.max_seq_len, seed=0)
    lengths = [len(a) for a in split.ids]
    print(f"{args.examples} examples, {sum(lengths)} tokens, mean length {sum(lengths) / len(lengths):.1f}, max_seq_len {args.max_seq_len}")
    results = {}
    for packing in (False, True, False, True):  # interleaved, so drift in machine load hits both
        rows = pack_rows(lengths, args.max_seq_len, packing)
        seconds, real, slots = epoch(model, split, rows, args.max_seq_len, args.batch)
        results.setdefault(packing, []).append((seconds, real, slots, len(rows)))
    for packing, runs in results.items():
        seconds = min(r[0] for r in runs)
        _, real, slots, n_rows = runs[0]
        print(f"{'packed' if packing else 'padded':>6}: {n_rows:4d} rows, real-token share {real / slots:.3f}, "
              f"{real / seconds:8.0f} real tokens/s (best of {len(runs)})")
    speedup = (min(r[0] for r in results[False])) / (min(r[0] for r in results[True]))
    print(f"packing trains the same examples {speedup:.2f}x faster")


if __name__ == "__main__":
    main()
