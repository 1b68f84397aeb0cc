"""Local mode: lay out a SageMaker ``/opt/ml`` tree under a folder and run the container's own
launcher in it, on CPU processes. Running again on the same folder resumes."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ftstack_train.config import MODEL_KEY, parse_config, parse_overrides
from ftstack_train.contract import (
    CONFIG_CHANNEL, DEFAULT_TEST_SPLIT, MODEL_CHANNEL, ROOT_ENV, TEST_CHANNEL, TINY_MODELS, TRAIN_CHANNEL,
    SageMakerPaths, hold_out_every,
)
from ftstack_train.errors import ConfigError
from ftstack_train.validation import check_files


@dataclass(frozen=True)
class LocalRun:
    """What ``ftstack local`` was asked to do."""

    train: Path
    test: Path | None
    model: str | None  # a directory, a tiny model name, or None for the config's choice
    nproc: int
    config: Path | None
    output: Path
    overrides: tuple[str, ...]


def _put(source: Path, channel: Path, name: str | None = None) -> None:
    """Copies one input file into its channel, replacing what an earlier run put there."""
    if channel.is_symlink() or channel.is_file():
        channel.unlink()
    elif channel.exists():
        shutil.rmtree(channel)
    channel.mkdir(parents=True)
    shutil.copyfile(source, channel / (name or source.name))


HOLD_OUT_EVERY = hold_out_every(DEFAULT_TEST_SPLIT)


def hold_out(source: Path, train_channel: Path, test_channel: Path) -> tuple[int, int]:
    """Splits ``source``: every HOLD_OUT_EVERY-th record goes to the test channel, the rest to the train
    channel. Deterministic and streaming; the source is validated first, so that problems are
    reported with its own line numbers. Returns (kept, held out)."""
    report = check_files([source])
    if report.records < HOLD_OUT_EVERY:
        raise ConfigError(f"--train {source}: {report.records} records are too few to hold out a test set; give --test")
    for channel in (train_channel, test_channel):
        if channel.exists():
            shutil.rmtree(channel)
        channel.mkdir(parents=True)
    counts = [0, 0]
    with open(source, "rb") as src, open(train_channel / source.name, "wb") as train, open(test_channel / source.name, "wb") as test:
        for line in src:
            if not line.strip():
                continue
            held = (counts[0] + counts[1] + 1) % HOLD_OUT_EVERY == 0
            (test if held else train).write(line if line.endswith(b"\n") else line + b"\n")
            counts[held] += 1
    return counts[0], counts[1]


def lay_out(run: LocalRun) -> SageMakerPaths:
    """Builds ``output/input/{config,data}`` as SageMaker would: channels, hyperparameters (the
    ``key=value`` overrides, as strings) and a one-host resource config."""
    for path, what in ((run.train, "--train"), (run.test, "--test"), (run.config, "--config")):
        if path is not None and not path.is_file():
            raise ConfigError(f"{what} {path}: no such file")
    if run.nproc < 1:
        raise ConfigError(f"--nproc {run.nproc}: give at least 1 process")
    hyperparameters = parse_overrides(run.overrides)
    if run.model in TINY_MODELS:
        hyperparameters[MODEL_KEY] = run.model
    elif run.model is not None and not Path(run.model).is_dir():
        raise ConfigError(f"--model {run.model}: not a directory; give a Hugging Face model directory or one of {', '.join(TINY_MODELS)}")
    # Fail on a bad config now, with the same parser the job uses, before anything is written.
    parse_config(str(run.config) if run.config else None, hyperparameters)

    paths = SageMakerPaths(run.output.resolve())
    if run.test is not None:
        _put(run.train, paths.channel(TRAIN_CHANNEL))
        _put(run.test, paths.channel(TEST_CHANNEL))
    else:
        kept, held = hold_out(run.train, paths.channel(TRAIN_CHANNEL), paths.channel(TEST_CHANNEL))
        print(f"no --test file: held out every {HOLD_OUT_EVERY}th record of {run.train} for evaluation ({held} held out, {kept} kept)")
    config_channel = paths.channel(CONFIG_CHANNEL)
    if run.config is not None:
        _put(run.config, config_channel, "config.yaml")
    elif config_channel.exists():
        shutil.rmtree(config_channel)  # from an earlier run; the job would read it
    model_channel = paths.channel(MODEL_CHANNEL)
    if model_channel.is_symlink():
        model_channel.unlink()
    if run.model is not None and run.model not in TINY_MODELS:
        model_channel.symlink_to(Path(run.model).resolve(), target_is_directory=True)
    paths.hyperparameters.parent.mkdir(parents=True, exist_ok=True)
    paths.hyperparameters.write_text(json.dumps(hyperparameters, indent=2))
    paths.resource_config.write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    failure = paths.failure_file
    if failure.exists():
        failure.unlink()  # from an earlier attempt; this one starts clean
    return paths


def run_local(run: LocalRun) -> int:
    """Lays out the tree and runs the container's launcher on it; returns its exit code."""
    from ftstack_train import launch

    paths = lay_out(run)
    os.environ[ROOT_ENV] = str(paths.root)
    os.environ[launch.NPROC_ENV] = str(run.nproc)
    return launch.main(["train"])
