"""Per-GPU memory of an ftstack training job, before any instance starts: the one place these
formulas live (``ftstack estimate``, the staging step's pre-flight check and
``bench/attention.py`` read them from here). Pure Python: no torch, no transformers.

What the job does, and so what is counted (``training_code/ftstack_train``):

- FSDP2 with fp32 master weights: fp32 parameters, fp32 gradients (reduced in fp32) and AdamW's
  two fp32 moments are sharded over the GPUs that share a shard group: every GPU of the job
  (FULL_SHARD), or, with ``auto`` on several nodes of more than one GPU, the GPUs of one node
  (HYBRID_SHARD: replicated across nodes), as ``distributed.plan_sharding`` decides.
- Compute in bf16: the block in use and the prefetched one are all-gathered in bf16; one block's
  bf16 gradients and their fp32 copy for the reduce-scatter exist at a time; the root's
  parameters (embedding, final norm, untied output layer) stay unsharded in bf16, with their bf16
  gradients, from the forward pass to the end of the backward pass.
- Activation checkpointing per block (non-reentrant) keeps each block's bf16 input and recomputes
  one block at a time in the backward pass; without it every block keeps all it saves.
- Attention: ``flex`` (MPT and Llama on GPU) and ``sdpa`` keep q, k, v and the output, no L x L
  tensor; sdpa holds MPT's ALiBi biases once per step (at worst heads x L x L, one example
  filling the row). ``eager`` (every other model type) materializes B x H x L x L scores per
  layer: bf16 scores upcast to an fp32 softmax, 6 bytes an element kept for the backward pass
  and 8 more in it (the fp32 gradient into and out of the softmax), plus the dense mask once per
  step (a bf16 bias and a bool copy, B x L x L).
- Loss: for MPT and Llama, on target tokens only, 1024 at a time under checkpointing
  (``loss.CHUNK_TOKENS``): one chunk's bf16 logits, fp32 upcast, log-softmax and its gradient,
  14 bytes a logit, plus the gathered target states and their gradient. Other model types compute
  full logits: every position's, 14 bytes a logit.
- The peak is the steady part plus the larger of one block's backward pass and the loss (the loss
  ends the forward pass, before any block's backward). The optimizer step comes after the
  activations are gone and adds one fp32 temporary per parameter shard (foreach AdamW's
  ``sqrt(exp_avg_sq)``); the verdict takes the larger of the two peaks.

Not counted: the CUDA context and NCCL's buffers (outside PyTorch's allocator) and allocator
fragmentation. The verdict's safety margin (use at most SAFETY_FRACTION of the GPU's memory)
stands for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ftstack_train.contract import LOSS_CHUNK_TOKENS as CHUNK_TOKENS
from ftstack_train.contract import VERIFIED_MODEL_TYPES as VERIFIED

from .instances import Gpu, InstanceType
from .model_shapes import ModelShape

LOGIT_BYTES = 14
"""Bytes per logit at the loss's peak: bf16 logits, fp32 upcast, fp32 log-softmax, fp32 gradient."""
EAGER_SAVED_BYTES = 6
"""Bytes per attention score that eager attention keeps for the backward pass (fp32 softmax
output and its bf16 copy)."""
EAGER_BACKWARD_BYTES = 8
"""Bytes per score added in the backward pass (the fp32 gradient into and out of the softmax)."""
SAFETY_FRACTION = 0.80
"""Largest share of a GPU's memory an estimate may fill and still count as fitting: the rest is
for the CUDA context, NCCL and fragmentation (the issue's rule: no OOM seen below 80%)."""
ATTN_PATHS = ("eager", "sdpa", "flex")


def attn_path_for(shape: ModelShape, requested: str, gpu: Gpu) -> str:
    """The attention path the job takes on ``gpu`` for ``attn_impl: requested``, as
    ``ftstack_train.attention.resolve_attn_impl`` decides it: flex for verified model types on a
    GPU whose shared memory holds its kernels (sdpa on others, and when attention dropout is on),
    eager for the others. Raises ValueError for a path the job would refuse (``check_attn_impl``)."""
    check_attn_impl(shape, requested)
    if requested == "auto":
        fused = shape.model_type in VERIFIED
        return "eager" if not fused else "sdpa" if shape.attn_dropout or not gpu.flex else "flex"
    return requested


def check_attn_impl(shape: ModelShape, requested: str) -> None:
    """ValueError for an ``attn_impl`` the job refuses for this model on any GPU."""
    fused = shape.model_type in VERIFIED
    if requested == "auto":
        return
    if requested not in ATTN_PATHS:
        raise ValueError(f"--attn-impl: {requested!r} is not one of auto, {', '.join(ATTN_PATHS)}")
    if requested != "eager" and not fused:
        raise ValueError(f"--attn-impl: {requested} is verified for {', '.join(VERIFIED)} models only, not "
                         f"{shape.model_type!r}; use auto or eager")
    if requested == "flex" and shape.attn_dropout:
        raise ValueError("--attn-impl: FlexAttention does not apply attention dropout; use auto or sdpa")


def shard_size(instance: InstanceType, nodes: int, sharding: str = "auto") -> int:
    """GPUs that split the model states: all of them (FULL_SHARD), or one node's (HYBRID_SHARD,
    which ``auto`` picks on several nodes of more than one GPU), as ``plan_sharding`` decides."""
    world = instance.gpus * nodes
    if sharding not in ("auto", "FULL_SHARD", "HYBRID_SHARD"):
        raise ValueError(f"--sharding: {sharding!r} is not one of auto, FULL_SHARD, HYBRID_SHARD")
    if sharding == "FULL_SHARD" or nodes == 1 or (sharding == "auto" and instance.gpus == 1):
        return world
    return instance.gpus


@dataclass(frozen=True)
class Setup:
    """What a run is: model, hardware and the memory-relevant training settings."""

    shape: ModelShape
    instance: InstanceType
    max_seq_len: int
    micro_batch: int
    activation_checkpointing: bool = True
    attn_impl: str = "auto"
    """As the job's ``attn_impl``: ``attn_path`` is what it becomes on this instance type's GPU."""
    nodes: int = 1
    sharding: str = "auto"
    compute_bytes: int = 2
    """2 for bf16 compute (the job on GPU), 4 for fp32 (CPU, used to check the model on a CPU run)."""

    @property
    def attn_path(self) -> str:
        """The attention path the job takes (``attn_path_for``)."""
        return attn_path_for(self.shape, self.attn_impl, self.instance.gpu)


@dataclass(frozen=True)
class Estimate:
    """Per-GPU bytes, item by item (``items``: name -> bytes, in print order) and the verdict."""

    setup: Setup
    items: dict[str, int]
    step_peak: int
    """Peak of the forward/backward pass."""
    optimizer_peak: int
    """Peak of the optimizer step (states plus AdamW's temporary)."""
    shard: int
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        """The larger of the two peaks."""
        return max(self.step_peak, self.optimizer_peak)

    @property
    def budget(self) -> int:
        """Bytes the peak may reach on this GPU (SAFETY_FRACTION of what the driver reports)."""
        return int(self.setup.instance.gpu_bytes * SAFETY_FRACTION)

    @property
    def fits(self) -> bool:
        """Whether the peak stays within the budget."""
        return self.peak <= self.budget


def block_activation_bytes(shape: ModelShape, tokens: int, b: int, attn_path: str = "flex") -> int:
    """What one block keeps for its backward pass, ``tokens`` tokens in ``b``-byte elements, the
    L x L scores left out: its input, the first norm's output, q, k and v, the attention output
    and the out-projection's (reshaped) input, the residual sum, the second norm's output, and the
    MLP's inner activations (GELU: its input and output; gated: gate, up, activation, product).
    The per-example sdpa path also keeps each example's output before they are joined."""
    d, kv = shape.d_model, shape.n_kv_heads * shape.head_dim
    attention = d + d + (d + 2 * kv) + d + d + (d if attn_path == "sdpa" else 0)
    mlp = d + d + (4 if shape.gated_mlp else 2) * shape.ffn_hidden
    return tokens * (attention + mlp) * b


def block_backward_bytes(shape: ModelShape, tokens: int, b: int) -> int:
    """What one block's backward pass adds on top of what it kept: the gradient flowing in (d
    wide) and two MLP-wide gradients at once (into and out of the activation)."""
    return tokens * (shape.d_model + 2 * shape.ffn_hidden) * b


def estimate_memory(setup: Setup) -> Estimate:
    """Per-GPU peak memory of one training step of ``setup``, itemized (see the module docstring)."""
    s, b = setup.shape, setup.compute_bytes
    shard = shard_size(setup.instance, setup.nodes, setup.sharding)
    n, seq, batch = s.n_params, setup.max_seq_len, setup.micro_batch
    tokens, scores = batch * seq, batch * s.n_heads * seq * seq
    eager = setup.attn_path == "eager"
    kept = block_activation_bytes(s, tokens, b, setup.attn_path) + (scores * (EAGER_SAVED_BYTES if b == 2 else 4) if eager else 0)
    backward = block_backward_bytes(s, tokens, b) + (scores * (EAGER_BACKWARD_BYTES if b == 2 else 8) if eager else 0)
    if setup.activation_checkpointing:
        activations = s.n_layers * tokens * s.d_model * b
        block_pass = kept - tokens * s.d_model * b + backward  # the input is already counted
    else:
        activations, block_pass = s.n_layers * kept, backward
    step_inputs = {"eager": batch * seq * seq * (b + 1), "sdpa": s.n_heads * seq * seq * b if s.model_type == "mpt" else 0,
                   "flex": 0}[setup.attn_path]
    if s.model_type in VERIFIED:
        loss = min(CHUNK_TOKENS, tokens) * s.vocab_size * LOGIT_BYTES + 2 * tokens * s.d_model * b
    else:
        loss = tokens * s.vocab_size * LOGIT_BYTES
    master = 4 * n // shard
    mixed = b == 2  # fp32 compute uses the fp32 shards' gathers directly: no separate copies
    items = {
        "parameters (fp32, sharded)": master,
        "gradients (fp32, sharded)": master,
        "optimizer state (AdamW, 2 x fp32, sharded)": 2 * master,
        "all-gathered blocks (current + prefetched)": 2 * s.block_params * b,
        "gradient reduce-scatter buffers (one block)": s.block_params * (b + 4 if mixed else b),
        "unsharded root (embeddings, head) + gradients": s.root_params * 2 * b,
        "activations kept for backward": activations,
        f"per-step attention inputs ({setup.attn_path})": step_inputs,
        "one block's backward pass" + (" (recomputed)" if setup.activation_checkpointing else ""): block_pass,
        "loss" + (" (targets only, 1024-token chunks)" if s.model_type in VERIFIED else " (full logits)"): loss,
    }
    steady = sum(list(items.values())[:8])
    notes = []
    if setup.nodes > 1 and shard < setup.instance.gpus * setup.nodes:
        notes.append(f"HYBRID_SHARD: states split over one node's {shard} GPUs, replicated across the {setup.nodes} nodes")
    return Estimate(setup, items, steady + max(block_pass, loss), 4 * master + master, shard, notes)


def largest_micro_batch(setup: Setup, most: int = 64) -> int:
    """The largest micro batch (1 to ``most``) whose estimate fits, 0 when even 1 does not (the
    staging step sizes ``device_train_microbatch_size: auto`` with it)."""
    from dataclasses import replace

    best = 0
    for batch in range(1, most + 1):
        if not estimate_memory(replace(setup, micro_batch=batch)).fits:
            break
        best = batch
    return best


def smallest_changes(setup: Setup, instance_types: dict[str, InstanceType], max_nodes: int = 16,
                     global_batch: int | None = None) -> list[tuple[str, Estimate]]:
    """Changes that make a setup that does not fit fit, least disruptive first, each with its
    estimate: activation checkpointing on; a smaller micro batch (the global batch stays, through
    gradient accumulation); FULL_SHARD over more instances of this type; the cheapest other
    instance type with bf16 (same count) that fits as is. The ones after the first keep
    activation checkpointing on, and say so. With ``global_batch``, only sizes the job accepts
    (its rows divide over the GPUs, and the micro batch divides each GPU's rows: the job's
    ``batch_split``). Empty when nothing in reach fits."""
    from dataclasses import replace

    found: list[tuple[str, Estimate]] = []
    base, also = setup, ""
    if not setup.activation_checkpointing:
        base, also = replace(setup, activation_checkpointing=True), ", with activation checkpointing"
        on = estimate_memory(base)
        if on.fits:
            found.append(("turn on activation checkpointing (--activation-checkpointing; costs about a third more compute)", on))
    if not estimate_memory(base).fits:
        world = base.instance.gpus * base.nodes
        for batch in range(base.micro_batch - 1, 0, -1):
            smaller = estimate_memory(replace(base, micro_batch=batch))
            if smaller.fits and _splits(global_batch, world, batch):
                found.append((f"micro batch {batch} (device_train_microbatch_size={batch}{also})", smaller))
                break
    for nodes in range(setup.nodes + 1, max_nodes + 1):
        wider = estimate_memory(replace(base, nodes=nodes, sharding="FULL_SHARD"))
        if wider.fits and _splits(global_batch, base.instance.gpus * nodes, base.micro_batch):
            flag = "" if base.instance.gpus == 1 else " with fsdp_config.sharding_strategy=FULL_SHARD"
            flag += "" if base.instance.efa else " (no EFA on this type: collectives across instances are slow)"
            found.append((f"--instance-count {nodes}{flag}{also}", wider))
            break
    others = sorted((t for t in instance_types.values() if t is not setup.instance and t.gpu.bf16), key=lambda t: t.price)
    for other in others:
        moved = estimate_memory(replace(base, instance=other))
        if moved.fits and _splits(global_batch, other.gpus * setup.nodes, base.micro_batch):
            found.append((f"--instance-type {other.name} (about ${other.price * setup.nodes:.2f}/h for {setup.nodes}){also}", moved))
            break
    return found


def _splits(global_batch: int | None, world: int, micro_batch: int) -> bool:
    """Whether the job's ``batch_split`` accepts ``micro_batch`` on ``world`` GPUs (always, when
    the global batch is not known)."""
    return global_batch is None or (global_batch % world == 0 and (global_batch // world) % micro_batch == 0)
