"""The packed attention paths and the targets-only loss against the models' own eager path, on
real tiny MPT (ALiBi) and Llama (RoPE, grouped-query) models: logits of every real token, the
loss and every gradient, packed and unpacked, fp32 and bf16."""

from __future__ import annotations

import json
import types

import pytest
import torch

from ftstack_train.attention import Layout, attention_dropout, resolve_attn_impl, use_packed_attention
from ftstack_train.data import collate, pack_rows
from ftstack_train.errors import ConfigError
from ftstack_train.model import load_model, make_tiny_model
from ftstack_train.trainer import Model

from test_data import CORPUS, PAD, random_split

KINDS = ("tiny-mpt", "tiny-llama")
CPU = torch.device("cpu")
LENGTHS = [5, 9, 17, 4, 12, 30, 7, 3]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("attention")
    return {kind: make_tiny_model(kind, CORPUS, root / kind, seed=0) for kind in KINDS}


def load(source, dtype=torch.float32):
    return load_model(str(source), pretrained=True, vocab_size=300).to(dtype)


def batch_of(packed: bool):
    split = random_split(LENGTHS, prompt_len=3, seed=4)
    rows = pack_rows(LENGTHS, 40, packing=packed)
    # One empty row more: padding-only rows reach the model at the end of an epoch.
    return collate(split, rows, 40, PAD, min_rows=len(rows) + 1)


def loss_and_grads(model: Model, batch):
    model.module.zero_grad(set_to_none=True)
    loss = model.loss_sum(batch, CPU)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.module.named_parameters()}


def real_logits(model: Model, batch):
    """Logits of the real (non-padding) tokens, through the model's own forward arguments."""
    segments = batch.segment_ids
    if model.attention is None:
        from ftstack_train.data import attention_bias
        kwargs = {"attention_mask": attention_bias(segments, model.compute_dtype)}
    else:
        kwargs = model.attention.prepare(segments)
    if model.takes_positions:
        kwargs["position_ids"] = batch.position_ids
    with torch.no_grad():
        logits = model.module(input_ids=batch.input_ids, **kwargs).logits
    return logits[segments > 0]


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("kind", KINDS)
def test_sdpa_path_and_targets_only_loss_equal_eager(kind, packed, sources):
    eager = Model(load(sources[kind]), torch.float32, PAD)
    fast = Model.build(load(sources[kind]), "sdpa", torch.float32, CPU, PAD)
    assert fast.attention.impl == "sdpa" and fast.head is not None
    fast.head.chunk_tokens = 7  # several chunks, the last one short
    batch = batch_of(packed)

    loss, grads = loss_and_grads(eager, batch)
    fast_loss, fast_grads = loss_and_grads(fast, batch)

    torch.testing.assert_close(fast_loss, loss)
    torch.testing.assert_close(fast_grads, grads)
    torch.testing.assert_close(real_logits(fast, batch), real_logits(eager, batch))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_micro_batch_without_targets_has_a_loss_in_the_graph(kind, impl, sources):
    """The end of an epoch gives some ranks a micro batch of padding only: its loss must still
    reach every parameter in the backward pass (zero gradients), as the full-logits loss did, or
    backward fails and FSDP's collectives on the other ranks wait for this one."""
    fast = Model.build(load(sources[kind]), impl, torch.float32, CPU, PAD)
    assert fast.head is not None
    empty = collate(random_split([5]), [], 40, PAD)
    loss = fast.loss_sum(empty, CPU)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    grads = [p.grad for p in fast.module.parameters()]
    assert all(g is not None and not g.any() for g in grads)


@pytest.mark.parametrize("kind", KINDS)
def test_sdpa_path_in_bf16_is_as_close_to_fp32_as_eager_in_bf16(kind, sources):
    """bf16 rounds differently in different kernels, so the fast path is held to the eager
    path's own bf16 error against the fp32 result, per parameter."""
    exact = Model(load(sources[kind]), torch.float32, PAD)
    eager = Model(load(sources[kind], torch.bfloat16), torch.bfloat16, PAD)
    fast = Model.build(load(sources[kind], torch.bfloat16), "sdpa", torch.bfloat16, CPU, PAD)
    batch = batch_of(packed=True)

    loss, grads = loss_and_grads(exact, batch)
    eager_loss, eager_grads = loss_and_grads(eager, batch)
    fast_loss, fast_grads = loss_and_grads(fast, batch)

    torch.testing.assert_close(fast_loss, loss, rtol=2e-3, atol=0.0)
    torch.testing.assert_close(eager_loss, loss, rtol=2e-3, atol=0.0)
    for name, grad in grads.items():
        def error(g):
            return float((g.float() - grad).norm() / grad.norm())
        assert error(fast_grads[name]) <= max(1.5 * error(eager_grads[name]), 5e-3), name
        assert error(fast_grads[name]) < 0.03, name


@pytest.mark.parametrize("kind", KINDS)
def test_flex_path_forward_equals_eager(kind, sources):
    """FlexAttention's backward needs a GPU (bench/gpu.py checks its gradients there); its block
    mask and ALiBi score modification are checked here, compiled, through the forward."""
    eager = Model(load(sources[kind]), torch.float32, PAD)
    module = load(sources[kind])
    flex = Model(module, torch.float32, PAD, use_packed_attention(module, "flex"))
    batch = batch_of(packed=True)

    torch.testing.assert_close(real_logits(flex, batch), real_logits(eager, batch), rtol=1e-4, atol=1e-4)


def test_flex_compiles_once_for_every_batch_of_one_shape(sources):
    """Each batch brings a new block mask; the compiled kernel must not be rebuilt for it (a
    recompile per batch would cost more than the attention saves, and stop at dynamo's limit)."""
    from torch._dynamo.utils import counters

    module = load(sources["tiny-mpt"])
    flex = Model(module, torch.float32, PAD, use_packed_attention(module, "flex"))
    real_logits(flex, batch_of(packed=True))
    compiled = counters["stats"]["unique_graphs"]
    for seed in range(3):
        split = random_split(LENGTHS[seed:] + LENGTHS[:seed], prompt_len=3, seed=seed)
        rows = pack_rows([len(a) for a in split.ids], 40, packing=True)
        batch = collate(split, rows, 40, PAD, min_rows=len(batch_of(packed=True).input_ids))
        real_logits(flex, batch)
    assert counters["stats"]["unique_graphs"] == compiled


@pytest.mark.parametrize("kind", KINDS)
def test_the_packed_path_isolates_examples(kind, sources):
    """The negative control: a layout that joins two examples changes the second one's logits."""
    fast = Model.build(load(sources[kind]), "sdpa", torch.float32, CPU, PAD)
    batch = batch_of(packed=True)
    joined = batch.segment_ids.clone()
    row = 0
    joined[row][joined[row] == 2] = 1
    second = batch.segment_ids[row] == 2
    args = {"position_ids": batch.position_ids} if fast.takes_positions else {}
    with torch.no_grad():
        apart = fast.module(input_ids=batch.input_ids, **fast.attention.prepare(batch.segment_ids), **args).logits
        together = fast.module(input_ids=batch.input_ids, **fast.attention.prepare(joined), **args).logits
    assert (apart[row][second] - together[row][second]).abs().max() > 1e-3


def test_mpt_generation_with_a_cache_takes_mpts_own_attention(sources):
    plain = load(sources["tiny-mpt"]).eval()
    module = load(sources["tiny-mpt"]).eval()
    fast = Model.build(module, "sdpa", torch.float32, CPU, PAD)
    fast.attention.prepare(batch_of(packed=True).segment_ids)  # a layout left from training
    prompt = torch.tensor([[5, 17, 42, 8]])
    kwargs = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": PAD, "use_cache": True}
    assert torch.equal(module.generate(prompt, **kwargs), plain.generate(prompt, **kwargs))


def test_the_config_saved_with_a_model_names_no_packed_attention(sources, tmp_path):
    module = load(sources["tiny-llama"])
    Model.build(module, "sdpa", torch.float32, CPU, PAD)
    module.config.save_pretrained(tmp_path)
    assert "ftstack" not in (tmp_path / "config.json").read_text()
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"


def test_layout_spans_cover_each_example_and_skip_padding():
    layout = Layout.build(torch.tensor([[1, 1, 2, 2, 2, 0, 0], [1, 2, 3, 0, 0, 0, 0], [0] * 7]), flex=False)
    assert layout.spans == [[(0, 2), (2, 5)], [(0, 1), (1, 2), (2, 3)], []]


def test_alibi_bias_is_mpts_up_to_a_constant_per_query():
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    slopes = -build_mpt_alibi_tensor(4, 2)[:, 0, 0]
    ours = Layout.build(torch.ones(1, 6, dtype=torch.long), flex=False).alibi(slopes, 6, torch.float32)[0]
    mpt = build_mpt_alibi_tensor(4, 6)  # (heads, 1, keys): slope x (key - last)
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()
    difference = (ours - mpt).masked_fill(~allowed, 0.0)
    # For each query, the same constant over its allowed keys: softmax does not see it.
    torch.testing.assert_close(difference, difference[..., :1].expand_as(difference).masked_fill(~allowed, 0.0))
    assert torch.isinf(ours[:, ~allowed]).all()


A100, A10G = 166912, 101376
"""Shared memory per block (opt-in) as the driver reports it: A100 (compute capability 8.0), and
the A10G of ml.g5 (8.6, as the L4 and L40S of 8.9)."""


@pytest.fixture
def gpu(monkeypatch):
    """Makes ``torch.cuda.get_device_properties`` answer for a GPU with the given shared memory."""
    def use(shared_memory: int) -> None:
        properties = types.SimpleNamespace(shared_memory_per_block_optin=shared_memory)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)
    return use


@pytest.mark.parametrize("requested, device, model_type, dropout, expected", [
    ("auto", "cpu", "mpt", 0.0, "sdpa"),
    ("auto", "cpu", "llama", 0.0, "sdpa"),
    ("auto", "cuda", "mpt", 0.0, "flex"),
    ("auto", "cuda", "llama", 0.1, "sdpa"),  # FlexAttention has no dropout
    ("auto", "cuda", "gpt_neox", 0.0, "eager"),  # not verified: the model's own attention
    ("eager", "cuda", "mpt", 0.0, "eager"),
    ("sdpa", "cuda", "mpt", 0.0, "sdpa"),
])
def test_auto_takes_the_fastest_exact_path(gpu, requested, device, model_type, dropout, expected):
    gpu(A100)
    assert resolve_attn_impl(requested, torch.device(device), model_type, dropout) == expected


@pytest.mark.parametrize("model_type", ["mpt", "llama"])
def test_on_a_gpu_whose_shared_memory_cannot_hold_flexs_kernels_auto_takes_sdpa(gpu, model_type):
    """inductor compiles FlexAttention with its A100 blocks on every 8.x GPU, which needs 128 KiB of
    shared memory at head dimension 128; the A10G, L4 and L40S have 99 KiB. Asked for by name,
    flex is still tried."""
    gpu(A10G)
    assert resolve_attn_impl("auto", torch.device("cuda"), model_type) == "sdpa"
    assert resolve_attn_impl("flex", torch.device("cuda"), model_type) == "flex"


@pytest.mark.parametrize("requested, device, model_type, dropout, words", [
    ("flex", "cpu", "mpt", 0.0, "no backward pass on CPU"),
    ("flex", "cuda", "mpt", 0.1, "dropout"),
    ("sdpa", "cpu", "gpt_neox", 0.0, "verified for mpt, llama models only"),
])
def test_a_path_that_cannot_train_is_refused_with_the_key(gpu, requested, device, model_type, dropout, words):
    gpu(A100)
    with pytest.raises(ConfigError, match=rf"^attn_impl: .*{words}.*; use "):
        resolve_attn_impl(requested, torch.device(device), model_type, dropout)


def test_attention_dropout_is_read_where_each_model_keeps_it(sources):
    assert attention_dropout(load(sources["tiny-mpt"]).config) == 0.0
    config = load(sources["tiny-llama"]).config
    config.attention_dropout = 0.25
    assert attention_dropout(config) == 0.25


def test_evaluation_with_flex_pads_every_batch_to_one_shape(sources, process_group):
    """A short last batch would compile FlexAttention again (and past dynamo's limit it runs
    uncompiled); padded to the batch size, every batch has one shape, and the loss is the same."""
    from torch._dynamo.utils import counters

    from ftstack_train.config import parse_config
    from ftstack_train.distributed import Dist
    from ftstack_train.trainer import evaluate

    cfg, _ = parse_config(overrides=["max_seq_len=48", "device_eval_batch_size=5"])
    split = random_split([5, 9, 17, 4, 12, 30, 7, 3, 11, 6, 8, 14], prompt_len=3, seed=7)
    rows = [[i] for i in range(12)]  # batches of 5, 5 and 2 rows
    d = Dist(0, 1, 0, CPU)
    module = load(sources["tiny-mpt"])
    flex = Model(module, torch.float32, PAD, use_packed_attention(module, "flex"))
    before = counters["stats"]["unique_graphs"]
    flex_ce, flex_tokens = evaluate(flex, split, rows, cfg, d)
    assert counters["stats"]["unique_graphs"] - before == 1
    eager_ce, eager_tokens = evaluate(Model(load(sources["tiny-mpt"]), torch.float32, PAD), split, rows, cfg, d)
    assert flex_tokens == eager_tokens
    assert flex_ce == pytest.approx(eager_ce, rel=1e-5)
