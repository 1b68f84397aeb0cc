"""Staging throughput: the staging function's real code (``infra.stage_data.handler.stage``) against
moto's S3, for records of a few sizes, and what that means for ``MAX_DATA_BYTES``.

    .venv/bin/python bench/staging.py [--mb 16] [--repeat 3]

The baseline is the least any check of the data does: ``json.loads`` of every line of the same
bytes, in memory, with nothing checked, copied, hashed or uploaded. What to read is the ratio to it
(absolute times on a shared machine are noise) and the shortest records' check+copy MB/s (the time
outside the upload, which moto serves and says nothing of S3's speed), which sets the limit:
staging must finish within the function's time at half the speed measured here (a Lambda vCPU may
be slower than this machine's core), with the upload at the rate the deadline assumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests" / "infra")]
for name, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}.items():
    os.environ.setdefault(name, value)

import boto3  # noqa: E402
from moto import mock_aws  # noqa: E402

from ftstack.infra.stage_data import handler  # noqa: E402
from ftstack.infra.stage_data.upload import MARGIN_S, UPLOAD_BYTES_PER_S, upload_new  # noqa: E402
from staging_samples import staging_settings  # noqa: E402

BUCKET = "ftstack-bench"
LAMBDA_SPEED = 0.5
"""The share of this machine's single-core speed a Lambda vCPU is assumed to reach, at least."""
SHAPES = {
    # name: (prompt characters, response characters); "shortest" is the smallest valid record.
    "shortest": (1, 1),
    "short": (40, 30),
    "instruction": (400, 600),
    "long": (3000, 5000),
}


def jsonl(prompt_chars: int, response_chars: int, total_bytes: int) -> tuple[bytes, int]:
    """About ``total_bytes`` of records of these lengths, compact JSON as most tools write it."""
    line = json.dumps({"prompt": "p" * prompt_chars, "response": "r" * response_chars}, separators=(",", ":")).encode() + b"\n"
    count = max(1, total_bytes // len(line))
    return line * count, count


def baseline(data: bytes) -> float:
    """Seconds for json.loads of every line: the floor for any line-by-line check."""
    start = time.perf_counter()
    for line in data.splitlines():
        json.loads(line)
    return time.perf_counter() - start


def staged(s3, data: bytes) -> tuple[float, float]:
    """Seconds for the staging function's code to check, split, copy and upload ``data``, and of
    those the seconds spent uploading (to moto, which says nothing of S3's speed)."""
    s3.put_object(Bucket=BUCKET, Key="incoming/bench.jsonl", Body=data)
    settings = staging_settings(BUCKET)
    uploading = []

    def timed_upload(*args, **kwargs):
        start = time.perf_counter()
        upload_new(*args, **kwargs)
        uploading.append(time.perf_counter() - start)

    handler.upload_new = timed_upload
    try:
        start = time.perf_counter()
        result = handler.stage(handler.Execution("bench", {"train_data": f"s3://{BUCKET}/incoming/bench.jsonl"}),
                               settings, s3)
        seconds = time.perf_counter() - start
    finally:
        handler.upload_new = upload_new
    assert result["train"]["bytes"] + result["test"]["bytes"] == len(data) + (not data.endswith(b"\n"))
    return seconds, sum(uploading)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=16, help="data per record shape, in MB")
    parser.add_argument("--repeat", type=int, default=3, help="runs per shape; the best one counts")
    args = parser.parse_args()
    worst = float("inf")
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket=BUCKET)
        print(f"{'records':>12} {'bytes/rec':>9} {'records/s':>10} {'check+copy MB/s':>15} {'with upload MB/s':>16} "
              f"{'baseline MB/s':>13} {'x baseline':>10}")
        for name, (prompt, response) in SHAPES.items():
            data, count = jsonl(prompt, response, int(args.mb * 1e6))
            total, upload = min(staged(s3, data) for _ in range(args.repeat))
            floor = min(baseline(data) for _ in range(args.repeat))
            check = total - upload  # what runs on the function's vCPU whatever S3's speed
            worst = min(worst, len(data) / check)
            print(f"{name:>12} {len(data) / count:9.0f} {count / check:10,.0f} {len(data) / check / 1e6:15.1f} "
                  f"{len(data) / total / 1e6:16.1f} {len(data) / floor / 1e6:13.1f} {check / floor:10.2f}")
    # The limit: reading at LAMBDA_SPEED of the worst rate, then uploading, within the timeout.
    per_byte = 1 / (worst * LAMBDA_SPEED) + 1 / UPLOAD_BYTES_PER_S
    supported = (handler.FUNCTION_TIMEOUT_S - 2 * MARGIN_S) / per_byte
    verdict = "holds" if handler.MAX_DATA_BYTES <= supported else "is TOO HIGH"
    print(f"shortest records at {LAMBDA_SPEED:.0%} of this speed, upload at {UPLOAD_BYTES_PER_S / 1e6:.0f} MB/s: "
          f"{supported / 1e9:.2f} GB fit in {handler.FUNCTION_TIMEOUT_S} s; MAX_DATA_BYTES "
          f"{handler.MAX_DATA_BYTES / 1e9:.2f} GB {verdict}")


if __name__ == "__main__":
    main()
