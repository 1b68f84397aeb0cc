"""The container's entrypoint: check the job's inputs, then start one training process per GPU
on this node with torchrun, and see it through.

Everything that can be rejected without a GPU is rejected here, before torchrun starts: the config,
the batch arithmetic, the data. A failure writes SageMaker's failure file and exits non-zero. A
SIGTERM (spot interruption, StopTrainingJob) is passed straight to the training processes, which
save a checkpoint and exit; the launcher then exits with 143.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .contract import CHECKPOINT_BASE_MODEL, TEST_CHANNEL, TINY_MODELS, TRAIN_CHANNEL, SageMakerPaths
from .errors import EXIT_STOPPED, EXIT_USER_ERROR, PID_DIR_ENV, STOPPED_FILE, USER_ERROR_FILE, USER_ERRORS, ConfigError
from .export_folder import check_model_dir
from .job import base_model_source, checkpoint_dir, load_job_config, require_hub_access, write_failure
from .network import NodeNetwork, describe, network_env, parse_node_network
from .validation import check_files

NPROC_ENV = "FTSTACK_NPROC_PER_NODE"
"""Processes per node when there is no GPU (local runs); on GPUs it is always the GPU count."""

MULTI_NODE_PORT = 29500

RENDEZVOUS_ENV = "FTSTACK_RENDEZVOUS"
"""``host:port`` of the multi-node rendezvous instead of the first host on MULTI_NODE_PORT. Only for
several "nodes" on one machine (tests/test_multinode.py), where SageMaker's host names do not
resolve and other runs may hold the port; never set in a SageMaker job."""


def _resource_config(paths: SageMakerPaths) -> tuple[dict, list[str], str]:
    """resourceconfig.json's content, ``hosts`` and ``current_host``; one local host when the
    file is absent (local runs)."""
    if not paths.resource_config.is_file():
        return {}, ["algo-1"], "algo-1"
    try:
        doc = json.loads(paths.resource_config.read_text())
        hosts, current = list(doc["hosts"]), doc["current_host"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{paths.resource_config}: not a SageMaker resource config ({exc})") from None
    if current not in hosts:
        raise ConfigError(f"{paths.resource_config}: current_host {current!r} is not among hosts {hosts}")
    return doc, hosts, current


def read_resource_config(paths: SageMakerPaths) -> tuple[list[str], str]:
    """``hosts`` and ``current_host`` from resourceconfig.json; one local host when absent."""
    _, hosts, current = _resource_config(paths)
    return hosts, current


def read_node_network(paths: SageMakerPaths) -> NodeNetwork:
    """This node's network interface and instance type from resourceconfig.json (see network)."""
    doc, hosts, current = _resource_config(paths)
    try:
        return parse_node_network(doc, hosts, current)
    except ValueError as exc:
        raise ConfigError(f"{paths.resource_config}: {exc}") from None


def set_network_env(net: NodeNetwork) -> dict[str, str]:
    """Adds the NCCL, gloo and EFA variables for ``net`` to this process's environment, which the
    training processes inherit, keeping every one the job set; logs them; returns what it added."""
    added = network_env(net, os.environ)
    if net.nodes > 1 or added:
        print(describe(net, added, os.environ), flush=True)
    os.environ.update(added)
    return added


def torchrun_args(hosts: list[str], current_host: str, nproc_per_node: int, port: int, master: str | None = None) -> list[str]:
    """torchrun's arguments: one node per host, rank by position in ``hosts``, the first host
    (or ``master``) as the rendezvous master."""
    return [
        "--nnodes", str(len(hosts)),
        "--node_rank", str(hosts.index(current_host)),
        "--nproc_per_node", str(nproc_per_node),
        "--master_addr", master or ("127.0.0.1" if len(hosts) == 1 else hosts[0]),
        "--master_port", str(port),
        "--max_restarts", "0",
        "-m", "ftstack_train.train",
    ]


def processes_per_node() -> tuple[int, str]:
    """(count, device type): every GPU, or ``FTSTACK_NPROC_PER_NODE`` CPU processes."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.device_count(), "cuda"
    text = os.environ.get(NPROC_ENV, "1")
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"{NPROC_ENV}={text!r}: give a positive number of processes")
    return int(text), "cpu"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prepare(paths: SageMakerPaths) -> list[str]:
    """Checks everything checkable before any process starts; returns torchrun's arguments."""
    from .data import StepPlan, format_prompt, list_data_files
    from .model import make_tiny_model

    cfg, warnings = load_job_config(paths)
    folder = checkpoint_dir(cfg, paths)  # a save_folder outside the job's checkpoint folder is an error
    for warning in warnings:
        print(f"warning: {warning}", flush=True)
    files = {}
    for name in (TRAIN_CHANNEL, TEST_CHANNEL):
        files[name] = list_data_files(paths.channel(name))
        print(f"{name} data:\n{check_files(files[name]).format()}", flush=True)
    hosts, current = read_resource_config(paths)
    net = read_node_network(paths)
    nproc, device = processes_per_node()
    StepPlan.from_config(cfg, len(hosts) * nproc, device)
    source = Path(base_model_source(cfg, paths))
    if cfg.model in TINY_MODELS and source.name == CHECKPOINT_BASE_MODEL and not source.is_dir():
        from .validation import read_records

        texts = (
            text for name in (TRAIN_CHANNEL, TEST_CHANNEL) for path in files[name] for r in read_records(path)
            for text in (format_prompt(cfg.prompt_template, r.prompt), r.response)
        )
        make_tiny_model(cfg.model, texts, source, cfg.seed)
        print(f"made a random {cfg.model} base model in {source}", flush=True)
    # The export replaces only its own earlier export; a foreign file there would stop the job at
    # its very end, after the training was paid for, so it stops it here.
    check_model_dir(paths.model_dir)
    require_hub_access(cfg, paths)
    folder.mkdir(parents=True, exist_ok=True)
    paths.model_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port() if len(hosts) == 1 else MULTI_NODE_PORT
    master, rendezvous = None, os.environ.get(RENDEZVOUS_ENV)
    if rendezvous and len(hosts) > 1:
        master, _, port_text = rendezvous.rpartition(":")
        if not master or not port_text.isdigit():
            raise ConfigError(f"{RENDEZVOUS_ENV}={rendezvous!r}: give host:port, e.g. 127.0.0.1:29500")
        port = int(port_text)
    set_network_env(net)
    return torchrun_args(hosts, current, nproc, port, master)


def supervise(args: list[str]) -> int:
    """Runs torchrun in its own session and forwards SIGTERM/SIGINT to the training processes
    themselves; returns torchrun's exit code, or 143 when they stopped on request."""
    requested = []
    previous = {sig: signal.signal(sig, lambda s, f: requested.append(s)) for sig in (signal.SIGTERM, signal.SIGINT)}
    with tempfile.TemporaryDirectory(prefix="ftstack-pids-") as pid_dir:
        env = dict(os.environ, **{PID_DIR_ENV: pid_dir})
        env.setdefault("OMP_NUM_THREADS", "1")
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], env=env, start_new_session=True)
        signalled: set[str] = set()
        try:
            while proc.poll() is None:
                if requested:
                    for pid_file in Path(pid_dir).glob("rank-*.pid"):
                        if pid_file.name not in signalled:
                            signalled.add(pid_file.name)
                            _kill(int(pid_file.read_text()), signal.SIGTERM)
                time.sleep(0.2)
        finally:
            if proc.poll() is None:  # the launcher itself is failing: take torchrun down with it
                proc.kill()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        stopped = (Path(pid_dir) / STOPPED_FILE).exists()
        user_error = (Path(pid_dir) / USER_ERROR_FILE).exists()
    if user_error:
        return EXIT_USER_ERROR
    if proc.returncode == 0 and stopped:
        return EXIT_STOPPED
    return proc.returncode


def _kill(pid: int, sig: signal.Signals) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # already gone


def main(argv: list[str] | None = None) -> int:
    """``python -m ftstack_train.launch [train]`` (SageMaker passes ``train``)."""
    argv = sys.argv[1:] if argv is None else argv
    # Progress bars and load reports of transformers and the hub would bury the metrics lines;
    # set before they are imported, here and (inherited) in the training processes.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    paths = SageMakerPaths.from_env()
    if [a for a in argv if a != "train"]:
        message = f"unexpected arguments {argv}; configure the job with hyperparameters or a config channel"
        print(f"error: {message}", file=sys.stderr, flush=True)
        write_failure(paths, message)
        return EXIT_USER_ERROR
    try:
        args = prepare(paths)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        write_failure(paths, str(exc))
        return EXIT_USER_ERROR
    code = supervise(args)
    if code == EXIT_STOPPED:
        print("stopped on request after saving a checkpoint; start the same job again to resume", flush=True)
    elif code == EXIT_USER_ERROR:
        print("error: the run stopped on the problem above (also in the failure file)", file=sys.stderr, flush=True)
    elif code != 0:
        write_failure(paths, f"the training processes failed (exit code {code}); see the job's logs")
        print(f"error: training failed (exit code {code})", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
