"""Trying an exported model: format a prompt with the chat template saved beside the model (the
training template) and generate greedily."""

from __future__ import annotations

import sys
from pathlib import Path

from ftstack_train.contract import MANIFEST_FILE
from ftstack_train.errors import ModelLoadError
from ftstack_train.manifest import verify_model


def generate(model_dir: Path, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Loads the model and tokenizer with transformers' Auto classes, as a serving stack would,
    and returns one completion per prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (model_dir / "config.json").is_file():
        raise ModelLoadError(f"{model_dir}: no config.json; give the model folder of a finished run (e.g. runs/demo/model)")
    if (model_dir / MANIFEST_FILE).is_file():
        verify_model(model_dir)  # files changed since the export are not loaded (ModelIntegrityError)
    else:
        print(f"note: {model_dir} has no {MANIFEST_FILE}; its files cannot be verified", file=sys.stderr)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if not tokenizer.chat_template:
        raise ModelLoadError(f"{model_dir}: the tokenizer has no chat template; give a model exported by ftstack")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    completions = []
    for prompt in prompts:
        inputs = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        completions.append(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    return completions
