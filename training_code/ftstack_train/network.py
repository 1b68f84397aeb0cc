"""The node's network settings for NCCL and gloo, derived from SageMaker's resourceconfig.json.

In the AWS Deep Learning Container, SageMaker starts the DLC's own entrypoint (the
sagemaker-training toolkit), which sets these variables before it starts torchrun. Our image
replaces that entrypoint with ``ftstack_train.launch``, so the launcher sets them itself, the way
the toolkit does, and never changes one that the job's environment already has (CreateTrainingJob's
``Environment``, or the image). Standard library only.

Sources:

- resourceconfig.json's keys (``current_host``, ``hosts``, ``current_instance_type``,
  ``instance_groups``, ``network_interface_name``): "How Amazon SageMaker AI Provides Training
  Information", section Distributed Training Configuration, RESOURCE_CONFIG_DOC below.
- The EFA variables and the instance types they apply to: the toolkit's
  ``src/sagemaker_training/torch_distributed.py`` (``TorchDistributedRunner._setup``) and
  ``__init__.py`` (``SM_EFA_NCCL_INSTANCES``, ``SM_EFA_RDMA_INSTANCES``) in
  github.com/aws/sagemaker-training-toolkit. ``NCCL_PROTO=simple`` came with its commit 9a5ed9f,
  "to handle the out-of-order data delivery from EFA"; commit d2488c6 limited
  ``FI_EFA_USE_DEVICE_RDMA`` to p4d and p4de.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

RESOURCE_CONFIG_DOC = (
    "https://docs.aws.amazon.com/sagemaker/latest/dg/your-algorithms-training-algo-running-container.html"
    "#your-algorithms-training-algo-running-container-dist-training"
)

EFA_INSTANCE_TYPES = frozenset({
    "ml.p5.48xlarge", "ml.p5e.48xlarge", "ml.p5en.48xlarge", "ml.p4d.24xlarge", "ml.p4de.24xlarge",
    "ml.p3dn.24xlarge", "ml.g5.48xlarge", "ml.g4dn.8xlarge", "ml.g4dn.12xlarge",
})
"""GPU instance types on which SageMaker jobs talk between nodes over EFA: the toolkit's
SM_EFA_NCCL_INSTANCES, plus p5e and p5en (EFA instances that the toolkit's list predates). Other
types get no EFA settings; a job can still set them in its Environment."""

EFA_RDMA_INSTANCE_TYPES = frozenset({"ml.p4d.24xlarge", "ml.p4de.24xlarge"})
"""Where the toolkit turns on EFA's device RDMA explicitly (SM_EFA_RDMA_INSTANCES). It leaves p5,
p5e and p5en to libfabric's default, and so do we."""

VARIABLES: dict[str, str] = {
    "NCCL_SOCKET_IFNAME": (
        "Set to `network_interface_name` whenever resourceconfig.json has it. NCCL opens its "
        "bootstrap sockets, and without EFA its TCP transport (NET/Socket), on this interface "
        "only; left to itself it may pick an interface the other nodes cannot reach, and the "
        "first collective hangs until the timeout."
    ),
    "GLOO_SOCKET_IFNAME": (
        "Same value. gloo (CPU collectives; the CPU backend) binds this interface instead of "
        "whatever address the container's host name resolves to."
    ),
    "FI_PROVIDER": (
        "`efa`, on several nodes of an EFA instance type. libfabric, which NCCL uses through the "
        "aws-ofi-nccl plugin, then uses the EFA device and nothing else, rather than quietly "
        "falling back to its TCP provider."
    ),
    "FI_EFA_USE_DEVICE_RDMA": (
        "`1`, on several nodes of p4d or p4de: EFA reads and writes GPU memory directly (GPUDirect "
        "RDMA) for one-sided and two-sided transfers."
    ),
    "RDMAV_FORK_SAFE": (
        "`1`, with FI_EFA_USE_DEVICE_RDMA: rdma-core keeps memory registered with the device "
        "valid in the parent when the process forks (subprocesses, data loader workers)."
    ),
    "NCCL_PROTO": (
        "`simple`, on several nodes of an EFA instance type. NCCL's LL and LL128 protocols rely "
        "on in-order delivery, which EFA's SRD transport does not give. One node keeps NCCL's "
        "default protocols (its traffic stays on NVLink)."
    ),
    "NCCL_DEBUG": (
        "`INFO`, on several nodes, unless set: NCCL logs what it chose when each communicator "
        "starts, among it the transport: `NET/OFI` lines naming the provider `efa` (EFA) or "
        "`Using network Socket` (TCP)."
    ),
    "NCCL_DEBUG_SUBSYS": (
        "`INIT,NET`, together with NCCL_DEBUG (never when NCCL_DEBUG was set by the job): only the "
        "start-up and network lines, once per communicator, not one per collective."
    ),
}
"""What the launcher may set, and when and why. The README's multi-node networking section
lists the same variables."""


@dataclass(frozen=True)
class NodeNetwork:
    """What resourceconfig.json says about this node's network."""

    nodes: int
    """Number of hosts in the job."""
    interface: str | None
    """``network_interface_name``: the interface the nodes reach each other on."""
    instance_type: str | None
    """``current_instance_type``, else the instance type of this host's instance group."""

    @property
    def efa(self) -> bool:
        """Between nodes, NCCL should talk over EFA."""
        return self.nodes > 1 and self.instance_type in EFA_INSTANCE_TYPES


def _text(doc: Mapping, key: str, where: str) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip() or value != value.strip():
        raise ValueError(f"{key}: {value!r} is not a name; {where}")
    return value


def parse_node_network(doc: Mapping, hosts: list[str], current_host: str) -> NodeNetwork:
    """The network facts of a parsed resourceconfig.json. A multi-node job needs
    ``network_interface_name`` and an instance type; one node needs neither (local runs write
    neither). Raises ValueError naming the key; the caller adds the file."""
    fix = f"SageMaker writes it as documented at {RESOURCE_CONFIG_DOC}"
    interface = _text(doc, "network_interface_name", fix)
    instance_type = _text(doc, "current_instance_type", fix)
    if instance_type is None:
        groups = doc.get("instance_groups") or []
        if not isinstance(groups, list) or not all(isinstance(g, Mapping) for g in groups):
            raise ValueError(f"instance_groups: {groups!r} is not a list of instance groups; {fix}")
        mine = [g for g in groups if current_host in (g.get("hosts") or [])]
        if mine:
            instance_type = _text(mine[0], "instance_type", f"in instance_groups; {fix}")
    if len(hosts) > 1:
        if interface is None:
            raise ValueError(f"network_interface_name: missing in a {len(hosts)}-node job; NCCL and gloo need it ({fix})")
        if instance_type is None:
            raise ValueError(
                f"current_instance_type: missing, and no instance_groups entry lists {current_host!r}; the EFA settings "
                f"depend on it ({fix})"
            )
    return NodeNetwork(len(hosts), interface, instance_type)


def network_env(net: NodeNetwork, environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add for the training processes (see VARIABLES): never one already in
    ``environ``, and NCCL_DEBUG_SUBSYS only together with NCCL_DEBUG."""
    wanted: dict[str, str] = {}
    if net.interface:
        wanted |= {"NCCL_SOCKET_IFNAME": net.interface, "GLOO_SOCKET_IFNAME": net.interface}
    if net.efa:
        wanted |= {"FI_PROVIDER": "efa", "NCCL_PROTO": "simple"}
        if net.instance_type in EFA_RDMA_INSTANCE_TYPES:
            wanted |= {"FI_EFA_USE_DEVICE_RDMA": "1", "RDMAV_FORK_SAFE": "1"}
    if net.nodes > 1 and "NCCL_DEBUG" not in environ:
        wanted |= {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET"}
    return {name: value for name, value in wanted.items() if name not in environ}


def describe(net: NodeNetwork, added: Mapping[str, str], environ: Mapping[str, str]) -> str:
    """One line for the log: the node's network and every variable of VARIABLES in effect, with
    the ones the job set itself marked as such."""
    settings = []
    for name in VARIABLES:
        if name in added:
            settings.append(f"{name}={added[name]}")
        elif name in environ:
            settings.append(f"{name}={environ[name]} (job's own)")
    kind = "EFA" if net.efa else "TCP" if net.nodes > 1 else "one node"
    where = f"{net.nodes} node(s), {net.instance_type or 'instance type not given'}, interface {net.interface or 'not given'}"
    return f"network: {kind}; {where}; {' '.join(settings) or 'no settings'}"
