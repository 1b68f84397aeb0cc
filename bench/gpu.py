"""Tokens/s per GPU and MFU of the training step for MPT-7B- and MPT-1B-shaped models at L=2048,
bf16, FSDP2, packed rows, with each attention path (eager, sdpa, flex) and activation
checkpointing on and off; before the timing, a check on a small model that every path gives the
eager path's loss and gradients (FlexAttention's backward pass is checked only here: it has none
on CPU).

    python bench/gpu.py --quick                         # one GPU; sized for < 8 minutes with compiles
    torchrun --nproc-per-node 8 bench/gpu.py            # full depth, every GPU of the node
    .venv/bin/python bench/gpu.py --smoke               # CPU, gloo, tiny shapes (make test runs it)

The step is the trainer's own: random init on the meta device, ``apply_fsdp`` (bf16 compute,
fp32 master weights and reduce), ``to_empty``, ``trainer.Model.build`` (packed attention and the
targets-only loss), ``loss_sum``, backward scaled as the trainer scales it, gradient clipping and
``trainer.build_optimizer``'s AdamW; synthetic packed batches (``bench/attention.py``'s example
lengths). No downloads. Without torchrun it runs as one process.

MFU = useful flops / step time / peak bf16 flops of the GPU, with useful flops per step =
6 x (non-embedding parameters) x real tokens + 6 x (embedding parameters) x target tokens (the
tied LM head runs on targets only) + 6 x layers x d_model x sum over examples of length^2
(attention, causal, within examples). ``mfu_foundry`` uses llm-foundry's formula for comparison
with its published figures: 3 x (2 x parameters x L + 4 x layers x d_model x L^2) per row, every
slot of the row counted. One H200 cannot hold MPT-7B's fp32 weights, gradients and AdamW states
with activations: ``--layers`` shrinks the depth (MFU counts the shrunk model's flops, so it
stays comparable per layer; the LM head's share grows a little) and ``--no-optimizer`` skips the
optimizer step (and its states). The JSON line says what was run.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import socket
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from attention import MPT_7B, pick_rows, synthetic_examples  # noqa: E402  (bench/ is the script's folder)
from ftstack_train.config import parse_config  # noqa: E402
from ftstack_train.data import TokenizedSplit, collate, pack_rows  # noqa: E402
from ftstack_train.distributed import Dist, apply_fsdp, build_sharded_model, compute_dtype, init_distributed  # noqa: E402
from ftstack_train.trainer import Model, build_optimizer  # noqa: E402

SHAPES = {
    "7b": MPT_7B,
    "1b": {"d_model": 2048, "n_heads": 16, "n_layers": 24, "vocab_size": 50432},  # mosaicml/mpt-1b-redpajama-200b
    "check": {"d_model": 256, "n_heads": 4, "n_layers": 2, "vocab_size": 512},
    "tiny": {"d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 256},
}
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("A100", 312.0), ("A10G", 125.0))
"""Dense bf16 tensor-core peak by device name (first match wins; H100 means SXM)."""
PAD = 0


def peak_flops(override: float | None) -> tuple[float | None, str]:
    """The GPU's peak bf16 flops/s and where the figure comes from."""
    if override:
        return override * 1e12, "--peak-tflops"
    if not torch.cuda.is_available():
        return None, "CPU: no peak"
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS:
        if key in name:
            return tflops * 1e12, f"table ({key})"
    return None, f"{name} is not in the table; give --peak-tflops"


def mpt_config(shape: dict, seq: int, layers: int | None):
    """An MptConfig of ``shape`` (``layers`` overrides the depth)."""
    from transformers import MptConfig

    return MptConfig(d_model=shape["d_model"], n_heads=shape["n_heads"], n_layers=layers or shape["n_layers"],
                     vocab_size=shape["vocab_size"], expansion_ratio=4, max_seq_len=seq, pad_token_id=PAD, use_cache=False)


def synthetic_batches(vocab: int, seq: int, rows: int, count: int, seed: int) -> list:
    """``count`` packed micro batches of ``rows`` rows of random tokens with the synthetic
    examples' lengths and prompt masks, through ``data.pack_rows`` and ``data.collate``; rows
    from across the packing, shuffled."""
    need = rows * count
    examples = synthetic_examples(2 * need * seq // 100 + 64, seq, seed)
    rng = np.random.default_rng(seed)
    split = TokenizedSplit("bench", [rng.integers(1, vocab, n).astype(np.int32) for n, _ in examples], [p for _, p in examples])
    packed = pick_rows(pack_rows([n for n, _ in examples], seq, packing=True), need)
    random.Random(seed).shuffle(packed)  # the packing runs from long examples to short: mix them
    return [collate(split, packed[i * rows : (i + 1) * rows], seq, PAD) for i in range(count)]


def init_sharded_(model: torch.nn.Module, seed: int) -> None:
    """Random weights in each rank's shards after ``to_empty``: normal(0, 0.02) for matrices,
    ones for norm weights (MPT has no biases)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            local = param.to_local() if hasattr(param, "to_local") else param
            local.normal_(0.0, 0.02) if param.ndim >= 2 else local.fill_(1.0)


def attention_flops(batch, layers: int, d_model: int) -> float:
    """Causal attention within each example, forward and backward: 6 x layers x d x n^2."""
    seg = batch.segment_ids
    total = 0
    for row in seg:
        counts = torch.bincount(row[row > 0])
        total += int((counts.double() ** 2).sum())
    return 6.0 * layers * d_model * total


@dataclass
class Setup:
    """What every timed configuration shares."""

    d: Dist
    precision: str
    seq: int
    micro_batch: int
    warmup: int
    steps: int
    optimizer: bool
    peak: float | None


def train_steps(model: Model, batches: list, setup: Setup, optimizer) -> tuple[list[float], list[float]]:
    """The trainer's step, one micro batch each: seconds and losses (mean per target token)."""
    d, seconds, losses = setup.d, [], []
    sync = torch.cuda.synchronize if d.device.type == "cuda" else (lambda: None)
    for batch in batches:
        sync()
        start = time.perf_counter()
        counts = torch.tensor([float(batch.label_tokens)], dtype=torch.float64, device=d.device)
        dist.all_reduce(counts)
        targets = counts.item()
        loss = model.loss_sum(batch, d.device)
        (loss * d.world_size / targets).backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.module.parameters() if p.grad is not None], 1.0)
        if optimizer is not None:
            optimizer.step()
        model.module.zero_grad(set_to_none=True)
        losses.append(loss.detach().double() / targets)
        sync()
        seconds.append(time.perf_counter() - start)
    summed = torch.stack(losses)
    dist.all_reduce(summed)  # after the timing: the trainer reads the loss only when it logs
    return seconds, summed.tolist()


def build_timed(shape: dict, layers: int | None, path: str, ac: bool, setup: Setup):
    """The model as the trainer builds it, from the meta device: sharded, then materialised on
    the device and initialised shard by shard (no full copy anywhere)."""
    from transformers import AutoModelForCausalLM

    d = setup.d
    config = mpt_config(shape, setup.seq, layers)
    with torch.device("meta"):
        module = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    apply_fsdp(module, d.device, setup.precision, ac, "auto", d.local_world_size)
    module.to_empty(device=d.device)
    init_sharded_(module, seed=d.rank)  # the same weights for every path: their losses must agree
    model = Model.build(module, path, compute_dtype(setup.precision, d.device), d.device, PAD)
    optimizer = build_optimizer(module, parse_config()[0]) if setup.optimizer else None
    return config, model, optimizer


def time_config(name: str, shape: dict, layers: int | None, path: str, ac: bool, setup: Setup) -> dict:
    """Warm-up steps (compiles, optimizer states), then timed steps: tokens/s per GPU, MFU and
    peak memory of one configuration."""
    d = setup.d
    run = {"shape": name, "layers": layers or shape["n_layers"], "attn_impl": path, "activation_checkpointing": ac}
    if d.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    config, model, optimizer = build_timed(shape, layers, path, ac, setup)
    batches = synthetic_batches(config.vocab_size, setup.seq, setup.micro_batch, setup.warmup + setup.steps, seed=1000 + d.rank)
    seconds, losses = train_steps(model, batches, setup, optimizer)
    timed = batches[setup.warmup :]
    n_params = sum(p.numel() for p in model.module.parameters())  # global sizes (DTensor), tied once
    n_embed = config.vocab_size * config.d_model
    real = sum(b.real_tokens for b in timed)
    targets = sum(b.label_tokens for b in timed)
    flops = 6.0 * (n_params - n_embed) * real + 6.0 * n_embed * targets + sum(attention_flops(b, config.n_layers, config.d_model) for b in timed)
    rows = sum(b.input_ids.shape[0] for b in timed)
    foundry = 3.0 * (2.0 * n_params * setup.seq + 4.0 * config.n_layers * config.d_model * setup.seq**2) * rows
    memory = torch.cuda.max_memory_allocated() if d.device.type == "cuda" else float("nan")  # CPU: not tracked
    sums = torch.tensor([real, flops, foundry], dtype=torch.float64, device=d.device)
    dist.all_reduce(sums)
    worst = torch.tensor([sum(seconds[setup.warmup :]), float(memory)], dtype=torch.float64, device=d.device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    elapsed = worst[0].item()
    per_gpu = lambda v: v / d.world_size / elapsed  # noqa: E731
    run |= {"params": n_params, "tokens_per_s_per_gpu": per_gpu(sums[0].item()), "step_s": statistics.median(seconds[setup.warmup :]),
            "first_loss": losses[0], "peak_memory_gib": worst[1].item() / 2**30 if d.device.type == "cuda" else None,
            "mfu": per_gpu(sums[1].item()) / setup.peak if setup.peak else None,
            "mfu_foundry": per_gpu(sums[2].item()) / setup.peak if setup.peak else None}
    del model, optimizer
    return run


def check_model(precision: str, path: str, batch, setup: Setup) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss (summed over ranks) and full gradients of the check model, loaded the trainer's way
    (``build_sharded_model``: weights on rank 0, broadcast into the shards)."""
    from transformers import AutoModelForCausalLM

    d = setup.d
    config = mpt_config(SHAPES["tiny" if d.device.type == "cpu" else "check"], batch.input_ids.shape[1], None)

    def load(empty: bool):
        torch.manual_seed(0)
        with torch.device("meta" if empty else "cpu"):
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")

    module = build_sharded_model(load, d, precision, False, "auto")
    model = Model.build(module, path, compute_dtype(precision, d.device), d.device, PAD)
    loss = model.loss_sum(batch, d.device)
    loss.backward()
    total = loss.detach().double()
    dist.all_reduce(total)
    grads = {}
    for name, param in module.named_parameters():
        grad = param.grad.full_tensor() if hasattr(param.grad, "full_tensor") else param.grad
        grads[name] = grad.float().cpu()
    return total.item(), grads


def _relative(grads: dict, reference: dict) -> float:
    """The worst parameter's gradient error relative to the reference's norm."""
    return max(float((grads[n] - g).norm() / g.norm().clamp_min(1e-30)) for n, g in reference.items())


def check_paths(paths: list[str], setup: Setup) -> dict:
    """Every path's loss and gradients against eager's on a small model: fp32 (CPU: to
    assert_close's defaults; GPU: 1e-3 relative, since the kernels may use TF32), and on GPU
    bf16, where each path's error against fp32 eager may be at most 1.5x eager's own bf16 error
    (or 5e-3) and under 3% per parameter, as in tests/test_attention.py."""
    d = setup.d
    seq = 128 if d.device.type == "cpu" else 512
    vocab = SHAPES["tiny" if d.device.type == "cpu" else "check"]["vocab_size"]
    batch = synthetic_batches(vocab, seq, 2, 1, seed=7 + d.rank)[0]
    precisions = ["fp32"] + (["amp_bf16"] if d.device.type == "cuda" else [])
    got = {(prec, path): check_model(prec, path, batch, setup) for prec in precisions for path in paths}
    ref_loss, ref_grads = got[("fp32", "eager")]
    report, ok = [], True
    for (prec, path), (loss, grads) in got.items():
        if path == "eager":
            continue
        e_loss, e_grads = got[(prec, "eager")]
        entry = {"precision": prec, "attn_impl": path, "loss": loss, "eager_loss": e_loss, "loss_diff": abs(loss - e_loss),
                 "grad_max_abs_diff": max(float((grads[n] - g).abs().max()) for n, g in e_grads.items()),
                 "grad_rel_err": _relative(grads, e_grads)}
        try:
            if prec == "fp32" and d.device.type == "cpu":
                torch.testing.assert_close(loss, e_loss)
                torch.testing.assert_close(grads, e_grads)
            elif prec == "fp32":
                torch.testing.assert_close(loss, e_loss, rtol=1e-4, atol=1e-4)
                assert entry["grad_rel_err"] < 1e-3, f"gradients {entry['grad_rel_err']:.2e} off eager's (relative norm)"
            else:
                torch.testing.assert_close(loss, ref_loss, rtol=2e-3, atol=0.0)
                own, eager_own = _relative(grads, ref_grads), _relative(e_grads, ref_grads)
                entry |= {"grad_rel_err_vs_fp32": own, "eager_grad_rel_err_vs_fp32": eager_own}
                assert own <= max(1.5 * eager_own, 5e-3) and own < 0.03, f"bf16 gradient error {own:.2e} (eager's {eager_own:.2e})"
            entry["ok"] = True
        except AssertionError as exc:
            entry |= {"ok": False, "error": str(exc).splitlines()[0]}
            ok = False
        report.append(entry)
    return {"ok": ok, "paths": report}


def _single_process_env() -> None:
    """Plain ``python bench/gpu.py``: a process group of one, as torchrun would set it up."""
    if "RANK" in os.environ:
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def parse_args() -> argparse.Namespace:
    """The command line; ``--smoke`` and ``--quick`` set the sizes they stand for."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="7B shape at 8 layers and the 1B shape, 4 timed steps each")
    mode.add_argument("--smoke", action="store_true", help="tiny shapes, eager and sdpa, 2 timed steps (make test runs it on CPU)")
    parser.add_argument("--shapes", default="7b,1b", help="model shapes to time: 7b, 1b (comma-separated)")
    parser.add_argument("--paths", help="attention paths (default: eager,sdpa,flex on GPU, eager,sdpa on CPU)")
    parser.add_argument("--layers", type=int, help="depth of the 7B shape (default 32; 8 with --quick)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=4, help="rows per micro batch per GPU")
    parser.add_argument("--steps", type=int, help="timed steps per configuration (default 8; 4 with --quick)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compiles, optimizer states)")
    parser.add_argument("--no-optimizer", action="store_true", help="skip the optimizer step and its states (memory)")
    parser.add_argument("--skip-check", action="store_true", help="no correctness check before the timing")
    parser.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak, overriding the table")
    args = parser.parse_args()
    if args.smoke:
        args.shapes, args.seq, args.micro_batch, args.warmup, args.steps = "tiny", 128, 2, 1, 2
        args.paths = args.paths or "eager,sdpa"
    elif args.quick:
        args.layers, args.steps = args.layers or 8, args.steps or 4
    args.steps = args.steps or 8
    args.shapes = args.shapes.split(",")
    unknown = [s for s in args.shapes if s not in SHAPES]
    if unknown or min(args.seq, args.micro_batch, args.steps, args.layers or 1) < 1 or args.warmup < 0:
        parser.error(f"--shapes takes {', '.join(k for k in SHAPES if k != 'check')}; sizes must be positive")
    return args


def run(args: argparse.Namespace, d: Dist) -> dict:
    """The check, then every timed configuration; rank 0 prints each as it comes."""
    cuda = d.device.type == "cuda"
    paths = (args.paths or ("eager,sdpa,flex" if cuda else "eager,sdpa")).split(",")
    if "flex" in paths and not cuda:
        raise SystemExit("error: --paths: flex needs a GPU (FlexAttention has no backward pass on CPU)")
    peak, peak_source = peak_flops(args.peak_tflops)
    setup = Setup(d, "amp_bf16", args.seq, args.micro_batch, args.warmup, args.steps, not args.no_optimizer, peak)
    say = print if d.is_main else (lambda *a, **k: None)
    device = torch.cuda.get_device_name() if cuda else "cpu"
    say(f"{d.world_size} x {device}, torch {torch.__version__}, peak {peak / 1e12 if peak else 0:.0f} TFLOPS ({peak_source}); "
        f"L={args.seq}, micro batch {args.micro_batch}, {args.warmup} warm-up + {args.steps} timed steps, "
        f"optimizer {'AdamW (trainer.build_optimizer)' if setup.optimizer else 'skipped'}", flush=True)
    check = {"ok": True, "paths": [], "skipped": True} if args.skip_check else check_paths(paths, setup)
    for c in check["paths"]:
        say(f"check {c['precision']:8s} {c['attn_impl']:5s} vs eager: loss diff {c['loss_diff']:.2e}, grad max abs diff "
            f"{c['grad_max_abs_diff']:.2e}, worst relative {c['grad_rel_err']:.2e} -> {'ok' if c['ok'] else 'FAILED: ' + c['error']}", flush=True)
    runs = []
    for name in args.shapes:
        layers = args.layers if name == "7b" else None
        for path in paths:
            for ac in (True, False):
                try:
                    runs.append(time_config(name, SHAPES[name], layers, path, ac, setup))
                except torch.cuda.OutOfMemoryError:
                    runs.append({"shape": name, "layers": layers or SHAPES[name]["n_layers"], "attn_impl": path,
                                 "activation_checkpointing": ac, "oom": True})
                gc.collect()
                if cuda:
                    torch.cuda.empty_cache()
                say(_line(runs[-1]), flush=True)
    notes = [f"7B shape at {args.layers} of {SHAPES['7b']['n_layers']} layers" if args.layers and "7b" in args.shapes else "full depth",
             "optimizer step run (AdamW)" if setup.optimizer else "optimizer step skipped (--no-optimizer)",
             "correctness check skipped" if args.skip_check else "correctness check run"]
    say("done: " + "; ".join(notes), flush=True)
    return {"bench": "gpu", "notes": notes, "device": device, "world_size": d.world_size, "torch": torch.__version__,
            "peak_tflops": peak / 1e12 if peak else None, "seq": args.seq, "micro_batch": args.micro_batch,
            "steps": args.steps, "optimizer": setup.optimizer, "check": check, "runs": runs}


def _line(r: dict) -> str:
    head = f"{r['shape']:>4} x{r['layers']:3d} layers {r['attn_impl']:5s} AC {'on ' if r['activation_checkpointing'] else 'off'}"
    if r.get("oom"):
        return f"{head}: out of memory"
    mfu = f", MFU {r['mfu']:.1%} (llm-foundry formula {r['mfu_foundry']:.1%})" if r["mfu"] is not None else ""
    memory = f", peak {r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else ""
    return (f"{head}: {r['tokens_per_s_per_gpu']:10.0f} real tokens/s per GPU, step {r['step_s'] * 1e3:8.1f} ms{mfu}"
            f"{memory}, first loss {r['first_loss']:.4f}")


def main() -> int:
    """Runs the bench under torchrun or as one process; exit 1 when a path's check fails."""
    args = parse_args()
    _single_process_env()
    d = init_distributed(timeout_s=900)
    try:
        summary = run(args, d)
    finally:
        dist.destroy_process_group()
    if d.is_main:
        print(json.dumps(summary), flush=True)
    return 0 if summary["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
