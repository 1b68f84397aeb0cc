"""The pre-flight memory estimate (``ftstack.estimate``) and ``ftstack estimate``.

Hand-checked figures for MPT-7B (6,649,286,656 parameters: 32 x (12 x 4096^2 + 2 x 4096) +
50432 x 4096 + 4096) at max_seq_len 512, micro batch 4 (2048 tokens), on 8 A10Gs (22.49 GiB each,
80% = 17.99 GiB allowed):
  states 16 bytes x 6.649e9 / 8 = 12.39 GiB; gathered blocks 2 x 201.3M x 2 B = 0.75 GiB; one
  block's reduce-scatter buffers 201.3M x 6 B = 1.13 GiB; root 206.6M x 4 B = 0.77 GiB;
  with checkpointing: block inputs 32 x 2048 x 4096 x 2 B = 0.50 GiB, and the larger of the loss
  (1024 x 50432 x 14 B + 2 x 2048 x 4096 x 2 B = 0.70 GiB) and one block's recompute (0.39 GiB):
  peak 16.23 GiB -> fits; without: 32 x 34 x 2048 x 4096 x 2 B = 8.50 GiB of activations, peak
  24.23 GiB -> does not fit.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from ftstack.cli import main
from ftstack.estimate import Setup, attn_path_for, estimate_memory, shard_size, smallest_changes
from ftstack.instances import INSTANCE_TYPES, instance_type
from ftstack.model_shapes import model_shape

GIB = 2**30


def _estimate(instance: str, ac: bool = True, seq: int = 512, batch: int = 4, nodes: int = 1, model: str = "mpt-7b"):
    shape = model_shape(model)
    return estimate_memory(Setup(shape, instance_type(instance), seq, batch, ac, "flex", nodes))


def test_mpt_7b_parameter_count_is_the_published_6_7b():
    assert model_shape("mpt-7b").n_params == 6_649_286_656


def test_mpt_7b_on_g5_48xlarge_fits_only_with_sharding_and_activation_checkpointing():
    on, off = _estimate("ml.g5.48xlarge", ac=True), _estimate("ml.g5.48xlarge", ac=False)
    assert on.shard == 8
    assert on.peak / GIB == pytest.approx(16.23, abs=0.01) and on.fits
    assert off.peak / GIB == pytest.approx(24.23, abs=0.01) and not off.fits
    assert on.items["activations kept for backward"] == 32 * 2048 * 4096 * 2
    # Without sharding (every GPU holding all states, as DDP would) nothing else could save it.
    assert 16 * model_shape("mpt-7b").n_params > instance_type("ml.g5.48xlarge").gpu_bytes
    changes = smallest_changes(off.setup, INSTANCE_TYPES)
    first, fixed = changes[0]
    assert "activation checkpointing" in first and fixed.fits
    # Another type is proposed only with bf16 tensor cores: p3dn's 32 GB V100s would hold the
    # states, but the job's bf16 would crawl on them.
    (other,) = [e.setup.instance for c, e in changes if c.startswith("--instance-type")]
    assert other.gpu.bf16 and not other.name.startswith(("ml.p3", "ml.g4dn"))


def test_mpt_7b_does_not_fit_on_g5_2xlarge():
    est = _estimate("ml.g5.2xlarge")
    assert est.shard == 1 and not est.fits
    assert est.optimizer_peak == 20 * model_shape("mpt-7b").n_params  # 16 bytes of states + AdamW's temporary
    changes = dict(smallest_changes(est.setup, INSTANCE_TYPES))
    assert all(e.fits for e in changes.values()) and any(c.startswith("--instance-count") for c in changes)


def test_mpt_7b_fits_on_p4d_24xlarge():
    assert _estimate("ml.p4d.24xlarge").fits and _estimate("ml.p4d.24xlarge", ac=False).fits


def test_hybrid_sharding_on_several_nodes_splits_states_within_a_node_only():
    one, two = _estimate("ml.g5.48xlarge"), _estimate("ml.g5.48xlarge", nodes=2)
    assert two.shard == 8 and two.items == one.items and two.notes
    assert shard_size(instance_type("ml.g5.2xlarge"), 4) == 4  # one GPU a node: shard across nodes


def test_model_from_config_json(tmp_path):
    config = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape = model_shape(str(tmp_path))
    assert shape.n_params == 8_030_261_248  # Llama-3-8B's published count
    assert dataclasses.replace(model_shape(str(tmp_path / "config.json")), name=shape.name) == shape
    assert estimate_memory(Setup(shape, instance_type("ml.p4d.24xlarge"), 2048, 4)).fits


def test_bad_config_json_names_the_key(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    assert main(["estimate", "--model", str(tmp_path), "--instance-type", "ml.g5.48xlarge"]) == 2
    err = capsys.readouterr().err
    assert "num_attention_heads" in err and "config.json" in err and "Traceback" not in err


def test_cli_json(capsys):
    assert main(["estimate", "--instance-type", "ml.g5.48xlarge", "--no-activation-checkpointing", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] is False and out["settings"]["attn_path"] == "sdpa"  # the A10G: FlexAttention's kernels do not fit
    assert out["peak_bytes"] == sum(list(out["per_gpu_bytes"].values())[:8]) + out["per_gpu_bytes"]["loss (targets only, 1024-token chunks)"]
    assert "activation checkpointing" in out["changes_that_fit"][0]["change"]


@pytest.mark.parametrize("args, needle", [
    (["--instance-type", "ml.g9.huge"], "not a GPU training instance type"),
    (["--instance-type", "ml.g5.48xlarge", "--model", "someone/some-model"], "config.json"),
    (["--instance-type", "ml.g5.48xlarge", "--micro-batch", "0"], "--micro-batch"),
    (["--instance-type", "ml.g5.48xlarge", "--mfu", "3"], "--mfu"),
    (["--model", "mpt-7b"], "--instance-type is required"),
    (["--instance-type", "ml.g5.48xlarge", "--tokenizer", "tok"], "give --data"),
    (["--instance-type", "ml.g5.48xlarge", "--attn-impl", "flex", "--model", "mpt-7b", "--max-seq-len", "-5"], "--max-seq-len"),
])
def test_cli_errors(args, needle, capsys):
    assert main(["estimate", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_cli_data_prints_epoch_with_assumptions(tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": "q" * 400, "response": "r" * 1600}) + "\n" for _ in range(1000)))
    assert main(["estimate", "--instance-type", "ml.g5.48xlarge", "--data", str(data), "--json"]) == 0
    epoch = json.loads(capsys.readouterr().out)["epoch"]
    # (400 + 94 template chars) / 4 -> 124 prompt tokens, + 400 response + 1 EOS = 512: one row each
    assert epoch["records"] == 1000 and epoch["tokens"] == 512_000 and epoch["rows"] == 1000 and epoch["steps"] == 8
    assert epoch["cost"] > 0 and any("MFU" in a for a in epoch["assumptions"]) and any("price" in a for a in epoch["assumptions"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert main(["estimate", "--instance-type", "ml.g5.48xlarge", "--data", str(bad)]) == 2
    assert "bad.jsonl" in capsys.readouterr().err


def test_the_shard_size_is_the_training_codes():
    from ftstack_train.distributed import plan_sharding

    for name in ("ml.g5.2xlarge", "ml.g5.12xlarge", "ml.p4d.24xlarge"):
        t = instance_type(name)
        for nodes in (1, 2, 4):
            for strategy in ("auto", "FULL_SHARD", "HYBRID_SHARD"):
                plan = plan_sharding(strategy, t.gpus * nodes, (t.gpus, t.gpus))
                assert shard_size(t, nodes, strategy) == plan.shape[-1], (name, nodes, strategy)


@pytest.fixture(scope="module")
def tiny_mpt(tmp_path_factory):
    """ftstack_train's own tiny MPT and its tokenizer, made once for the module."""
    from ftstack_train.model import make_tiny_model

    texts = ["the quick brown fox jumps over the lazy dog", "what is the answer to this question"] * 20
    return make_tiny_model("tiny-mpt", texts, tmp_path_factory.mktemp("tiny") / "m", seed=0)


def test_cli_data_with_a_tokenizer_counts_and_packs_as_the_job(tiny_mpt, tmp_path, capsys):
    from ftstack_train.config import DEFAULT_PROMPT_TEMPLATE
    from ftstack_train.data import pack_rows, tokenize_files
    from ftstack_train.model import load_tokenizer

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": "what is " * (i % 7 + 1), "response": "the fox " * (i % 13 + 1)}) + "\n"
                            for i in range(300)))
    assert main(["estimate", "--instance-type", "ml.g5.48xlarge", "--data", str(data), "--tokenizer", str(tiny_mpt),
                 "--max-seq-len", "256", "--json"]) == 0
    epoch = json.loads(capsys.readouterr().out)["epoch"]
    split = tokenize_files("train", [data], load_tokenizer(str(tiny_mpt)), DEFAULT_PROMPT_TEMPLATE, 256, 1.0)
    lengths = [len(ids) for ids in split.ids]
    assert epoch["tokens"] == sum(lengths) and epoch["rows"] == len(pack_rows(lengths, 256, packing=True))
    assert epoch["steps"] == -(-epoch["rows"] // 128) and "tokenizer" in epoch["assumptions"][0]


@pytest.mark.parametrize("path", ["eager", "sdpa"])
def test_estimate_matches_what_a_cpu_run_of_a_tiny_mpt_allocates(tiny_mpt, path):
    """The model checked, not only its arithmetic: a tiny MPT (ftstack_train's own, from its
    config.json) takes one fp32 training step on CPU in one process (shard group of 1) with the
    job's attention path and targets-only loss, activation checkpointing off. Parameters,
    gradients and AdamW state must equal the estimate exactly; the tensors autograd keeps for
    the backward pass (the saved-tensor hooks see each one; unique storages, parameters left
    out), plus the step's attention inputs, within 3% of the estimate's activations and inputs."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    from ftstack_train.attention import use_packed_attention
    from ftstack_train.data import attention_bias
    from ftstack_train.loss import use_targets_only_loss

    model_dir = tiny_mpt
    batch, seq = 2, 256
    est = estimate_memory(Setup(model_shape(str(model_dir)), instance_type("ml.g5.2xlarge"), seq, batch, False, path, compute_bytes=4))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.train()
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    segments = torch.ones(batch, seq, dtype=torch.long)  # one example filling each row: the estimate's worst case
    kwargs, held = {"input_ids": ids}, 0
    if path == "eager":
        kwargs["attention_mask"] = attention_bias(segments, torch.float32)
        held = kwargs["attention_mask"].nbytes  # the trainer's dense bias lives through the step
    else:
        kwargs.update(use_packed_attention(model, path).prepare(segments, torch.device("cpu")))
    use_targets_only_loss(model).targets = ids
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**kwargs).logits
    optimizer = torch.optim.AdamW(model.parameters())
    loss.backward()
    optimizer.step()
    item = est.items
    assert item["parameters (fp32, sharded)"] == sum(p.nbytes for p in model.parameters())
    assert item["gradients (fp32, sharded)"] == sum(p.grad.nbytes for p in model.parameters())
    moments = sum(s["exp_avg"].nbytes + s["exp_avg_sq"].nbytes for s in optimizer.state.values())
    assert item["optimizer state (AdamW, 2 x fp32, sharded)"] == moments
    estimated = item["activations kept for backward"] + item[f"per-step attention inputs ({path})"]
    measured = sum(saved.values()) + held
    assert measured == pytest.approx(estimated, rel=0.03), (measured, estimated)


def test_changes_are_sizes_the_job_accepts_and_say_they_keep_checkpointing_on():
    """Each proposed change must pass the job's batch_split for the global batch (the rows divide
    over the GPUs, the micro batch divides each GPU's rows), and a change found with activation
    checkpointing turned on says so."""
    from dataclasses import replace

    from ftstack_train.config import batch_split, parse_config

    def accepted(est, global_batch):
        cfg, _ = parse_config(overrides=[f"global_train_batch_size={global_batch}",
                                         f"device_train_microbatch_size={est.setup.micro_batch}"])
        batch_split(cfg, est.setup.instance.gpus * est.setup.nodes, "cuda")  # raises ConfigError if not
        return True

    # 16 rows per GPU at 2048 x 4 on 8 A10Gs: micro batch 3 would fit but does not divide 16.
    at_2048 = _estimate("ml.g5.48xlarge", seq=2048)
    changes = smallest_changes(at_2048.setup, INSTANCE_TYPES, global_batch=128)
    assert changes[0][0].startswith("micro batch 2 ") and all(accepted(e, 128) for _, e in changes)
    # Checkpointing off and nothing fits without it: every later change keeps it on, and says so.
    off = replace(_estimate("ml.g5.12xlarge", seq=2048).setup, micro_batch=1, activation_checkpointing=False)
    changes = smallest_changes(off, INSTANCE_TYPES, global_batch=128)
    assert changes and all(e.fits and accepted(e, 128) for _, e in changes)
    for text, est in changes:
        assert est.setup.activation_checkpointing and (text.startswith("turn on") or "with activation checkpointing" in text)
    # Llama-3-8B on 4-GPU instances: only instance counts whose GPUs divide 128 rows.
    llama = replace(off, shape=model_shape("llama-3-8b"), activation_checkpointing=True)
    nodes = [e.setup.nodes for text, e in smallest_changes(llama, INSTANCE_TYPES, global_batch=128) if text.startswith("--instance-count")]
    assert nodes and all(128 % (4 * n) == 0 for n in nodes)


@pytest.mark.parametrize("model_type", ["mpt", "llama", "gpt_neox"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("requested", ["auto", "eager", "sdpa", "flex"])
@pytest.mark.parametrize("gpu", sorted({t.gpu for t in INSTANCE_TYPES.values() if t.gpu.bf16}, key=lambda g: g.name), ids=lambda g: g.name)
def test_the_attention_path_is_the_one_the_job_takes_on_a_gpu(monkeypatch, model_type, dropout, requested, gpu):
    """The estimator cannot import the job's resolve_attn_impl (torch): its copy must agree, the
    refusals included, on each GPU as its driver would describe it."""
    import dataclasses
    import types

    torch = pytest.importorskip("torch")
    from ftstack_train.attention import resolve_attn_impl
    from ftstack_train.errors import ConfigError

    properties = types.SimpleNamespace(shared_memory_per_block_optin=gpu.shared_memory)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)
    shape = dataclasses.replace(model_shape("mpt-7b"), model_type=model_type, attn_dropout=dropout)
    try:
        job = resolve_attn_impl(requested, torch.device("cuda"), model_type, dropout)
    except ConfigError:
        with pytest.raises(ValueError):
            attn_path_for(shape, requested, gpu)
    else:
        assert attn_path_for(shape, requested, gpu) == job


def test_flex_on_the_gpus_whose_shared_memory_holds_its_kernels():
    assert {t.gpu.name for t in INSTANCE_TYPES.values() if t.gpu.flex} == {
        "A100-SXM4-40GB", "A100-SXM4-80GB", "H100-SXM-80GB", "H200-SXM-141GB"}
