"""bench/gpu.py's CPU smoke mode: the same check and timed training step as on a GPU (the
trainer's model building, FSDP2, packed batches, optimizer), tiny, on gloo; and its flop count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def gpu_bench():
    """bench/gpu.py imported as its own script imports it (bench/ on the path)."""
    sys.path.insert(0, str(BENCH))
    try:
        import gpu

        yield gpu
    finally:
        sys.path.remove(str(BENCH))


def test_smoke_mode_times_every_path_and_each_loss_equals_eagers():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(BENCH / "gpu.py"), "--smoke"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["bench"] == "gpu" and summary["device"] == "cpu"

    checked = summary["check"]["paths"]
    assert summary["check"]["ok"] and [c["attn_impl"] for c in checked] == ["sdpa"]
    for c in checked:
        torch.testing.assert_close(c["loss"], c["eager_loss"])

    runs = {(r["attn_impl"], r["activation_checkpointing"]): r for r in summary["runs"]}
    assert set(runs) == {(p, ac) for p in ("eager", "sdpa") for ac in (True, False)}
    eager = runs[("eager", True)]["first_loss"]
    for run in runs.values():
        assert run["tokens_per_s_per_gpu"] > 0 and run["mfu"] is None  # no peak flops on CPU
        # Same weights and batches on every path: the first step's loss must not depend on it.
        torch.testing.assert_close(run["first_loss"], eager)


def test_flops_count_attention_within_examples_only(gpu_bench):
    from ftstack_train.data import Batch

    segments = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    batch = Batch(segments, segments, segments, segments)
    # 6 x layers x d_model x sum of squared example lengths: (9 + 4) + 36
    assert gpu_bench.attention_flops(batch, layers=2, d_model=8) == 6 * 2 * 8 * 49


def test_peak_flops_override_and_cpu(gpu_bench):
    assert gpu_bench.peak_flops(100.0) == (100e12, "--peak-tflops")
    if not torch.cuda.is_available():
        assert gpu_bench.peak_flops(None)[0] is None


def test_synthetic_batches_are_packed_short_examples(gpu_bench):
    (batch,) = gpu_bench.synthetic_batches(vocab=256, seq=2048, rows=2, count=1, seed=0)
    assert batch.input_ids.shape == (2, 2048)
    assert batch.real_tokens / batch.input_ids.numel() > 0.9
    assert int(batch.segment_ids.max()) >= 3  # several examples per row
    assert 0 < batch.label_tokens < batch.real_tokens  # prompts carry no loss
