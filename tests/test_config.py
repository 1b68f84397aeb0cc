"""Tests for ftstack_train.config (and the Duration and StepPlan arithmetic it feeds): the tutorial's
llm-foundry YAML as is, SageMaker's string hyperparameters, precedence, references, and every
validation error naming its key and source."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import ftstack_train
from ftstack_train.config import DEFAULT_PROMPT_TEMPLATE, FIELDS, TrainConfig, parse_config, parse_size
from ftstack_train.data import StepPlan
from ftstack_train.references import MAX_EXPANDED_CHARS, MAX_REFERENCES, MAX_TOTAL_EXPANDED_CHARS
from ftstack_train.durations import Duration
from ftstack_train.errors import ConfigError

TUTORIAL = Path(__file__).parent / "data" / "llmfoundry_tutorial.yaml"


def write_yaml(tmp_path, text: str, name: str = "config.yaml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def parse(*overrides: str, yaml_path=None, hyperparameters=None) -> TrainConfig:
    cfg, _ = parse_config(yaml_path, hyperparameters, overrides)
    return cfg


def config_error(*overrides: str, yaml_path=None, hyperparameters=None) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(yaml_path, hyperparameters, overrides)
    return str(info.value)


# --- the tutorial's YAML works as is -----------------------------------------------------------

def test_tutorial_yaml_lands_every_meaningful_value_in_its_field():
    cfg, warnings = parse_config(str(TUTORIAL))

    assert cfg == TrainConfig(
        model="mosaicml/mpt-7b",
        pretrained=True,
        tokenizer="mosaicml/mpt-7b",
        run_name="mpt-7b-finetune",
        seed=17,
        max_seq_len=512,
        prompt_template=DEFAULT_PROMPT_TEMPLATE,
        shuffle=True,
        max_duration=Duration(3, "ep"),
        eval_interval=Duration(1, "ep"),
        eval_first=False,
        eval_subset_num_batches=-1,
        global_train_batch_size=128,
        device_train_microbatch_size=None,  # auto
        device_eval_batch_size=8,
        optimizer="decoupled_adamw",
        lr=5e-6,
        betas=(0.9, 0.999),
        eps=1e-8,
        weight_decay=0.0,
        scheduler="linear_decay_with_warmup",
        warmup=Duration(50, "ba"),
        alpha_f=0.0,
        clipping_type="norm",
        max_grad_norm=1.0,
        precision="amp_bf16",
        activation_checkpointing=True,
        sharding="FULL_SHARD",
        save_folder="/tmp/checkpoints",
        console_log_interval=Duration(1, "ba"),
        dist_timeout=2000.0,
    )
    assert isinstance(cfg.dist_timeout, float) and isinstance(cfg.lr, float)


def test_tutorial_yaml_reports_the_ignored_keys_in_one_warning():
    _, warnings = parse_config(str(TUTORIAL))

    [warning] = warnings
    listed = set(warning.split(": ", 1)[1].split(", "))
    for key in (
        "callbacks.speed_monitor.window_size", "callbacks.lr_monitor",
        "fsdp_config.mixed_precision", "model.name", "model.config_overrides.attn_config.attn_impl",
        "tokenizer.kwargs.model_max_length", "train_loader.dataset.tokenizer_name", "train_loader.num_workers",
        "eval_loader.dataset.shuffle", "progress_bar", "log_to_console",
    ):
        assert key in listed
    # Keys that do take effect are never reported as ignored.
    assert not listed & set(FIELDS)
    assert "train_loader.dataset.shuffle" not in listed and "fsdp_config.activation_checkpointing" not in listed
    assert "fsdp_config.sharding_strategy" not in listed


# --- hyperparameters: all strings, some JSON-quoted by the SageMaker SDK -----------------------

def test_hyperparameter_strings_are_coerced_to_each_fields_type():
    cfg = parse(hyperparameters={
        "max_seq_len": "1024",
        "optimizer.lr": "1e-4",
        "packing": "False",
        "eval_first": "true",
        "train_loader.dataset.shuffle": "0",
        "fsdp_config.activation_checkpointing": "1",
        "max_duration": "500ba",
        "scheduler.t_warmup": "0.1dur",
        "dist_timeout": "60",
        "device_train_microbatch_size": "auto",
        "tokenizer.name": "none",
        "sagemaker_program": "launch.py",
        "sagemaker_submit_directory": "s3://bucket/code.tar.gz",
    })

    assert (cfg.max_seq_len, cfg.lr, cfg.packing, cfg.eval_first) == (1024, 1e-4, False, True)
    assert (cfg.shuffle, cfg.activation_checkpointing) == (False, True)
    assert (cfg.max_duration, cfg.warmup) == (Duration(500, "ba"), Duration(0.1, "dur"))
    assert (cfg.dist_timeout, cfg.device_train_microbatch_size, cfg.tokenizer) == (60.0, None, None)


@pytest.mark.parametrize("text", ["[0.9,0.95]", "[0.9, 0.95]", "0.9,0.95", " 0.9 , 0.95 "])
def test_betas_from_a_string(text):
    assert parse(hyperparameters={"optimizer.betas": text}).betas == (0.9, 0.95)


def test_sdk_json_quoted_hyperparameters_are_unquoted():
    # The SageMaker Python SDK json.dumps every value: strings arrive with their quotes.
    cfg = parse(hyperparameters={
        "max_duration": '"3ep"',
        "run_name": '"my run"',
        "optimizer.lr": "5e-06",
        "prompt_template": '"Q: {question}\\nA: "',
        "eval_first": '"false"',
    })

    assert (cfg.max_duration, cfg.run_name, cfg.lr, cfg.eval_first) == (Duration(3, "ep"), "my run", 5e-6, False)
    assert cfg.prompt_template == "Q: {question}\nA: "


def test_later_sources_win_yaml_then_hyperparameters_then_overrides(tmp_path):
    path = write_yaml(tmp_path, "optimizer:\n  lr: 1.0e-5\nmax_seq_len: 256\nrun_name: from-yaml\n")
    hyperparameters = {"optimizer.lr": "2e-5", "max_seq_len": "384"}

    cfg = parse("optimizer.lr=3e-5", yaml_path=path, hyperparameters=hyperparameters)

    assert (cfg.lr, cfg.max_seq_len, cfg.run_name) == (3e-5, 384, "from-yaml")


def test_references_follow_the_winning_value(tmp_path):
    path = write_yaml(tmp_path, "max_seq_len: 512\nrun_name: run-${max_seq_len}\nsave_folder: ${run_name}\n")

    assert parse(yaml_path=path).run_name == "run-512"
    cfg = parse("max_seq_len=1024", yaml_path=path)
    assert (cfg.max_seq_len, cfg.run_name, cfg.save_folder) == (1024, "run-1024", "run-1024")
    assert parse(yaml_path=path, hyperparameters={"max_seq_len": "2048"}).run_name == "run-2048"


def test_a_reference_to_an_unset_field_takes_its_default(tmp_path):
    path = write_yaml(tmp_path, "run_name: len-${max_seq_len}-for-${max_duration}\n")

    assert parse(yaml_path=path).run_name == "len-512-for-3ep"


def test_circular_reference_is_an_error(tmp_path):
    path = write_yaml(tmp_path, "run_name: ${save_folder}\nsave_folder: ${run_name}\n")

    message = config_error(yaml_path=path)
    assert "circular reference" in message and "run_name" in message and "save_folder" in message


def test_undefined_reference_in_a_used_key_names_the_key_and_the_reference(tmp_path):
    path = write_yaml(tmp_path, "run_name: run-${nope}\n")

    message = config_error(yaml_path=path)
    assert message.startswith(f"run_name ({path}):")
    assert "${nope}" in message


# --- ${ref} expansion is capped (issue 11: nested references grow exponentially) ----------------

def nested_references(depth: int, per_level: int, leaf: str) -> dict[str, str]:
    """Hyperparameters where ``run_name`` refers to a chain of ignored keys, each value holding
    ``per_level`` references to the next: the leaf is copied ``per_level ** depth`` times."""
    hyperparameters = {"run_name": "${callbacks.l0}"}
    for level in range(depth):
        hyperparameters[f"callbacks.l{level}"] = f"${{callbacks.l{level + 1}}}" * per_level
    hyperparameters[f"callbacks.l{depth}"] = leaf
    return hyperparameters


def test_nested_references_stop_at_the_size_cap_naming_the_key():
    # 50 * 50 copies of 1,000 characters: 2.5 MB, which the uncapped expansion builds in milliseconds.
    message = config_error(hyperparameters=nested_references(depth=2, per_level=50, leaf="x" * 1000))

    assert message.startswith("run_name (hyperparameter): its references expand to a value of more than 65,536 characters")
    assert "(through run_name -> callbacks.l0)" in message and "write the value out" in message


def test_nested_references_to_empty_text_stop_at_the_reference_cap():
    # Nothing grows, but 20 ** 3 = 8,000 substitutions: the work, not the size, is what explodes here.
    message = config_error(hyperparameters=nested_references(depth=3, per_level=20, leaf=""))

    assert message.startswith(f"run_name (hyperparameter): its references expand to more than {MAX_REFERENCES:,}")


def test_a_value_of_exactly_the_size_cap_is_accepted_and_one_more_character_is_not():
    exact = {"run_name": "${callbacks.a}" * 16, "callbacks.a": "x" * (MAX_EXPANDED_CHARS // 16)}

    assert len(parse(hyperparameters=exact).run_name) == MAX_EXPANDED_CHARS
    assert "65,536 characters" in config_error(hyperparameters={**exact, "run_name": exact["run_name"] + "x"})


def test_a_long_chain_of_large_values_stops_at_the_total_cap():
    # Each value stays under the per-value cap, but every level copies the 60,000 characters once more.
    chain = {f"callbacks.l{level}": f"${{callbacks.l{level + 1}}}." for level in range(20)}
    hyperparameters = {"run_name": "${callbacks.l0}", **chain, "callbacks.l20": "x" * 60_000}

    message = config_error(hyperparameters=hyperparameters)
    assert message.startswith(f"run_name (hyperparameter): its references expand to more than {MAX_TOTAL_EXPANDED_CHARS:,} characters in all")


def test_the_reviewed_attack_fails_in_milliseconds_and_little_memory():
    """The review's input: SageMaker-sized (2,500-character) values nested 4 deep, which ran past the
    staging Lambda's 900 s. Run in a child process with 1 GiB of address space and a timeout, so
    that an uncapped expansion fails this test fast (MemoryError) instead of hanging the suite."""
    hyperparameters = nested_references(depth=4, per_level=2500 // len("${callbacks.l0}"), leaf="x" * 2500)
    assert max(len(v) for v in hyperparameters.values()) <= 2500
    script = (
        "import json, resource, sys, time\n"
        "resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))\n"
        "from ftstack_train.config import parse_config\n"
        "from ftstack_train.errors import ConfigError\n"
        "start = time.monotonic()\n"
        "try:\n"
        "    parse_config(hyperparameters=json.load(sys.stdin))\n"
        "except ConfigError as exc:\n"
        "    print(f'{time.monotonic() - start:.3f} {exc}')\n"
    )
    package_root = Path(ftstack_train.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    child = subprocess.run([sys.executable, "-c", script], input=json.dumps(hyperparameters), env=env,
                           capture_output=True, text=True, timeout=60)

    assert child.returncode == 0, child.stderr[-2000:]
    seconds, message = child.stdout.split(" ", 1)
    assert message.startswith("run_name (hyperparameter): its references expand to")
    assert float(seconds) < 1.0


# --- validation: each error names the key (and where it came from) ------------------------------

@pytest.mark.parametrize("override, key", [
    ("max_seq_len=4", "max_seq_len"),
    ("prompt_template=no placeholder", "prompt_template"),
    ("prompt_template={question} and {question}", "prompt_template"),
    ("max_dropped_fraction=2", "max_dropped_fraction"),
    ("max_duration=0.5dur", "max_duration"),
    ("max_duration=0ep", "max_duration"),
    ("eval_interval=0ba", "eval_interval"),
    ("eval_interval=0.5dur", "eval_interval"),
    ("save_interval=0.1dur", "save_interval"),
    ("console_log_interval=1ep", "console_log_interval"),
    ("console_log_interval=0ba", "console_log_interval"),
    ("global_train_batch_size=0", "global_train_batch_size"),
    ("device_eval_batch_size=0", "device_eval_batch_size"),
    ("device_train_microbatch_size=0", "device_train_microbatch_size"),
    ("eval_subset_num_batches=0", "eval_subset_num_batches"),
    ("eval_subset_num_batches=-2", "eval_subset_num_batches"),
    ("optimizer.name=sgd", "optimizer.name"),
    ("optimizer.lr=0", "optimizer.lr"),
    ("optimizer.betas=[0.9,1.0]", "optimizer.betas"),
    ("optimizer.eps=0", "optimizer.eps"),
    ("optimizer.weight_decay=-0.1", "optimizer.weight_decay"),
    ("scheduler.name=step", "scheduler.name"),
    ("scheduler.alpha_f=2", "scheduler.alpha_f"),
    ("algorithms.gradient_clipping.clipping_type=value", "algorithms.gradient_clipping.clipping_type"),
    ("algorithms.gradient_clipping.clipping_threshold=-1", "algorithms.gradient_clipping.clipping_threshold"),
    ("precision=amp_fp16", "precision"),
    ("save_num_checkpoints_to_keep=0", "save_num_checkpoints_to_keep"),
    ("dist_timeout=0", "dist_timeout"),
    ("export.dtype=int8", "export.dtype"),
    ("export.max_shard_size=lots", "export.max_shard_size"),
    ("export.max_shard_size=0", "export.max_shard_size"),
    ("fsdp_config.sharding_strategy=SHARD_GRAD_OP", "fsdp_config.sharding_strategy"),
    ("attn_impl=flash", "attn_impl"),
])
def test_invalid_value_names_its_key_once_and_its_source(override, key):
    message = config_error(override)

    assert message.startswith(f"{key}: ")
    assert not message.startswith(f"{key}: {key}")  # the key is said once, then the problem
    assert message.endswith("(from override)")


def test_invalid_value_from_yaml_names_the_file(tmp_path):
    path = write_yaml(tmp_path, "optimizer:\n  lr: 0\n")

    message = config_error(yaml_path=path)
    assert message.startswith("optimizer.lr: ") and message.endswith(f"(from {path})")


@pytest.mark.parametrize("override, key", [
    ("optimizer.lr=abc", "optimizer.lr"),
    ("max_seq_len=1.5", "max_seq_len"),
    ("packing=maybe", "packing"),
    ("max_duration=3 epochs", "max_duration"),
    ("optimizer.betas=0.9", "optimizer.betas"),
    ("optimizer.betas=[0.9,x]", "optimizer.betas"),
    ("scheduler.t_warmup=1.5ba", "scheduler.t_warmup"),
])
def test_wrong_type_names_the_key_and_its_source(override, key):
    assert config_error(override).startswith(f"{key} (override): ")
    key_, _, text = override.partition("=")
    assert config_error(hyperparameters={key_: text}).startswith(f"{key} (hyperparameter): ")


@pytest.mark.parametrize("line, key", [
    ("max_seq_len: [1, 2]", "max_seq_len"),
    ("run_name: [a, b]", "run_name"),
    ("run_name: {}", "run_name"),
    ("packing: maybe", "packing"),
    ("optimizer: {lr: true}", "optimizer.lr"),
    ("optimizer: {betas: [0.9, 0.95, 0.99]}", "optimizer.betas"),
])
def test_wrong_type_in_yaml_names_the_file(tmp_path, line, key):
    path = write_yaml(tmp_path, line + "\n")

    assert config_error(yaml_path=path).startswith(f"{key} ({path}): ")


def test_unknown_key_suggests_the_closest_one():
    message = config_error("optimizer.lrr=1e-4")

    assert message.startswith("optimizer.lrr (override): unknown key")
    assert "'optimizer.lr'" in message


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = write_yaml(tmp_path, "max_seq_length: 512\n")

    message = config_error(yaml_path=path)
    assert message.startswith(f"max_seq_length ({path}): unknown key") and "'max_seq_len'" in message


@pytest.mark.parametrize("item", ["noequals", "=5", " =5"])
def test_malformed_override_is_an_error(item):
    message = config_error(item)

    assert repr(item) in message and "key=value" in message


def test_seed_is_an_alias_of_global_seed():
    assert parse("seed=5").seed == 5
    assert parse(hyperparameters={"seed": "7"}).seed == 7


def test_seed_and_global_seed_disagreeing_is_an_error():
    message = config_error("global_seed=1", "seed=2")

    assert "seed" in message and "global_seed" in message and "disagree" in message


def test_seed_and_global_seed_agreeing_across_sources_is_fine(tmp_path):
    # The same seed from YAML (an int) and from a hyperparameter (a string) is no disagreement.
    path = write_yaml(tmp_path, "global_seed: 17\n")

    assert parse(yaml_path=path, hyperparameters={"seed": "17"}).seed == 17


def test_seed_referring_to_an_unset_global_seed_takes_its_default(tmp_path):
    # The tutorial's `seed: ${global_seed}` without its `global_seed` line: like any other reference
    # to an unset field, it is the default, not a reference to itself.
    path = write_yaml(tmp_path, "seed: ${global_seed}\n")

    assert parse(yaml_path=path).seed == 17


# --- the YAML file itself ------------------------------------------------------------------------

def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    path = write_yaml(tmp_path, "max_seq_len: 512\nrun_name: a: b\n")

    message = config_error(yaml_path=path)
    assert message.startswith(path) and "line 2" in message and "not valid YAML" in message


def test_yaml_whose_top_level_is_a_list_is_an_error(tmp_path):
    path = write_yaml(tmp_path, "- max_seq_len: 512\n")

    message = config_error(yaml_path=path)
    assert message.startswith(path) and "mapping" in message


def test_missing_yaml_file_is_an_error(tmp_path):
    path = str(tmp_path / "absent.yaml")

    message = config_error(yaml_path=path)
    assert message.startswith(path) and "cannot read" in message


def test_empty_yaml_file_gives_the_defaults(tmp_path):
    cfg, warnings = parse_config(write_yaml(tmp_path, ""))

    assert (cfg, warnings) == (TrainConfig(), [])


# --- sizes and durations -------------------------------------------------------------------------

@pytest.mark.parametrize("text, size", [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("1.5GiB", 3 * 2**29), ("123", 123), ("2kib", 2048), (" 10 B ", 10),
])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "", "5 GBs", "-1GB", "5XB"])
def test_parse_size_rejects_non_sizes(text):
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)


@pytest.mark.parametrize("text, duration", [
    ("3ep", Duration(3, "ep")), ("500ba", Duration(500, "ba")), ("0.1dur", Duration(0.1, "dur")),
    (" 1.5 ep ", Duration(1.5, "ep")), ("1e3ba", Duration(1000, "ba")),
])
def test_duration_parse(text, duration):
    assert Duration.parse(text) == duration


@pytest.mark.parametrize("text", ["3", "ep", "3 epochs", "-1ep", "1.5ba", "3EP"])
def test_duration_parse_rejects_bad_text(text):
    with pytest.raises(ValueError, match="e.g."):
        Duration.parse(text)


def test_duration_to_steps_rounds_up():
    assert Duration(500, "ba").to_steps(steps_per_epoch=7) == 500
    assert Duration(3, "ep").to_steps(steps_per_epoch=7) == 21
    assert Duration(0.5, "ep").to_steps(steps_per_epoch=7) == 4
    assert Duration(0.1, "dur").to_steps(steps_per_epoch=7, total_steps=21) == 3
    with pytest.raises(ValueError, match="relative"):
        Duration(0.1, "dur").to_steps(steps_per_epoch=7)


def test_duration_str_round_trips():
    for text in ("3ep", "500ba", "0.1dur", "1.5ep"):
        assert str(Duration.parse(text)) == text


# --- the batch plan ------------------------------------------------------------------------------

def plan(rows: int, micro, world: int, device: str = "cuda") -> StepPlan:
    cfg = TrainConfig(global_train_batch_size=rows, device_train_microbatch_size=micro)
    return StepPlan.from_config(cfg, world, device)


def test_step_plan_splits_rows_over_ranks_and_micro_batches():
    assert plan(128, 4, 8) == StepPlan(rows_per_step=128, micro_batch=4, accumulation=4, world_size=8)
    assert plan(128, 16, 8) == StepPlan(128, 16, 1, 8)


@pytest.mark.parametrize("rows, world, device, micro", [
    (128, 8, "cpu", 16),  # the whole per-device batch
    (128, 8, "cuda", 4),  # at most 4 rows
    (48, 8, "cuda", 3),   # 6 rows each: the largest divisor up to 4
    (10, 5, "cuda", 2),
    (7, 7, "cuda", 1),
])
def test_auto_micro_batch(rows, world, device, micro):
    result = plan(rows, None, world, device)

    assert result.micro_batch == micro
    assert result.micro_batch * result.accumulation * world == rows


def test_batch_not_divisible_by_world_size_names_the_key():
    with pytest.raises(ConfigError, match=r"^global_train_batch_size: 128 rows .* 3 processes"):
        plan(128, 4, 3)


@pytest.mark.parametrize("micro", [5, 32])
def test_micro_batch_not_dividing_the_per_device_batch_names_the_key(micro):
    with pytest.raises(ConfigError, match=rf"^device_train_microbatch_size: {micro} does not divide the 16 rows"):
        plan(128, micro, 8)


# --- the effective config round trip -------------------------------------------------------------

def test_to_dict_fed_back_as_yaml_gives_the_same_config(tmp_path):
    cfg, _ = parse_config(str(TUTORIAL), overrides=["prompt_template=Q: {question} A:", "max_duration=1.5ep"])
    path = tmp_path / "effective.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()), encoding="utf-8")

    again, warnings = parse_config(str(path))

    assert again == cfg and warnings == []
    assert set(cfg.to_dict()) == set(FIELDS)


def test_to_dict_of_the_defaults_round_trips(tmp_path):
    path = tmp_path / "defaults.yaml"
    path.write_text(yaml.safe_dump(TrainConfig().to_dict()), encoding="utf-8")

    assert parse_config(str(path))[0] == TrainConfig()


def test_every_field_has_a_key_and_a_doc():
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata["key"] and f.metadata["doc"], f.name
