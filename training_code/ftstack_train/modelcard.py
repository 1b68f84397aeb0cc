"""The model card (``README.md``) of an exported model."""

from __future__ import annotations

import json
from typing import Any

from .config import TrainConfig
from .contract import CHAT_TEMPLATE_FILE


def _block(text: str) -> str:
    """Text for a fenced block: the closing fence must start a line of its own."""
    return text if text.endswith("\n") else text + "\n"


SERVING_IMAGE = "the Hugging Face vLLM container"
"""What the stack registers the model with (``ftstack.infra.images.inference_image``)."""


def _serving(cfg: TrainConfig, chat_template: str | None) -> str:
    """How to serve the model: vLLM on a GPU machine, or a SageMaker endpoint through ftstack."""
    template = (f"The chat template (`{CHAT_TEMPLATE_FILE}`, which vLLM and `apply_chat_template` read):\n\n"
                f"```jinja\n{_block(chat_template)}```\n\n") if chat_template else ""
    return f"""## Serve

vLLM serves the folder as it is (transformers' native classes, no remote code) and formats chat
requests with the tokenizer's chat template, so a request reads exactly as training formatted it:

```bash
vllm serve path/to/model --dtype bfloat16 --max-model-len {cfg.max_seq_len} --chat-template path/to/model/{CHAT_TEMPLATE_FILE}
curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' \\
  -d '{{"messages": [{{"role": "user", "content": "your question"}}], "max_tokens": 200}}'
```

{template}On SageMaker, the registered model package runs in {SERVING_IMAGE} with this folder as its
uncompressed model data. Once the package is approved (`ftstack approve MODEL_PACKAGE_ARN`; with
`deploy_on_approval` on, the stack then deploys it by itself):

```bash
ftstack deploy MODEL_PACKAGE_ARN                  # checks the files against the registered manifest first
ftstack invoke ENDPOINT "your question"
ftstack undeploy ENDPOINT                          # deletes the endpoint and its config, keeps the package
```
"""


def render_model_card(cfg: TrainConfig, metrics: dict[str, Any], lineage: dict[str, Any], example_prompt: str,
                      chat_template: str | None = None) -> str:
    """Markdown with the base model, data, results, the prompt template, how to use and serve it,
    and ``chat_template`` (the tokenizer's, as exported) when given."""
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

{_serving(cfg, chat_template)}
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
