"""Loading the base model and its tokenizer, and making the tiny random models of the demo and
the tests."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from .errors import ModelLoadError

from .contract import TINY_MODELS


def load_tokenizer(source: str):
    """The tokenizer, with an EOS token (required: it ends every response) and a pad token."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load a tokenizer from {source!r} ({_first_line(exc)}); give a directory with the "
            "tokenizer files (the `model` channel), or a hub id on a job with network access"
        ) from None
    if tokenizer.eos_token_id is None:
        raise ModelLoadError(f"the tokenizer of {source!r} has no EOS token; set eos_token in its tokenizer_config.json")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding never reaches the loss, so any id will do
    return tokenizer


def load_model(source: str, pretrained: bool, vocab_size: int, empty: bool = False):
    """The causal LM in fp32 (the master weights; FSDP casts for compute). MPT goes through
    transformers' native ``MptForCausalLM``, never remote code. ``empty`` builds it on the meta
    device, without weights or memory, for ranks that receive the weights by broadcast."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"cannot load the model config from {source!r} ({_first_line(exc)}); give a directory with "
            "config.json and the weights (the `model` channel), or a hub id on a job with network access"
        ) from None
    # MPT's native attention is eager only; the others take SDPA with our 4D mask.
    attn = "eager" if config.model_type == "mpt" else "sdpa"
    try:
        if empty:
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
        elif pretrained:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, attn_implementation=attn)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the model from {source!r} ({_first_line(exc)})") from None
    if model.get_input_embeddings().weight.shape[0] < vocab_size:
        raise ModelLoadError(
            f"the tokenizer has {vocab_size} tokens but the model's embedding only {model.get_input_embeddings().weight.shape[0]}; "
            "use the model's own tokenizer"
        )
    model.config.use_cache = False  # no KV cache while training; the export turns it back on
    return model


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def make_tiny_model(kind: str, texts: Iterable[str], out_dir: Path, seed: int, vocab_size: int = 512) -> Path:
    """Writes a small random-init model and a byte-level BPE tokenizer trained on ``texts`` to
    ``out_dir`` (atomically: a finished directory or none). Deterministic for the same inputs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, MptConfig, MptForCausalLM, PreTrainedTokenizerFast

    if kind not in TINY_MODELS:
        raise ValueError(f"unknown tiny model {kind!r}; choose one of {', '.join(TINY_MODELS)}")
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>", pad_token="<|pad|>")

    torch.manual_seed(seed)
    ids = {"vocab_size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    if kind == "tiny-mpt":
        model = MptForCausalLM(MptConfig(d_model=128, n_heads=4, n_layers=2, expansion_ratio=4, max_seq_len=2048, **ids))
    else:
        config = LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, tie_word_embeddings=False, **ids,
        )
        model = LlamaForCausalLM(config)
    staging = out_dir.with_name(out_dir.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    (staging / "ftstack-tiny.json").write_text(json.dumps({"kind": kind, "seed": seed}))
    staging.rename(out_dir)
    return out_dir
