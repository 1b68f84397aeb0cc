"""The export's streaming safetensors writer: what it writes is what safetensors reads back, and it
holds one tensor at a time (the shard-at-once writer held the whole bf16 model of a 1B MPT on
rank 0, see bench/export.py)."""

import gc
import weakref

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ftstack_train.export import _plan_shards, write_safetensors

TENSORS = {
    "embedding.weight": torch.randn(7, 5).to(torch.bfloat16),
    "scale": torch.tensor(2.5),
    "half": torch.randn(3, 2, 4).to(torch.float16),
    "full": torch.randn(6),
    "positions": torch.arange(9),
    "empty": torch.zeros(0, 3),
    "mask": torch.tensor([True, False, True]),
    "bytes": torch.arange(5, dtype=torch.uint8),
}


def specs_of(tensors: dict[str, torch.Tensor]):
    return [(name, t.shape, t.dtype) for name, t in tensors.items()]


def test_streamed_file_reads_back_with_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, specs_of(TENSORS), iter(TENSORS.values()))
    loaded = load_file(str(path))
    assert loaded.keys() == TENSORS.keys()
    for name, tensor in TENSORS.items():
        assert loaded[name].dtype == tensor.dtype, name
        torch.testing.assert_close(loaded[name], tensor, rtol=0, atol=0, msg=name)
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_streaming_holds_one_tensor_at_a_time(tmp_path):
    alive: list[weakref.ref] = []

    def produced():
        for tensor in TENSORS.values():
            gc.collect()
            # Every tensor handed over before must be gone by the time the next one is made.
            assert [ref() for ref in alive] == [None] * len(alive)
            copy = tensor.clone()
            alive.append(weakref.ref(copy))
            yield copy
            del copy

    write_safetensors(tmp_path / "model.safetensors", specs_of(TENSORS), produced())
    assert len(alive) == len(TENSORS)


def test_a_tensor_unlike_its_header_entry_is_refused(tmp_path):
    specs = [("w", torch.Size([2, 2]), torch.bfloat16)]
    with pytest.raises(ValueError, match=r"w: got \(2, 2\) torch.float32, the header says \(2, 2\) torch.bfloat16"):
        write_safetensors(tmp_path / "x.safetensors", specs, [torch.zeros(2, 2)])


def test_shards_follow_the_size_limit_and_a_large_tensor_gets_its_own():
    specs = [("a", torch.Size([10]), torch.float32), ("b", torch.Size([10]), torch.float32),
             ("big", torch.Size([100]), torch.float32), ("c", torch.Size([5]), torch.bfloat16)]
    shards = _plan_shards(specs, max_shard_bytes=80)
    assert [[name for name, _, _ in shard] for shard in shards] == [["a", "b"], ["big"], ["c"]]
    assert [[name for name, _, _ in shard] for shard in _plan_shards(specs, 10**6)] == [["a", "b", "big", "c"]]
