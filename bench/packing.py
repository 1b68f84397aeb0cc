"""Packing against padding for a JSON Lines file (or synthetic instruction-like data): rows, real-token
share, truncated and dropped examples, and real (non-padding) tokens trained per second for the
same examples and a tiny model, in one process on CPU.

    .venv/bin/python bench/packing.py [--data FILE] [--max-seq-len 512] [--tokenizer DIR] [--no-train]
                                      [--long-seq-len 2048] [--attn-impl auto]

The file goes through the training job's own reading, validation and tokenization
(``ftstack_train.data.tokenize_files`` with the default prompt template), so the truncation and
drop counts are the ones a job would log; without ``--data``, synthetic records with the
long-tailed lengths of instruction data take the same path. ``--tokenizer`` takes a folder with a
Hugging Face tokenizer (offline); by default a small BPE is trained on the fly. Both modes train
back to back in this process, so the tokens/s ratio is what to read: absolute times on a shared
machine are noise. ``--long-seq-len N`` also trains the same examples packed into rows of N
tokens, interleaved with the others: with attention whose cost follows the examples, longer rows
should train about as fast. The model takes the attention path a training job would
(``--attn-impl``, default ``auto``). The last line is a JSON summary of every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ftstack_train.config import ATTN_IMPLS, DEFAULT_PROMPT_TEMPLATE, TrainConfig, parse_config  # noqa: E402
from ftstack_train.data import TokenizedSplit, collate, pack_rows, tokenize_files  # noqa: E402
from ftstack_train.errors import EXIT_USER_ERROR, USER_ERRORS  # noqa: E402
from ftstack_train.model import load_model, load_tokenizer, make_tiny_model  # noqa: E402
from ftstack_train.trainer import Model  # noqa: E402

WORDS = "the of model data train answer question value token sequence batch packing example".split()
TOKENIZER_TEXTS = [" ".join(WORDS), DEFAULT_PROMPT_TEMPLATE] * 4
"""What the default tokenizer learns from: the words and the prompt template, so that neither is
spelt out byte by byte."""


def synthetic_records(path: Path, n: int, seed: int) -> Path:
    """Writes ``n`` prompt/response records with lognormal word counts (long-tailed, as in
    instruction data) to ``path`` as JSON Lines."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as out:
        for _ in range(n):
            prompt = " ".join(rng.choice(WORDS) for _ in range(max(1, int(rng.lognormvariate(2.5, 0.6)))))
            response = " ".join(rng.choice(WORDS) for _ in range(max(1, int(rng.lognormvariate(3.0, 0.8)))))
            out.write(json.dumps({"prompt": prompt, "response": response}) + "\n")
    return path


def build_model(tokenizer, folder: Path, attn_impl: str) -> Model:
    """The tiny MPT of the tests and the demo, random-init in fp32, with an embedding sized for
    ``tokenizer`` (a real tokenizer's vocabulary makes the LM head larger, as it would be)."""
    tiny = make_tiny_model("tiny-mpt", TOKENIZER_TEXTS, folder / "tiny", seed=0)
    config = json.loads((tiny / "config.json").read_text())
    config.update(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    source = folder / "bench-model"
    source.mkdir()
    (source / "config.json").write_text(json.dumps(config))
    module = load_model(str(source), False, len(tokenizer))
    return Model.build(module, attn_impl, torch.float32, torch.device("cpu"), tokenizer.pad_token_id)


def layout(split: TokenizedSplit, max_seq_len: int) -> dict:
    """Rows and real-token share of each mode; every row is padded to ``max_seq_len``, as
    ``collate`` does."""
    lengths = [len(a) for a in split.ids]
    tokens = sum(lengths)
    figures = {"records": split.records, "examples": len(lengths), "tokens": tokens,
               "mean_length": tokens / len(lengths), "truncated": split.truncated, "dropped": len(split.dropped)}
    for mode, packing in (("padded", False), ("packed", True)):
        rows = len(pack_rows(lengths, max_seq_len, packing))
        figures[f"rows_{mode}"] = rows
        figures[f"share_{mode}"] = tokens / (rows * max_seq_len)
    return figures


def epoch(model: Model, split: TokenizedSplit, rows: list[list[int]], max_seq_len: int, batch: int) -> tuple[float, int]:
    """One forward/backward pass over every row; returns seconds and real tokens."""
    real = 0
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        b = collate(split, rows[i : i + batch], max_seq_len, model.pad_id)
        model.loss_sum(b, torch.device("cpu")).backward()
        real += b.real_tokens
    return time.perf_counter() - start, real


def throughput(model: Model, split: TokenizedSplit, max_seq_len: int, batch: int, long_seq_len: int | None) -> dict:
    """Real tokens/s of each mode, best of two epochs each, interleaved so that drift in the
    machine's load hits every mode alike. With ``long_seq_len``, also the packed rows of that
    length (fewer rows of the same total tokens per pass: ``batch`` is scaled down to match)."""
    lengths = [len(a) for a in split.ids]
    modes = {"padded": (False, max_seq_len, batch), "packed": (True, max_seq_len, batch)}
    if long_seq_len:
        modes["packed_long"] = (True, long_seq_len, max(1, batch * max_seq_len // long_seq_len))
    best: dict[str, float] = {}
    real: dict[str, int] = {}
    for _ in range(2):
        for mode, (packing, seq_len, rows_per_pass) in modes.items():
            seconds, real[mode] = epoch(model, split, pack_rows(lengths, seq_len, packing), seq_len, rows_per_pass)
            best[mode] = min(best.get(mode, seconds), seconds)
    figures = {f"tokens_per_s_{mode}": real[mode] / best[mode] for mode in best}
    figures["speedup"] = best["padded"] / best["packed"]
    if long_seq_len:
        figures["long_rows_vs_short"] = figures["tokens_per_s_packed_long"] / figures["tokens_per_s_packed"]
    return figures


def read_split(args: argparse.Namespace, cfg: TrainConfig, tokenizer, folder: Path) -> TokenizedSplit:
    """The examples as a training job tokenizes them. Every drop is counted and reported here
    rather than refused, so the bench still gives its figures for data a job would reject."""
    path = Path(args.data) if args.data else synthetic_records(folder / "synthetic.jsonl", args.examples, seed=0)
    return tokenize_files("bench", [path], tokenizer, cfg.prompt_template, cfg.max_seq_len, 1.0)


def run(args: argparse.Namespace) -> dict:
    """Every figure of the bench, printed as it comes; raises a user error for bad input."""
    cfg, _ = parse_config(overrides=[f"max_seq_len={args.max_seq_len}"])  # the job's own check of the value
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        tokenizer = load_tokenizer(args.tokenizer) if args.tokenizer else load_tokenizer(
            str(make_tiny_model("tiny-mpt", TOKENIZER_TEXTS, folder / "tokenizer", seed=0)))
        split = read_split(args, cfg, tokenizer, folder)
        model = None if args.no_train else build_model(tokenizer, folder, args.attn_impl)
    print(split.summary())
    figures = {"data": Path(args.data).name if args.data else "synthetic", "max_seq_len": cfg.max_seq_len,
               "tokenizer_vocab": len(tokenizer), "long_seq_len": args.long_seq_len,
               "attention": model.describe() if model else None} | layout(split, cfg.max_seq_len)
    figures["dropped_share"] = figures["dropped"] / max(figures["records"], 1)
    if figures["dropped_share"] > cfg.max_dropped_fraction:
        print(f"note: a training job would refuse this data at max_seq_len {cfg.max_seq_len}: {figures['dropped_share']:.1%} "
              f"of the records have no room for a response, more than max_dropped_fraction={cfg.max_dropped_fraction}")
    print(f"mean length {figures['mean_length']:.1f} tokens, max_seq_len {cfg.max_seq_len}")
    for mode in ("padded", "packed"):
        print(f"{mode:>6}: {figures[f'rows_{mode}']:6d} rows, real-token share {figures[f'share_{mode}']:.3f}")
    if model is None:  # the same keys either way, so that readers of the JSON line need no case
        figures |= {"tokens_per_s_padded": None, "tokens_per_s_packed": None, "speedup": None}
    else:
        print(model.describe())
        figures |= throughput(model, split, cfg.max_seq_len, args.batch, args.long_seq_len)
        for mode in ("padded", "packed"):
            print(f"{mode:>6}: {figures[f'tokens_per_s_{mode}']:8.0f} real tokens/s (best of 2)")
        print(f"packing trains the same examples {figures['speedup']:.2f}x faster")
        if args.long_seq_len:
            print(f"packed into rows of {args.long_seq_len}: {figures['tokens_per_s_packed_long']:8.0f} real tokens/s, "
                  f"{figures['long_rows_vs_short']:.2f}x the rate in rows of {cfg.max_seq_len}")
    return figures


def main() -> int:
    """Runs the bench; bad input ends with its message and exit code 2, not a traceback."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="a JSON Lines file of prompt/response records (default: synthetic records)")
    parser.add_argument("--examples", type=int, default=256, help="how many synthetic records, without --data")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--tokenizer", help="a folder with a Hugging Face tokenizer (default: a small BPE trained here)")
    parser.add_argument("--batch", type=int, default=8, help="rows per forward/backward pass")
    parser.add_argument("--no-train", action="store_true", help="only count rows and shares; skip the timed passes")
    parser.add_argument("--long-seq-len", type=int, help="also train the same examples packed into rows of this many tokens")
    parser.add_argument("--attn-impl", default="auto", choices=ATTN_IMPLS, help="the attention path (as attn_impl in a job)")
    args = parser.parse_args()
    if args.examples < 1 or args.batch < 1:
        parser.error("--examples and --batch must be at least 1")
    if args.long_seq_len is not None and args.long_seq_len < args.max_seq_len:
        parser.error("--long-seq-len must be at least --max-seq-len: the examples are truncated to --max-seq-len")
    try:
        figures = run(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    print(json.dumps({"bench": "packing"} | figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
