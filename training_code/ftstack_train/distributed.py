"""Process group set-up and FSDP2 sharding."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .errors import ConfigError
from .network import VARIABLES


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

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
    d = Dist(rank, world, local, device)
    if d.is_main and world > int(os.environ.get("LOCAL_WORLD_SIZE", world)):
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


def build_sharded_model(load, d: Dist, precision: str, activation_checkpointing: bool) -> torch.nn.Module:
    """Loads the model on rank 0 only and broadcasts it into every rank's shards, so that a node's
    host memory holds one full copy of the weights, not one per GPU.

    ``load(empty)`` returns the model: with its weights on rank 0, on the meta device elsewhere.
    """
    model = load(empty=not d.is_main)
    full = model.state_dict() if d.is_main else {}
    apply_fsdp(model, d.device, precision, activation_checkpointing)
    if not d.is_main:
        model.to_empty(device=d.device)
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


def apply_fsdp(model: torch.nn.Module, device: torch.device, precision: str, activation_checkpointing: bool) -> torch.nn.Module:
    """Shards each transformer block and then the root with FSDP2 (full sharding).

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
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    if not blocks:
        raise ValueError(f"{type(model).__name__} names no transformer block class (_no_split_modules); it cannot be sharded per block")
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model
