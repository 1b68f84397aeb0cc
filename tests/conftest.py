"""Fixtures shared by the training-code tests."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def process_environment():
    """Puts the process environment back after each test. The launcher's ``prepare`` sets
    variables for the training processes it is about to start (NCCL_*, GLOO_SOCKET_IFNAME,
    HF_HUB_OFFLINE); called in-process by a test, they would reach every later test's
    subprocesses and make results depend on test order."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="session")
def free_port():
    """Returns a function giving a loopback TCP port that nothing listens on now (for a process
    group's rendezvous)."""

    def pick() -> int:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    return pick


@pytest.fixture(scope="session")
def tiny_mpt(tmp_path_factory) -> Path:
    """A tiny random MPT with its tokenizer, made once per test session."""
    from ftstack_train.model import make_tiny_model

    texts = [f"What is the code word for {i}? The code word is word{i}." for i in range(20)]
    return make_tiny_model("tiny-mpt", texts, tmp_path_factory.getbasetemp() / "tiny-mpt-seed3", seed=3)


HUB_REMOTE_CODE = {
    "auto_map": {"AutoConfig": "configuration_mpt.MPTConfig", "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"},
    "custom_pipelines": {"text-generation": {"impl": "pipeline_mpt.MPTTextGenerationPipeline", "pt": ["AutoModelForCausalLM"]}},
}
"""What mosaicml/mpt-7b's config.json points at remote code with (files that an export does not hold)."""


@pytest.fixture(scope="session")
def hub_like_mpt(tiny_mpt, tmp_path_factory) -> Path:
    """The tiny MPT with a config shaped like mosaicml/mpt-7b's on the hub: the remote-code class
    name in ``architectures``, ``auto_map`` and ``custom_pipelines`` naming Python files the
    folder does not have (in the tokenizer's config too), and the remote code's own attention and
    init settings."""
    import json
    import shutil

    folder = tmp_path_factory.getbasetemp() / "hub-like-mpt"
    if not folder.exists():
        staging = folder.with_name(folder.name + ".partial")
        shutil.copytree(tiny_mpt, staging)
        config = json.loads((staging / "config.json").read_text())
        config.update(HUB_REMOTE_CODE, architectures=["MPTForCausalLM"], tokenizer_name="EleutherAI/gpt-neox-20b", verbose=0,
                      init_config={"init_name": "kaiming_normal_", "fan_mode": "fan_in", "init_nonlinearity": "relu"})
        config["attn_config"].update(attn_impl="torch", attn_type="multihead_attention", attn_uses_sequence_id=False)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer = json.loads((staging / "tokenizer_config.json").read_text())
        tokenizer["auto_map"] = {"AutoTokenizer": ["tokenization_mpt.MPTTokenizer", None]}
        (staging / "tokenizer_config.json").write_text(json.dumps(tokenizer, indent=2))
        staging.rename(folder)
    return folder


# --- whole training runs through the launcher (test_local_run.py, test_multinode.py) -----------

RUN_WORDS = ["amber", "birch", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "juniper",
             "kestrel", "lagoon", "meadow", "nickel", "onyx", "pepper", "quartz", "raven", "saffron", "tundra"]

# Small enough for seconds per run; micro batch 1 with 2 processes means 2 accumulation steps.
RUN_OVERRIDES = (
    "max_seq_len=64", "global_train_batch_size=4", "device_train_microbatch_size=1",
    "optimizer.lr=3e-3", "scheduler.t_warmup=2ba", "eval_interval=10ba", "save_interval=4ba",
    "export.dtype=fp32", "export.max_shard_size=100KB", "save_num_checkpoints_to_keep=2",
)


class Runs:
    """Starting, watching and checking whole runs (real torchrun jobs of a tiny MPT on CPU)."""

    overrides = RUN_OVERRIDES

    def __init__(self, dataset: tuple[Path, Path]) -> None:
        self.dataset = dataset
        """A memorisable (train, test) pair: the test set is part of the training set."""

    def command(self, output: Path, *overrides: str) -> list[str]:
        """``ftstack local`` with 2 processes on the dataset and the shared overrides."""
        import sys

        train, test = self.dataset
        return [sys.executable, "-m", "ftstack.cli", "local", "--train", str(train), "--test", str(test),
                "--model", "tiny-mpt", "--nproc", "2", "--output", str(output), *self.overrides, *overrides]

    @staticmethod
    def start(command: list[str], log: Path, env: dict[str, str] | None = None):
        """Starts ``command`` in its own session, appending its output to ``log``."""
        import subprocess

        with open(log, "ab") as handle:
            return subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def run(self, command: list[str], log: Path, timeout: float = 240) -> int:
        """Runs ``command`` to the end; returns its exit code."""
        return self.start(command, log).wait(timeout=timeout)

    @staticmethod
    def wait_for(predicate, *procs, timeout: float = 120) -> None:
        """Polls ``predicate`` until true; fails if a process ends first or time runs out."""
        import time

        deadline = time.monotonic() + timeout
        while not predicate():
            assert all(p.poll() is None for p in procs), "the run ended before the moment the test waits for"
            assert time.monotonic() < deadline, "timed out"
            time.sleep(0.05)

    @staticmethod
    def metrics_lines(log: Path) -> list[tuple[str, dict[str, float]]]:
        """The metric lines a run printed, parsed."""
        from ftstack_train.metrics import parse_line

        return [parsed for line in log.read_text().splitlines() if (parsed := parse_line(line))]

    @staticmethod
    def exported_weights(model_dir: Path) -> dict:
        """The exported model's weights, as transformers loads them."""
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()

    def assert_same_weights(self, model_dir: Path, expected_dir: Path) -> None:
        """The two exports hold the same tensors (to fp32 rounding)."""
        import torch

        resumed, expected = self.exported_weights(model_dir), self.exported_weights(expected_dir)
        assert resumed.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(resumed[name], expected[name], rtol=1e-6, atol=1e-7, msg=name)


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> Runs:
    """The helpers for whole runs, with their dataset."""
    import json

    folder = tmp_path_factory.mktemp("data")
    records = [{"prompt": f"What is the code word for {i}?", "response": f"The code word for {i} is {w}."} for i, w in enumerate(RUN_WORDS)]
    for name, rows in (("train.jsonl", records), ("test.jsonl", records[:6])):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return Runs((folder / "train.jsonl", folder / "test.jsonl"))


@pytest.fixture(scope="session")
def reference(runs, tmp_path_factory) -> tuple[Path, Path]:
    """One uninterrupted 2-process run of 40 steps (output folder, log); interrupted runs must end
    with its weights."""
    output = tmp_path_factory.mktemp("reference")
    log = output.parent / f"{output.name}.log"
    assert runs.run(runs.command(output, "max_duration=40ba"), log) == 0, log.read_text()
    return output, log


@pytest.fixture(scope="module")
def process_group(free_port):
    """A one-process gloo group for a test module's in-process saves and loads."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
