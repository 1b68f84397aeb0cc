"""Whole runs through ``ftstack local``: 2 CPU processes, FSDP2 over gloo, a tiny MPT.

These start real torchrun jobs (a few seconds each) and check what a user would: the model learns,
the export reloads with transformers and computes what the trained model computes, a run stopped
by SIGTERM or killed by SIGKILL ends, once restarted, with exactly the weights of an uninterrupted
run, and a bad input fails with the failure file and no traceback.
"""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import pytest
import torch

from ftstack.run_folder import MARKER
from ftstack_train.checkpoint import is_complete, part_marker, step_dir
from ftstack_train.config import DEFAULT_PROMPT_TEMPLATE
from ftstack_train.data import format_prompt
from ftstack_train.metrics import METRIC_DEFINITIONS

pytestmark = pytest.mark.slow


def descendants(pid: int) -> list[int]:
    """The process tree under ``pid`` (torchrun runs in its own session, so a process group kill
    would miss it)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def test_run_learns_and_export_matches_the_trained_model(runs, reference):
    output, log = reference
    text = log.read_text()
    assert "Traceback" not in text
    evals = [values for kind, values in runs.metrics_lines(log) if kind == "eval"]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 40
    assert evals[-1]["cross_entropy"] < 0.3 * evals[0]["cross_entropy"], evals

    model_dir = output / "model"
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert metrics["final"]["eval_cross_entropy"] == pytest.approx(evals[-1]["cross_entropy"], rel=1e-5)
    assert [h["step"] for h in metrics["history"]] == [e["step"] for e in evals]
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1, "100KB shards should split the tiny model"
    assert "lm_head.weight" not in index["weight_map"], "tied weights are stored once"

    # The trained model: the final checkpoint, loaded without FSDP into a fresh model.
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = step_dir(output / "checkpoints", 40)
    assert is_complete(final)
    trained = AutoModelForCausalLM.from_pretrained(output / "checkpoints" / "base-model", dtype=torch.float32)
    state = {"model": trained.state_dict()}
    dcp.load(state, checkpoint_id=str(final))
    trained.load_state_dict(state["model"])
    exported = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer([format_prompt(DEFAULT_PROMPT_TEMPLATE, "What is the code word for 3?")], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, trained.eval()(ids).logits, rtol=1e-6, atol=1e-6)

    # The chat template reproduces the training prompt exactly, and the model learned the format.
    text_prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the code word for 3?"}], tokenize=False, add_generation_prompt=True)
    assert text_prompt == format_prompt(DEFAULT_PROMPT_TEMPLATE, "What is the code word for 3?")
    out = exported.generate(ids, max_new_tokens=12, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).startswith("The code word for")

    card = (model_dir / "README.md").read_text()
    assert "### Question:" in card and "tiny-mpt" in card


def test_metric_regexes_read_the_lines_a_run_prints(runs, reference):
    _, log = reference
    lines = log.read_text().splitlines()
    for definition in METRIC_DEFINITIONS:
        values = [float(m.group(1)) for line in lines if (m := re.search(definition.regex, line))]
        assert values, f"{definition.name}: no line matched {definition.regex}"
    eval_ce = [float(m.group(1)) for line in lines if (m := re.search(dict((d.name, d.regex) for d in METRIC_DEFINITIONS)["eval:cross_entropy"], line))]
    assert eval_ce == [v["cross_entropy"] for k, v in runs.metrics_lines(log) if k == "eval"]


def test_sigterm_saves_and_a_restart_ends_like_an_uninterrupted_run(runs, reference, tmp_path):
    output, log = tmp_path / "run", tmp_path / "run.log"
    command = runs.command(output, "max_duration=40ba")
    proc = runs.start(command, log)
    runs.wait_for(lambda: any(k == "train" and v["step"] >= 13 for k, v in runs.metrics_lines(log)), proc)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, log.read_text()
    text = log.read_text()
    assert "stopped on request" in text and "Traceback" not in text
    stopped_at = max(v["step"] for k, v in runs.metrics_lines(log) if k == "train")
    assert stopped_at < 40 and is_complete(step_dir(output / "checkpoints", int(stopped_at)))
    assert not (output / "model" / "config.json").exists()

    assert runs.run(command, log) == 0, log.read_text()
    assert f"resumed from step-{int(stopped_at):08d}" in log.read_text()
    runs.assert_same_weights(output / "model", reference[0] / "model")


def test_sigkill_resumes_from_the_last_complete_checkpoint(runs, reference, tmp_path):
    output, log = tmp_path / "run", tmp_path / "run.log"
    command = runs.command(output, "max_duration=40ba")
    proc = runs.start(command, log)
    runs.wait_for(lambda: is_complete(step_dir(output / "checkpoints", 12)), proc)
    tree = descendants(proc.pid)
    for pid in tree:  # freeze first, so that no process reacts to another's death
        os.kill(pid, signal.SIGSTOP)
    for pid in tree:
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    last = max(int(p.name.split("-")[1]) for p in (output / "checkpoints").glob("step-*") if is_complete(p))
    assert last >= 12

    assert runs.run(command, log) == 0, log.read_text()
    assert f"resumed from step-{last:08d}" in log.read_text()
    runs.assert_same_weights(output / "model", reference[0] / "model")


def test_an_unfinished_checkpoint_is_skipped(runs, reference, tmp_path):
    """A checkpoint whose marker lists a file that is missing (a kill mid-save) does not count."""
    import shutil

    output, log = tmp_path / "run", tmp_path / "run.log"
    shutil.copytree(reference[0] / "checkpoints", output / "checkpoints")
    shutil.copy(reference[0] / MARKER, output / MARKER)  # a run folder of ftstack's, or local refuses it
    newest = step_dir(output / "checkpoints", 40)
    marker = json.loads(part_marker(newest, 0).read_text())
    (newest / sorted(marker["files"])[0]).unlink()
    assert not is_complete(newest)
    assert runs.run(runs.command(output, "max_duration=40ba"), log) == 0, log.read_text()
    assert "resumed from step-00000036" in log.read_text()
    runs.assert_same_weights(output / "model", reference[0] / "model")


def test_bad_data_in_the_training_processes_fails_with_the_reason(runs, tmp_path):
    """All prompts are longer than max_seq_len: the workers reject the data (after the launcher's
    validation passed); the failure file says why and nobody prints a traceback."""
    output, log = tmp_path / "run", tmp_path / "run.log"
    code = runs.run(runs.command(output, "max_duration=2ba", "max_seq_len=8"), log)
    assert code == 2
    failure = (output / "output" / "failure").read_text()
    assert "max_seq_len=8" in failure and "max_dropped_fraction" in failure
    assert "Traceback" not in log.read_text()
    assert not (output / "model" / "config.json").exists()


def test_tiny_llama_loads_identically_on_every_rank_and_exports_bf16(runs, tmp_path):
    """Rank 0 alone reads the weights and broadcasts them into the shards: the baseline loss with
    2 processes must equal the one with 1. Llama also covers the path for models with position
    ids and untied embeddings, and the default bf16 export."""
    from safetensors import safe_open

    baselines = {}
    for nproc in (1, 2):
        output, log = tmp_path / f"n{nproc}", tmp_path / f"n{nproc}.log"
        command = runs.command(output, "max_duration=2ba", "export.dtype=bf16")
        command[command.index("tiny-mpt")] = "tiny-llama"
        command[command.index("--nproc") + 1] = str(nproc)
        assert runs.run(command, log) == 0, log.read_text()
        history = json.loads((output / "model" / "metrics.json").read_text())["history"]
        baselines[nproc] = history[0]["cross_entropy"]  # full precision, unlike the log line
    assert baselines[2] == pytest.approx(baselines[1], rel=1e-6)

    model_dir = tmp_path / "n2" / "model"
    assert json.loads((model_dir / "config.json").read_text())["dtype"] == "bfloat16"
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" in index["weight_map"], "untied weights are both written"
    for name in sorted(set(index["weight_map"].values())):
        with safe_open(model_dir / name, "pt") as shard:
            assert {shard.get_tensor(k).dtype for k in shard.keys()} == {torch.bfloat16}
    weights = runs.exported_weights(model_dir)
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_the_packed_attention_and_targets_only_loss_train_like_the_eager_path(runs, reference, tmp_path):
    """The run's default paths (per-example SDPA, targets-only loss) against MPT's own eager
    attention with the full row mask and full logits, through the same 2-process FSDP job: the
    same losses and gradient norms, step by step (the same run length: it sets the schedule)."""
    _, log = reference
    eager_log = tmp_path / "eager.log"
    assert runs.run(runs.command(tmp_path / "eager", "max_duration=40ba", "attn_impl=eager"), eager_log) == 0, eager_log.read_text()
    assert "attention: sdpa (per example); loss: targets only, chunked" in log.read_text()
    assert "attention: eager (the model's own, full row mask); loss: targets only, chunked" in eager_log.read_text()

    def first_steps(path):
        lines = [(kind, values) for kind, values in runs.metrics_lines(path) if kind in ("train", "eval") and values["step"] <= 10]
        return [(kind, values["step"], values.get("loss", values.get("cross_entropy")), values.get("grad_norm", 0.0)) for kind, values in lines]

    default, eager = first_steps(log), first_steps(eager_log)
    assert [step[:2] for step in default] == [step[:2] for step in eager] and len(default) == 12
    for ours, theirs in zip(default, eager):
        assert ours[2:] == pytest.approx(theirs[2:], rel=1e-4), (ours, theirs)


def test_an_epoch_that_leaves_a_rank_without_rows_trains_and_exports(runs, tmp_path):
    """5 examples, one per row, 4 rows per step over 2 processes: the second step has one row, so
    one rank's micro batch is padding only. Its loss must still be in the graph (zero gradients),
    or its backward fails and the other rank's reduce-scatter waits for it."""
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"prompt": f"Question {i}?", "response": f"Answer {i}."}) + "\n" for i in range(5)))
    command = runs.command(tmp_path / "out", "max_duration=2ep", "packing=false")
    command[command.index("--train") + 1] = str(train)
    command[command.index("--test") + 1] = str(train)
    log = tmp_path / "run.log"
    assert runs.run(command, log) == 0, log.read_text()
    steps = [values["step"] for kind, values in runs.metrics_lines(log) if kind == "train"]
    assert steps == [1, 2, 3, 4]  # 2 steps per epoch: 4 rows, then 1
    assert (tmp_path / "out" / "model" / "model-manifest.json").is_file()
