"""The tutorial's YAML without network: with ``--model`` pointing at a local, hub-shaped MPT the
run trains and exports without a single request to the Hugging Face hub (its tokenizer, named
after the model's hub id, follows the model to the folder); with the hub id alone it fails at
once with one line that names the key, the id and the fix, never a traceback or retries.

The hub is replaced by a local endpoint (``HF_ENDPOINT``) that either records every connection
or refuses them, and the Hugging Face cache by an empty folder, so that these tests are
deterministic on machines with or without network.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ftstack_train.config import MODEL_KEY, TOKENIZER_KEY, TrainConfig
from ftstack_train.contract import MODEL_CHANNEL, SageMakerPaths
from ftstack_train.errors import ConfigError
from ftstack_train.job import HUB_OFFLINE_ENV, require_hub_access, tokenizer_source

TUTORIAL = Path(__file__).parent / "data" / "llmfoundry_tutorial.yaml"
HUB_ID = "mosaicml/mpt-7b"  # the tutorial's model and tokenizer

# The tutorial's run, small: its global batch of 128 rows and 3 epochs become 2 rows and 2 steps,
# and its save_folder (/tmp/checkpoints, outside the run's folder and shared by every run on the
# machine) becomes the run's own checkpoint folder.
SMALL = ("global_train_batch_size=2", "max_duration=2ba", "save_folder=")


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """The endpoints here are on loopback; a proxy from the environment must not stand in between."""
    for name in [k for k in os.environ if "proxy" in k.lower()]:
        monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tutorial-data")
    records = [{"prompt": f"What is the code word for {i}?", "response": f"The code word for {i} is w{i}."} for i in range(12)]
    train, test = folder / "train.jsonl", folder / "test.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in records))
    test.write_text("".join(json.dumps(r) + "\n" for r in records[:4]))
    return train, test


class RecordingHub:
    """A TCP endpoint that counts connections and closes them: any hub request fails, and is seen."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(16)
        self.connections = 0
        self.url = f"http://127.0.0.1:{self.server.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return  # closed
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.server.close()


def refused_endpoint() -> str:
    """A loopback URL where nothing listens: every connection is refused at once."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def ftstack_local(data, output: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    train, test = data
    command = [sys.executable, "-m", "ftstack.cli", "local", "--config", str(TUTORIAL), "--train", str(train),
               "--test", str(test), "--nproc", "1", "--output", str(output), *args]
    base = {k: v for k, v in os.environ.items() if not k.startswith("HF_") and "proxy" not in k.lower()}
    full = {**base, "HF_HOME": str(output.parent / "hf-home"), "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(command, capture_output=True, text=True, env=full, timeout=300)


# --- whole runs ---------------------------------------------------------------------------------

@pytest.mark.slow  # a whole torchrun run
def test_tutorial_yaml_with_a_local_model_trains_and_exports_without_the_hub(data, hub_like_mpt, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, MptForCausalLM

    hub = RecordingHub()
    try:
        done = ftstack_local(data, tmp_path / "run", {"HF_ENDPOINT": hub.url}, "--model", str(hub_like_mpt), *SMALL)
    finally:
        hub.close()
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "Retry" not in done.stdout + done.stderr
    assert hub.connections == 0, "the run contacted the hub"

    model_dir = tmp_path / "run" / "model"
    # The tokenizer came from the --model folder, not from the hub id the YAML names.
    exported = AutoTokenizer.from_pretrained(model_dir)
    assert exported.get_vocab() == AutoTokenizer.from_pretrained(hub_like_mpt).get_vocab()
    # The export loads as the native class, also where remote code is trusted.
    assert type(AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)) is MptForCausalLM


@pytest.mark.parametrize("offline", ["HF_HUB_OFFLINE", "unreachable endpoint"])
def test_tutorial_yaml_with_a_hub_model_and_no_network_fails_with_one_line(data, tmp_path, offline):
    env = {HUB_OFFLINE_ENV: "1"} if offline == "HF_HUB_OFFLINE" else {"HF_ENDPOINT": refused_endpoint()}
    # save_folder= : the tutorial's /tmp/checkpoints is refused first (issue 11: checkpoints are
    # read only from the job's own folder); this test is about the hub.
    done = ftstack_local(data, tmp_path / "run", env, "save_folder=")

    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: {MODEL_KEY}: {HUB_ID!r} is a Hugging Face hub id, but ")
    assert "base-models/" in lines[0] and "base_model" in lines[0] and "network access" in lines[0]
    assert "Traceback" not in done.stdout and "Retry" not in done.stdout + done.stderr
    assert (tmp_path / "run" / "output" / "failure").read_text() == lines[0].removeprefix("error: ")
    assert not (tmp_path / "run" / "model").exists(), "no training process should have started"


def test_a_tokenizer_other_than_the_model_is_not_replaced_by_the_local_model(data, hub_like_mpt, tmp_path):
    other = "EleutherAI/gpt-neox-20b"
    done = ftstack_local(data, tmp_path / "run", {HUB_OFFLINE_ENV: "1"}, "--model", str(hub_like_mpt), f"{TOKENIZER_KEY}={other}",
                         "save_folder=")

    assert done.returncode == 2
    assert done.stderr.splitlines() == [done.stderr.splitlines()[0]]
    assert done.stderr.startswith(f"error: {TOKENIZER_KEY}: {other!r} is a Hugging Face hub id")


# --- where the tokenizer comes from, and the check before any process starts ------------------

@pytest.fixture
def channel_paths(tmp_path, monkeypatch) -> SageMakerPaths:
    """A job with a base model in its ``model`` channel; the HF_HUB_OFFLINE that the check sets
    is undone after the test."""
    monkeypatch.setenv(HUB_OFFLINE_ENV, "0")
    paths = SageMakerPaths(tmp_path / "ml")
    paths.channel(MODEL_CHANNEL).mkdir(parents=True)
    (paths.channel(MODEL_CHANNEL) / "config.json").write_text("{}")
    return paths


@pytest.mark.parametrize("tokenizer", [None, HUB_ID])
def test_a_tokenizer_named_like_the_model_follows_the_model_channel(channel_paths, tokenizer):
    cfg = TrainConfig(model=HUB_ID, tokenizer=tokenizer)
    channel = str(channel_paths.channel(MODEL_CHANNEL))
    assert tokenizer_source(cfg, channel) == channel
    require_hub_access(cfg, channel_paths)
    assert os.environ[HUB_OFFLINE_ENV] == "1", "nothing needs the hub, so no library may try it"


def test_a_tokenizer_named_otherwise_is_kept(channel_paths, tmp_path):
    elsewhere = tmp_path / "tokenizer"
    elsewhere.mkdir()
    cfg = TrainConfig(model=HUB_ID, tokenizer=str(elsewhere))
    assert tokenizer_source(cfg, str(channel_paths.channel(MODEL_CHANNEL))) == str(elsewhere)
    assert tokenizer_source(TrainConfig(model="org/a", tokenizer="org/b"), "org/a") == "org/b"
    require_hub_access(cfg, channel_paths)  # both local


def test_a_path_that_is_no_directory_and_no_hub_id_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(HUB_OFFLINE_ENV, "1")
    missing = tmp_path / "no-such-model"
    with pytest.raises(ConfigError, match=f"^{MODEL_KEY}: '{missing}' is not a directory here, nor a Hugging Face hub id"):
        require_hub_access(TrainConfig(model=str(missing)), SageMakerPaths(tmp_path / "ml"))


def test_a_hub_model_in_the_local_cache_is_used_offline(tmp_path, monkeypatch):
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--mosaicml--mpt-7b" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "hub" / "models--mosaicml--mpt-7b" / "refs").mkdir()
    (tmp_path / "hub" / "models--mosaicml--mpt-7b" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_ENDPOINT", refused_endpoint())
    monkeypatch.setenv(HUB_OFFLINE_ENV, "0")

    require_hub_access(TrainConfig(model=HUB_ID), SageMakerPaths(tmp_path / "ml"))
    assert os.environ[HUB_OFFLINE_ENV] == "1", "the libraries must read the cache, not retry the hub"


def test_a_hub_that_answers_is_left_to_the_libraries(tmp_path, monkeypatch):
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # any HTTP answer, even an error, means the hub is reachable
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv(HUB_OFFLINE_ENV, "0")
        require_hub_access(TrainConfig(model=HUB_ID), SageMakerPaths(tmp_path / "ml"))
    finally:
        server.shutdown()
        server.server_close()
    assert os.environ[HUB_OFFLINE_ENV] == "0"
