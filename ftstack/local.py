"""Local mode: lay out a SageMaker ``/opt/ml`` tree under a folder and run the container's own
launcher in it, on CPU processes. Running again on the same folder resumes."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ftstack_train.config import MODEL_KEY, parse_config
from ftstack_train.sources import parse_overrides
from ftstack_train.contract import (
    CONFIG_CHANNEL, DEFAULT_TEST_SPLIT, MODEL_CHANNEL, ROOT_ENV, TEST_CHANNEL, TINY_MODELS, TRAIN_CHANNEL,
    SageMakerPaths, hold_out_every,
)
from ftstack_train.errors import ConfigError
from ftstack_train.validation import check_files

from ftstack.run_folder import RunFolder, check_inputs


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


def _put(folder: RunFolder, source: Path, channel: Path, name: str | None = None) -> None:
    """Copies one input file into its channel (cleared beforehand by ``RunFolder.clear_inputs``)."""
    shutil.copyfile(source, folder.claim(channel / (name or source.name)))


HOLD_OUT_EVERY = hold_out_every(DEFAULT_TEST_SPLIT)


def check_hold_out(source: Path) -> None:
    """Validates ``source`` (problems are reported with its own line numbers) and checks that it has
    enough records to hold out a test set."""
    report = check_files([source])
    if report.records < HOLD_OUT_EVERY:
        raise ConfigError(f"--train {source}: {report.records} records are too few to hold out a test set; give --test")


def _split(source: Path, train_channel: Path, test_channel: Path) -> tuple[int, int]:
    for channel in (train_channel, test_channel):
        channel.mkdir(parents=True, exist_ok=True)
    counts = [0, 0]
    # "xb": never overwrite; the caller clears the channels of what it wrote there before.
    with open(source, "rb") as src, open(train_channel / source.name, "xb") as train, open(test_channel / source.name, "xb") as test:
        for line in src:
            if not line.strip():
                continue
            held = (counts[0] + counts[1] + 1) % HOLD_OUT_EVERY == 0
            (test if held else train).write(line if line.endswith(b"\n") else line + b"\n")
            counts[held] += 1
    return counts[0], counts[1]


def hold_out(source: Path, train_channel: Path, test_channel: Path) -> tuple[int, int]:
    """Splits ``source``: every HOLD_OUT_EVERY-th record goes to the test channel, the rest to the train
    channel. Deterministic and streaming; the source is validated first (``check_hold_out``). Writes
    only new files, never over an existing one. Returns (kept, held out)."""
    check_hold_out(source)
    return _split(source, train_channel, test_channel)


def _check(run: LocalRun) -> tuple[dict[str, str], RunFolder, Path | None]:
    """Every check of ``lay_out``, before anything is written. Returns the hyperparameters, the
    folder and the base model folder, resolved (``--model`` may be a link that the lay-out replaces)."""
    inputs = {"--train": run.train, "--test": run.test, "--config": run.config}
    for what, path in inputs.items():
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
    if run.test is None:
        check_hold_out(run.train)
    model_dir = Path(run.model) if run.model is not None and run.model not in TINY_MODELS else None
    check_inputs(run.output, inputs, model_dir)
    return hyperparameters, RunFolder(run.output), model_dir.resolve() if model_dir else None


def lay_out(run: LocalRun) -> SageMakerPaths:
    """Builds ``output/input/{config,data}`` as SageMaker would: channels, hyperparameters (the
    ``key=value`` overrides, as strings) and a one-host resource config. The output folder must be
    new, empty or an earlier run's (see ``ftstack.run_folder``); only files an earlier run wrote
    there are replaced."""
    hyperparameters, folder, model_dir = _check(run)
    paths = SageMakerPaths(folder.root)
    folder.clear_inputs()
    if run.test is not None:
        _put(folder, run.train, paths.channel(TRAIN_CHANNEL))
        _put(folder, run.test, paths.channel(TEST_CHANNEL))
    else:
        for channel in (TRAIN_CHANNEL, TEST_CHANNEL):
            folder.claim(paths.channel(channel) / run.train.name)
        kept, held = _split(run.train, paths.channel(TRAIN_CHANNEL), paths.channel(TEST_CHANNEL))
        print(f"no --test file: held out every {HOLD_OUT_EVERY}th record of {run.train} for evaluation ({held} held out, {kept} kept)")
    if run.config is not None:
        _put(folder, run.config, paths.channel(CONFIG_CHANNEL), "config.yaml")
    if model_dir is not None:
        # A link, not a copy: removing it later never touches the user's model.
        folder.claim(paths.channel(MODEL_CHANNEL)).symlink_to(model_dir, target_is_directory=True)
    folder.claim(paths.hyperparameters).write_text(json.dumps(hyperparameters, indent=2))
    folder.claim(paths.resource_config).write_text(json.dumps({"current_host": "algo-1", "hosts": ["algo-1"]}))
    failure = paths.failure_file
    if failure.is_file() or failure.is_symlink():
        failure.unlink()  # the job wrote it in an earlier attempt; this one starts clean
    return paths


def run_local(run: LocalRun) -> int:
    """Lays out the tree and runs the container's launcher on it; returns its exit code."""
    from ftstack_train import launch

    paths = lay_out(run)
    os.environ[ROOT_ENV] = str(paths.root)
    os.environ[launch.NPROC_ENV] = str(run.nproc)
    return launch.main(["train"])
