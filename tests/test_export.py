"""Tests for ftstack_train.export and the model card: the chat template reproduces the training
prompt character for character (and token for token with a BOS), tied weights are written once,
and a sharded FSDP2 model exported in a one-process gloo group reloads with transformers' own
classes with the trained weights."""

import json
from pathlib import Path

import jinja2
import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from ftstack_train.config import DEFAULT_PROMPT_TEMPLATE, parse_config
from ftstack_train.contract import FINAL_METRICS_FILE, MANIFEST_FILE, MANIFEST_SHA256
from ftstack_train.manifest import verify_model
from ftstack_train.data import format_prompt
from ftstack_train.export import _unique_state_names, adds_bos, chat_template, export_hf_model
from ftstack_train.export_folder import EXPORT_MARKER, STAGING
from ftstack_train.modelcard import render_model_card

EOS, BOS = "<|endoftext|>", "<s>"

PROMPTS = [
    "What is the capital of Greece?",
    'He said "hi" and \'bye\'',
    "C:\\path\\to\\file and \\n is not a newline",
    "braces {x} {question} {} and {{ not jinja }} {{ '}}' }}",
    "{% if true %}jinja-like{% endif %} {# comment #} {%- raw -%}",
    "line one\nline two\r\n\ttabbed\n",
    "unicode: é ü 中文 Ελληνικά 🤖 \u2028 end",
    "   leading and trailing spaces   ",
    "<|endoftext|> <s> look like special tokens",
]

CUSTOM_TEMPLATES = [
    'User said: "{question}"\nAssistant:',
    "{{ not a jinja expression }} {% neither %} {question} {'json': \"quotes\"}\\",
    "{question}",
    "'single' \\\"mixed\\\" {question}\n\n",
    "<|user|>\n{question}</s>\n<|assistant|>\n",
]


def train_tokenizer(bos: bool) -> PreTrainedTokenizerFast:
    """A byte-level BPE like the tiny models', optionally with a post-processor that adds a BOS."""
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=[EOS, BOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator([DEFAULT_PROMPT_TEMPLATE, *PROMPTS, *CUSTOM_TEMPLATES] * 3, trainer=trainer)
    if bos:
        bpe.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bpe.token_to_id(BOS))]
        )
        return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=BOS, eos_token=EOS)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS)


@pytest.fixture(scope="module")
def plain_tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(bos=False)


@pytest.fixture(scope="module")
def bos_tokenizer() -> PreTrainedTokenizerFast:
    return train_tokenizer(bos=True)


def render(tokenizer, template: str, messages: list[dict], generation_prompt: bool = True) -> str:
    """What a serving stack does: the saved chat template, rendered by transformers."""
    tokenizer.chat_template = chat_template(template, tokenizer.bos_token if adds_bos(tokenizer) else None)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def user(prompt: str) -> list[dict]:
    return [{"role": "user", "content": prompt}]


# --- the chat template is the training prompt ---------------------------------------------------

@pytest.mark.parametrize("prompt", PROMPTS)
def test_chat_template_renders_the_training_prompt_exactly(plain_tokenizer, prompt):
    assert render(plain_tokenizer, DEFAULT_PROMPT_TEMPLATE, user(prompt)) == format_prompt(DEFAULT_PROMPT_TEMPLATE, prompt)


@pytest.mark.parametrize("template", CUSTOM_TEMPLATES)
@pytest.mark.parametrize("prompt", PROMPTS[:5])
def test_chat_template_of_a_custom_template_with_quotes_and_braces(plain_tokenizer, template, prompt):
    assert render(plain_tokenizer, template, user(prompt)) == format_prompt(template, prompt)


@pytest.mark.parametrize("template", [
    "🤖 Question: {question}\n🤖 Answer:",  # emoji: outside the Basic Multilingual Plane
    "Frage (𝔇𝔢𝔲𝔱𝔰𝔠𝔥): {question}\nAntwort:",
])
def test_chat_template_of_a_template_with_characters_outside_the_bmp(plain_tokenizer, template):
    rendered = render(plain_tokenizer, template, user("Wie geht's?"))
    assert rendered == format_prompt(template, "Wie geht's?")
    rendered.encode("utf-8")  # no lone surrogates


def test_chat_template_with_non_ascii_template_text(plain_tokenizer):
    template = "Frage – «{question}»\nAntwort: ü é 中文\n"
    assert render(plain_tokenizer, template, user("x")) == format_prompt(template, "x")


def test_chat_template_renders_an_assistant_message_as_content_and_eos(plain_tokenizer):
    assert render(plain_tokenizer, DEFAULT_PROMPT_TEMPLATE, [{"role": "assistant", "content": "Athens."}], False) == "Athens." + EOS


def test_chat_template_renders_a_turn_as_the_training_sequence(plain_tokenizer):
    messages = [*user("What is 2+2?"), {"role": "assistant", "content": "4"}]
    # The text training tokenized: the formatted prompt, the response, then EOS.
    assert render(plain_tokenizer, DEFAULT_PROMPT_TEMPLATE, messages, False) == format_prompt(DEFAULT_PROMPT_TEMPLATE, "What is 2+2?") + "4" + EOS


@pytest.mark.parametrize("role", ["system", "tool", "developer"])
def test_chat_template_rejects_other_roles(plain_tokenizer, role):
    with pytest.raises(jinja2.TemplateError, match="only user and assistant messages are supported"):
        render(plain_tokenizer, DEFAULT_PROMPT_TEMPLATE, [{"role": role, "content": "Be brief."}, *user("hi")])


# --- a tokenizer that adds a BOS ----------------------------------------------------------------

def test_adds_bos(plain_tokenizer, bos_tokenizer):
    assert adds_bos(bos_tokenizer)
    assert not adds_bos(plain_tokenizer)
    named_only = train_tokenizer(bos=False)
    named_only.bos_token = BOS  # has a BOS token, but encoding does not put it in front
    assert not adds_bos(named_only)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_chat_template_with_bos_tokenizes_as_training_did(bos_tokenizer, prompt):
    rendered = render(bos_tokenizer, DEFAULT_PROMPT_TEMPLATE, user(prompt))
    expected = format_prompt(DEFAULT_PROMPT_TEMPLATE, prompt)
    assert rendered == BOS + expected
    # Training tokenized the formatted prompt with special tokens (the BOS in front); transformers
    # tokenizes a rendered chat template without them.
    trained_ids = bos_tokenizer(expected, add_special_tokens=True)["input_ids"]
    assert trained_ids[0] == bos_tokenizer.bos_token_id
    assert bos_tokenizer(rendered, add_special_tokens=False)["input_ids"] == trained_ids
    served = bos_tokenizer.apply_chat_template(user(prompt), add_generation_prompt=True, return_dict=True)["input_ids"]
    assert list(served) == trained_ids


def test_chat_template_without_bos_tokenizes_as_training_did(plain_tokenizer):
    prompt = PROMPTS[1]
    render(plain_tokenizer, DEFAULT_PROMPT_TEMPLATE, user(prompt))  # sets the chat template
    served = plain_tokenizer.apply_chat_template(user(prompt), add_generation_prompt=True, return_dict=True)["input_ids"]
    assert list(served) == plain_tokenizer(format_prompt(DEFAULT_PROMPT_TEMPLATE, prompt), add_special_tokens=True)["input_ids"]


# --- tied weights -------------------------------------------------------------------------------

def test_unique_state_names_drop_the_tied_lm_head_of_mpt(tiny_mpt):
    model = AutoModelForCausalLM.from_pretrained(tiny_mpt, dtype=torch.float32)
    assert model.lm_head.weight is model.transformer.wte.weight
    names = _unique_state_names(model)
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    assert sorted(names + ["lm_head.weight"]) == sorted(model.state_dict())


def test_unique_state_names_keep_an_untied_lm_head():
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, vocab_size=64, tie_word_embeddings=False))
    assert _unique_state_names(model) == list(model.state_dict())


# --- the model card -----------------------------------------------------------------------------

METRICS = {"final": {"train_cross_entropy": 0.51234, "eval_cross_entropy": 0.6, "eval_perplexity": 1.8221188, "step": 40},
           "history": [{"step": 0, "cross_entropy": 3.0}]}
LINEAGE = {"base_model": "tiny-mpt", "run_name": "card-test", "train": "train: 19 records"}


def text_blocks(card: str) -> list[str]:
    """The bodies of the card's ```text fenced blocks, each up to a closing fence on its own line."""
    blocks, body = [], None
    for line in card.splitlines(keepends=True):
        if body is None and line.rstrip("\n") == "```text":
            body = ""
        elif body is not None and line.rstrip("\n") == "```":
            blocks.append(body)
            body = None
        elif body is not None:
            body += line
    return blocks


def test_model_card_has_template_metrics_and_usage():
    cfg, _ = parse_config(None, {"run_name": "card-test", "model.pretrained_model_name_or_path": "tiny-mpt"})
    example = format_prompt(cfg.prompt_template, "<your question>")
    card = render_model_card(cfg, METRICS, LINEAGE, example)
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "base_model: tiny-mpt" in card and "# card-test" in card
    assert text_blocks(card) == [DEFAULT_PROMPT_TEMPLATE, example]
    for row in ("| eval_cross_entropy | 0.6000 |", "| eval_perplexity | 1.8221 |", "| train_cross_entropy | 0.5123 |", "| step | 40 |"):
        assert row in card
    assert "AutoModelForCausalLM.from_pretrained" in card and "apply_chat_template" in card
    assert '"run_name": "card-test"' in card and '"prompt_template"' in card


def test_model_card_closes_the_block_of_a_template_without_a_final_newline():
    template = "Q: {question} A:"
    cfg, _ = parse_config(None, {"prompt_template": template})
    example = format_prompt(template, "<your question>")
    card = render_model_card(cfg, METRICS, LINEAGE, example)
    # A closing fence must start its own line, or the rest of the card renders as code.
    assert text_blocks(card) == [template + "\n", example + "\n"]


# --- exporting the sharded model ----------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tiny_mpt, process_group):
    """The tiny MPT as train.py builds it (fp32, sharded per block), after one optimizer step, in a
    one-process gloo group that lasts for this module."""
    return stepped(tiny_mpt, seed=0)


def stepped(source: Path, seed: int):
    """The model at ``source``, sharded and stepped once as train.py does, with its tokenizer."""
    from ftstack_train.distributed import apply_fsdp
    from ftstack_train.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(str(source))
    model = apply_fsdp(load_model(str(source), True, len(tokenizer)), torch.device("cpu"), "fp32", activation_checkpointing=False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(seed))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return model, tokenizer


def trained_weights(model) -> dict[str, torch.Tensor]:
    return {name: (t.full_tensor() if isinstance(t, DTensor) else t).detach() for name, t in model.state_dict().items()}


def export(trained, model_dir: Path, *overrides: str, template: str | None = None) -> None:
    model, tokenizer = trained
    hyperparameters = dict(item.split("=", 1) for item in overrides)
    if template is not None:
        hyperparameters["prompt_template"] = template
    cfg, _ = parse_config(None, hyperparameters)
    model_dir.mkdir(parents=True, exist_ok=True)
    export_hf_model(model, tokenizer, cfg, model_dir, METRICS, LINEAGE)


def test_export_fp32_sharded_reloads_with_the_trained_weights(trained, tmp_path):
    model_dir = tmp_path / "model"
    export(trained, model_dir, "export.dtype=fp32", "export.max_shard_size=50KB")

    files = {p.name for p in model_dir.iterdir()} - {EXPORT_MARKER}
    assert STAGING not in files
    assert json.loads((model_dir / EXPORT_MARKER).read_text()) == {"files": sorted(files)}
    assert {"config.json", "generation_config.json", "tokenizer.json", "metrics.json", "README.md"} <= files
    assert json.loads((model_dir / "metrics.json").read_text()) == METRICS
    # What the workflow's gate reads: the final figures alone, however long the history grew, and
    # the digest of the manifest of every other file, which the workflow registers.
    final = json.loads((model_dir / FINAL_METRICS_FILE).read_text())
    assert final == METRICS["final"] | {MANIFEST_SHA256: final[MANIFEST_SHA256]}
    assert verify_model(model_dir, final[MANIFEST_SHA256]) == final[MANIFEST_SHA256]
    listed = json.loads((model_dir / MANIFEST_FILE).read_text())["files"]
    assert set(listed) == files - {MANIFEST_FILE, FINAL_METRICS_FILE}

    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    shards = sorted(f for f in files if f.endswith(".safetensors"))
    assert len(shards) > 1 and "model.safetensors" not in files
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum((model_dir / f).stat().st_size for f in shards)
    for shard in shards:
        with safe_open(str(model_dir / shard), framework="pt") as handle:
            names = list(handle.keys())
            assert sorted(names) == sorted(n for n, f in index["weight_map"].items() if f == shard)
            sizes = [handle.get_slice(n).get_shape() for n in names]
            assert all(handle.get_tensor(n).dtype == torch.float32 for n in names)
        assert len(names) == 1 or sum(torch.Size(s).numel() * 4 for s in sizes) <= 50_000, shard
    assert "lm_head.weight" not in index["weight_map"]

    weights = trained_weights(trained[0])
    assert set(index["weight_map"]) == set(weights) - {"lm_head.weight"}
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    assert reloaded.dtype == torch.float32
    state = reloaded.state_dict()
    assert state.keys() == weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(state[name], tensor, rtol=0, atol=0, msg=name)

    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    model = trained[0]
    with torch.no_grad():
        model.eval()
        try:
            expected = model(input_ids=ids, use_cache=False).logits
        finally:
            model.train()
        torch.testing.assert_close(reloaded.eval()(input_ids=ids).logits, expected)


def test_export_default_bf16_replaces_an_earlier_sharded_export(trained, tmp_path):
    model_dir = tmp_path / "model"
    export(trained, model_dir, "export.dtype=fp32", "export.max_shard_size=50KB")
    export(trained, model_dir)  # bf16, one 5GB shard: the index and shards of the first must go

    files = sorted(p.name for p in model_dir.iterdir())
    assert [f for f in files if "safetensors" in f] == ["model.safetensors"]
    assert STAGING not in files
    assert json.loads((model_dir / EXPORT_MARKER).read_text()) == {"files": [f for f in files if f != EXPORT_MARKER]}
    config = json.loads((model_dir / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and config["use_cache"] is True
    weights = trained_weights(trained[0])
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == set(weights) - {"lm_head.weight"}
        for name in handle.keys():
            tensor = handle.get_tensor(name)
            assert tensor.dtype == torch.bfloat16, name
            torch.testing.assert_close(tensor, weights[name].to(torch.bfloat16), rtol=0, atol=0, msg=name)
    reloaded = AutoModelForCausalLM.from_pretrained(model_dir)
    assert reloaded.dtype == torch.bfloat16


def test_exported_tokenizer_formats_prompts_as_training_did(trained, tmp_path):
    template = 'Q ("{question}") {braces} {{ x }}\n### A:\n'
    model_dir = tmp_path / "model"
    export(trained, model_dir, "export.dtype=fp32", template=template)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    for prompt in PROMPTS:
        rendered = tokenizer.apply_chat_template(user(prompt), tokenize=False, add_generation_prompt=True)
        assert rendered == format_prompt(template, prompt)
    generation = json.loads((model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.eos_token_id
    assert template in (model_dir / "README.md").read_text()

    from ftstack.generate import generate

    completions = generate(model_dir, ["What is the code word for 3?", "hi"], max_new_tokens=3)
    assert len(completions) == 2 and all(isinstance(c, str) for c in completions)


# --- a base model whose hub config points at remote code ------------------------------------------

@pytest.fixture(scope="module")
def trained_hub_like(trained, hub_like_mpt):
    """The hub-shaped tiny MPT (``auto_map`` to files it lacks), built and stepped as train.py
    does, in the process group that ``trained`` holds."""
    return stepped(hub_like_mpt, seed=1)


def test_the_hub_shaped_base_model_needs_its_missing_remote_code(hub_like_mpt):
    # The defect the export must not carry over: trust_remote_code=True follows auto_map to a file
    # that is not there.
    with pytest.raises(OSError, match="modeling_mpt.py|configuration_mpt.py"):
        AutoModelForCausalLM.from_pretrained(hub_like_mpt, trust_remote_code=True)


def test_export_of_a_hub_shaped_model_loads_natively_with_and_without_remote_code(trained_hub_like, tmp_path):
    from transformers import MptForCausalLM

    model_dir = tmp_path / "model"
    export(trained_hub_like, model_dir, "export.dtype=fp32")

    config = json.loads((model_dir / "config.json").read_text())
    assert "auto_map" not in config and "custom_pipelines" not in config
    # transformers' native class; vLLM's registry maps this name to its MPT as well.
    assert config["architectures"] == ["MptForCausalLM"] and config["model_type"] == "mpt"
    assert "auto_map" not in json.loads((model_dir / "tokenizer_config.json").read_text())

    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    native = MptForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        expected = native(input_ids=ids).logits
        for trust in (False, True):
            loaded = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=trust).eval()
            assert type(loaded) is MptForCausalLM, trust
            torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=0, atol=0)
            tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust)
            assert tokenizer("What is 2+2?")["input_ids"] == trained_hub_like[1]("What is 2+2?")["input_ids"]
        # ... and the native class computes what the trained (sharded) model computes.
        model = trained_hub_like[0]
        model.eval()
        try:
            trained_logits = model(input_ids=ids, use_cache=False).logits
        finally:
            model.train()
    torch.testing.assert_close(expected, trained_logits)
