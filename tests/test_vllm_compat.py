"""What vLLM reads from an exported model, checked with the classes it reads it with: config.json
through transformers' AutoConfig without remote code (vLLM loads the config the same way, then
looks ``architectures`` up in its model registry), the tokenizer through AutoTokenizer without
remote code, and the chat template, which must turn a chat request into the very token ids
training built for the same prompt (``ftstack_train.data``). The export is the real one
(``export_hf_model`` of a sharded tiny model, as in test_export.py), for MPT and Llama alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, MptConfig

from ftstack.serving import ENV_CHAT_TEMPLATE, MODEL_DIR, vllm_environment
from ftstack_train.contract import CHAT_TEMPLATE_FILE, MANIFEST_FILE
from ftstack_train.data import tokenize_files
from ftstack_train.manifest import verify_model
from ftstack_train.model import make_tiny_model

from test_export import PROMPTS, export, stepped

VLLM_ARCHITECTURES = {"mpt": ("MptForCausalLM", "MPTForCausalLM"), "llama": ("LlamaForCausalLM",)}
"""The names vLLM's registry maps to its MPT and Llama implementations
(vllm/model_executor/models/registry.py, _TEXT_GENERATION_MODELS)."""
TEMPLATE = 'Q ("{question}") {braces} {{ x }}\n### A:\n'


@pytest.fixture(scope="module", params=["tiny-mpt", "tiny-llama"])
def exported(request, process_group, tmp_path_factory) -> tuple[str, Path]:
    """A tiny model of each kind, sharded, stepped once and exported as the training job does."""
    texts = [f"What is the code word for {i}? The code word is word{i}." for i in range(20)] + PROMPTS
    base = make_tiny_model(request.param, texts, tmp_path_factory.mktemp("base") / request.param, seed=5)
    model_dir = tmp_path_factory.mktemp("export") / "model"
    export(stepped(base, seed=2), model_dir, "export.dtype=bf16", "max_seq_len=256", template=TEMPLATE)
    return request.param, model_dir


def test_config_loads_natively_as_a_class_vllm_serves(exported):
    kind, model_dir = exported
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=False)
    assert type(config) is {"tiny-mpt": MptConfig, "tiny-llama": LlamaConfig}[kind]
    raw = json.loads((model_dir / "config.json").read_text())
    assert "auto_map" not in raw
    assert raw["architectures"][0] in VLLM_ARCHITECTURES[config.model_type]
    assert raw.get("dtype", raw.get("torch_dtype")) == "bfloat16"  # what SM_VLLM_DTYPE serves


def test_the_chat_template_formats_a_request_exactly_as_training_did(exported, tmp_path):
    _, model_dir = exported
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": "ok"}) + "\n" for p in PROMPTS))
    split = tokenize_files("train", [data], tokenizer, TEMPLATE, max_seq_len=256, max_dropped_fraction=0.0)
    assert len(split.ids) == len(PROMPTS)
    for prompt, ids, prompt_len in zip(PROMPTS, split.ids, split.prompt_lens):
        served = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               return_dict=True)["input_ids"]
        assert served == ids[:prompt_len].tolist(), prompt


def test_the_template_file_the_container_is_told_to_use_is_the_exported_one(exported):
    _, model_dir = exported
    path = vllm_environment()[ENV_CHAT_TEMPLATE]
    assert path == f"{MODEL_DIR}/{CHAT_TEMPLATE_FILE}"
    template = model_dir / CHAT_TEMPLATE_FILE
    assert template.read_text() == AutoTokenizer.from_pretrained(model_dir).chat_template
    # Listed in the manifest, so deployment's check covers the template that formats every request.
    assert CHAT_TEMPLATE_FILE in json.loads((model_dir / MANIFEST_FILE).read_text())["files"]
    verify_model(model_dir)


def test_the_model_card_says_how_to_serve_it(exported):
    _, model_dir = exported
    card = (model_dir / "README.md").read_text()
    assert "vllm serve path/to/model --dtype bfloat16 --max-model-len 256" in card
    assert "ftstack deploy MODEL_PACKAGE_ARN" in card and 'ftstack invoke ENDPOINT "your question"' in card
    # The chat template itself, as exported: what vLLM formats a chat request with.
    assert (model_dir / CHAT_TEMPLATE_FILE).read_text().strip() in card
