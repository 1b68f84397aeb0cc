"""Reading a job's inputs as SageMaker lays them out: hyperparameters, the optional config
channel, the base model; and reporting failure the way SageMaker shows it."""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from http.client import HTTPException
from pathlib import Path, PurePosixPath

from .config import MODEL_KEY, TOKENIZER_KEY, TrainConfig, parse_config
from .errors import ConfigError
from .contract import CHECKPOINT_BASE_MODEL, CONFIG_CHANNEL, MODEL_CHANNEL, TINY_MODELS, SageMakerPaths, is_hub_id

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
    """``save_folder`` when set (a relative path inside the SageMaker checkpoint folder), else the
    SageMaker checkpoint folder itself. Checkpoints are unpickled on resume, so they are read only
    from there: an absolute path, ``..`` or a link that leads out is a ConfigError."""
    if not cfg.save_folder:
        return paths.checkpoints
    if "://" in cfg.save_folder:
        raise ConfigError(
            f"save_folder: {cfg.save_folder!r} is remote; leave save_folder empty, the job's checkpoint "
            "folder is synced to S3 by SageMaker"
        )
    relative = PurePosixPath(cfg.save_folder)
    folder = paths.checkpoints / relative
    if relative.is_absolute() or ".." in relative.parts or not folder.resolve().is_relative_to(paths.checkpoints.resolve()):
        raise ConfigError(
            f"save_folder: {cfg.save_folder!r} leads outside the job's checkpoint folder {paths.checkpoints}; "
            "give a relative path without '..' (such as run-1), or leave save_folder empty"
        )
    return folder


def base_model_source(cfg: TrainConfig, paths: SageMakerPaths) -> str:
    """Where the base model comes from: the ``model`` channel when given, else a tiny model made
    by the launcher, else ``model.pretrained_model_name_or_path`` (a directory or a hub id)."""
    channel = paths.channel(MODEL_CHANNEL)
    if channel.is_dir() and any(channel.iterdir()):
        return str(_model_root(channel))
    if cfg.model in TINY_MODELS:
        return str(checkpoint_dir(cfg, paths) / CHECKPOINT_BASE_MODEL)
    return cfg.model


def tokenizer_source(cfg: TrainConfig, model_source: str) -> str:
    """Where the tokenizer comes from: ``tokenizer.name`` when it names something other than the
    base model, otherwise the base model's own source. So the tutorial's ``tokenizer.name:
    mosaicml/mpt-7b`` next to the same model id follows the model to the ``model`` channel (or
    ``--model``) instead of fetching the tokenizer of a model that is not the one being trained."""
    if cfg.own_tokenizer:
        return model_source
    return cfg.tokenizer


HUB_OFFLINE_ENV = "HF_HUB_OFFLINE"
"""Hugging Face's switch that stops every hub request (and its retries) in the libraries."""

HUB_ENDPOINT_ENV = "HF_ENDPOINT"
HUB_PROBE_TIMEOUT_S = 5.0

_HUB_FIX = {
    MODEL_KEY: "stage the model in S3 under base-models/ and pass it as base_model (locally: --model DIR), "
    "or run the job with network access",
    TOKENIZER_KEY: "put the tokenizer files in the model folder and leave tokenizer.name empty, "
    "or run the job with network access",
}


def require_hub_access(cfg: TrainConfig, paths: SageMakerPaths) -> None:
    """Checks, before any training process starts, that every hub id among the model and tokenizer
    sources can be fetched; raises ConfigError with one line naming the key, the id and the fix
    when one cannot (no network: the libraries would retry for most of a minute, then fail on
    every rank). Sets HF_HUB_OFFLINE for the training processes when nothing needs the hub."""
    model = base_model_source(cfg, paths)
    sources = {MODEL_KEY: model}
    tokenizer = tokenizer_source(cfg, model)
    if tokenizer != model:
        sources[TOKENIZER_KEY] = tokenizer
    hub = {}
    for key, source in sources.items():
        if Path(source).is_dir() or (key == MODEL_KEY and cfg.model in TINY_MODELS):
            continue
        if not is_hub_id(source):
            raise ConfigError(
                f"{key}: {source!r} is not a directory here, nor a Hugging Face hub id; give a model directory "
                "or an id such as mosaicml/mpt-7b"
            )
        hub[key] = source
    if hub:
        reason = _hub_unreachable()
        if reason is None:
            return
        for key, source in hub.items():
            if not _in_hub_cache(source, key):
                raise ConfigError(
                    f"{key}: {source!r} is a Hugging Face hub id, but {reason} and it is not in the local "
                    f"Hugging Face cache; {_HUB_FIX[key]}"
                )
    # Everything is local (or cached): no library may try the hub, and none retries.
    os.environ[HUB_OFFLINE_ENV] = "1"


def _hub_unreachable() -> str | None:
    """Why the hub cannot be reached from here, or None when it answers. One request, no retries."""
    if os.environ.get(HUB_OFFLINE_ENV, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return f"{HUB_OFFLINE_ENV} is set"
    endpoint = os.environ.get(HUB_ENDPOINT_ENV, "https://huggingface.co")
    try:
        # urllib honours HTTPS_PROXY/NO_PROXY, as the hub client does.
        with urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=HUB_PROBE_TIMEOUT_S):
            return None
    except urllib.error.HTTPError:
        return None  # any HTTP answer means the hub is reachable
    except (urllib.error.URLError, HTTPException, OSError, ValueError) as exc:
        detail = getattr(exc, "reason", None) or exc
        return f"this job cannot reach the hub at {endpoint} ({detail})"


def _in_hub_cache(repo_id: str, key: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    filename = "config.json" if key == MODEL_KEY else "tokenizer_config.json"
    return isinstance(try_to_load_from_cache(repo_id, filename), str)


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
