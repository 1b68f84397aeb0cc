"""The model card (``README.md``) of an exported model."""

from __future__ import annotations

import json
from typing import Any

from .config import TrainConfig


def _block(text: str) -> str:
    """Text for a fenced block: the closing fence must start a line of its own."""
    return text if text.endswith("\n") else text + "\n"


def render_model_card(cfg: TrainConfig, metrics: dict[str, Any], lineage: dict[str, Any], example_prompt: str) -> str:
    """Markdown with the base model, data, results, the prompt template and how to use it."""
    final = metrics.get("final", {})
    rows = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in final.items())
    return f"""---
library_name: transformers
pipeline_tag: text-generation
base_model: {lineage.get("base_model", cfg.model)}
tags: [ftstack, fine-tuned]
---
# {cfg.run_name}

Fine-tuned from `{lineage.get("base_model", cfg.model)}` with ftstack on prompt/response data.

## Results

| metric | value |
|---|---|
{rows}

## Prompt template

Training formatted every prompt with this template (`{{question}}` is the prompt). The tokenizer's
chat template reproduces it, so `apply_chat_template` with one user message formats prompts
exactly as training did; generation stops at the EOS token.

```text
{_block(cfg.prompt_template)}```

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("path/to/model")
model = AutoModelForCausalLM.from_pretrained("path/to/model")
ids = tokenizer.apply_chat_template([{{"role": "user", "content": "your question"}}],
                                    add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=200)
print(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
```

The formatted prompt looks like this:

```text
{_block(example_prompt)}```

## Training

Lineage:

```json
{json.dumps(lineage, indent=2)}
```

Configuration:

```json
{json.dumps(cfg.to_dict(), indent=2)}
```
"""
