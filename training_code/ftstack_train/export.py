"""Hugging Face export of the trained (sharded) model, written straight into the job's model
folder, which SageMaker uploads uncompressed.

Weights are gathered one tensor at a time and written in safetensors shards of at most
``export.max_shard_size``, each tensor streamed into its shard file as soon as it is gathered:
rank 0's host holds one full tensor and its cast copy at a time, whatever the shard size (with
``safetensors.save_file`` it held a whole shard, which is the whole bf16 model when that is under
``max_shard_size``). Everything is written to a staging folder first and moved
into place at the end, so a failed export leaves no half-written model behind. Only an earlier
export of ftstack is replaced; a model folder holding anything else is refused before the weights
are gathered (see ``export_folder``).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from .config import TEMPLATE_FIELD, TrainConfig
from .contract import FINAL_METRICS_FILE, MANIFEST_SHA256, METRICS_FILE
from .errors import ConfigError
from .export_folder import STAGING, check_model_dir, claim_staging, replace_export
from .manifest import write_manifest
from .metrics import json_safe
from .data import format_prompt
from .modelcard import render_model_card

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def chat_template(prompt_template: str, bos_token: str | None) -> str:
    """A Jinja chat template that renders a user message exactly as training formatted prompts
    (and an assistant message as the response plus EOS), so inference matches training."""
    # ensure_ascii=False: Jinja decodes a \ud83e\udd16 escape pair as two lone surrogates.
    prefix, suffix = (json.dumps(part, ensure_ascii=False) for part in prompt_template.split(TEMPLATE_FIELD, 1))
    bos = "{{ bos_token }}" if bos_token else ""
    return (
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'user' -%}" + bos + "{{ " + prefix + " }}{{ message['content'] }}{{ " + suffix + " }}"
        "{%- elif message['role'] == 'assistant' -%}{{ message['content'] }}{{ eos_token }}"
        "{%- else -%}{{ raise_exception('only user and assistant messages are supported') }}"
        "{%- endif -%}"
        "{%- endfor -%}"
    )


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS token in front when encoding with special tokens."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return tokenizer.bos_token_id is not None and bool(ids) and ids[0] == tokenizer.bos_token_id


def _unique_state_names(model: torch.nn.Module) -> list[str]:
    """State dict keys with tied duplicates removed (``lm_head.weight`` when tied to the
    embedding): transformers re-ties them on load."""
    seen: set[int] = set()
    names = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        names.append(name)
    return names


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL",
}
TensorSpec = tuple[str, torch.Size, torch.dtype]
"""A tensor's name, shape and dtype as written: all a safetensors header needs."""


def write_safetensors(path: Path, specs: Sequence[TensorSpec], tensors: Iterable[torch.Tensor]) -> None:
    """Writes a safetensors file (metadata ``format: pt``) holding ``tensors``, whose names, shapes
    and dtypes ``specs`` gives in advance, in the same order. The header comes first, from the
    specs, so each tensor is written and dropped as it arrives: ``save_file`` needs all of them in
    memory at once."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in specs:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format allows trailing spaces; 8-byte alignment, as safetensors writes
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        # next() rather than zip: zip's reused result tuple would keep each tensor alive while
        # the next one is gathered.
        items = iter(tensors)
        for name, shape, dtype in specs:
            tensor = next(items, None)
            if tensor is None or tensor.shape != shape or tensor.dtype != dtype:
                got = "nothing" if tensor is None else f"{tuple(tensor.shape)} {tensor.dtype}"
                raise ValueError(f"{name}: got {got}, the header says {tuple(shape)} {dtype}")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor  # before the next one is gathered


def _plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Groups the tensors, in order, into shards of at most ``max_shard_bytes`` (a larger tensor
    gets a shard of its own)."""
    shards: list[list[TensorSpec]] = []
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * spec[2].itemsize
        if not shards or (shards[-1] and size + nbytes > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def _write_weights(model: torch.nn.Module, out: Path, dtype: torch.dtype, max_shard_bytes: int, is_main: bool) -> None:
    """Gathers each tensor (a collective: every rank calls this) and rank 0 streams it into its
    shard file."""
    state = model.state_dict()
    specs = [(n, state[n].shape, dtype if state[n].is_floating_point() else state[n].dtype) for n in _unique_state_names(model)]
    shards = _plan_shards(specs, max_shard_bytes)

    def gathered(shard: list[TensorSpec]):
        for name, _, target in shard:
            # Cast before the gather: a rounding of each element, so the same bytes as casting
            # after it, with half the traffic and no full-precision copy of the whole tensor.
            tensor = state[name].detach().to(dtype=target)
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            del tensor
            if is_main:
                cast = full.to(device="cpu").contiguous()
                del full
                yield cast
                del cast  # written: gone before the next tensor is gathered

    files = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    if len(shards) == 1:
        files = ["model.safetensors"]
    for file, shard in zip(files, shards):
        if is_main:
            write_safetensors(out / file, shard, gathered(shard))
        else:
            for _ in gathered(shard):  # the same collectives, in the same order; yields nothing here
                pass
    if not is_main or len(files) == 1:
        return
    total = sum((out / f).stat().st_size for f in files)
    weight_map = {name: file for file, shard in zip(files, shards) for name, _, _ in shard}
    index_doc = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_doc, indent=2))


def _claim_model_dir(model_dir: Path, staging: Path, is_main: bool) -> list[str]:
    """Rank 0 checks the model folder and makes its staging folder; every rank learns the outcome,
    so that a refusal stops all of them here rather than leaving the others in a collective."""
    outcome: list = [None, []]
    if is_main:
        try:
            outcome[1] = check_model_dir(model_dir)
            claim_staging(staging)
        except ConfigError as exc:
            outcome[0] = str(exc)
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise ConfigError(outcome[0])
    return outcome[1]


def export_hf_model(model: torch.nn.Module, tokenizer, cfg: TrainConfig, model_dir: Path, metrics: dict[str, Any], lineage: dict[str, Any]) -> None:
    """Writes weights, config, generation config, tokenizer with the chat template,
    ``metrics.json`` and a model card into ``model_dir``, in place of an earlier export there.
    Collective: every rank calls it. Raises ConfigError, on every rank, when ``model_dir`` holds
    files that no export wrote."""
    is_main = dist.get_rank() == 0
    staging = model_dir / STAGING
    previous = _claim_model_dir(model_dir, staging, is_main)
    dtype = _DTYPES[cfg.export_dtype]
    try:
        _write_weights(model, staging, dtype, cfg.export_shard_bytes, is_main)
        if is_main:
            _write_metadata(model, tokenizer, cfg, staging, dtype, metrics, lineage)
            replace_export(model_dir, staging, previous)
    finally:
        if is_main and staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()


REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")
"""Keys that send a ``trust_remote_code=True`` loader to Python files of the base model's hub
repository (mosaicml/mpt-7b's ``auto_map`` names ``modeling_mpt.MPTForCausalLM``). The export
holds no such files: training ran transformers' native class, so the export names only that."""


def native_architecture(config) -> str:
    """The name of the transformers class that ``AutoModelForCausalLM`` builds for ``config``
    (``MptForCausalLM`` for MPT), which is the class that trained; the live model's own class name
    will not do, FSDP2 wraps it in a generated subclass."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__name__


def _drop_remote_code(path: Path, architecture: str | None = None) -> None:
    """Rewrites a saved config file without the remote-code keys (and, for config.json, with the
    native architecture), so that native transformers, ``trust_remote_code=True`` loaders and
    vLLM all load the folder. vLLM looks ``architectures`` up in its registry
    (vllm/model_executor/models/registry.py), which maps transformers' ``MptForCausalLM`` and the
    hub's ``MPTForCausalLM`` alike to its own MPT."""
    if not path.is_file():
        return  # a tokenizer class that keeps no tokenizer_config.json has no auto_map to drop
    doc = json.loads(path.read_text(encoding="utf-8"))
    for key in REMOTE_CODE_KEYS:
        doc.pop(key, None)
    if architecture is not None:
        doc["architectures"] = [architecture]
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_metadata(model, tokenizer, cfg: TrainConfig, out: Path, dtype: torch.dtype, metrics: dict[str, Any], lineage: dict[str, Any]) -> None:
    config = model.config
    config.use_cache = True
    config.dtype = dtype
    config.save_pretrained(out)
    _drop_remote_code(out / "config.json", native_architecture(config))
    generation = model.generation_config
    generation.eos_token_id = tokenizer.eos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(out)
    tokenizer.chat_template = chat_template(cfg.prompt_template, tokenizer.bos_token if adds_bos(tokenizer) else None)
    tokenizer.save_pretrained(out)
    _drop_remote_code(out / "tokenizer_config.json")
    (out / METRICS_FILE).write_text(json.dumps(json_safe(metrics), indent=2, allow_nan=False))
    example = format_prompt(cfg.prompt_template, "<your question>")
    (out / "README.md").write_text(render_model_card(cfg, metrics, lineage, example, chat_template=tokenizer.chat_template))
    # Last: the manifest lists every file above, and the final figures carry its digest, which the
    # workflow registers with the package.
    final = json_safe(metrics.get("final", {})) | {MANIFEST_SHA256: write_manifest(out)}
    (out / FINAL_METRICS_FILE).write_text(json.dumps(final, allow_nan=False))
