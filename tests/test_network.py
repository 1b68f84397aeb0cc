"""The NCCL, gloo and EFA variables the launcher derives from resourceconfig.json
(ftstack_train.network): which ones for which job, never over the job's own, and a clear error for
a resource config that cannot say."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ftstack_train.network import (
    EFA_INSTANCE_TYPES, EFA_RDMA_INSTANCE_TYPES, VARIABLES, NodeNetwork, describe, network_env, parse_node_network,
)

HOSTS = ["algo-1", "algo-2"]
SOCKETS = {"NCCL_SOCKET_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "eth0"}
DEBUG = {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET"}


def resource_config(instance_type: str, hosts: list[str] = HOSTS, **extra) -> dict:
    """resourceconfig.json as SageMaker writes it on the first host (see RESOURCE_CONFIG_DOC)."""
    group = {"instance_group_name": "homogeneousCluster", "instance_type": instance_type, "hosts": hosts}
    doc = {"current_host": hosts[0], "current_instance_type": instance_type, "current_group_name": "homogeneousCluster",
           "hosts": hosts, "instance_groups": [group], "network_interface_name": "eth0"}
    return doc | extra


def derive(doc: dict, environ: dict | None = None) -> dict[str, str]:
    return network_env(parse_node_network(doc, doc["hosts"], doc["current_host"]), environ or {})


def test_one_node_gets_only_the_socket_interfaces():
    # NCCL's traffic stays on NVLink: no EFA settings, NCCL's default protocols, no debug lines.
    assert derive(resource_config("ml.p4d.24xlarge", ["algo-1"])) == SOCKETS


def test_a_local_run_without_interface_or_instance_type_gets_nothing():
    assert derive({"current_host": "algo-1", "hosts": ["algo-1"]}) == {}


def test_several_nodes_without_efa_talk_tcp_and_log_the_transport():
    assert derive(resource_config("ml.g6e.48xlarge")) == SOCKETS | DEBUG


def test_p4d_nodes_use_efa_with_device_rdma():
    assert derive(resource_config("ml.p4d.24xlarge")) == SOCKETS | DEBUG | {
        "FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "RDMAV_FORK_SAFE": "1", "NCCL_PROTO": "simple"}


@pytest.mark.parametrize("instance_type", ["ml.p5.48xlarge", "ml.p5e.48xlarge", "ml.p5en.48xlarge", "ml.g5.48xlarge"])
def test_other_efa_nodes_use_efa_and_leave_rdma_to_libfabric(instance_type):
    assert derive(resource_config(instance_type)) == SOCKETS | DEBUG | {"FI_PROVIDER": "efa", "NCCL_PROTO": "simple"}


def test_the_rdma_types_are_efa_types():
    assert EFA_RDMA_INSTANCE_TYPES <= EFA_INSTANCE_TYPES


def test_what_the_job_set_is_kept():
    environ = {"NCCL_SOCKET_IFNAME": "ens5", "FI_PROVIDER": "tcp", "NCCL_DEBUG": "WARN", "NCCL_PROTO": "LL,Simple"}

    added = derive(resource_config("ml.p4d.24xlarge"), environ)

    # NCCL_DEBUG_SUBSYS goes with NCCL_DEBUG: the job chose its own debug level.
    assert added == {"GLOO_SOCKET_IFNAME": "eth0", "FI_EFA_USE_DEVICE_RDMA": "1", "RDMAV_FORK_SAFE": "1"}


def test_the_job_may_set_only_the_subsystems():
    added = derive(resource_config("ml.g6e.48xlarge"), {"NCCL_DEBUG_SUBSYS": "INIT"})

    assert added["NCCL_DEBUG"] == "INFO" and "NCCL_DEBUG_SUBSYS" not in added


def test_instance_type_from_the_instance_group_of_this_host():
    doc = resource_config("ml.p5.48xlarge")
    del doc["current_instance_type"]
    doc["instance_groups"] = [{"instance_group_name": "a", "instance_type": "ml.g5.2xlarge", "hosts": ["algo-3"]},
                              {"instance_group_name": "b", "instance_type": "ml.p5.48xlarge", "hosts": HOSTS}]

    assert parse_node_network(doc, HOSTS, "algo-1") == NodeNetwork(2, "eth0", "ml.p5.48xlarge")


@pytest.mark.parametrize(("change", "key"), [
    ({"network_interface_name": None}, "network_interface_name: missing in a 2-node job"),
    ({"current_instance_type": None, "instance_groups": []}, "current_instance_type: missing"),
    ({"network_interface_name": 0}, "network_interface_name: 0 is not a name"),
    ({"network_interface_name": " eth0"}, "network_interface_name: ' eth0' is not a name"),
    ({"current_instance_type": ["ml.p4d.24xlarge"]}, "current_instance_type: ['ml.p4d.24xlarge'] is not a name"),
    ({"current_instance_type": None, "instance_groups": "ml.p4d.24xlarge"}, "instance_groups: 'ml.p4d.24xlarge' is not a list"),
])
def test_a_multi_node_config_that_cannot_say_is_an_error_naming_the_key(change, key):
    doc = {k: v for k, v in (resource_config("ml.p4d.24xlarge") | change).items() if v is not None}

    with pytest.raises(ValueError) as info:
        parse_node_network(doc, HOSTS, "algo-1")
    assert str(info.value).startswith(key) and "docs.aws.amazon.com/sagemaker" in str(info.value)


def test_every_variable_is_documented_in_the_code_and_the_readme():
    produced = set(derive(resource_config("ml.p4d.24xlarge")))
    assert produced == set(VARIABLES)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Multi-node networking"):].split("\n## ", 1)[0]
    assert set(re.findall(r"^\| `([A-Z_]+)` \|", section, re.M)) == set(VARIABLES)


def test_describe_names_the_transport_and_marks_the_jobs_own_settings():
    net = NodeNetwork(2, "eth0", "ml.p4d.24xlarge")
    environ = {"NCCL_DEBUG": "WARN"}

    line = describe(net, network_env(net, environ), environ)

    assert line.startswith("network: EFA; 2 node(s), ml.p4d.24xlarge, interface eth0; ")
    assert "FI_PROVIDER=efa" in line and "NCCL_DEBUG=WARN (job's own)" in line and "NCCL_DEBUG_SUBSYS" not in line


def test_rank_0_names_the_backend_and_the_variables_the_training_processes_see(monkeypatch):
    from ftstack_train.distributed import network_line

    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert network_line("gloo") == "rank 0 network: gloo; no network variables set"
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth0")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth0")

    assert network_line("gloo") == "rank 0 network: gloo; NCCL_SOCKET_IFNAME=eth0 GLOO_SOCKET_IFNAME=eth0"
