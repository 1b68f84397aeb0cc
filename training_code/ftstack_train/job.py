"""Reading a job's inputs as SageMaker lays them out: hyperparameters, the optional config
channel, the base model; and reporting failure the way SageMaker shows it."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .config import TrainConfig, parse_config
from .errors import ConfigError
from .contract import CHECKPOINT_BASE_MODEL, CONFIG_CHANNEL, MODEL_CHANNEL, TINY_MODELS, SageMakerPaths

FAILURE_LIMIT = 1000  # SageMaker truncates FailureReason; keep the start, which names the problem


def read_hyperparameters(paths: SageMakerPaths) -> dict[str, str]:
    """hyperparameters.json (every value a string), or nothing when the file is absent."""
    if not paths.hyperparameters.is_file():
        return {}
    try:
        values = json.loads(paths.hyperparameters.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConfigError(f"{paths.hyperparameters}: not valid JSON ({exc})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{paths.hyperparameters}: must be a JSON object of names to values")
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}


def config_file(paths: SageMakerPaths) -> Path | None:
    """The YAML file of the ``config`` channel, if the job has one; more than one is an error."""
    channel = paths.channel(CONFIG_CHANNEL)
    if not channel.is_dir():
        return None
    found = sorted(p for p in channel.rglob("*") if p.suffix in (".yaml", ".yml"))
    if len(found) != 1:
        raise ConfigError(f"{channel}: the config channel must hold exactly one .yaml file, found {len(found)}")
    return found[0]


def load_job_config(paths: SageMakerPaths) -> tuple[TrainConfig, list[str]]:
    """The run's config: the config channel's YAML, then the hyperparameters on top."""
    path = config_file(paths)
    return parse_config(str(path) if path else None, read_hyperparameters(paths))


def checkpoint_dir(cfg: TrainConfig, paths: SageMakerPaths) -> Path:
    """``save_folder`` when set (relative paths under the SageMaker checkpoint folder), else the
    SageMaker checkpoint folder itself."""
    if not cfg.save_folder:
        return paths.checkpoints
    if "://" in cfg.save_folder:
        raise ConfigError(
            f"save_folder: {cfg.save_folder!r} is remote; leave save_folder empty, the job's checkpoint "
            "folder is synced to S3 by SageMaker"
        )
    return paths.checkpoints / cfg.save_folder


def base_model_source(cfg: TrainConfig, paths: SageMakerPaths) -> str:
    """Where the base model comes from: the ``model`` channel when given, else a tiny model made
    by the launcher, else ``model.pretrained_model_name_or_path`` (a directory or a hub id)."""
    channel = paths.channel(MODEL_CHANNEL)
    if channel.is_dir() and any(channel.iterdir()):
        return str(_model_root(channel))
    if cfg.model in TINY_MODELS:
        return str(checkpoint_dir(cfg, paths) / CHECKPOINT_BASE_MODEL)
    return cfg.model


def _model_root(channel: Path) -> Path:
    # A channel made from an S3 prefix may hold the model one folder down.
    if (channel / "config.json").is_file():
        return channel
    inner = [p for p in channel.iterdir() if p.is_dir() and (p / "config.json").is_file()]
    if len(inner) == 1:
        return inner[0]
    raise ConfigError(f"{channel}: the model channel has no config.json; upload a Hugging Face model directory")


def write_failure(paths: SageMakerPaths, reason: str) -> None:
    """Writes the failure file once (the first reason wins: later ones are consequences)."""
    paths.output.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(paths.failure_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(reason[:FAILURE_LIMIT])
