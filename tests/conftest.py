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
