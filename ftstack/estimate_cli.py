"""``ftstack estimate``: the memory estimate of ``ftstack.estimate`` for one run, printed or as
JSON, and with ``--data`` the steps, tokens, time and cost of an epoch with every assumption."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .estimate import SAFETY_FRACTION, Estimate, Setup, check_attn_impl, estimate_memory, smallest_changes
from .instances import INSTANCE_TYPES, PRICE_CAVEAT, UnknownInstanceType, instance_type
from .model_shapes import KNOWN_MODELS, ModelShapeError, model_shape

GIB = 2**30
CHARS_PER_TOKEN = 4.0
"""Characters per token for the data estimate (English text with a BPE tokenizer: about 4)."""
DEFAULT_MFU = 0.30
"""Assumed model FLOPs utilization (6 x parameters per token, plus causal attention)."""

EXAMPLES = """examples:
  ftstack estimate --model mpt-7b --instance-type ml.g5.48xlarge --max-seq-len 512
  ftstack estimate --model mpt-7b --instance-type ml.g5.48xlarge --no-activation-checkpointing --json
  ftstack estimate --model path/to/config.json --instance-type ml.p4d.24xlarge --instance-count 2 \\
      --data train.jsonl --global-batch 128
  ftstack estimate --list-instance-types
"""


class EstimateInputError(ValueError):
    """A bad argument to ``ftstack estimate``; the message names it and the fix."""


def add_parser(commands) -> None:
    """Registers ``estimate`` on the ``ftstack`` subcommand parsers."""
    p = commands.add_parser("estimate", help="per-GPU memory, verdict and epoch cost before a run starts",
                            formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXAMPLES, description=(
                                "Estimates the per-GPU memory of the training job (FSDP2, fp32 master weights, bf16 compute, "
                                f"AdamW) item by item, says whether it fits in {SAFETY_FRACTION:.0%} of the GPU's memory, and "
                                "names the smallest change that would fit. With --data: steps, tokens, time and cost per epoch."))
    p.add_argument("--model", default="mpt-7b", metavar="NAME|DIR|config.json",
                   help=f"a known model ({', '.join(KNOWN_MODELS)}), a model directory or its config.json (default mpt-7b)")
    p.add_argument("--instance-type", metavar="TYPE", help="e.g. ml.g5.48xlarge")
    p.add_argument("--instance-count", type=int, default=1, metavar="N", help="instances (default 1)")
    p.add_argument("--max-seq-len", type=int, default=512, metavar="L", help="tokens per packed row (default 512)")
    p.add_argument("--micro-batch", type=int, default=4, metavar="B", help="rows per forward/backward per GPU (default 4)")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="recompute each block in the backward pass (default on, as the job)")
    p.add_argument("--attn-impl", default="auto", choices=("auto", "eager", "sdpa", "flex"), help="as the job's attn_impl (default auto)")
    p.add_argument("--sharding", default="auto", choices=("auto", "FULL_SHARD", "HYBRID_SHARD"),
                   help="as the job's fsdp_config.sharding_strategy (default auto)")
    p.add_argument("--data", type=Path, nargs="+", metavar="FILE", help="training JSONL: adds steps, tokens, time and cost per epoch")
    p.add_argument("--tokenizer", type=Path, metavar="DIR", help="with --data: count tokens with this tokenizer (the job's code; needs torch)")
    p.add_argument("--global-batch", type=int, default=128, metavar="ROWS", help="global_train_batch_size (default 128)")
    p.add_argument("--mfu", type=float, default=DEFAULT_MFU, help=f"assumed model FLOPs utilization (default {DEFAULT_MFU})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--list-instance-types", action="store_true", help="print the known instance types and exit")
    p.set_defaults(func=run_estimate)


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise EstimateInputError(f"{name}: {value} must be a positive whole number")


def setup_from_args(args: argparse.Namespace) -> Setup:
    """The Setup that the arguments describe; EstimateInputError for a bad one."""
    if not args.instance_type:
        raise EstimateInputError("--instance-type is required, e.g. --instance-type ml.g5.48xlarge (see --list-instance-types)")
    for name in ("instance_count", "max_seq_len", "micro_batch", "global_batch"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.tokenizer and not args.data:
        raise EstimateInputError("--tokenizer counts the tokens of --data; give --data FILE as well")
    if not 0 < args.mfu <= 1:
        raise EstimateInputError(f"--mfu: {args.mfu} must be a share between 0 and 1, e.g. 0.3")
    try:
        shape = model_shape(args.model)
        instance = instance_type(args.instance_type)
        check_attn_impl(shape, args.attn_impl)
    except (ModelShapeError, UnknownInstanceType, ValueError) as exc:
        raise EstimateInputError(str(exc)) from None
    return Setup(shape, instance, args.max_seq_len, args.micro_batch, args.activation_checkpointing, args.attn_impl,
                 args.instance_count, args.sharding)


@dataclass(frozen=True)
class Epoch:
    """One epoch of the data on this setup, and what it assumes."""

    records: int
    dropped: int
    tokens: int
    rows: int
    steps: int
    hours: float
    cost: float
    assumptions: list[str]


def lengths_by_characters(files: list[Path], max_seq_len: int) -> tuple[int, list[int]]:
    """(records, token counts of the kept examples), each estimated from its characters with the
    default prompt template, truncated and dropped as the job does."""
    from ftstack_train.config import DEFAULT_PROMPT_TEMPLATE, TEMPLATE_FIELD
    from ftstack_train.validation import read_records

    template = len(DEFAULT_PROMPT_TEMPLATE) - len(TEMPLATE_FIELD)
    records, lengths = 0, []
    for path in files:
        for record in read_records(path):
            records += 1
            prompt = math.ceil((template + len(record.prompt)) / CHARS_PER_TOKEN)
            if prompt < max_seq_len:  # the job drops an example whose prompt leaves no room for a response
                lengths.append(min(max_seq_len, prompt + math.ceil(len(record.response) / CHARS_PER_TOKEN) + 1))
    return records, lengths


def lengths_by_tokenizer(files: list[Path], tokenizer_dir: Path, max_seq_len: int) -> tuple[int, list[int]]:
    """(records, token counts of the kept examples) through the job's own tokenize path (needs
    torch and transformers)."""
    from ftstack_train.config import DEFAULT_PROMPT_TEMPLATE
    from ftstack_train.data import tokenize_files
    from ftstack_train.model import load_tokenizer

    split = tokenize_files("train", files, load_tokenizer(str(tokenizer_dir)), DEFAULT_PROMPT_TEMPLATE, max_seq_len, 1.0)
    return split.records, [len(ids) for ids in split.ids]


def epoch_of(files: list[Path], est: Estimate, global_batch: int, mfu: float, tokenizer: Path | None = None) -> Epoch:
    """Steps, tokens, time and cost of one epoch of ``files``, checked with the job's own
    validation first; tokens from ``tokenizer`` (the job's tokenize and packing code) or, without
    one, estimated from characters, as the assumptions say."""
    from ftstack_train.validation import check_files

    check_files(files)  # raises DataError naming file and line, before any number is made
    s, L = est.setup, est.setup.max_seq_len
    if tokenizer is None:
        records, lengths = lengths_by_characters(files, L)
        rows = math.ceil(sum(lengths) / L)
        how = [f"tokens estimated as characters / {CHARS_PER_TOKEN:g} with the default prompt template (give --tokenizer to count)",
               "rows = tokens / max_seq_len (perfect packing; the job's best-fit packing comes close for short examples)"]
    else:
        from ftstack_train.data import pack_rows

        records, lengths = lengths_by_tokenizer(files, tokenizer, L)
        rows = len(pack_rows(lengths, L, packing=True))
        how = [f"tokens counted with the tokenizer in {tokenizer} and the default prompt template; rows packed as the job packs them"]
    steps = math.ceil(rows / global_batch) if rows else 0
    slots = rows * L  # padding still goes through every matmul; the last step may be short
    # causal attention within each example (flex/sdpa): 6 x layers x d x l^2 FLOPs per example;
    # eager computes the whole L x L row, padding included: twice that per row of L
    pairs = 2 * slots * L if s.attn_path == "eager" else sum(n * n for n in lengths)
    flops = 6 * s.shape.n_params * slots + 6 * s.shape.n_layers * s.shape.d_model * pairs
    hours = flops / (s.instance.gpus * s.nodes * s.instance.gpu.bf16_tflops * 1e12 * mfu) / 3600
    assumptions = how + [
        f"steps = rows / global_train_batch_size {global_batch}; FLOPs = 6 x parameters x token slots + attention",
        f"MFU {mfu:.0%} (assumed) of {s.instance.gpu.bf16_tflops:g} TFLOP/s dense bf16 per {s.instance.gpu.name} (datasheet, from memory)",
        f"price ${s.instance.price:.2f}/h per instance ({s.instance.price_source}); {PRICE_CAVEAT}",
        "training steps only: instance start-up, model loading, evaluation, checkpoints and export are not included",
    ]
    return Epoch(records, records - len(lengths), sum(lengths), rows, steps, hours, hours * s.nodes * s.instance.price, assumptions)


def _duration(hours: float) -> str:
    return f"{hours:.2f} h" if hours >= 1 else f"{hours * 60:.1f} min"


def _gib(value: int) -> str:
    return f"{value / GIB:7.2f} GiB"


def to_json(est: Estimate, changes: list[tuple[str, Estimate]], epoch: Epoch | None) -> dict:
    """The estimate as one JSON-ready object (bytes as integers)."""
    s = est.setup
    out = {
        "model": {"name": s.shape.name, "model_type": s.shape.model_type, "parameters": s.shape.n_params},
        "instance": {"type": s.instance.name, "count": s.nodes, "gpus_per_instance": s.instance.gpus, "gpu": s.instance.gpu.name,
                     "gpu_bytes": s.instance.gpu_bytes, "efa": s.instance.efa},
        "settings": {"max_seq_len": s.max_seq_len, "micro_batch": s.micro_batch, "activation_checkpointing": s.activation_checkpointing,
                     "attn_path": s.attn_path, "sharding": s.sharding, "shard_group_gpus": est.shard},
        "per_gpu_bytes": est.items, "step_peak_bytes": est.step_peak, "optimizer_step_peak_bytes": est.optimizer_peak,
        "peak_bytes": est.peak, "budget_bytes": est.budget, "safety_fraction": SAFETY_FRACTION, "fits": est.fits,
        "changes_that_fit": [{"change": text, "peak_bytes": e.peak} for text, e in changes], "notes": est.notes,
    }
    if epoch is not None:
        out["epoch"] = asdict(epoch)
    return out


def print_report(est: Estimate, changes: list[tuple[str, Estimate]], epoch: Epoch | None) -> None:
    """The estimate as a table, the verdict and the changes, then the epoch."""
    s = est.setup
    print(f"{s.shape.name} ({s.shape.n_params / 1e9:.2f}B parameters, {s.shape.model_type}) on {s.nodes} x {s.instance.name} "
          f"({s.instance.gpus} x {s.instance.gpu.name}, {s.instance.gpu_bytes / GIB:.1f} GiB each{', EFA' if s.instance.efa else ''})")
    print(f"max_seq_len {s.max_seq_len}, micro batch {s.micro_batch}, activation checkpointing "
          f"{'on' if s.activation_checkpointing else 'off'}, attention {s.attn_path}, states sharded over {est.shard} GPUs")
    print("per GPU:")
    for name, value in est.items.items():
        print(f"  {name:50s} {_gib(value)}")
    print(f"  {'peak, forward/backward':50s} {_gib(est.step_peak)}")
    print(f"  {'peak, optimizer step':50s} {_gib(est.optimizer_peak)}")
    for note in est.notes:
        print(f"  note: {note}")
    verdict = "FITS" if est.fits else "DOES NOT FIT"
    print(f"{verdict}: peak {est.peak / GIB:.2f} GiB of {est.budget / GIB:.2f} GiB allowed "
          f"({SAFETY_FRACTION:.0%} of {s.instance.gpu_bytes / GIB:.2f} GiB; the rest is for the CUDA context, NCCL, fragmentation)")
    if not est.fits:
        if changes:
            print(f"smallest change that fits: {changes[0][0]} -> peak {changes[0][1].peak / GIB:.2f} GiB")
            for text, e in changes[1:]:
                print(f"  or: {text} -> peak {e.peak / GIB:.2f} GiB")
        else:
            print("no change in reach fits (activation checkpointing, micro batch 1, up to 16 instances, any known type)")
    if epoch is not None:
        print(f"one epoch: {epoch.records} records ({epoch.dropped} dropped: prompt longer than max_seq_len), "
              f"~{epoch.tokens:,} tokens, {epoch.rows:,} rows, {epoch.steps:,} optimizer steps, "
              f"~{_duration(epoch.hours)}, ~${epoch.cost:,.2f}")
        for line in epoch.assumptions:
            print(f"  assumes: {line}")


def print_instance_types() -> None:
    """The instance table."""
    print(f"{'type':20s} {'GPUs':>4s} {'GPU':16s} {'GiB/GPU':>8s} {'EFA':>4s} {'$/h':>8s}  price source")
    for t in INSTANCE_TYPES.values():
        print(f"{t.name:20s} {t.gpus:4d} {t.gpu.name:16s} {t.gpu_bytes / GIB:8.1f} {'yes' if t.efa else 'no':>4s} {t.price:8.2f}  {t.price_source}")
    print(PRICE_CAVEAT)


def run_estimate(args: argparse.Namespace) -> int:
    """The ``estimate`` command: 0 when the run fits, 1 when it does not, 2 for bad input."""
    if args.list_instance_types:
        print_instance_types()
        return 0
    try:
        setup = setup_from_args(args)
    except EstimateInputError as exc:
        print(f"ftstack estimate: error: {exc}", file=sys.stderr)
        return 2
    est = estimate_memory(setup)
    changes = [] if est.fits else smallest_changes(setup, INSTANCE_TYPES, global_batch=args.global_batch)
    epoch = epoch_of(list(args.data), est, args.global_batch, args.mfu, args.tokenizer) if args.data else None
    if args.json:
        print(json.dumps(to_json(est, changes, epoch), indent=2))
    else:
        print_report(est, changes, epoch)
    return 0 if est.fits else 1
