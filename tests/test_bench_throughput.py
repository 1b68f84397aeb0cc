"""Smoke test of bench/throughput_cpu.py: both sides really train (2 processes each) and count
real tokens alike. Speed is not checked here (the bench's figures are read, not asserted)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "throughput_cpu.py"
MAX_SEQ_LEN = 64
GLOBAL_BATCH = 4


def _bench(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(BENCH), *args], env=env, capture_output=True, text=True, timeout=300)


def _same_length_records(path: Path, n: int) -> Path:
    # Identical examples of more than half a row: packing cannot put two in one row, so each of
    # ftstack's rows holds exactly one example, as each of Trainer's does, and every step of
    # either side trains the same number of real tokens whatever order the rows come in.
    record = {"prompt": "What is the code word of the blue box?", "response": "The code word of the blue box is seven green apples on a table."}
    path.write_text("".join(json.dumps(record) + "\n" for _ in range(n)))
    return path


@pytest.mark.slow
def test_both_sides_train_the_same_real_tokens_per_step(tmp_path):
    data = _same_length_records(tmp_path / "train.jsonl", 12)
    proc = _bench("--data", str(data), "--max-seq-len", str(MAX_SEQ_LEN), "--steps", "2",
                  "--global-batch", str(GLOBAL_BATCH), "--micro-batch", "1")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    example_tokens = summary["data_tokens"] / summary["examples"]
    assert summary["examples"] == 12 and example_tokens.is_integer()
    assert MAX_SEQ_LEN / 2 < example_tokens <= MAX_SEQ_LEN  # the premise: one example per row on both sides
    assert summary["timed_steps"] == 1 and summary["global_batch"] == GLOBAL_BATCH and summary["processes"] == 2
    expected = [GLOBAL_BATCH * int(example_tokens)]
    assert summary["ftstack"]["real_tokens_per_step"] == expected
    assert summary["trainer"]["real_tokens_per_step"] == expected
    for side in ("ftstack", "trainer"):
        assert summary[side]["real_tokens_per_s"] > 0
        assert summary[side]["real_token_share"] == pytest.approx(example_tokens / MAX_SEQ_LEN, abs=1e-4)
    # The bench prints the ratio to 3 decimals (half a unit: 5e-4) and each side's speed to 0.1 token/s:
    # one unit of the ratio's last place bounds both roundings. A relative bound alone failed for a
    # ratio below 1 (0.336 printed for 0.33649 is 1.4e-3 off, relatively).
    computed = summary["ftstack"]["real_tokens_per_s"] / summary["trainer"]["real_tokens_per_s"]
    assert summary["ratio"] == pytest.approx(computed, rel=1e-3, abs=1e-3)


def test_too_little_data_is_refused_before_anything_trains(tmp_path):
    data = _same_length_records(tmp_path / "small.jsonl", 3)
    proc = _bench("--data", str(data), "--max-seq-len", str(MAX_SEQ_LEN), "--steps", "2", "--global-batch", "4", "--micro-batch", "1")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert f"--data {data}: 3 examples pack into 3 rows" in proc.stderr
    assert "give more data or fewer --steps" in proc.stderr
