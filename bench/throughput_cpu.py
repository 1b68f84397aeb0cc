"""Real (non-padding) tokens trained per second on CPU: ftstack's training step against
transformers' ``Trainer`` fed the tutorial's way, on the same tiny MPT, the same examples and the
same global batch (rows per optimizer step), 2 processes each (torchrun, gloo), back to back.

    .venv/bin/python bench/throughput_cpu.py [--data FILE] [--max-seq-len 512] [--steps 8] [--repeats 1]

ftstack runs as users run it, ``ftstack local`` with a generated config (packing on, everything
else at its default, eval and checkpoints kept out of the timing by the trainer itself); its
figure comes from the trainer's own metric lines. ``Trainer`` (``bench/trainer_baseline.py``)
gets each example padded to max_seq_len, one per row, prompt tokens masked with -100. The first
step of each side is not timed (start-up). Without ``--data`` the examples are synthetic
prompt/response pairs with the long-tailed lengths of instruction data (as in
``bench/packing.py``). The ratio is what to read: absolute times on a shared machine are noise;
``--repeats N`` runs the two sides N times, interleaved, and keeps each side's best run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from ftstack_train.config import DEFAULT_PROMPT_TEMPLATE, TrainConfig  # noqa: E402
from ftstack_train.data import format_prompt, pack_rows, tokenize_files  # noqa: E402
from ftstack_train.errors import USER_ERRORS  # noqa: E402
from ftstack_train.metrics import parse_line  # noqa: E402
from ftstack_train.model import load_tokenizer, make_tiny_model  # noqa: E402
from ftstack_train.validation import read_records  # noqa: E402

NPROC = 2
WORDS = "the of model data train answer question value token sequence batch packing example".split()
TOKENIZER_TEXTS = 2000
"""Records the tiny model's tokenizer is trained on (the first ones of the data)."""
BASELINE = Path(__file__).with_name("trainer_baseline.py")


@dataclass(frozen=True)
class Side:
    """One side's timed steps: wall seconds and real tokens of each, and token slots per step."""

    seconds: list[float]
    real_tokens: list[int]
    slots_per_step: int

    @property
    def tokens_per_s(self) -> float:
        return sum(self.real_tokens) / sum(self.seconds)

    @property
    def real_token_share(self) -> float:
        return sum(self.real_tokens) / (self.slots_per_step * len(self.real_tokens))


def synthetic_records(n: int, seed: int) -> list[dict[str, str]]:
    """Prompt/response pairs with the lengths of ``bench/packing.py``'s synthetic split (log-normal
    word counts: a long tail of long examples). The first k records are the same for any n >= k."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        prompt = " ".join(rng.choice(WORDS) for _ in range(max(1, int(rng.lognormvariate(2.5, 0.6)))))
        response = " ".join(rng.choice(WORDS) for _ in range(max(1, int(rng.lognormvariate(3.0, 0.8)))))
        records.append({"prompt": prompt, "response": response})
    return records


def write_jsonl(records: list[dict[str, str]], path: Path) -> Path:
    """Writes ``records`` as JSON Lines; returns ``path``."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def prepare_data(args: argparse.Namespace, work: Path) -> tuple[Path, Path, dict[str, int]]:
    """The model folder, the training file and its figures (examples, real tokens, packed rows).
    Synthetic data grows until it packs into at least the rows the run takes, so that ftstack's timed
    steps are all full and inside one epoch; a ``--data`` file that is too small is an error."""
    need = args.steps * args.global_batch
    if args.data is not None:
        records = [{"prompt": r.prompt, "response": r.response} for r in read_records(args.data)]
        data = args.data
    else:
        records = synthetic_records(256, args.seed)
    texts = [format_prompt(DEFAULT_PROMPT_TEMPLATE, r["prompt"]) + r["response"] for r in records[:TOKENIZER_TEXTS]]
    model = make_tiny_model("tiny-mpt", texts, work / "model", seed=args.seed)
    tokenizer = load_tokenizer(str(model))
    while True:
        if args.data is None:
            data = write_jsonl(records, work / "train.jsonl")
        split = tokenize_files("train", [data], tokenizer, DEFAULT_PROMPT_TEMPLATE, args.max_seq_len, TrainConfig().max_dropped_fraction)
        lengths = [len(ids) for ids in split.ids]
        rows = len(pack_rows(lengths, args.max_seq_len, packing=True))
        if rows >= need or args.data is not None:
            break
        records = synthetic_records(2 * len(records), args.seed)
    if rows < need:  # packed rows are never more than the examples: Trainer has enough too
        raise SystemExit(
            f"--data {args.data}: {len(lengths)} examples pack into {rows} rows of {args.max_seq_len} tokens; the run takes "
            f"{need} rows (--steps {args.steps} x --global-batch {args.global_batch}); give more data or fewer --steps"
        )
    return model, data, {"examples": len(lengths), "data_tokens": sum(lengths), "packed_rows": rows}


def run_ftstack(args: argparse.Namespace, model: Path, data: Path, work: Path, attempt: int) -> Side:
    """``ftstack local`` on 2 processes; reads the timing of every step after the first from its
    metric lines (each step logs ``tokens_per_s`` over that step alone and its real-token share)."""
    test = write_jsonl([next({"prompt": r.prompt, "response": r.response} for r in read_records(data))], work / "test.jsonl")
    config = {
        "run_name": "bench-throughput", "max_seq_len": args.max_seq_len, "packing": True,
        "global_train_batch_size": args.global_batch, "device_train_microbatch_size": args.micro_batch,
        "max_duration": f"{args.steps}ba", "console_log_interval": "1ba", "global_seed": args.seed,
        # Evaluation and checkpoints happen once, at the end, outside the timed window.
        "eval_first": False, "eval_interval": f"{args.steps}ba", "eval_subset_num_batches": 1,
        "device_eval_batch_size": 1, "save_interval": f"{args.steps}ba",
    }
    config_file = work / "ftstack.yaml"
    config_file.write_text(json.dumps(config, indent=2))  # JSON is YAML
    command = [
        sys.executable, "-m", "ftstack.cli", "local", "--train", str(data), "--test", str(test), "--model", str(model),
        "--config", str(config_file), "--nproc", str(NPROC), "--output", str(work / f"ftstack-run-{attempt}"),
    ]
    output = _run(command, "ftstack local")
    steps = {}
    for line in output.splitlines():
        parsed = parse_line(line)
        if parsed and parsed[0] == "train":
            steps[int(parsed[1]["step"])] = parsed[1]
    if sorted(steps) != list(range(1, args.steps + 1)):
        raise SystemExit(f"ftstack local logged train metrics for steps {sorted(steps)}, expected 1..{args.steps}:\n{output[-3000:]}")
    slots = args.global_batch * args.max_seq_len  # every step is full: prepare_data made sure
    timed = [steps[s] for s in range(2, args.steps + 1)]
    real = [round(s["real_token_share"] * slots) for s in timed]
    return Side([r / s["tokens_per_s"] for r, s in zip(real, timed)], real, slots)


def run_trainer(args: argparse.Namespace, model: Path, data: Path, work: Path) -> Side:
    """``bench/trainer_baseline.py`` under torchrun, 2 processes, the same rows per step."""
    out = work / "trainer.json"
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(NPROC),
        "--master_addr", "127.0.0.1", "--master_port", str(port), str(BASELINE),
        "--model", str(model), "--data", str(data), "--max-seq-len", str(args.max_seq_len), "--steps", str(args.steps),
        "--micro-batch", str(args.micro_batch), "--accumulation", str(args.global_batch // (NPROC * args.micro_batch)),
        "--seed", str(args.seed), "--out", str(out),
    ]
    _run(command, "the Trainer baseline")
    result = json.loads(out.read_text())
    return Side(result["seconds"], result["real_tokens"], result["slots_per_step"])


def _run(command: list[str], what: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1")
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit code {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
    return proc.stdout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The bench's options; sizes that cannot be split over 2 processes are an error."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="prompt/response JSONL (default: synthetic examples)")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per side; the first is not timed")
    parser.add_argument("--global-batch", type=int, default=8, help="rows per optimizer step, both sides")
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per forward pass per process, both sides")
    parser.add_argument("--repeats", type=int, default=1, help="runs per side, interleaved; each side's best counts")
    parser.add_argument("--seed", type=int, default=17)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.steps < 2:
        parser.error("--steps must be at least 2: the first step of each side is not timed")
    if args.global_batch % (NPROC * args.micro_batch):
        parser.error(f"--global-batch {args.global_batch} must be a multiple of {NPROC} processes x --micro-batch {args.micro_batch}")
    if args.data is not None and not args.data.is_file():
        parser.error(f"--data {args.data}: no such file")
    return args


def main(argv: list[str] | None = None) -> None:
    """Runs both sides back to back, prints their figures and the ratio, then one JSON line."""
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as folder:
        work = Path(folder)
        try:
            model, data, figures = prepare_data(args, work)
        except USER_ERRORS as exc:
            raise SystemExit(f"error: {exc}") from None
        accumulation = args.global_batch // (NPROC * args.micro_batch)
        print(f"data: {args.data or 'synthetic'}, {figures['examples']} examples, {figures['data_tokens']} tokens "
              f"(mean {figures['data_tokens'] / figures['examples']:.1f}), max_seq_len {args.max_seq_len}; "
              f"{args.global_batch} rows per step ({args.micro_batch} x {accumulation} accumulation x {NPROC} processes), "
              f"{args.steps} steps, the first not timed", flush=True)
        runs: dict[str, list[Side]] = {"ftstack": [], "trainer": []}
        for attempt in range(args.repeats):  # interleaved, so drift in machine load hits both
            runs["ftstack"].append(run_ftstack(args, model, data, work, attempt))
            runs["trainer"].append(run_trainer(args, model, data, work))
    ours, theirs = (max(runs[name], key=lambda side: side.tokens_per_s) for name in ("ftstack", "trainer"))
    for name, side in (("ftstack (packed, FSDP2)", ours), ("Trainer (padded, DDP)", theirs)):
        print(f"{name:>24}: real-token share {side.real_token_share:.3f}, {sum(side.real_tokens) / len(side.real_tokens):8.0f} "
              f"real tokens per step, {side.tokens_per_s:8.0f} real tokens/s (best of {args.repeats})")
    ratio = ours.tokens_per_s / theirs.tokens_per_s
    print(f"ftstack trains {ratio:.2f}x the real tokens per second of Trainer")
    summary = {
        "bench": "throughput_cpu", "data": str(args.data) if args.data else "synthetic", "max_seq_len": args.max_seq_len,
        "steps": args.steps, "timed_steps": args.steps - 1, "repeats": args.repeats, "global_batch": args.global_batch, "micro_batch": args.micro_batch,
        "processes": NPROC, **figures,
        **{name: {"real_tokens_per_s": round(side.tokens_per_s, 1), "real_token_share": round(side.real_token_share, 4),
                  "real_tokens_per_step": side.real_tokens} for name, side in (("ftstack", ours), ("trainer", theirs))},
        "ratio": round(ratio, 3),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
