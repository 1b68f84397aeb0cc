"""Smoke runs of the CPU benches at tiny sizes: each ends with one JSON line holding its figures,
and the figures are the ones the bench's own inputs imply (row counts, shares, truncation and
drops, file sizes), not just present."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str):
    """The bench script as a module, so that its main runs in this process (no second start-up
    of torch and transformers)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_bench(name: str, args: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """Runs ``bench/<name>.py`` with ``args``; returns the exit code, stdout and stderr."""
    module = load_bench(name)
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *args])
    code = module.main()
    out, err = capsys.readouterr()
    return code, out, err


def summary(out: str) -> dict:
    """The last line of a bench's output, which must be its JSON summary."""
    return json.loads(out.strip().splitlines()[-1])


PACKING_KEYS = {"bench", "data", "max_seq_len", "tokenizer_vocab", "long_seq_len", "attention", "records", "examples", "tokens", "mean_length", "truncated",
                "dropped", "dropped_share", "rows_padded", "rows_packed", "share_padded", "share_packed",
                "tokens_per_s_padded", "tokens_per_s_packed", "speedup"}


def test_packing_synthetic_trains_both_modes_and_packs_fewer_fuller_rows(capsys, monkeypatch):
    code, out, _ = run_bench("packing", ["--examples", "24", "--max-seq-len", "128", "--batch", "8", "--long-seq-len", "256"], capsys, monkeypatch)
    assert code == 0
    figures = summary(out)
    long_rows = {"tokens_per_s_packed_long", "long_rows_vs_short"}
    assert set(figures) == PACKING_KEYS | long_rows and figures["bench"] == "packing" and figures["data"] == "synthetic"
    assert figures["attention"] == "attention: sdpa (per example); loss: targets only, chunked"  # what a CPU job takes
    assert figures["long_rows_vs_short"] == pytest.approx(figures["tokens_per_s_packed_long"] / figures["tokens_per_s_packed"])
    assert figures["records"] == 24 == figures["examples"] + figures["dropped"]
    assert figures["rows_padded"] == figures["examples"] and 0 < figures["rows_packed"] < figures["rows_padded"]
    for mode in ("padded", "packed"):
        rows = figures[f"rows_{mode}"]
        assert figures[f"share_{mode}"] == pytest.approx(figures["tokens"] / (rows * 128))
        assert 0 < figures[f"share_{mode}"] <= 1
        assert figures[f"tokens_per_s_{mode}"] > 0
    assert figures["share_packed"] > figures["share_padded"]
    assert figures["speedup"] > 0


def test_packing_on_a_file_counts_truncated_and_dropped_as_a_job_would(tmp_path, capsys, monkeypatch):
    data = tmp_path / "data.jsonl"
    records = [
        {"prompt": "What is the value?", "response": "The value is the answer."},
        {"prompt": "the " * 100, "response": "no room left for this response"},  # prompt alone > max_seq_len: dropped
        {"prompt": "Give the data.", "response": "data " * 100},  # response cut to fit: truncated
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    code, out, _ = run_bench("packing", ["--data", str(data), "--max-seq-len", "48", "--no-train"], capsys, monkeypatch)
    assert code == 0
    figures = summary(out)
    assert set(figures) == PACKING_KEYS and figures["data"] == "data.jsonl"
    assert (figures["records"], figures["examples"], figures["truncated"], figures["dropped"]) == (3, 2, 1, 1)
    assert figures["dropped_share"] == pytest.approx(1 / 3)
    assert figures["rows_padded"] == 2 and figures["share_padded"] == pytest.approx(figures["tokens"] / (2 * 48))
    assert 0 < figures["share_packed"] <= 1
    assert figures["tokens_per_s_packed"] is None and figures["speedup"] is None
    assert "a training job would refuse this data" in out  # 1 of 3 dropped is above max_dropped_fraction


def test_packing_names_the_bad_line_of_a_data_file_without_a_traceback(tmp_path, capsys, monkeypatch):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    code, out, err = run_bench("packing", ["--data", str(data), "--no-train"], capsys, monkeypatch)
    assert code == 2
    assert f"{data}:2" in err and "response" in err and "Traceback" not in err + out


def test_export_bench_exports_the_checkpoint_and_compares_with_tar(capsys, monkeypatch):
    code, out, _ = run_bench("export", ["--params", "2e5", "--nproc", "1"], capsys, monkeypatch)
    assert code == 0
    f = summary(out)
    assert f["bench"] == "export" and f["nproc"] == 1
    assert 1e5 < f["params"] < 4e5 and f["bf16_bytes"] == 2 * f["params"]
    # fp32 weights in the checkpoint; bf16 in the export, plus the safetensors headers.
    assert f["checkpoint_bytes"] > 4 * f["params"]
    assert f["bf16_bytes"] < f["safetensors_bytes"] < f["bf16_bytes"] + 64 * 1024
    assert 0 < f["tar_gz_bytes"] < f["checkpoint_bytes"]
    assert f["tar_seconds"] > 0 and f["export_seconds"] > sum(f["export_phases_seconds"].values()) > 0
    assert 0 < f["tar_peak_rss_bytes"] < 100e6  # tar and gzip, without the bench's own pages
    assert 0 < f["export_peak_rss_bytes"] <= f["export_peak_rss_sum_bytes"]
    assert f["export_added_rss_bytes"] is None or f["export_added_rss_bytes"] >= 0
    assert f["peak_rss_ratio"] == pytest.approx(f["export_peak_rss_bytes"] / f["bf16_bytes"])
    assert f["speedup"] == pytest.approx(f["tar_seconds"] / f["export_seconds"])
