"""The staging function's time and its writes: a deadline taken from the Lambda context, and
uploads that create a new object in one piece or nothing.

Each staged file goes up as a multipart upload, which S3 makes visible only when it completes, and
it completes with ``If-None-Match: *``, so an existing object is never replaced. An upload that
fails or runs out of time is aborted; one whose process is killed is aborted by the bucket's
``AbortIncompleteUploads`` lifecycle rule.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

PART_BYTES = 16 * 1024 * 1024
"""Upload part size: 10,000 parts (S3's most) hold 160 GiB, far above what staging takes."""
PARALLEL_PARTS = 8
"""Parts sent at once: one stream to S3 is far slower than several."""
UPLOAD_BYTES_PER_S = 40 * 1000 * 1000
"""What the time checks assume an upload makes at least (S3 from Lambda, 8 parts at once, makes
several times this); the deadline keeps this much time for what is staged so far."""
MARGIN_S = 20.0
"""Time kept at the end for aborting uploads, removing /tmp files and returning the error."""


class StagingTimeout(Exception):
    """Staging would not finish in the function's time; nothing the workflow uses was written."""


class Deadline:
    """The invocation's remaining time, from the Lambda context (none outside Lambda)."""

    def __init__(self, remaining_ms: Callable[[], int] | None = None) -> None:
        self._remaining_ms = remaining_ms
        self._start = time.monotonic()

    @classmethod
    def of(cls, context: Any) -> Deadline:
        """The deadline of a Lambda invocation; no deadline when ``context`` has none."""
        return cls(getattr(context, "get_remaining_time_in_millis", None))

    def seconds_left(self) -> float:
        """Seconds until the function is stopped (infinite without a context)."""
        return float("inf") if self._remaining_ms is None else self._remaining_ms() / 1000

    def elapsed(self) -> float:
        """Seconds since this invocation started staging."""
        return time.monotonic() - self._start

    def upload_reserve(self, staged_bytes: int) -> float:
        """Seconds to keep for uploading ``staged_bytes`` and ending cleanly."""
        return MARGIN_S + staged_bytes / UPLOAD_BYTES_PER_S


def upload_new(s3: Any, bucket: str, key: str, path: Path, extra: dict[str, str], deadline: Deadline) -> None:
    """Uploads ``path`` to a new object ``key`` (``extra``: CreateMultipartUpload's encryption
    and content type), in parts sent in parallel; refuses to replace an existing object."""
    from botocore.exceptions import ClientError

    size = path.stat().st_size
    upload_id = s3.create_multipart_upload(Bucket=bucket, Key=key, ChecksumAlgorithm="CRC32", **extra)["UploadId"]
    try:
        parts = _upload_parts(s3, bucket, key, upload_id, path, size, deadline)
        try:
            s3.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, IfNoneMatch="*",
                                         MultipartUpload={"Parts": parts})
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "PreconditionFailed":
                raise
            # Each invocation writes under a fresh folder: only a bug or another writer gets here.
            raise RuntimeError(f"s3://{bucket}/{key} already exists; staging never replaces an object, so "
                               "nothing was staged; start the execution again") from None
    except BaseException:
        try:
            s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        except Exception as exc:  # the first error is the one to report; the lifecycle rule aborts it later
            print(f"could not abort the upload of s3://{bucket}/{key}: {exc}")
        raise


def _upload_parts(s3: Any, bucket: str, key: str, upload_id: str, path: Path, size: int,
                  deadline: Deadline) -> list[dict[str, Any]]:
    """Sends every part of ``path``; stops at the first error, or when time runs out."""
    fd = os.open(path, os.O_RDONLY)

    def send(number: int) -> dict[str, Any]:
        if deadline.seconds_left() < MARGIN_S:
            raise StagingTimeout(
                f"staging ran out of time while uploading s3://{bucket}/{key} ({size:,} bytes, "
                f"{deadline.elapsed():.0f} s after it started); nothing was staged. Use less data: see the "
                "README's staging limits")
        body = os.pread(fd, PART_BYTES, (number - 1) * PART_BYTES)  # pread: no shared file offset
        sent = s3.upload_part(Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=body,
                              ChecksumAlgorithm="CRC32")
        return {"PartNumber": number, "ETag": sent["ETag"], "ChecksumCRC32": sent["ChecksumCRC32"]}

    numbers = range(1, max(1, -(-size // PART_BYTES)) + 1)
    try:
        with ThreadPoolExecutor(PARALLEL_PARTS, thread_name_prefix="ftstack-upload") as pool:
            futures = [pool.submit(send, number) for number in numbers]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f in done and f.exception() is not None), None)
            if failed is not None:
                for future in futures:
                    future.cancel()
                raise failed.exception()
            return [future.result() for future in futures]
    finally:
        os.close(fd)
