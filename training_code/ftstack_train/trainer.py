"""The training loop: optimizer and schedule, prompt-masked loss, evaluation, checkpoints and the
graceful stop on SIGTERM."""

from __future__ import annotations

import inspect
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoint import agree_on_resume, load_checkpoint, save_checkpoint
from .config import TrainConfig
from .data import IGNORE_INDEX, Batch, StepPlan, TokenizedSplit, attention_bias, collate, epoch_order
from .attention import PackedAttention, attention_dropout, resolve_attn_impl, use_packed_attention
from .distributed import Dist, sync_replicas
from .loss import TargetsOnlyHead, use_targets_only_loss
from .metrics import format_line, perplexity


class StopRequested:
    """Set by SIGTERM (spot interruption, StopTrainingJob) or SIGINT; the loop checks it between
    steps on every rank, saves a checkpoint and returns."""

    def __init__(self) -> None:
        self.flag = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._set)

    def _set(self, signum, frame) -> None:
        self.flag = True


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over all trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)


def lr_factor(step: int, total_steps: int, warmup_steps: int, cfg: TrainConfig) -> float:
    """Share of the peak learning rate at ``step``: linear warm-up from 0, then linear or cosine
    decay to ``alpha_f`` at the end (or constant)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if cfg.scheduler == "constant_with_warmup":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if cfg.scheduler == "cosine_with_warmup":
        return cfg.alpha_f + (1 - cfg.alpha_f) * 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.alpha_f + (1 - cfg.alpha_f) * (1 - progress)


@dataclass
class Schedule:
    """Steps of the run, derived from the config and the number of training rows."""

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    eval_every: int
    save_every: int

    @classmethod
    def build(cls, cfg: TrainConfig, plan: StepPlan, n_rows: int) -> Schedule:
        per_epoch = plan.steps_per_epoch(n_rows)
        total = cfg.max_duration.to_steps(per_epoch)
        return cls(
            steps_per_epoch=per_epoch,
            total_steps=total,
            warmup_steps=cfg.warmup.to_steps(per_epoch, total),
            eval_every=cfg.eval_interval.to_steps(per_epoch),
            save_every=cfg.save_interval.to_steps(per_epoch),
        )


@dataclass
class Model:
    """The sharded model with what the loop needs to call it: the packed attention and the
    targets-only output layer when the model has them (see ``attention`` and ``loss``)."""

    module: torch.nn.Module
    compute_dtype: torch.dtype
    pad_id: int
    attention: PackedAttention | None = None
    head: TargetsOnlyHead | None = None
    takes_positions: bool = field(init=False)

    @classmethod
    def build(cls, module: torch.nn.Module, attn_impl: str, compute_dtype: torch.dtype, device: torch.device, pad_id: int) -> Model:
        """Puts in the fastest exact attention the config allows (see ``resolve_attn_impl``) and
        the targets-only loss where the model has them; on every rank, after sharding."""
        config = module.config
        impl = resolve_attn_impl(attn_impl, device, config.model_type, attention_dropout(config))
        return cls(module, compute_dtype, pad_id, use_packed_attention(module, impl), use_targets_only_loss(module))

    def rows(self, batch_size: int) -> int:
        """The fewest rows a batch is padded to: the full batch size for FlexAttention, whose
        compiled kernel is specialised to its shapes (a short batch at an epoch's end would
        compile it again, and past dynamo's recompile limit it runs uncompiled, materializing the
        scores); 1 otherwise."""
        return batch_size if self.attention is not None and self.attention.impl == "flex" else 1

    def describe(self) -> str:
        """What the log says about the paths taken."""
        attention = "eager (the model's own, full row mask)" if self.attention is None else f"{self.attention.impl} (per example)"
        loss = "targets only, chunked" if self.head is not None else "full logits"
        return f"attention: {attention}; loss: {loss}"

    def __post_init__(self) -> None:
        # Models with position ids (RoPE, learned) need them restarted per packed example; ALiBi
        # models such as MPT take none and need none.
        self.takes_positions = "position_ids" in inspect.signature(self.module.forward).parameters

    def loss_sum(self, batch: Batch, device: torch.device) -> torch.Tensor:
        """Summed cross-entropy over the batch's target tokens."""
        kwargs: dict[str, Any] = {"input_ids": batch.input_ids.to(device)}
        if self.attention is None:
            kwargs["attention_mask"] = attention_bias(batch.segment_ids.to(device), self.compute_dtype)
        else:
            kwargs.update(self.attention.prepare(batch.segment_ids, device))
        if self.takes_positions:
            kwargs["position_ids"] = batch.position_ids.to(device)
        labels = batch.labels.to(device)
        if self.head is None:
            logits = self.module(**kwargs).logits
            return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
        self.head.targets = labels
        try:
            return self.module(**kwargs).logits  # the head's summed loss
        finally:
            self.head.targets = None


def accumulate_gradients(module: torch.nn.Module, batches: list, loss_sum, scale: float, device: torch.device) -> torch.Tensor:
    """Backward passes of one step's micro batches, each ``loss_sum(batch) x scale``, gradients
    summed; returns the losses' sum, kept on ``device`` (no sync per micro batch). Only the last
    all-reduces across HYBRID_SHARD's replicas (``sync_replicas``)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for i, batch in enumerate(batches):
        sync_replicas(module, i == len(batches) - 1)
        loss = loss_sum(batch)
        (loss * scale).backward()
        total += loss.detach()
    return total


def _all_sum(values: list[float], device: torch.device) -> list[float]:
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def evaluate(model: Model, split: TokenizedSplit, rows: list[list[int]], cfg: TrainConfig, d: Dist) -> tuple[float, int]:
    """Token-weighted cross-entropy over the whole eval set (or its configured subset), summed
    across ranks. Every rank runs the same number of batches."""
    mine = rows[d.rank :: d.world_size]
    per_rank = math.ceil(len(rows) / d.world_size)
    n_batches = math.ceil(per_rank / cfg.device_eval_batch_size)
    if cfg.eval_subset_num_batches > 0:
        n_batches = min(n_batches, cfg.eval_subset_num_batches)
    total, tokens = torch.zeros((), dtype=torch.float64, device=d.device), 0
    model.module.eval()
    with torch.no_grad():
        for b in range(n_batches):
            chunk = mine[b * cfg.device_eval_batch_size : (b + 1) * cfg.device_eval_batch_size]
            batch = collate(split, chunk, cfg.max_seq_len, model.pad_id, model.rows(cfg.device_eval_batch_size))
            total += model.loss_sum(batch, d.device)
            tokens += batch.label_tokens
    model.module.train()
    total, tokens = _all_sum([total.item(), float(tokens)], d.device)
    return total / max(tokens, 1.0), int(tokens)


@dataclass
class RunResult:
    """What the loop hands to the export."""

    stopped: bool
    step: int
    history: list[dict[str, Any]]
    final_train: dict[str, float]


def train(
    model: Model,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    d: Dist,
    plan: StepPlan,
    train_split: TokenizedSplit,
    train_rows: list[list[int]],
    eval_split: TokenizedSplit,
    eval_rows: list[list[int]],
    checkpoint_dir: Path,
    stop: StopRequested,
) -> RunResult:
    """Runs from the newest complete checkpoint (or the start) to the end of the schedule."""
    sched = Schedule.build(cfg, plan, len(train_rows))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, sched.total_steps, sched.warmup_steps, cfg)
    )
    state: dict[str, Any] = {"step": 0, "history": [], "final_train": {}}
    resume = agree_on_resume(checkpoint_dir, d.is_local_main)  # collective: every rank picks the same one
    if resume is not None:
        state = load_checkpoint(resume, model.module, optimizer)
        scheduler.last_epoch = state["step"]
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(state["step"], sched.total_steps, sched.warmup_steps, cfg)
        _log(d, f"resumed from {resume.name} at step {state['step']} of {sched.total_steps}")
    else:
        _log(d, f"starting: {sched.total_steps} steps, {sched.steps_per_epoch} per epoch, {len(train_rows)} rows, world size {d.world_size}")

    def record_eval(step: int) -> None:
        ce, tokens = evaluate(model, eval_split, eval_rows, cfg, d)
        entry = {"step": step, "epoch": round(step / sched.steps_per_epoch, 4), "cross_entropy": ce, "perplexity": perplexity(ce), "tokens": tokens}
        state["history"].append(entry)
        _log(d, format_line("eval", **entry))

    def checkpoint(step: int, prune: bool = True) -> None:
        save_checkpoint(
            checkpoint_dir, step, model.module, optimizer, dict(state, step=step), cfg.save_num_checkpoints_to_keep,
            d.is_local_main, prune=prune,
        )

    if state["step"] == 0 and cfg.eval_first and not state["history"]:
        record_eval(0)
    step, saved_at = state["step"], state["step"]
    order_epoch, order = -1, []
    window_start, window_tokens = time.perf_counter(), 0.0
    while step < sched.total_steps:
        epoch, in_epoch = divmod(step, sched.steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(len(train_rows), cfg.seed, epoch, cfg.shuffle), epoch
        micro = plan.micro_batches(order, in_epoch, d.rank)
        rows = model.rows(plan.micro_batch)
        batches = [collate(train_split, (train_rows[i] for i in mb), cfg.max_seq_len, model.pad_id, rows) for mb in micro]
        # One collective per step before the forward passes: the loss scale needs the global
        # target count, and every rank must agree on a requested stop.
        local = [sum(b.label_tokens for b in batches), sum(b.real_tokens for b in batches), sum(b.input_ids.numel() for b in batches)]
        targets, real, slots, stops = _all_sum([*map(float, local), float(stop.flag)], d.device)
        if stops > 0:
            if saved_at != step:
                # No pruning: this save may not finish uploading before the instance goes, so
                # the periodic checkpoints before it must all stay.
                checkpoint(step, prune=False)
            _log(d, f"stop requested: saved a checkpoint at step {step}; start the run again to resume")
            return RunResult(True, step, state["history"], state["final_train"])
        # FSDP averages gradients over ranks; scaling by world/targets makes the result the mean
        # over every target token of the global batch, however they fall on ranks.
        loss_total = accumulate_gradients(model.module, batches, lambda b: model.loss_sum(b, d.device),
                                          d.world_size / targets, d.device)
        grad_norm = _clip(model.module, cfg.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_tokens += real
        if step % cfg.console_log_interval.to_steps(1) == 0 or step == sched.total_steps:
            dist.all_reduce(loss_total)  # the loss is only read (and synchronised) when logged
            ce = loss_total.item() / targets
            state["final_train"] = {"cross_entropy": ce, "perplexity": perplexity(ce)}
            elapsed = time.perf_counter() - window_start
            _log(d, format_line(
                "train", step=step, epoch=round(step / sched.steps_per_epoch, 4), loss=ce, perplexity=perplexity(ce),
                lr=scheduler.get_last_lr()[0], tokens_per_s=window_tokens / max(elapsed, 1e-9),
                real_token_share=real / slots, grad_norm=_full(grad_norm).item(),
            ))
            window_start, window_tokens = time.perf_counter(), 0.0
        evaluated = step % sched.eval_every == 0 or step == sched.total_steps
        if evaluated:
            record_eval(step)
        saving = step % sched.save_every == 0 or step % sched.steps_per_epoch == 0 or step == sched.total_steps
        if saving:
            checkpoint(step)
            saved_at = step
        if evaluated or saving:  # keep evaluation and checkpoint time out of tokens/s
            window_start, window_tokens = time.perf_counter(), 0.0
    return RunResult(False, step, state["history"], state["final_train"])


def _clip(model: torch.nn.Module, max_norm: float) -> torch.Tensor:
    """Clips the gradients' global norm (0: only measures it); returns the norm, unsynchronised."""
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in params])


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (FSDP2 returns the gradient norm as one), a plain tensor as is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _log(d: Dist, line: str) -> None:
    if d.is_main:
        print(line, flush=True)
