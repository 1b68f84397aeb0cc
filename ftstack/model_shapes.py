"""The shape of a causal LM, as the memory estimate needs it, without torch or transformers.

A shape comes from a built-in table of a few known models (``mpt-7b``, ...) or from a model's
``config.json``. Hub ids outside the table cannot be looked up here (no network, and the staging
Lambda must not download models): the error says to give the config.json instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

GATED_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2")
"""Model types whose MLP is gated (SwiGLU/GeGLU: gate, up and down projections)."""


class ModelShapeError(ValueError):
    """A model that cannot be turned into a shape: unknown name, unreadable or incomplete config."""


@dataclass(frozen=True)
class ModelShape:
    """The sizes that set a decoder-only transformer's training memory."""

    name: str
    """What the user called it (table key or config path)."""
    model_type: str
    """``config.json``'s model_type; decides the attention path and the loss the job takes."""
    d_model: int
    """Hidden size."""
    n_layers: int
    """Transformer blocks."""
    n_heads: int
    """Query heads."""
    n_kv_heads: int
    """Key/value heads (fewer than n_heads with grouped-query attention)."""
    ffn_hidden: int
    """Width of the MLP's inner layer."""
    vocab_size: int
    """Rows of the token embedding (and of the output layer)."""
    tied_embeddings: bool
    """Whether the output layer shares the embedding's weights."""
    gated_mlp: bool
    """Three MLP matrices (gate, up, down) instead of two."""
    attn_dropout: float = 0.0
    """Attention dropout; FlexAttention is not used when it is non-zero (as in the job)."""

    @property
    def head_dim(self) -> int:
        """Width of one attention head."""
        return self.d_model // self.n_heads

    @property
    def block_params(self) -> int:
        """Parameters of one block: q, k, v and output projections, the MLP, two norm weights
        (biases left out: MPT has none, Llama-likes none, others a negligible d-sized few)."""
        kv = self.n_kv_heads * self.head_dim
        attention = self.d_model * (2 * self.d_model + 2 * kv)
        mlp = (3 if self.gated_mlp else 2) * self.d_model * self.ffn_hidden
        return attention + mlp + 2 * self.d_model

    @property
    def root_params(self) -> int:
        """Parameters outside the blocks: embedding, final norm, untied output layer."""
        embed = self.vocab_size * self.d_model
        return embed * (1 if self.tied_embeddings else 2) + self.d_model

    @property
    def n_params(self) -> int:
        """All parameters."""
        return self.n_layers * self.block_params + self.root_params


KNOWN_MODELS: dict[str, ModelShape] = {
    # From the models' published config.json files (from memory; no network here).
    "mpt-7b": ModelShape("mpt-7b", "mpt", 4096, 32, 32, 32, 4 * 4096, 50432, True, False),
    "mpt-1b": ModelShape("mpt-1b", "mpt", 2048, 24, 16, 16, 4 * 2048, 50432, True, False),
    "llama-2-7b": ModelShape("llama-2-7b", "llama", 4096, 32, 32, 32, 11008, 32000, False, True),
    "llama-3-8b": ModelShape("llama-3-8b", "llama", 4096, 32, 32, 8, 14336, 128256, False, True),
}
ALIASES = {"mosaicml/mpt-7b": "mpt-7b", "mosaicml/mpt-7b-instruct": "mpt-7b", "mosaicml/mpt-1b-redpajama-200b": "mpt-1b",
           "meta-llama/llama-2-7b-hf": "llama-2-7b", "meta-llama/meta-llama-3-8b": "llama-3-8b",
           "meta-llama/llama-3.1-8b": "llama-3-8b"}


def model_shape(spec: str) -> ModelShape:
    """The shape of ``spec``: a table name or alias (``mpt-7b``), a model directory holding
    config.json, or a config.json file. Raises ModelShapeError naming the fix otherwise."""
    key = spec.strip().lower()
    if key in KNOWN_MODELS or key in ALIASES:
        return KNOWN_MODELS[ALIASES.get(key, key)]
    path = Path(spec)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        return shape_from_config(path)
    raise ModelShapeError(
        f"--model: {spec!r} is neither a known model ({', '.join(KNOWN_MODELS)}) nor a directory or config.json file; "
        "hub ids are not looked up (no network): download the model's config.json and pass its path")


def shape_from_config(path: Path) -> ModelShape:
    """The shape that a model's config.json describes (MPT's or the Llama-like keys)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelShapeError(f"{path}: cannot read it as JSON ({exc}); give the model's config.json") from None
    return shape_from_dict(config, str(path))


def shape_from_dict(config: object, name: str) -> ModelShape:
    """The shape that a parsed config.json describes; ``name`` names it in errors and in the shape
    (a path, or the s3:// URI the staging step read it from)."""
    if not isinstance(config, dict):
        raise ModelShapeError(f"{name}: not a JSON object; give the model's config.json")
    model_type = str(config.get("model_type", ""))

    def need(*keys: str) -> int:
        for key in keys:
            value = config.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        raise ModelShapeError(f"{name}: key {keys[0]!r} is missing or not a positive integer (model_type {model_type!r}); "
                              "give a causal LM's config.json with MPT's or Llama's size keys")

    if model_type == "mpt":
        d = need("d_model")
        ratio = config.get("expansion_ratio", 4)
        attn = config.get("attn_config") or {}
        return ModelShape(name, "mpt", d, need("n_layers"), need("n_heads"), need("n_heads"), int(ratio * d),
                          need("vocab_size"), bool(config.get("tie_word_embeddings", True)), False,
                          float(attn.get("attn_pdrop") or 0.0))
    d, heads = need("hidden_size"), need("num_attention_heads")
    if d % heads:
        raise ModelShapeError(f"{name}: hidden_size {d} is not a multiple of num_attention_heads {heads}")
    gated = model_type in GATED_TYPES or config.get("hidden_act") in ("silu", "swish")
    kv = config.get("num_key_value_heads") or heads
    return ModelShape(name, model_type or "unknown", d, need("num_hidden_layers"), heads, int(kv),
                      need("intermediate_size"), need("vocab_size"), bool(config.get("tie_word_embeddings", False)), gated,
                      float(config.get("attention_dropout") or 0.0))
