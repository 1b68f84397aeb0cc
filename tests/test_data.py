"""Tests for ftstack_train.data: prompt-masked labels, truncation and drop accounting, packing,
the per-example attention mask (checked through real tiny MPT and Llama models), the step plan
and the data channel listing."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ftstack_train.data import (
    IGNORE_INDEX, StepPlan, TokenizedSplit, attention_bias, collate, epoch_order, format_prompt,
    list_data_files, pack_rows, tokenize_files,
)
from ftstack_train.errors import ConfigError, DatasetError
from ftstack_train.model import load_model, load_tokenizer, make_tiny_model
from ftstack_train.trainer import Model

KINDS = ("tiny-mpt", "tiny-llama")
TEMPLATE = "Question: {question}\nAnswer:"
CORPUS = [
    "Question: what is two plus two?\nAnswer: four",
    "Question: name a colour of the sky\nAnswer: the sky is blue on a clear day",
    "the quick brown fox jumps over the lazy dog while the cat sleeps in the sun",
] * 10
PAD = 1  # the tiny tokenizers' <|pad|>; never a target, so its value does not matter to the loss


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Both tiny models, with a tokenizer trained on CORPUS, built once for the module."""
    root = tmp_path_factory.mktemp("tiny")
    return {kind: make_tiny_model(kind, CORPUS, root / kind, seed=0) for kind in KINDS}


@pytest.fixture(scope="module")
def tokenizer(tiny_dirs):
    return load_tokenizer(str(tiny_dirs["tiny-mpt"]))


@pytest.fixture(scope="module")
def models(tiny_dirs, tokenizer):
    return {kind: load_model(str(path), pretrained=True, vocab_size=len(tokenizer)).eval() for kind, path in tiny_dirs.items()}


def write_jsonl(path, records):
    """``records`` are (prompt, response) pairs, or None for a blank line."""
    lines = ["" if r is None else json.dumps({"prompt": r[0], "response": r[1]}) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def prompt_ids(tokenizer, prompt):
    return tokenizer(format_prompt(TEMPLATE, prompt), add_special_tokens=True)["input_ids"]


def response_ids(tokenizer, response):
    return tokenizer(response, add_special_tokens=False)["input_ids"]


def random_split(lengths, prompt_len=2, seed=0, high=250):
    """A split of random token ids with the given lengths (the vocabulary is about 290 tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = [torch.randint(2, high, (n,), generator=g).numpy().astype(np.int32) for n in lengths]
    return TokenizedSplit("train", ids=ids, prompt_lens=[prompt_len] * len(lengths), records=len(lengths))


def forward_logits(model: Model, batch, segment_ids=None):
    """Logits from exactly the inputs that ``Model.loss_sum`` gives the module."""
    kwargs = {
        "input_ids": batch.input_ids,
        "attention_mask": attention_bias(batch.segment_ids if segment_ids is None else segment_ids, torch.float32),
    }
    if model.takes_positions:
        kwargs["position_ids"] = batch.position_ids
    with torch.no_grad():
        return model.module(**kwargs).logits


# --- prompt template and prompt-masked labels -------------------------------------------------

def test_format_prompt_replaces_the_field_once_and_leaves_braces_alone():
    assert format_prompt(TEMPLATE, "what is {question} and {x}?") == "Question: what is {question} and {x}?\nAnswer:"


def test_labels_are_the_response_and_eos_shifted_onto_the_positions_before_them(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [("what is two plus two?", " four")])
    split = tokenize_files("train", [path], tokenizer, TEMPLATE, max_seq_len=64, max_dropped_fraction=0.0)
    prompt = prompt_ids(tokenizer, "what is two plus two?")
    target = response_ids(tokenizer, " four") + [tokenizer.eos_token_id]
    assert split.ids[0].tolist() == prompt + target
    assert split.prompt_lens == [len(prompt)]

    batch = collate(split, [[0]], 64, PAD)
    labels, ids = batch.labels[0], batch.input_ids[0]
    length, p = len(prompt) + len(target), len(prompt)
    where = (labels != IGNORE_INDEX).nonzero().flatten().tolist()
    assert where == list(range(p - 1, length - 1))
    assert labels[where].tolist() == target
    assert labels[where].tolist() == ids[[t + 1 for t in where]].tolist()
    assert (labels[: p - 1] == IGNORE_INDEX).all()  # the prompt predicts nothing
    assert (labels[length - 1 :] == IGNORE_INDEX).all()  # nor does EOS, nor padding
    assert (ids[length:] == PAD).all()
    assert batch.label_tokens == len(target)
    assert batch.real_tokens == length


def test_two_packed_examples_keep_their_own_labels_segments_and_positions(tmp_path, tokenizer):
    pairs = [("what is two plus two?", " four"), ("name a colour of the sky", " the sky is blue")]
    path = write_jsonl(tmp_path / "train.jsonl", pairs)
    split = tokenize_files("train", [path], tokenizer, TEMPLATE, max_seq_len=64, max_dropped_fraction=0.0)
    n0, n1 = (len(a) for a in split.ids)
    batch = collate(split, [[0, 1]], 64, PAD)
    labels, ids, seg = batch.labels[0], batch.input_ids[0], batch.segment_ids[0]

    assert seg.tolist() == [1] * n0 + [2] * n1 + [0] * (64 - n0 - n1)
    assert batch.position_ids[0].tolist() == list(range(n0)) + list(range(n1)) + [0] * (64 - n0 - n1)
    # The last token of example 1 (its EOS) must not learn to predict example 2's first token.
    assert ids[n0 - 1] == tokenizer.eos_token_id
    assert labels[n0 - 1] == IGNORE_INDEX
    # Every target lies inside one example: position t and its target t+1 share a segment.
    for t in (labels != IGNORE_INDEX).nonzero().flatten().tolist():
        assert seg[t] == seg[t + 1] > 0
        assert labels[t] == ids[t + 1]
    for (prompt, response), start, p in zip(pairs, (0, n0), split.prompt_lens):
        target = response_ids(tokenizer, response) + [tokenizer.eos_token_id]
        assert p == len(prompt_ids(tokenizer, prompt))
        assert labels[start + p - 1 : start + p - 1 + len(target)].tolist() == target
        assert (labels[start : start + p - 1] == IGNORE_INDEX).all()


# --- truncation and drop accounting -------------------------------------------------------------

def accounting_file(tmp_path, tokenizer):
    """Line 1 fits with its EOS, line 2 is truncated, line 3 is blank, line 4's prompt alone is too
    long, line 5 fits. Returns the file and a max_seq_len that makes it so."""
    short, long = " four", " the sky is blue on a clear day and the fox jumps over the lazy dog"
    p = len(prompt_ids(tokenizer, "tell me"))
    max_seq_len = p + len(response_ids(tokenizer, short)) + 1
    assert len(response_ids(tokenizer, long)) + 1 > max_seq_len - p + 2  # truncated by several tokens
    big = "the quick brown fox " * 20
    assert len(prompt_ids(tokenizer, big)) > max_seq_len
    path = write_jsonl(tmp_path / "train.jsonl", [("tell me", short), ("tell me", long), None, (big, short), ("tell me", short)])
    return path, max_seq_len


def test_a_long_response_is_cut_to_max_seq_len_and_a_long_prompt_is_dropped_by_line(tmp_path, tokenizer):
    path, max_seq_len = accounting_file(tmp_path, tokenizer)
    split = tokenize_files("train", [path], tokenizer, TEMPLATE, max_seq_len, max_dropped_fraction=0.25)
    prompt = prompt_ids(tokenizer, "tell me")
    eos = tokenizer.eos_token_id

    assert (split.records, len(split.ids), split.truncated, split.dropped) == (4, 3, 1, ["train.jsonl:4"])
    assert split.records == len(split.ids) + len(split.dropped)  # nothing vanishes silently
    fits, cut, last = (a.tolist() for a in split.ids)
    assert len(fits) == max_seq_len and fits[-1] == eos  # exactly full, not truncated
    assert last == fits
    long = response_ids(tokenizer, " the sky is blue on a clear day and the fox jumps over the lazy dog")
    assert cut == prompt + long[: max_seq_len - len(prompt)]
    assert len(cut) == max_seq_len and eos not in cut[len(prompt) :]
    assert split.prompt_lens == [len(prompt)] * 3
    tokens = 3 * max_seq_len
    assert split.summary() == f"train: 4 records -> 3 examples, {tokens} tokens; 1 truncated, 1 dropped (train.jsonl:4)"


def test_a_prompt_one_token_short_of_max_seq_len_keeps_one_target(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [("tell me", " four")])
    p = len(prompt_ids(tokenizer, "tell me"))
    split = tokenize_files("train", [path], tokenizer, TEMPLATE, max_seq_len=p + 1, max_dropped_fraction=0.0)
    assert (split.truncated, split.dropped) == (1, [])
    assert collate(split, [[0]], p + 1, PAD).label_tokens == 1
    with pytest.raises(DatasetError):
        tokenize_files("train", [path], tokenizer, TEMPLATE, max_seq_len=p, max_dropped_fraction=0.0)


def test_more_drops_than_max_dropped_fraction_is_an_error_naming_both_settings(tmp_path, tokenizer):
    path, max_seq_len = accounting_file(tmp_path, tokenizer)
    with pytest.raises(DatasetError) as info:
        tokenize_files("train", [path], tokenizer, TEMPLATE, max_seq_len, max_dropped_fraction=0.24)
    message = str(info.value)
    assert f"max_seq_len={max_seq_len}" in message
    assert "max_dropped_fraction=0.24" in message
    assert "25.0%" in message and "train.jsonl:4" in message


def test_nothing_left_is_an_error_even_when_every_drop_is_allowed(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [("the quick brown fox " * 20, " four")])
    with pytest.raises(DatasetError, match="no example left"):
        tokenize_files("train", [path], tokenizer, TEMPLATE, max_seq_len=8, max_dropped_fraction=1.0)


def test_drops_name_file_and_line_across_files_and_tokenizer_batches(tmp_path, tokenizer):
    big = ("the quick brown fox " * 20, " four")
    a = [("tell me", " four")] * 1030
    a[1026] = big  # line 1027: in the second batch of 1024 records
    b = [("tell me", " four"), big, ("tell me", " four")]
    files = [write_jsonl(tmp_path / "a.jsonl", a), write_jsonl(tmp_path / "b.jsonl", b)]
    split = tokenize_files("train", files, tokenizer, TEMPLATE, max_seq_len=32, max_dropped_fraction=0.01)
    assert split.dropped == ["a.jsonl:1027", "b.jsonl:2"]
    assert (split.records, len(split.ids)) == (1033, 1031)


# --- packing ------------------------------------------------------------------------------------

def check_rows(rows, lengths, max_seq_len):
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= max_seq_len for row in rows)


def test_pack_rows_is_best_fit_decreasing():
    lengths = [5, 9, 3, 8, 2, 7, 1, 4, 6, 10]
    rows = pack_rows(lengths, 10, packing=True)
    check_rows(rows, lengths, 10)
    # 55 tokens in 6 rows of 10: the biggest first, each into the fullest row it fits.
    assert rows == [[9], [1, 6], [3, 4], [5, 2], [8, 7], [0]]


def test_without_packing_each_example_has_its_own_row():
    assert pack_rows([5, 9, 3], 10, packing=False) == [[0], [1], [2]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packing_covers_every_example_once_in_fewer_rows_deterministically(seed):
    lengths = np.random.default_rng(seed).integers(1, 65, size=300).tolist()
    rows = pack_rows(lengths, 64, packing=True)
    check_rows(rows, lengths, 64)
    assert rows == pack_rows(lengths, 64, packing=True)
    assert len(rows) < 0.6 * len(lengths)
    assert len(rows) <= 1.1 * sum(lengths) / 64 + 1  # near the lower bound, not merely "fewer"


# --- batches and the attention mask -------------------------------------------------------------

def test_collate_pads_with_empty_rows_up_to_min_rows():
    split = random_split([5, 7])
    batch = collate(split, [[0], [1]], 16, PAD, min_rows=4)
    assert batch.input_ids.shape == batch.labels.shape == batch.segment_ids.shape == (4, 16)
    assert (batch.input_ids[2:] == PAD).all()
    assert (batch.labels[2:] == IGNORE_INDEX).all()
    assert (batch.segment_ids[2:] == 0).all() and (batch.position_ids[2:] == 0).all()
    assert batch.label_tokens == (5 - 2) + (7 - 2)
    assert collate(split, [[0], [1]], 16, PAD, min_rows=1).input_ids.shape == (2, 16)
    empty = collate(split, [], 16, PAD)
    assert empty.input_ids.shape == (1, 16) and empty.label_tokens == empty.real_tokens == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_bias_is_causal_within_each_segment(dtype):
    segments = torch.tensor([[1, 1, 2, 2, 2, 0, 0], [0] * 7])
    bias = attention_bias(segments, dtype)
    assert bias.shape == (2, 1, 7, 7) and bias.dtype == dtype
    low = torch.finfo(dtype).min
    for b in range(2):
        for i in range(7):
            for j in range(7):
                allowed = j <= i and segments[b, i] == segments[b, j]
                assert bias[b, 0, i, j] == (0 if allowed else low), (b, i, j)
    assert (bias == 0).any(dim=-1).all()  # no row fully masked, padding and empty rows included


# --- per-example attention through the real models ----------------------------------------------

def example_slices(split, row):
    starts = np.cumsum([0] + [len(split.ids[i]) for i in row])
    return [slice(int(s), int(e)) for s, e in zip(starts[:-1], starts[1:])]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("middle", [6, 9, 3], ids=["same-length", "longer", "shorter"])
def test_a_packed_example_sees_only_itself(kind, middle, models):
    model = Model(models[kind], torch.float32, PAD)
    assert model.takes_positions == (kind == "tiny-llama")  # MPT is ALiBi: no position ids
    # Examples 0, 1, 2 packed; example 3 replaces the middle one with other tokens.
    split = random_split([5, 6, 7, middle], seed=1)
    s = 24
    packed = forward_logits(model, collate(split, [[0, 1, 2]], s, PAD))[0]
    changed = forward_logits(model, collate(split, [[0, 3, 2]], s, PAD))[0]
    first, _, third = example_slices(split, [0, 1, 2])
    first_c, _, third_c = example_slices(split, [0, 3, 2])

    tight = {"atol": 1e-5, "rtol": 1e-5}
    torch.testing.assert_close(changed[first_c], packed[first], **tight)
    torch.testing.assert_close(changed[third_c], packed[third], **tight)
    # Each packed example gives what it gives alone in its own row. MPT: ALiBi's offset is the
    # same for every key of a query, so it cancels. Llama: RoPE sees only relative positions, so
    # this holds for any per-example shift; the restart itself is checked on collate's output.
    alone = forward_logits(model, collate(split, [[0], [1], [2]], s, PAD))
    for r, part in enumerate(example_slices(split, [0, 1, 2])):
        torch.testing.assert_close(packed[part], alone[r, : part.stop - part.start], **tight)


@pytest.mark.parametrize("kind", KINDS)
def test_without_the_segment_mask_the_middle_example_leaks_into_the_third(kind, models):
    """The negative control: the isolation test above can fail."""
    model = Model(models[kind], torch.float32, PAD)
    split = random_split([5, 6, 7, 6], seed=1)
    third = example_slices(split, [0, 1, 2])[2]
    logits = []
    for row in ([0, 1, 2], [0, 3, 2]):
        batch = collate(split, [row], 24, PAD)
        logits.append(forward_logits(model, batch, segment_ids=torch.ones_like(batch.segment_ids))[0, third])
    assert (logits[0] - logits[1]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_loss_sum_is_the_cross_entropy_summed_over_target_tokens(kind, models):
    model = Model(models[kind], torch.float32, PAD)
    split = random_split([5, 6, 7], seed=2)
    batch = collate(split, [[0, 1], [2]], 16, PAD, min_rows=3)
    loss = model.loss_sum(batch, torch.device("cpu"))

    logits = forward_logits(model, batch).double()
    expected, count = torch.zeros((), dtype=torch.float64), 0
    for r in range(3):
        for t in range(16):
            target = int(batch.labels[r, t])
            if target != IGNORE_INDEX:
                expected += torch.logsumexp(logits[r, t], 0) - logits[r, t, target]
                count += 1
    assert count == (5 - 2) + (6 - 2) + (7 - 2)
    torch.testing.assert_close(loss.double(), expected, atol=1e-4, rtol=1e-5)
    # Packing does not change the loss: it is the sum of each example's loss alone.
    alone = sum(model.loss_sum(collate(split, [[i]], 16, PAD), torch.device("cpu")) for i in range(3))
    torch.testing.assert_close(loss, alone, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_an_empty_micro_batch_has_zero_loss_and_finite_gradients(kind, models):
    """The end of an epoch gives some ranks empty micro batches; they must still run cleanly."""
    module = models[kind]
    model = Model(module, torch.float32, PAD)
    loss = model.loss_sum(collate(random_split([5]), [], 16, PAD), torch.device("cpu"))
    assert loss.item() == 0.0
    loss.backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    module.zero_grad(set_to_none=True)


# --- step plan and epoch order ------------------------------------------------------------------

def test_one_epoch_of_micro_batches_uses_every_row_once():
    plan = StepPlan(rows_per_step=8, micro_batch=2, accumulation=2, world_size=2)
    order = epoch_order(37, seed=3, epoch=0, shuffle=True)
    steps = plan.steps_per_epoch(37)
    assert steps == 5
    seen = []
    for step in range(steps):
        for rank in range(2):
            micro = plan.micro_batches(order, step, rank)
            assert len(micro) == 2 and all(len(mb) <= 2 for mb in micro)
            seen += [row for mb in micro for row in mb]
    assert sorted(seen) == list(range(37))
    # The short last step: 5 rows, so rank 1 runs one micro batch of 2 and one empty one.
    assert [len(mb) for mb in plan.micro_batches(order, 4, 0)] == [2, 1]
    assert [len(mb) for mb in plan.micro_batches(order, 4, 1)] == [2, 0]


def test_epoch_order_is_a_seeded_permutation():
    a = epoch_order(50, seed=7, epoch=0, shuffle=True)
    assert sorted(a) == list(range(50)) and a != list(range(50))
    assert a == epoch_order(50, seed=7, epoch=0, shuffle=True)
    assert a != epoch_order(50, seed=7, epoch=1, shuffle=True)
    assert a != epoch_order(50, seed=8, epoch=0, shuffle=True)
    assert epoch_order(50, seed=7, epoch=3, shuffle=False) == list(range(50))


def plan_config(total, micro):
    """The two TrainConfig fields that StepPlan.from_config reads."""
    return SimpleNamespace(global_train_batch_size=total, device_train_microbatch_size=micro)


@pytest.mark.parametrize("total, micro, world, device, expected", [
    (8, None, 2, "cpu", (8, 4, 1, 2)),
    (12, None, 2, "cuda", (12, 3, 2, 2)),
    (16, 2, 2, "cuda", (16, 2, 4, 2)),
])
def test_step_plan_from_config(total, micro, world, device, expected):
    plan = StepPlan.from_config(plan_config(total, micro), world, device)
    assert (plan.rows_per_step, plan.micro_batch, plan.accumulation, plan.world_size) == expected


@pytest.mark.parametrize("total, micro, world, key", [
    (9, None, 2, "global_train_batch_size"),
    (8, 3, 2, "device_train_microbatch_size"),
    (8, 8, 2, "device_train_microbatch_size"),
])
def test_step_plan_rejects_uneven_splits_naming_the_key(total, micro, world, key):
    with pytest.raises(ConfigError, match=key):
        StepPlan.from_config(plan_config(total, micro), world, "cpu")


# --- data channel -------------------------------------------------------------------------------

def test_list_data_files_is_sorted_and_recursive(tmp_path):
    for name in ["b.jsonl", "sub/a.jsonl", "a.jsonl", "sub/deeper/c.jsonl"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    found = list_data_files(tmp_path)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["a.jsonl", "b.jsonl", "sub/a.jsonl", "sub/deeper/c.jsonl"]


def test_a_file_that_is_not_jsonl_is_an_error_naming_it(tmp_path):
    (tmp_path / "train.jsonl").write_text("{}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "notes.csv").write_text("a,b\n")
    with pytest.raises(DatasetError, match=r"sub/notes\.csv"):
        list_data_files(tmp_path)


def test_an_empty_or_missing_channel_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="no .jsonl file"):
        list_data_files(tmp_path)
    with pytest.raises(DatasetError, match="missing"):
        list_data_files(tmp_path / "absent")
