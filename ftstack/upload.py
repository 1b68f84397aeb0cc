"""Putting a run's data under the bucket's ``incoming/`` prefix, the only place the workflow reads.

A local file goes to ``incoming/<first 16 hex digits of its SHA-256>/<file name>``, with its whole
SHA-256 in the object's metadata (``x-amz-meta-sha256``). The same file therefore always lands on
the same key, and a second run with it finds the object there with the same digest and skips the
upload. The digest lives in metadata rather than in S3's own ``ChecksumSHA256`` because a
multipart upload's checksum is a checksum of the parts' checksums, which depends on the part size
and cannot be compared with the file's. S3 still checks each part as it arrives
(``ChecksumAlgorithm: SHA256``).

No encryption header is sent: the bucket's default encryption is SSE-KMS with the stack's key
(infra/storage.py) and its policy requires nothing else. Asking for ``aws:kms`` without a key id
would use the account's ``aws/s3`` key instead, which the staging step cannot decrypt.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ftstack_train.contract import BASE_MODELS  # noqa: F401 (stage-model names its local download folder after it)

from ftstack.infra.layout import Layout

from .aws import AwsError, aws_errors, error_code

DIGEST_METADATA = "sha256"
"""The object metadata key that holds an upload's SHA-256 (hex)."""
_MB = 1024 * 1024


@dataclass(frozen=True)
class Uploaded:
    """Where one data file is in S3, and whether this run had to upload it."""

    uri: str
    """``s3://<bucket>/incoming/...``."""
    uploaded: bool
    """False when the object was already there with the same SHA-256, or an s3:// URI was given."""


def sha256_file(path: Path) -> str:
    """The file's SHA-256, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * _MB), b""):
            digest.update(block)
    return digest.hexdigest()


def incoming_key(path: Path, digest: str, prefix: str = "") -> str:
    """``<prefix>incoming/<digest[:16]>/<name>``: one key per content, keeping the file's name for
    people (``prefix``: the pipeline's folder in a shared bucket)."""
    return f"{Layout(prefix).incoming}{digest[:16]}/{path.name}"


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` as (bucket, key); ('', '') when ``uri`` is not one."""
    bucket, _, key = uri[len("s3://"):].partition("/") if uri.startswith("s3://") else ("", "", "")
    return bucket, key


def check_data_uri(option: str, uri: str, bucket: str, prefix: str = "") -> None:
    """An s3:// data URI must name one object under the stack's ``incoming/``, as the workflow requires."""
    got, key = split_uri(uri)
    incoming = Layout(prefix).incoming
    if got != bucket or not key.startswith(incoming) or key.endswith("/") or key == incoming:
        raise AwsError(f"{option} {uri}: the workflow reads data only from s3://{bucket}/{incoming}; give a local "
                       f"file (ftstack uploads it there) or the URI of one JSONL object under that prefix")


STAGED_MANIFEST = ".ftstack-staged.json"
"""Written last by ``ftstack stage-model`` into a base model's folder: without it the folder is
partly staged (an interrupted or changing copy)."""


def check_base_model_uri(uri: str, bucket: str, s3: Any | None = None, prefix: str = "") -> None:
    """An s3:// base model must be a folder under the stack's ``base-models/``; with ``s3``, one
    that ``ftstack stage-model`` finished staging."""
    got, key = split_uri(uri)
    base_models = Layout(prefix).base_models
    if got != bucket or not key.startswith(base_models) or not key[len(base_models):].strip("/"):
        raise AwsError(f"--base-model {uri}: training jobs read base models only from s3://{bucket}/{base_models}<name>/; "
                       "copy the model folder there (ftstack stage-model) or give a Hugging Face hub id")
    if s3 is not None:
        name = key[len(base_models):].strip("/")
        with aws_errors(f"--base-model {uri}"):
            if not s3.list_objects_v2(Bucket=bucket, Prefix=f"{base_models}{name}/{STAGED_MANIFEST}", MaxKeys=1).get("KeyCount"):
                raise AwsError(f"--base-model {uri}: not completely staged (no {STAGED_MANIFEST}: the copy was interrupted, "
                               f"is changing, or was not made by ftstack); run ftstack stage-model DIR --name {name}")


def object_exists(s3: Any, option: str, uri: str) -> None:
    """AwsError naming ``option`` when the object ``uri`` is not there."""
    bucket, key = split_uri(uri)
    with aws_errors(f"{option} {uri}"):
        try:
            s3.head_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
                raise AwsError(f"{option} {uri}: no such object; upload it or give a local file") from None
            raise


def stored_digest(s3: Any, bucket: str, key: str) -> str | None:
    """The SHA-256 recorded on the object ``key``; None when there is no such object."""
    try:
        head = s3.head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
    return head.get("Metadata", {}).get(DIGEST_METADATA)


def upload_file(s3: Any, bucket: str, path: Path, *, out: TextIO = sys.stderr, prefix: str = "") -> Uploaded:
    """Uploads ``path`` under ``<prefix>incoming/`` unless the same content is there already.

    boto3's managed transfer splits files over its threshold (8 MB) into parts sent in parallel
    and retried one by one; a progress line goes to ``out`` when it is a terminal.
    """
    digest = sha256_file(path)
    key = incoming_key(path, digest, prefix)
    uri = f"s3://{bucket}/{key}"
    with aws_errors(f"uploading {path} to {uri}"):
        if stored_digest(s3, bucket, key) == digest:
            return Uploaded(uri=uri, uploaded=False)
        transfer(s3, bucket, key, path, digest, path.name, out)
    return Uploaded(uri=uri, uploaded=True)


def transfer(s3: Any, bucket: str, key: str, path: Path, digest: str, label: str, out: TextIO, part_mb: int = 16) -> None:
    """Uploads ``path`` to ``key`` with its SHA-256 (``digest``) in the object's metadata, S3
    checking each part's own SHA-256 on the way; a progress line named ``label`` goes to ``out``
    when it is a terminal."""
    from boto3.s3.transfer import TransferConfig

    progress = Progress(label, path.stat().st_size, out) if out.isatty() else None
    s3.upload_file(
        os.fspath(path), bucket, key, Config=TransferConfig(multipart_chunksize=part_mb * _MB),
        ExtraArgs={"Metadata": {DIGEST_METADATA: digest}, "ChecksumAlgorithm": "SHA256"},
        Callback=progress,
    )
    if progress:
        progress.done()


class Progress:
    """A one-line progress bar, rewritten in place: ``train.jsonl [#####     ] 52% 10.4/20.0 MB``."""

    WIDTH = 30

    def __init__(self, name: str, total: int, out: TextIO) -> None:
        """``total``: the file's size in bytes."""
        self.name, self.total, self.out, self.sent = name, max(total, 1), out, 0
        self._lock = threading.Lock()  # boto3 sends the parts of a multipart upload from several threads

    def __call__(self, sent: int) -> None:
        """boto3's transfer callback: ``sent`` more bytes went out."""
        with self._lock:
            self.sent += sent
            share = min(self.sent / self.total, 1.0)
            bar = "#" * int(share * self.WIDTH)
            self.out.write(f"\r{self.name} [{bar:<{self.WIDTH}}] {share:4.0%} "
                           f"{self.sent / _MB:.1f}/{self.total / _MB:.1f} MB")
            self.out.flush()

    def done(self) -> None:
        """Ends the progress line."""
        self.out.write("\n")
        self.out.flush()
