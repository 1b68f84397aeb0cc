"""Tests for the container's entrypoint (ftstack_train.launch) and the job inputs it reads
(ftstack_train.job): torchrun's arguments per host, and every user error rejected before torchrun
starts, reported in SageMaker's failure file. No test here starts torchrun."""

import json
import os

import pytest
import torch

from ftstack_train import launch
from ftstack_train.contract import ROOT_ENV, SageMakerPaths
from ftstack_train.config import TrainConfig
from ftstack_train.errors import EXIT_USER_ERROR, ConfigError
from ftstack_train.job import (
    FAILURE_LIMIT, base_model_source, checkpoint_dir, config_file, load_job_config, read_hyperparameters, write_failure,
)
from ftstack_train.launch import NPROC_ENV, main, prepare, processes_per_node, read_resource_config, torchrun_args
from ftstack_train.network import VARIABLES

GOOD_LINE = '{"prompt": "What is 2+2?", "response": "4"}\n'


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def paths(tmp_path, monkeypatch) -> SageMakerPaths:
    """A SageMaker tree under tmp_path with good train and test channels, one CPU process per node."""
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    monkeypatch.setenv(NPROC_ENV, "1")
    # main() sets these for the training processes; keep them out of the other tests' environment.
    monkeypatch.setenv("TRANSFORMERS_VERBOSITY", "error")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # prepare() sets it when nothing needs the hub; set here, no test ever reaches the network.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in VARIABLES:  # prepare() sets them for the training processes; restored after the test
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(launch, "supervise", lambda args: pytest.fail(f"torchrun would have started: {args}"))
    sm = SageMakerPaths(tmp_path)
    write(sm.channel("train") / "train.jsonl", GOOD_LINE * 3)
    write(sm.channel("test") / "test.jsonl", GOOD_LINE)
    return sm


def set_hyperparameters(paths: SageMakerPaths, values: dict) -> None:
    write(paths.hyperparameters, json.dumps(values))


def set_resource_config(paths: SageMakerPaths, hosts: list[str], current: str, instance_type: str = "ml.g5.12xlarge") -> None:
    doc = {"current_host": current, "current_instance_type": instance_type, "hosts": hosts, "network_interface_name": "eth0"}
    write(paths.resource_config, json.dumps(doc))


def fails_with(paths: SageMakerPaths, capsys, argv=("train",)) -> str:
    """Runs main, which must reject the job; returns the failure file's text."""
    assert main(list(argv)) == EXIT_USER_ERROR
    assert paths.failure_file.is_file(), "no failure file: SageMaker would show no reason"
    reason = paths.failure_file.read_text(encoding="utf-8")
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    return reason


# --- torchrun's arguments --------------------------------------------------------------------------

def test_torchrun_args_one_host_rendezvous_locally():
    args = torchrun_args(["algo-1"], "algo-1", 4, 12345)

    assert (option(args, "--nnodes"), option(args, "--node_rank")) == ("1", "0")
    assert (option(args, "--nproc_per_node"), option(args, "--master_addr"), option(args, "--master_port")) == (
        "4", "127.0.0.1", "12345")
    assert args[-2:] == ["-m", "ftstack_train.train"]


def test_torchrun_args_three_hosts_from_the_resource_config(tmp_path):
    sm = SageMakerPaths(tmp_path)
    set_resource_config(sm, ["algo-1", "algo-2", "algo-3"], "algo-2")

    args = torchrun_args(*read_resource_config(sm), 8, 29500)

    assert (option(args, "--nnodes"), option(args, "--node_rank"), option(args, "--nproc_per_node")) == ("3", "1", "8")
    assert (option(args, "--master_addr"), option(args, "--master_port")) == ("algo-1", "29500")
    assert args[-2:] == ["-m", "ftstack_train.train"]


def test_resource_config_absent_means_one_local_host(tmp_path):
    assert read_resource_config(SageMakerPaths(tmp_path)) == (["algo-1"], "algo-1")


def test_current_host_not_among_hosts_is_an_error(tmp_path):
    sm = SageMakerPaths(tmp_path)
    set_resource_config(sm, ["algo-1", "algo-2"], "algo-3")

    with pytest.raises(ConfigError) as info:
        read_resource_config(sm)
    assert str(info.value).startswith(str(sm.resource_config)) and "'algo-3'" in str(info.value)


@pytest.mark.parametrize("text", ["{not json", '{"hosts": ["algo-1"]}', "[]", '{"hosts": 3, "current_host": "a"}'])
def test_malformed_resource_config_is_an_error_naming_the_file(tmp_path, text):
    sm = SageMakerPaths(tmp_path)
    write(sm.resource_config, text)

    with pytest.raises(ConfigError) as info:
        read_resource_config(sm)
    assert str(info.value).startswith(f"{sm.resource_config}: not a SageMaker resource config")


def test_nproc_per_node_must_be_a_positive_number(paths, monkeypatch):
    assert processes_per_node() == (1, "cpu")
    monkeypatch.setenv(NPROC_ENV, "0")

    with pytest.raises(ConfigError, match=NPROC_ENV):
        processes_per_node()


# --- prepare: everything checked before torchrun -------------------------------------------------

def test_prepare_returns_torchrun_args_for_a_good_multi_node_job(paths, monkeypatch):
    monkeypatch.setenv(NPROC_ENV, "2")
    set_resource_config(paths, ["algo-1", "algo-2", "algo-3"], "algo-3")
    set_hyperparameters(paths, {"global_train_batch_size": "24", "save_folder": '"run-1"'})
    write(paths.channel("model") / "config.json", "{}")  # the base model comes from S3, not the hub

    args = prepare(paths)

    assert (option(args, "--nnodes"), option(args, "--node_rank"), option(args, "--nproc_per_node")) == ("3", "2", "2")
    assert (option(args, "--master_addr"), option(args, "--master_port")) == ("algo-1", str(launch.MULTI_NODE_PORT))
    assert (paths.checkpoints / "run-1").is_dir() and paths.model_dir.is_dir()


def test_prepare_sets_the_network_for_the_training_processes_and_keeps_the_jobs_own(paths, monkeypatch, capsys):
    set_resource_config(paths, ["algo-1", "algo-2"], "algo-2", "ml.p4d.24xlarge")
    write(paths.channel("model") / "config.json", "{}")
    monkeypatch.setenv("NCCL_DEBUG", "WARN")

    prepare(paths)

    assert {name: os.environ.get(name) for name in VARIABLES} == {
        "NCCL_SOCKET_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "eth0", "FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1",
        "RDMAV_FORK_SAFE": "1", "NCCL_PROTO": "simple", "NCCL_DEBUG": "WARN", "NCCL_DEBUG_SUBSYS": None}
    assert "network: EFA; 2 node(s), ml.p4d.24xlarge, interface eth0; " in capsys.readouterr().out


def test_a_multi_node_resource_config_without_interface_fails_naming_file_and_key(paths, capsys):
    write(paths.resource_config, json.dumps({"current_host": "algo-1", "hosts": ["algo-1", "algo-2"],
                                             "current_instance_type": "ml.p4d.24xlarge"}))

    reason = fails_with(paths, capsys)

    assert reason.startswith(f"{paths.resource_config}: network_interface_name: missing in a 2-node job")
    assert "FI_PROVIDER" not in os.environ


def test_bad_jsonl_in_the_train_channel_fails_with_its_line(paths, capsys):
    write(paths.channel("train") / "train.jsonl", GOOD_LINE + '{"prompt": "p", "response": \n' + GOOD_LINE)

    reason = fails_with(paths, capsys)

    assert f"{paths.channel('train') / 'train.jsonl'}:2: is not valid JSON" in reason


def test_a_model_folder_with_foreign_files_fails_before_training(paths, capsys):
    # Issue 11, item 3: the export refused them only at the end of the paid-for run.
    write(paths.model_dir / "notes.txt", "mine")

    reason = fails_with(paths, capsys)

    assert f"{paths.model_dir}: holds 'notes.txt'" in reason
    assert (paths.model_dir / "notes.txt").read_text() == "mine"


def test_bad_hyperparameter_fails_naming_the_key(paths, capsys):
    set_hyperparameters(paths, {"optimizer.lr": "abc"})

    reason = fails_with(paths, capsys)

    assert reason.startswith("optimizer.lr (hyperparameter): 'abc'")


def test_a_file_that_is_not_jsonl_in_the_train_channel_fails_naming_it(paths, capsys):
    write(paths.channel("train") / "notes.txt", "not data")

    reason = fails_with(paths, capsys)

    assert str(paths.channel("train")) in reason and "notes.txt" in reason and "not JSONL" in reason


def test_missing_test_channel_fails_saying_so(paths, capsys):
    (paths.channel("test") / "test.jsonl").unlink()
    paths.channel("test").rmdir()

    reason = fails_with(paths, capsys)

    assert reason.startswith(f"{paths.channel('test')}: the data channel is missing")


def test_batch_that_does_not_split_over_the_processes_fails_naming_the_key(paths, capsys, monkeypatch):
    monkeypatch.setenv(NPROC_ENV, "4")
    set_hyperparameters(paths, {"global_train_batch_size": "6"})

    reason = fails_with(paths, capsys)

    assert reason.startswith("global_train_batch_size: 6 rows cannot be split evenly over 4 processes")


def test_malformed_resource_config_fails_the_job(paths, capsys):
    write(paths.resource_config, "{")

    assert fails_with(paths, capsys).startswith(str(paths.resource_config))


def test_unexpected_arguments_fail_the_job(paths, capsys):
    # SageMaker shows only the failure file as the job's FailureReason: an exit code alone says nothing.
    reason = fails_with(paths, capsys, ["train", "--bogus"])

    assert "--bogus" in reason


# --- the job's inputs ------------------------------------------------------------------------------

def test_failure_file_keeps_the_first_reason(tmp_path):
    sm = SageMakerPaths(tmp_path)

    write_failure(sm, "first: the cause")
    write_failure(sm, "second: a consequence")

    assert sm.failure_file.read_text(encoding="utf-8") == "first: the cause"


def test_failure_file_is_cut_to_what_sagemaker_shows(tmp_path):
    sm = SageMakerPaths(tmp_path)

    write_failure(sm, "x" * (FAILURE_LIMIT + 50))

    assert len(sm.failure_file.read_text(encoding="utf-8")) == FAILURE_LIMIT


def test_read_hyperparameters_gives_strings(tmp_path):
    sm = SageMakerPaths(tmp_path)
    assert read_hyperparameters(sm) == {}
    set_hyperparameters(sm, {"optimizer.lr": 1e-4, "packing": False, "optimizer.betas": [0.9, 0.95], "run_name": "x"})

    values = read_hyperparameters(sm)

    assert values == {"optimizer.lr": "0.0001", "packing": "false", "optimizer.betas": "[0.9, 0.95]", "run_name": "x"}


@pytest.mark.parametrize("text", ["{", '["optimizer.lr", "1e-4"]'])
def test_malformed_hyperparameters_file_is_an_error_naming_it(tmp_path, text):
    sm = SageMakerPaths(tmp_path)
    write(sm.hyperparameters, text)

    with pytest.raises(ConfigError) as info:
        read_hyperparameters(sm)
    assert str(info.value).startswith(str(sm.hyperparameters))


def test_config_channel_yaml_with_hyperparameters_on_top(tmp_path):
    sm = SageMakerPaths(tmp_path)
    assert config_file(sm) is None
    write(sm.channel("config") / "nested" / "run.yaml", "max_seq_len: 256\noptimizer:\n  lr: 1.0e-5\n")
    set_hyperparameters(sm, {"optimizer.lr": "2e-5"})

    cfg, warnings = load_job_config(sm)

    assert (cfg.max_seq_len, cfg.lr, warnings) == (256, 2e-5, [])


def test_config_channel_with_two_yaml_files_is_an_error(tmp_path):
    sm = SageMakerPaths(tmp_path)
    write(sm.channel("config") / "a.yaml", "{}")
    write(sm.channel("config") / "b.yml", "{}")

    with pytest.raises(ConfigError, match="exactly one .yaml file, found 2"):
        config_file(sm)


def test_checkpoint_dir(tmp_path):
    sm = SageMakerPaths(tmp_path)

    assert checkpoint_dir(TrainConfig(), sm) == sm.checkpoints
    assert checkpoint_dir(TrainConfig(save_folder="run-1"), sm) == sm.checkpoints / "run-1"
    with pytest.raises(ConfigError, match="^save_folder: 's3://b/ckpt' is remote"):
        checkpoint_dir(TrainConfig(save_folder="s3://b/ckpt"), sm)


def test_base_model_source(tmp_path):
    sm = SageMakerPaths(tmp_path)

    assert base_model_source(TrainConfig(model="org/model"), sm) == "org/model"
    assert base_model_source(TrainConfig(model="tiny-mpt"), sm) == str(sm.checkpoints / "base-model")
    write(sm.channel("model") / "inner" / "config.json", "{}")  # an S3 prefix one folder down
    assert base_model_source(TrainConfig(model="org/model"), sm) == str(sm.channel("model") / "inner")
    write(sm.channel("model") / "config.json", "{}")
    assert base_model_source(TrainConfig(model="tiny-mpt"), sm) == str(sm.channel("model"))


def test_model_channel_without_config_json_is_an_error(tmp_path):
    sm = SageMakerPaths(tmp_path)
    write(sm.channel("model") / "weights.bin", "")

    with pytest.raises(ConfigError, match="no config.json"):
        base_model_source(TrainConfig(), sm)


def test_a_training_process_ends_with_its_exit_code_and_everything_it_printed():
    """train.exit_now skips interpreter finalization (see its docstring): what the streams still
    buffer must be flushed first, and the exit code must be the one given."""
    import subprocess
    import sys

    script = "import sys; from ftstack_train.train import exit_now; print('last line', end=''); sys.stderr.write('err'); exit_now(5)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # buffered, as in a job

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)

    assert (result.returncode, result.stdout, result.stderr) == (5, "last line", "err")
