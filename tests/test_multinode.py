"""A multi-node job on this machine: 2 nodes x 1 process, each with its own /opt/ml root and
resourceconfig.json, with SageMaker's checkpoint sync to S3 emulated between and during attempts.

SageMaker, as documented in "Use checkpoints in Amazon SageMaker" (model-checkpoints.html) and
"Resume training from a checkpoint" (model-checkpoints-resume.html): each node's
/opt/ml/checkpoints is synced to the same S3 prefix while the job runs, a local deletion is
mirrored to S3, and at the start of an attempt the prefix is copied into every node's folder. So
during an attempt each node holds only its own ranks' files, and only S3 ever holds a whole
checkpoint. The emulation here is pessimistic about timing: a node's files of a checkpoint reach
S3 only once that node has written a newer checkpoint (the upload takes up to one save interval),
while deletions reach S3 at once. The interruption cuts off the upload of the newest checkpoint
(the 2-minute notice ran out), so the resume must fall back to the one before it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from ftstack.local import LocalRun, lay_out
from ftstack_train.checkpoint import PART_PREFIX, is_complete, step_dir
from ftstack_train.contract import ROOT_ENV, SageMakerPaths
from ftstack_train.errors import ConfigError
from ftstack_train.launch import NPROC_ENV, RENDEZVOUS_ENV, prepare

HOSTS = ["algo-1", "algo-2"]


def resource_config(host: str) -> dict:
    """resourceconfig.json as SageMaker writes it on ``host`` (a CPU type: no EFA settings)."""
    group = {"instance_group_name": "homogeneousCluster", "instance_type": "ml.m5.xlarge", "hosts": HOSTS}
    return {"current_host": host, "current_instance_type": "ml.m5.xlarge", "current_group_name": "homogeneousCluster",
            "hosts": HOSTS, "instance_groups": [group], "network_interface_name": "lo"}


class S3Sync:
    """SageMaker's checkpoint sync, emulated for nodes on one machine (see the module docstring).

    A thread polls every node's checkpoint folder. Deletions seen in one poll are mirrored after the
    next poll's uploads, so that everything a node wrote before it deleted something is taken into
    account first. Before a file of a checkpoint that is complete in S3 is deleted there, S3 must
    hold a newer complete checkpoint; any breach is recorded in ``violations``."""

    def __init__(self, nodes: list[Path], s3: Path) -> None:
        self.nodes, self.s3 = nodes, s3
        self.seen: list[set[str]] = [self._walk(node) for node in nodes]
        self.pending: set[str] = set()
        self.uploaded: dict[str, tuple[int, int]] = {}  # (size, mtime) of what S3 holds
        self.violations: list[str] = []
        self.mirrored: set[str] = set()  # complete checkpoints deleted from S3, with a newer one there
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> S3Sync:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    @staticmethod
    def _walk(node: Path) -> set[str]:
        if not node.is_dir():
            return set()
        return {f"{d.name}/{f.name}" for d in node.glob("step-*") if d.is_dir() for f in d.iterdir() if f.is_file()}

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.poll()
            time.sleep(0.01)

    def poll(self, cut_off: str | None = None, final: bool = False) -> None:
        """One round: upload, then mirror the deletions seen in the round before. ``final``: the
        attempt has ended, upload everything except ``cut_off`` (``step/node``)."""
        now = [self._walk(node) for node in self.nodes]
        for k, files in enumerate(now):
            steps = sorted({rel.split("/")[0] for rel in files})
            marked = {rel.split("/")[0] for rel in files if rel.split("/")[1].startswith(PART_PREFIX)}
            for rel in sorted(files):
                step = rel.split("/")[0]
                if final and cut_off == f"{step}/{k}":
                    continue
                if final or any(newer in marked for newer in steps if newer > step):
                    self._upload(self.nodes[k] / rel, rel)
        for rel in sorted(self.pending):
            self._delete(rel)
        self.pending = set().union(*(seen - files for seen, files in zip(self.seen, now)))
        self.seen = now
        if final:
            for rel in sorted(self.pending):
                self._delete(rel)
            self.pending = set()

    def _upload(self, source: Path, rel: str) -> None:
        target = self.s3 / rel
        try:
            stat = source.stat()
            if self.uploaded.get(rel) != (stat.st_size, stat.st_mtime_ns) or not target.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
                self.uploaded[rel] = (stat.st_size, stat.st_mtime_ns)
        except FileNotFoundError:
            pass  # deleted on the node meanwhile: the next poll mirrors that

    def _delete(self, rel: str) -> None:
        step = rel.split("/")[0]
        if is_complete(self.s3 / step):
            newer = [p.name for p in self.s3.glob("step-*") if p.name > step and is_complete(p)]
            if not newer:
                self.violations.append(f"{rel} deleted while S3 held no complete checkpoint newer than {step}")
            self.mirrored.add(step)
        (self.s3 / rel).unlink(missing_ok=True)
        self.uploaded.pop(rel, None)
        if (self.s3 / step).is_dir() and not any((self.s3 / step).iterdir()):
            (self.s3 / step).rmdir()


def lay_out_nodes(runs, root: Path, model: Path) -> list[SageMakerPaths]:
    """One /opt/ml tree per host, as SageMaker lays them out: the same channels and hyperparameters,
    each its own resourceconfig.json."""
    nodes = []
    for host in HOSTS:
        train, test = runs.dataset
        paths = lay_out(LocalRun(train, test, str(model), 1, None, root / host, (*runs.overrides, "max_duration=40ba")))
        paths.resource_config.write_text(json.dumps(resource_config(host)))
        nodes.append(paths)
    return nodes


def start_nodes(runs, nodes: list[SageMakerPaths], port: int, log: Path) -> list:
    """Each node's container entrypoint (the launcher), started the way SageMaker starts it."""
    procs = []
    for paths in nodes:
        env = dict(os.environ, **{ROOT_ENV: str(paths.root), NPROC_ENV: "1", RENDEZVOUS_ENV: f"127.0.0.1:{port}"})
        procs.append(runs.start([sys.executable, "-m", "ftstack_train.launch", "train"], log.with_suffix(f".{paths.root.name}.log"), env))
    return procs


def wait_all(procs: list, timeout: float = 180) -> list[int]:
    return [proc.wait(timeout=timeout) for proc in procs]


def logs(log: Path) -> str:
    return "".join(p.read_text() for p in sorted(log.parent.glob(f"{log.stem}.*.log")))


def download(s3: Path, nodes: list[SageMakerPaths]) -> None:
    """The start of an attempt: every node's checkpoint folder gets the merged S3 content (new
    instances: nothing else)."""
    for paths in nodes:
        shutil.rmtree(paths.checkpoints, ignore_errors=True)
        shutil.copytree(s3, paths.checkpoints)


def test_interrupted_two_node_job_resumes_from_s3_and_ends_like_an_uninterrupted_run(runs, reference, free_port, tmp_path):
    model = reference[0] / "checkpoints" / "base-model"  # the reference's weights and tokenizer
    nodes, s3, log = lay_out_nodes(runs, tmp_path, model), tmp_path / "s3", tmp_path / "run.log"
    s3.mkdir()
    node0_log = log.with_suffix(".algo-1.log")

    # Attempt 1: interrupted (SIGTERM on both nodes, as SageMaker stops every instance) mid-run.
    with S3Sync([p.checkpoints for p in nodes], s3) as sync:
        procs = start_nodes(runs, nodes, free_port(), log)
        runs.wait_for(lambda: node0_log.exists() and any(v["step"] >= 13 for k, v in runs.metrics_lines(node0_log) if k == "train"), *procs)
        for proc in procs:
            os.kill(proc.pid, signal.SIGTERM)
        assert wait_all(procs, 60) == [143, 143], logs(log)
    # What each node has left; the newest checkpoint's upload from node 2 did not make it.
    held = sorted(p.name for p in nodes[0].checkpoints.glob("step-*"))
    assert held == sorted(p.name for p in nodes[1].checkpoints.glob("step-*")) and len(held) >= 2, held
    assert not any(is_complete(nodes[0].checkpoints / name) for name in held), "a node alone holds only its part"
    sync.poll(cut_off=f"{held[-1]}/1", final=True)
    assert [p.name for p in sorted(s3.glob("step-*")) if is_complete(p)] == held[:-1]
    assert not is_complete(s3 / held[-1])

    # Attempt 2: new instances get the S3 content, agree on the checkpoint before the cut-off one,
    # and finish.
    download(s3, nodes)
    with S3Sync([p.checkpoints for p in nodes], s3) as sync2:
        assert wait_all(start_nodes(runs, nodes, free_port(), log)) == [0, 0], logs(log)
    sync2.poll(final=True)
    text = logs(log)
    assert f"resumed from {held[-2]}" in text and "Traceback" not in text
    runs.assert_same_weights(nodes[0].model_dir, reference[0] / "model")

    # Pruning ran across the nodes without ever leaving S3 without a complete checkpoint, and
    # left exactly the newest 2 complete ones (36: every 4 steps; 35 was an epoch end).
    assert sync.violations == [] and sync2.violations == []
    assert sync.mirrored and sync2.mirrored, "no complete checkpoint was ever pruned: the test proved nothing"
    assert [p.name for p in sorted(s3.glob("step-*"))] == [step_dir(s3, 36).name, step_dir(s3, 40).name]
    assert all(is_complete(p) for p in s3.glob("step-*"))


def test_the_rendezvous_can_be_moved_for_local_multi_node_runs(runs, tiny_mpt, tmp_path, monkeypatch):
    nodes = lay_out_nodes(runs, tmp_path, tiny_mpt)
    monkeypatch.setenv(NPROC_ENV, "1")
    monkeypatch.setenv(RENDEZVOUS_ENV, "127.0.0.1:12345")
    args = prepare(nodes[1])
    assert args[args.index("--master_addr") + 1] == "127.0.0.1" and args[args.index("--master_port") + 1] == "12345"
    assert args[args.index("--node_rank") + 1] == "1"
    monkeypatch.setenv(RENDEZVOUS_ENV, "no-port")
    with pytest.raises(ConfigError, match=RENDEZVOUS_ENV):
        prepare(nodes[1])
