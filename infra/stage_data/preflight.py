"""The staging step's pre-flight memory check: the per-GPU estimate of ``ftstack estimate``
(``ftstack.estimate``) for each instance type the run may use, before any instance starts.

A run whose estimate exceeds the budget on every instance type it may fall back to fails with
``InsufficientGpuMemory``, its message itemizing the estimate per type and naming the smallest
change that fits; ``force: true`` in the execution input starts it anyway. A run that fits on some
of its types keeps all of them, in order: the estimate keeps a safety margin, and the user chose
the first type, so the check stops only the runs that no type can hold. Where no estimate can be
made (a hub model outside the estimator's table, an instance type outside ftstack's table, a
config.json the estimator cannot read), the run goes on and the output says why.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from ftstack.estimate import (
    SAFETY_FRACTION, Estimate, Setup, check_attn_impl, estimate_memory, largest_micro_batch, smallest_changes,
)
from ftstack.instances import INSTANCE_TYPES
from ftstack.model_shapes import ALIASES, KNOWN_MODELS, ModelShape, ModelShapeError, shape_from_dict
from ftstack_train.config import MICRO_BATCH_KEY, batch_split

from .request import InvalidInput, Request, Settings, _uri

GIB = 2**30
MAX_CONFIG_BYTES = 1 << 20
"""A config.json is a few KB; more is not read (the function's memory is small)."""
_CLI_TO_INPUT = (("--activation-checkpointing", "hyperparameters fsdp_config.activation_checkpointing=true"),
                 ("--instance-count ", "instance_count "), ("--instance-type ", "instance_type "),
                 ("with fsdp_config.", "with hyperparameters fsdp_config."))
"""``smallest_changes`` words its changes for ``ftstack estimate``; here they name execution input keys."""


class InsufficientGpuMemory(Exception):
    """The run's estimated per-GPU memory exceeds the budget on every instance type it may use;
    the message itemizes the estimate and names the smallest change that fits, and ``force``."""


def base_model_shape(s3: Any, bucket: str, request: Request) -> tuple[ModelShape | None, str]:
    """(the base model's shape, "") or (None, why there is none). A hub id is looked up in the
    estimator's table (no network here); an s3:// model's config.json is read from the bucket."""
    if request.base_model_key is None:
        key = request.base_model.strip().lower()
        shape = KNOWN_MODELS.get(ALIASES.get(key, key))
        if shape is None:
            return None, (f"{request.base_model} is not in the estimator's table ({', '.join(KNOWN_MODELS)}); copy it to "
                          "the bucket with `ftstack stage-model` to have its config.json read, or check it with "
                          "`ftstack estimate --model config.json`")
        return shape, ""
    uri = _uri(bucket, request.base_model_key + "config.json")
    body = s3.get_object(Bucket=bucket, Key=request.base_model_key + "config.json")["Body"]
    try:
        data = body.read(MAX_CONFIG_BYTES + 1)
    finally:
        body.close()
    if len(data) > MAX_CONFIG_BYTES:
        return None, f"{uri} is over {MAX_CONFIG_BYTES:,} bytes, larger than any model config"
    try:
        return shape_from_dict(json.loads(data), uri), ""
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return None, f"{uri} is not JSON ({exc})"
    except (ModelShapeError, TypeError, ValueError, AttributeError) as exc:  # a config of a form the estimator does not know
        return None, f"the estimator cannot read {uri}: {exc}"


def check_memory(request: Request, settings: Settings, shape: ModelShape | None, why_none: str = "") -> dict[str, Any]:
    """The estimate per instance type, for the staging output; raises InsufficientGpuMemory when
    the run fits none of them (and none is unknown), unless the input says ``force``."""
    if shape is None:
        return {"estimated": False, "note": f"no memory estimate: {why_none}"}
    cfg = request.config
    try:
        check_attn_impl(shape, cfg.attn_impl)
    except ValueError as exc:
        raise InvalidInput(f"hyperparameters.attn_impl: {str(exc).removeprefix('--attn-impl: ')}") from None
    estimates: dict[str, Estimate] = {}
    for name in request.instance_types:
        instance = INSTANCE_TYPES.get(name)
        if instance is not None:  # batch_split already passed for it (request._check_batches)
            micro, _ = batch_split(cfg, instance.gpus * request.instance_count, "cuda")
            estimates[name] = estimate_memory(Setup(
                shape, instance, cfg.max_seq_len, micro, cfg.activation_checkpointing, cfg.attn_impl, request.instance_count,
                cfg.sharding, 4 if cfg.precision == "fp32" else 2))
    unknown = [name for name in request.instance_types if name not in estimates]
    micro_batch = sized_micro_batch(request, estimates) if not unknown else None
    if micro_batch:
        estimates = {name: estimate_memory(replace(e.setup, micro_batch=micro_batch)) for name, e in estimates.items()}
    report = {
        "estimated": True, "model": shape.name, "forced": request.force, "not_estimated": unknown,
        "micro_batch": micro_batch,
        "instance_types": {name: {"peak_gib": round(e.peak / GIB, 1), "budget_gib": round(e.budget / GIB, 1), "fits": e.fits,
                                  "attn_path": e.setup.attn_path} for name, e in estimates.items()},
    }
    if estimates and not unknown and not any(e.fits for e in estimates.values()) and not request.force:
        raise InsufficientGpuMemory(_message(request, settings, list(estimates.values())))
    return report


def sized_micro_batch(request: Request, estimates: dict[str, Estimate]) -> int | None:
    """What ``device_train_microbatch_size: auto`` becomes in the workflow: the largest micro
    batch that divides every instance type's rows per GPU (the job's ``batch_split``) and fits on
    each type where any fits. None when the run names its micro batch, or when none is known to
    fit (the job's own default then applies)."""
    cfg = request.config
    if cfg.device_train_microbatch_size is not None or not estimates:
        return None
    rows = [cfg.global_train_batch_size // (e.setup.instance.gpus * request.instance_count) for e in estimates.values()]
    # Memory grows with the micro batch: a size fits every type that holds any iff it is at most
    # the smallest of their largest.
    largest = [n for n in (largest_micro_batch(e.setup, most=min(rows)) for e in estimates.values()) if n]
    return max((m for m in range(1, min(largest) + 1) if all(r % m == 0 for r in rows)), default=None) if largest else None


def staged_hyperparameters(request: Request, report: dict[str, Any]) -> dict[str, str]:
    """The hyperparameters the job gets: the request's, with its ``auto`` micro batch replaced by
    the sized one. The key is the run's own and a number of rows is no longer than ``auto``, so
    SageMaker's count and the workflow's size limits checked on the request still hold."""
    micro_batch = report.get("micro_batch")
    return request.hyperparameters | ({MICRO_BATCH_KEY: str(micro_batch)} if micro_batch else {})


def _message(request: Request, settings: Settings, estimates: list[Estimate]) -> str:
    cfg, shape = request.config, estimates[0].setup.shape
    lines = [f"base_model {request.base_model} ({shape.model_type}, {shape.n_params / 1e9:.1f}B parameters) at max_seq_len "
             f"{cfg.max_seq_len}, activation checkpointing {'on' if cfg.activation_checkpointing else 'off'}, attn_impl "
             f"{cfg.attn_impl}, {request.instance_count} instance(s): the estimated per-GPU peak exceeds the budget "
             f"({SAFETY_FRACTION:.0%} of GPU memory) on every instance type this run may use, so no instance was started."]
    for e in estimates:
        t = e.setup.instance
        lines.append(f"{t.name} ({t.gpus} x {t.gpu.name}, {t.gpu_bytes / GIB:.1f} GiB each; micro batch {e.setup.micro_batch}, "
                     f"attention {e.setup.attn_path}, states sharded over {e.shard} GPUs): peak {e.peak / GIB:.1f} GiB > "
                     f"budget {e.budget / GIB:.1f} GiB")
        lines += [f"  {item}: {size / GIB:.2f} GiB" for item, size in e.items.items()]
        lines.append(f"  optimizer step peak: {e.optimizer_peak / GIB:.2f} GiB")
    allowed = {name: INSTANCE_TYPES[name] for name in settings.allowed_instance_types if name in INSTANCE_TYPES}
    changes = smallest_changes(estimates[0].setup, allowed, max_nodes=settings.max_instance_count,
                               global_batch=request.config.global_train_batch_size)
    if changes:
        text, fitted = changes[0]
        for cli, key in _CLI_TO_INPUT:
            text = text.replace(cli, key)
        lines.append(f"Smallest change that fits: {text} (peak {fitted.peak / GIB:.1f} GiB of {fitted.budget / GIB:.1f}).")
    else:
        lines.append("No change within this deployment's instance types and max_instance_count fits; use a smaller "
                     "max_seq_len or model.")
    lines.append('To start it anyway (the estimate keeps a safety margin), give "force": true in the execution input '
                 "(ftstack start --force).")
    return "\n".join(lines)
