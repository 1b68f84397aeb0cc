"""Fixtures shared by the training-code tests."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest


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
