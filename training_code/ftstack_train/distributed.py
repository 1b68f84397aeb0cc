"""Process group set-up and FSDP2 sharding."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from .config import SHARDING_STRATEGIES
from .errors import ConfigError
from .network import VARIABLES

SHARDING_KEY = "fsdp_config.sharding_strategy"
FULL_SHARD, HYBRID_SHARD = "FULL_SHARD", "HYBRID_SHARD"
HYBRID_DIMS = ("replicate", "shard")
"""The 2-D mesh's dimensions, in the order FSDP2 reads them: replicate across nodes, shard within one."""


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int | None = None
    """Processes on this node (torchrun's LOCAL_WORLD_SIZE); None: the whole job is on one node."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """The first process on its node: it tidies that node's local disk."""
        return self.local_rank == 0


def init_distributed(timeout_s: float) -> Dist:
    """Joins the process group torchrun set up: NCCL on GPUs, gloo on CPU."""
    rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), device_id=device if backend == "nccl" else None)
    d = Dist(rank, world, local, device, int(os.environ.get("LOCAL_WORLD_SIZE", world)))
    if d.is_main and world > d.local_world_size:
        print(network_line(backend), flush=True)
    return d


def network_line(backend: str) -> str:
    """What rank 0 of a multi-node job logs once its process group is up: the backend (with NCCL's
    version) and the network variables as the training processes see them. NCCL's own start-up
    lines (NCCL_DEBUG=INFO, NCCL_DEBUG_SUBSYS=INIT,NET, set by the launcher) then name the
    transport it picked: NET/OFI with provider efa, or NET/Socket."""
    if backend == "nccl":
        backend = "NCCL " + ".".join(map(str, torch.cuda.nccl.version()))
    settings = " ".join(f"{name}={os.environ[name]}" for name in VARIABLES if name in os.environ)
    return f"rank 0 network: {backend}; {settings or 'no network variables set'}"


@dataclass(frozen=True)
class MeshPlan:
    """The sharding a job runs with: the strategy, the device mesh's shape and why."""

    strategy: str
    shape: tuple[int, ...]
    reason: str

    @property
    def dim_names(self) -> tuple[str, ...]:
        return HYBRID_DIMS if len(self.shape) == 2 else ("shard",)

    def line(self) -> str:
        """What rank 0 logs once the mesh is chosen."""
        dims = " x ".join(f"{n} {name}" for n, name in zip(self.shape, self.dim_names))
        return f"sharding: {self.strategy}, mesh {dims}; {self.reason}"


def plan_sharding(requested: str, world_size: int, per_node: tuple[int, int]) -> MeshPlan:
    """Resolves ``fsdp_config.sharding_strategy`` for ``world_size`` processes whose nodes run
    between ``per_node[0]`` and ``per_node[1]`` processes each.

    ``auto`` replicates across nodes and shards within each (HYBRID_SHARD) when there are several
    nodes of equal size with more than one process each: the per-micro-batch all-gathers and
    reduce-scatters then stay on the node's fast links, and only one gradient all-reduce per step
    crosses the network. Otherwise it shards over every process (FULL_SHARD): with one process per
    node, HYBRID_SHARD would shard nothing and hold the whole model and optimizer on every device.
    """
    low, high = per_node
    even = low == high and world_size % high == 0
    nodes = world_size // high if even else 0
    full = (world_size,)
    if requested not in SHARDING_STRATEGIES:
        raise ConfigError(f"{SHARDING_KEY}: {requested!r} is not supported; use {', '.join(SHARDING_STRATEGIES)}")
    if requested == FULL_SHARD:
        return MeshPlan(FULL_SHARD, full, f"as configured, over all {world_size} processes")
    if requested == HYBRID_SHARD:
        if not even:
            raise ConfigError(
                f"{SHARDING_KEY}: HYBRID_SHARD needs the same number of processes on every node, but this job's "
                f"{world_size} processes run {_range(low, high)} per node; give every node the same instance type "
                f"(and processes per node), or set {SHARDING_KEY} to FULL_SHARD or auto"
            )
        if nodes == 1:
            return MeshPlan(FULL_SHARD, full, "HYBRID_SHARD on one node is FULL_SHARD: there is nothing to replicate across")
        what = "the whole model on every process" if high == 1 else f"shard within each node's {high} processes"
        return MeshPlan(HYBRID_SHARD, (nodes, high), f"as configured: {what}, replicate across the {nodes} nodes")
    if not even:
        return MeshPlan(FULL_SHARD, full, f"auto: the nodes run {_range(low, high)} processes each, so shard over all {world_size}")
    if nodes == 1:
        return MeshPlan(FULL_SHARD, full, "auto: one node")
    if high == 1:
        return MeshPlan(FULL_SHARD, full, f"auto: one process on each of the {nodes} nodes, so shard across them")
    return MeshPlan(HYBRID_SHARD, (nodes, high), f"auto: {nodes} nodes, shard within each node's {high} processes, replicate across nodes")


def _range(low: int, high: int) -> str:
    return f"{low}" if low == high else f"{low} to {high}"


def sharding_mesh(sharding: str, device: torch.device, local_world_size: int | None = None) -> DeviceMesh:
    """The device mesh for ``sharding`` (collective: every rank calls it, and all get the same
    one); rank 0 logs the choice. ``local_world_size``: this node's process count (default:
    torchrun's LOCAL_WORLD_SIZE; without it, the job is taken as one node).

    The 2-D mesh is ranks laid out row by row, one row a node: torchrun numbers the ranks of a
    node consecutively (``checkpoint._place`` relies on the same)."""
    world = dist.get_world_size()
    local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    # Every rank must build the same mesh (or all fail alike), so the nodes' sizes are agreed on
    # first: one all-reduce of (largest, -smallest).
    sizes = torch.tensor([local, -local], dtype=torch.int64, device=device)
    dist.all_reduce(sizes, op=dist.ReduceOp.MAX)
    plan = plan_sharding(sharding, world, (-int(sizes[1]), int(sizes[0])))
    if dist.get_rank() == 0:
        print(plan.line(), flush=True)
    return init_device_mesh(device.type, plan.shape, mesh_dim_names=plan.dim_names)


def build_sharded_model(load, d: Dist, precision: str, activation_checkpointing: bool, sharding: str = "auto") -> torch.nn.Module:
    """Loads the model on rank 0 only and broadcasts it into every rank's shards, so that a node's
    host memory holds one full copy of the weights, not one per GPU.

    ``load(empty)`` returns the model: with its weights on rank 0, on the meta device elsewhere.
    ``sharding``: ``fsdp_config.sharding_strategy`` (see ``plan_sharding``).
    """
    model = load(empty=not d.is_main)
    full = model.state_dict() if d.is_main else {}
    apply_fsdp(model, d.device, precision, activation_checkpointing, sharding, d.local_world_size)
    if not d.is_main:
        model.to_empty(device=d.device)
    # The broadcast reaches every rank; each then keeps its slice of the mesh's placements, so
    # this is the same for a 1-D and a 2-D mesh.
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    # Buffers are not sharded and not all are in the state dict (rotary inv_freq is not
    # persistent): rank 0's are the computed ones.
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    return model


def compute_dtype(precision: str, device: torch.device) -> torch.dtype:
    """bf16 on GPU unless fp32 was asked for; CPU always computes in fp32."""
    return torch.bfloat16 if device.type == "cuda" and precision in ("amp_bf16", "bf16") else torch.float32


def apply_fsdp(
    model: torch.nn.Module, device: torch.device, precision: str, activation_checkpointing: bool,
    sharding: str = "auto", local_world_size: int | None = None,
) -> torch.nn.Module:
    """Shards each transformer block and then the root with FSDP2, over the mesh that
    ``sharding_mesh`` picks: 1-D (FULL_SHARD) or 2-D (HYBRID_SHARD: FSDP2 shards over the mesh's
    second dimension and replicates over its first, with gradients averaged over both).

    Blocks are the classes the model names in ``_no_split_modules`` (``MptBlock``,
    ``LlamaDecoderLayer``, ...). Master weights stay fp32; with bf16 the parameters are cast for
    compute and gradients are reduced in fp32. Activation checkpointing uses the model's own
    non-reentrant hook, which keeps parameter names unchanged for checkpoints and the export.
    """
    if activation_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(
                f"fsdp_config.activation_checkpointing: {type(model).__name__} does not support activation checkpointing; set it to false"
            )
        model.activation_checkpointing_enable({"use_reentrant": False})
    dtype = compute_dtype(precision, device)
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no transformer block class (_no_split_modules); it cannot be sharded per block")
    mesh = sharding_mesh(sharding, device, local_world_size)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def sync_replicas(module: torch.nn.Module, now: bool) -> None:
    """Whether the next backward pass all-reduces gradients across HYBRID_SHARD's replicas (the
    nodes). FSDP2 does it in every backward pass unless told (``set_requires_all_reduce``): a step
    of several micro batches holds it back until the last, so that the gradients cross the network
    once per step, while each micro batch's reduce-scatter within the node keeps them sharded.
    Nothing to hold back on a 1-D mesh, or for a module that is not sharded."""
    if isinstance(module, FSDPModule):
        module.set_requires_all_reduce(now)
