"""The training configuration: one typed, frozen object, parsed once at the edge.

Keys are llm-foundry's where they mean the same thing here (so the tutorial's YAML works as is),
dotted for nested keys (``optimizer.lr``). Sources, later ones winning: the defaults below, a YAML
file, SageMaker hyperparameters (all strings) and ``key=value`` overrides. ``${name}`` in a value
refers to a top-level key. Keys that mean nothing here are reported in one warning; unknown keys
are an error that suggests the closest known key.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .durations import Duration
from .errors import ConfigError

from .references import Budget, Value, resolve
from .sources import coerce, parse_overrides, read_yaml, unquote

DEFAULT_PROMPT_TEMPLATE = (
    "Write a response that appropriately answers the question below.\n"
    "### Question:\n{question}\n\n### Response:\n"
)
"""The tutorial's template; ``{question}`` is replaced by each record's prompt."""

TEMPLATE_FIELD = "{question}"

MODEL_KEY = "model.pretrained_model_name_or_path"
"""The key that names the base model; ``ftstack local --model`` and the workflow's ``base_model``
set it."""

MIN_CHECKPOINTS_KEPT = 2
"""SageMaker uploads the checkpoint folder in the background and mirrors deletions to S3: with one
kept, the only complete checkpoint would be deleted while its successor is still uploading."""

TOKENIZER_KEY = "tokenizer.name"
"""The key that names the tokenizer; equal to the base model's id, it follows the model (see job.tokenizer_source)."""


SHARDING_STRATEGIES = ("auto", "FULL_SHARD", "HYBRID_SHARD")
ATTN_IMPLS = ("auto", "eager", "sdpa", "flex")


MICRO_BATCH_KEY = "device_train_microbatch_size"
"""The micro batch's key; the workflow's staging step replaces its ``auto`` with a size."""


def _key(key: str, doc: str, **kwargs: Any) -> Any:
    return field(metadata={"key": key, "doc": doc}, **kwargs)


@dataclass(frozen=True)
class TrainConfig:
    """Every option of a fine-tuning run. The user-facing name of each field is its ``key``."""

    model: str = _key(
        MODEL_KEY,
        "Base model: a local directory, a Hugging Face hub id (needs network access), or "
        "`tiny-mpt` / `tiny-llama` for a small random model. A `model` channel overrides it.",
        default="mosaicml/mpt-7b",
    )
    pretrained: bool = _key(
        "model.pretrained", "Load the base model's weights; false starts from random weights.", default=True
    )
    tokenizer: str | None = _key(
        TOKENIZER_KEY,
        "Tokenizer directory or hub id; empty, or the same as the base model's id, means the base "
        "model's own tokenizer, from wherever the model is loaded (a `model` channel, `--model`).",
        default=None,
    )
    run_name: str = _key("run_name", "Name shown in logs and in the model card.", default="ftstack")
    seed: int = _key("global_seed", "Seed for initialisation, shuffling and dropout.", default=17)
    max_seq_len: int = _key("max_seq_len", "Tokens per training row.", default=512)
    prompt_template: str = _key(
        "prompt_template",
        "Text put around each prompt; must contain `{question}` once. Saved with the model as its "
        "chat template.",
        default=DEFAULT_PROMPT_TEMPLATE,
    )
    packing: bool = _key(
        "packing",
        "Pack several examples into each row (each attends only to itself); false pads one example per row.",
        default=True,
    )
    shuffle: bool = _key("train_loader.dataset.shuffle", "Shuffle the training rows every epoch.", default=True)
    max_dropped_fraction: float = _key(
        "max_dropped_fraction",
        "Fail when more than this share of examples has no response token left after truncation.",
        default=0.05,
    )
    max_duration: Duration = _key(
        "max_duration", "Length of the run: epochs (`3ep`) or optimizer steps (`500ba`).", default=Duration(3, "ep")
    )
    eval_interval: Duration = _key(
        "eval_interval", "Evaluate every `Nba` steps or `Nep` epochs, and always at the end.", default=Duration(1, "ep")
    )
    eval_first: bool = _key("eval_first", "Evaluate before the first step (the baseline).", default=True)
    eval_subset_num_batches: int = _key(
        "eval_subset_num_batches", "Evaluate on at most this many batches per rank; -1 means all.", default=-1
    )
    global_train_batch_size: int = _key(
        "global_train_batch_size",
        "Rows per optimizer step over all GPUs: micro batch x accumulation x world size.",
        default=128,
    )
    device_train_microbatch_size: int | None = _key(
        MICRO_BATCH_KEY,
        "Rows per forward/backward on one device; `auto` takes the whole per-device batch "
        "(no accumulation) on CPU; on GPU, in the workflow, the largest that the staging step's memory "
        "estimate fits on every instance type the run may use (4 rows where there is no estimate).",
        default=4,
    )
    device_eval_batch_size: int = _key("device_eval_batch_size", "Rows per evaluation batch on one device.", default=8)
    optimizer: str = _key("optimizer.name", "`decoupled_adamw` or `adamw` (both run torch AdamW).", default="decoupled_adamw")
    lr: float = _key("optimizer.lr", "Peak learning rate.", default=5e-6)
    betas: tuple[float, float] = _key("optimizer.betas", "AdamW betas (the tutorial's by default).", default=(0.9, 0.999))
    eps: float = _key("optimizer.eps", "AdamW epsilon.", default=1e-8)
    weight_decay: float = _key("optimizer.weight_decay", "AdamW decoupled weight decay.", default=0.0)
    scheduler: str = _key(
        "scheduler.name",
        "`linear_decay_with_warmup`, `cosine_with_warmup` or `constant_with_warmup`.",
        default="linear_decay_with_warmup",
    )
    warmup: Duration = _key("scheduler.t_warmup", "Linear warm-up from 0 (`50ba`, `0.1dur`, `1ep`).", default=Duration(50, "ba"))
    alpha_f: float = _key("scheduler.alpha_f", "Final learning rate as a share of the peak.", default=0.0)
    clipping_type: str = _key("algorithms.gradient_clipping.clipping_type", "Only `norm` is supported.", default="norm")
    max_grad_norm: float = _key(
        "algorithms.gradient_clipping.clipping_threshold", "Clip the global gradient norm to this; 0 turns it off.", default=1.0
    )
    precision: str = _key(
        "precision", "`amp_bf16`/`bf16`: bf16 compute with fp32 master weights and reductions (GPU); `fp32`. CPU always runs fp32.",
        default="amp_bf16",
    )
    activation_checkpointing: bool = _key(
        "fsdp_config.activation_checkpointing", "Recompute activations in the backward pass to save memory.", default=True
    )
    sharding: str = _key(
        "fsdp_config.sharding_strategy",
        "`auto`: `HYBRID_SHARD` when the job has more than one node (shard within a node, replicate "
        "across nodes), else `FULL_SHARD`; or either of them by name.",
        default="auto",
    )
    attn_impl: str = _key(
        "attn_impl",
        "Attention over packed rows: `auto` (the fastest exact path for the device: `flex` on GPU, "
        "`sdpa` on CPU), `flex` (FlexAttention with a block mask from the examples), `sdpa` (one "
        "fused call per example: cost follows the examples' lengths), or `eager` (the model's own, "
        "with a full row-by-row mask).",
        default="auto",
    )
    save_folder: str | None = _key(
        "save_folder",
        "Checkpoint directory, relative to the SageMaker checkpoint directory (synced to S3, survives "
        "interruptions); empty means that directory itself.",
        default=None,
    )
    save_interval: Duration = _key(
        "save_interval", "Checkpoint every `Nba` steps (and always at each epoch end and at the end).", default=Duration(100, "ba")
    )
    save_num_checkpoints_to_keep: int = _key(
        "save_num_checkpoints_to_keep",
        "Complete checkpoints kept (at least 2: SageMaker is still uploading the newest); older ones are deleted.",
        default=2,
    )
    console_log_interval: Duration = _key("console_log_interval", "Print a training metrics line every `Nba` steps.", default=Duration(1, "ba"))
    dist_timeout: float = _key("dist_timeout", "Seconds a collective may wait before the run fails.", default=1800.0)
    export_dtype: str = _key("export.dtype", "Weights dtype of the exported model: bf16, fp16 or fp32.", default="bf16")
    export_max_shard_size: str = _key(
        "export.max_shard_size", "Largest safetensors file of the export, e.g. 5GB or 500MB.", default="5GB"
    )

    def __post_init__(self) -> None:
        _check(self)

    @property
    def own_tokenizer(self) -> bool:
        """Whether the tokenizer comes with the base model, from wherever that is loaded: no
        ``tokenizer.name``, or one equal to the model id (as in the tutorial's YAML)."""
        return self.tokenizer is None or self.tokenizer == self.model

    @property
    def export_shard_bytes(self) -> int:
        """``export_max_shard_size`` in bytes."""
        return parse_size(self.export_max_shard_size)

    def to_dict(self) -> dict[str, Any]:
        """The effective configuration under its user-facing keys, as JSON-friendly values."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.metadata["key"]] = str(value) if isinstance(value, Duration) else list(value) if isinstance(value, tuple) else value
        return out


FIELDS: dict[str, dataclasses.Field] = {f.metadata["key"]: f for f in dataclasses.fields(TrainConfig)}
"""Every accepted key, by its user-facing name; also the hyperparameter names of the job."""

ALIASES = {"seed": "global_seed"}

IGNORED_PREFIXES = (
    "model.name", "model.config_overrides", "model.init_device", "tokenizer.kwargs", "train_loader", "eval_loader",
    "fsdp_config", "callbacks", "loggers", "progress_bar", "log_to_console", "python_log_level",
    "max_split_size_mb", "autoresume", "save_overwrite",
)
"""llm-foundry keys that have no effect here (data comes from the channels, the other FSDP
settings follow `precision` and `fsdp_config.sharding_strategy`, logging is fixed)."""


def batch_split(cfg: TrainConfig, world_size: int, device_type: str) -> tuple[int, int]:
    """(micro batch, accumulation steps) with ``global_train_batch_size = micro batch x
    accumulation x world size``; ``auto`` micro batches take the whole per-device batch on CPU and
    at most 4 rows on GPU. Raises ConfigError naming the key and a size that divides."""
    total = cfg.global_train_batch_size
    if total % world_size:
        raise ConfigError(
            f"global_train_batch_size: {total} rows cannot be split evenly over {world_size} processes; "
            f"use a multiple of {world_size}"
        )
    per_device = total // world_size
    micro = cfg.device_train_microbatch_size
    if micro is None:
        micro = per_device if device_type == "cpu" else max(d for d in range(1, min(4, per_device) + 1) if per_device % d == 0)
    if micro > per_device or per_device % micro:
        raise ConfigError(
            f"device_train_microbatch_size: {micro} does not divide the {per_device} rows each of the {world_size} "
            f"processes gets per step (global_train_batch_size {total} / {world_size}); use a divisor of {per_device}"
        )
    return micro, per_device // micro


def parse_size(text: str) -> int:
    """Parses ``5GB``, ``500MB``, ``1.5GiB`` or a byte count."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]i?B|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"{text!r} is not a size; write e.g. 5GB or 500MB")
    unit = (match.group(2) or "B").upper()
    powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(float(match.group(1)) * powers[unit])


def _check(cfg: TrainConfig) -> None:
    def fail(key: str, message: str) -> None:
        raise ConfigError(f"{key}: {message}")

    if cfg.max_seq_len < 8:
        fail("max_seq_len", f"{cfg.max_seq_len} is too small; use at least 8 (the tutorial uses 512)")
    if cfg.prompt_template.count(TEMPLATE_FIELD) != 1:
        fail("prompt_template", f"must contain {TEMPLATE_FIELD} exactly once, where each record's prompt goes")
    if not 0.0 <= cfg.max_dropped_fraction <= 1.0:
        fail("max_dropped_fraction", "must be between 0 and 1, e.g. 0.05")
    if cfg.max_duration.unit == "dur" or cfg.max_duration.value <= 0:
        fail("max_duration", f"{cfg.max_duration} is not a run length; use e.g. 3ep or 500ba")
    if cfg.eval_interval.unit == "dur" or cfg.eval_interval.value <= 0:
        fail("eval_interval", f"{cfg.eval_interval}: use e.g. 1ep or 100ba")
    if cfg.save_interval.unit == "dur" or cfg.save_interval.value <= 0:
        fail("save_interval", f"{cfg.save_interval}: use e.g. 100ba or 1ep")
    if cfg.console_log_interval.unit != "ba" or cfg.console_log_interval.value < 1:
        fail("console_log_interval", f"{cfg.console_log_interval}: use a number of steps, e.g. 1ba or 10ba")
    for key, value in (("global_train_batch_size", cfg.global_train_batch_size), ("device_eval_batch_size", cfg.device_eval_batch_size)):
        if value < 1:
            fail(key, f"{value} must be a positive whole number")
    if cfg.device_train_microbatch_size is not None and cfg.device_train_microbatch_size < 1:
        fail("device_train_microbatch_size", "must be a positive whole number or auto")
    if cfg.eval_subset_num_batches == 0 or cfg.eval_subset_num_batches < -1:
        fail("eval_subset_num_batches", "must be -1 (all) or a positive number of batches")
    if cfg.optimizer not in ("decoupled_adamw", "adamw"):
        fail("optimizer.name", f"{cfg.optimizer!r} is not supported; use decoupled_adamw or adamw")
    if cfg.lr <= 0:
        fail("optimizer.lr", "must be positive, e.g. 5e-6")
    if len(cfg.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.betas):
        fail("optimizer.betas", "must be two numbers in [0, 1), e.g. [0.9, 0.95]")
    if cfg.eps <= 0 or cfg.weight_decay < 0:
        fail("optimizer.eps" if cfg.eps <= 0 else "optimizer.weight_decay", "must be positive (weight decay may be 0)")
    if cfg.scheduler not in ("linear_decay_with_warmup", "cosine_with_warmup", "constant_with_warmup"):
        fail("scheduler.name", f"{cfg.scheduler!r}: use linear_decay_with_warmup, cosine_with_warmup or constant_with_warmup")
    if cfg.warmup.value < 0:
        fail("scheduler.t_warmup", "must not be negative")
    if not 0.0 <= cfg.alpha_f <= 1.0:
        fail("scheduler.alpha_f", "must be between 0 and 1")
    if cfg.clipping_type != "norm":
        fail("algorithms.gradient_clipping.clipping_type", f"{cfg.clipping_type!r} is not supported; use norm")
    if cfg.max_grad_norm < 0:
        fail("algorithms.gradient_clipping.clipping_threshold", "must be positive, or 0 to turn clipping off")
    if cfg.precision not in ("amp_bf16", "bf16", "fp32"):
        fail("precision", f"{cfg.precision!r} is not supported; use amp_bf16 (or bf16) or fp32")
    if cfg.sharding not in SHARDING_STRATEGIES:
        fail("fsdp_config.sharding_strategy", f"{cfg.sharding!r} is not supported; use {', '.join(SHARDING_STRATEGIES)}")
    if cfg.attn_impl not in ATTN_IMPLS:
        fail("attn_impl", f"{cfg.attn_impl!r} is not supported; use {', '.join(ATTN_IMPLS)}")
    if cfg.save_num_checkpoints_to_keep < MIN_CHECKPOINTS_KEPT:
        fail("save_num_checkpoints_to_keep", f"keep at least {MIN_CHECKPOINTS_KEPT}: with 1, the only complete checkpoint is deleted "
             "while SageMaker is still uploading the next one, and an interruption leaves nothing to resume")
    if cfg.dist_timeout <= 0:
        fail("dist_timeout", "must be a positive number of seconds")
    if cfg.export_dtype not in ("bf16", "fp16", "fp32"):
        fail("export.dtype", f"{cfg.export_dtype!r}: use bf16, fp16 or fp32")
    try:
        shard_bytes = parse_size(cfg.export_max_shard_size)
    except ValueError as exc:
        fail("export.max_shard_size", str(exc))
    if shard_bytes < 1:
        fail("export.max_shard_size", "must be positive, e.g. 5GB")


def parse_config(
    yaml_path: str | None = None,
    hyperparameters: Mapping[str, str] | None = None,
    overrides: Iterable[str] = (),
) -> tuple[TrainConfig, list[str]]:
    """Builds the config from its sources; returns it with the warnings to print (ignored keys).

    Raises ConfigError naming the key, its source and the fix.
    """
    values: dict[str, Value] = {}
    if yaml_path:
        values.update({k: Value(v, yaml_path) for k, v in read_yaml(yaml_path).items()})
    for key, text in (hyperparameters or {}).items():
        if key.startswith("sagemaker_"):
            continue  # the SageMaker Python SDK's own bookkeeping, not ours
        values[key] = Value(unquote(text), "hyperparameter")
    values.update({key: Value(text, "override") for key, text in parse_overrides(overrides).items()})
    return _build(values)


def _default(name: str) -> Any:
    """What ``${name}`` stands for when ``name`` is not set: the field's default, if it has one."""
    if name not in FIELDS:
        raise KeyError(name)
    default = FIELDS[name].default
    return str(default) if isinstance(default, Duration) else default


def _expand(values: dict[str, Value], key: str, budget: Budget) -> Any:
    return resolve(values, key, budget, aliases=ALIASES, default=_default)


def _build(values: dict[str, Value]) -> tuple[TrainConfig, list[str]]:
    budget = Budget()  # one for the whole config: every reference it expands counts
    for alias, key in ALIASES.items():
        if alias in values:
            aliased = values.pop(alias)
            # Resolved before it stands in for `key`, so that `seed: ${global_seed}` is no self-reference.
            aliased = Value(_expand({**values, alias: aliased}, alias, budget), aliased.origin)
            if key in values:
                annotation = FIELDS[key].type
                ours = coerce(key, annotation, _expand(values, key, budget), values[key].origin)
                if ours != coerce(alias, annotation, aliased.value, aliased.origin):
                    raise ConfigError(f"{alias} ({aliased.origin}) and {key} disagree; set only {key}")
            values.setdefault(key, aliased)
    ignored = sorted(k for k in values if k not in FIELDS and k.startswith(IGNORED_PREFIXES))
    unknown = sorted(k for k in values if k not in FIELDS and k not in ignored)
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(key, FIELDS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "see the training configuration reference in the README"
        raise ConfigError(f"{key} ({values[key].origin}): unknown key; {hint}")
    kwargs = {}
    for key, f in FIELDS.items():
        if key in values:
            kwargs[f.name] = coerce(key, f.type, _expand(values, key, budget), values[key].origin)
    warnings = []
    if ignored:
        warnings.append("these keys have no effect in ftstack and were ignored: " + ", ".join(ignored))
    try:
        return TrainConfig(**kwargs), warnings
    except ConfigError as exc:
        origin = next((v.origin for k, v in values.items() if str(exc).startswith(k + ":")), None)
        raise ConfigError(f"{exc} (from {origin})" if origin else str(exc)) from None


def reference_table() -> str:
    """The configuration reference as a Markdown table (the README embeds it; a test keeps the
    two equal)."""
    lines = ["| key | default | meaning |", "|---|---|---|"]
    for key, f in FIELDS.items():
        default = f.default
        shown = "(empty)" if default is None else str(list(default)) if isinstance(default, tuple) else str(default)
        shown = shown.replace("\n", "\\n")
        lines.append(f"| `{key}` | `{shown}` | {f.metadata['doc']} |")
    return "\n".join(lines)
