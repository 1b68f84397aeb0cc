"""``ftstack stage-model``: copies a Hugging Face model directory to ``base-models/<name>/`` in the
stack's bucket, where a training job without network access reads it (the ``model`` channel).

Each file goes to ``base-models/<name>/<path>`` with its SHA-256 in the object's metadata, as
``ftstack start`` uploads data (ftstack.upload). A file already there with the same digest is
skipped, so running the command again after an interruption sends only what is missing. S3 checks
each part's SHA-256 on the way; each uploaded file is hashed again afterwards (a file rewritten
while it was sent is caught), every object's recorded digest and size are compared with the
file's (HeadObject), and only then is the manifest
``.ftstack-staged.json`` written, listing each file's SHA-256 and size: a folder without it is
partially staged. A run that has anything to upload first deletes an earlier manifest, so a folder
being changed never looks complete.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ftstack.infra.layout import Layout

from .aws import AwsError, aws_errors, find_stack, session
from .upload import BASE_MODELS, DIGEST_METADATA, STAGED_MANIFEST, sha256_file, stored_digest, transfer

MANIFEST = STAGED_MANIFEST
"""Written last under ``base-models/<name>/``: the staged files, their SHA-256 and sizes."""
WEIGHT_SUFFIXES = (".safetensors", ".bin")
"""What transformers loads weights from (model*.safetensors, pytorch_model*.bin and their shards)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
_MB = 1024 * 1024


@dataclass(frozen=True)
class ModelFile:
    """One file of the model directory and where it goes."""

    path: Path
    """On this machine."""
    relative: str
    """Its path inside the model directory, with '/' separators: the key under the model's prefix."""
    size: int
    """Bytes."""


def check_name(name: str) -> str:
    """``name`` when it is a safe S3 folder name (1-128 of A-Z a-z 0-9 . _ -, starting with a letter or digit)."""
    if not _NAME.match(name):
        raise AwsError(f"--name {name!r}: give 1-128 characters of A-Z a-z 0-9 . _ - starting with a letter or "
                       "digit (it becomes the folder base-models/NAME/ in the bucket)")
    return name


def model_files(directory: Path) -> list[ModelFile]:
    """The files to stage: every regular file under ``directory`` except hidden ones (``.cache/``
    of ``huggingface-cli download``, ``.git``), after checking that it is a model directory."""
    root = directory.resolve()
    found = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts) or (path.is_dir() and not path.is_symlink()):
            continue
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            raise AwsError(f"{path}: a symbolic link to {os.readlink(path)}, outside {directory}; copy the model into "
                           f"one folder with real files (`huggingface-cli download ID --local-dir DIR`) and pass DIR")
        if not path.is_file():
            raise AwsError(f"{path}: not a regular file; remove it from {directory} or copy the model's files elsewhere")
        found.append(ModelFile(path=path, relative=relative.as_posix(), size=path.stat().st_size))
    _check_contents(directory, {f.relative for f in found})
    return found


def _check_contents(directory: Path, names: set[str]) -> None:
    missing = [] if "config.json" in names else ["config.json"]
    if not any(name.endswith(WEIGHT_SUFFIXES) and "/" not in name for name in names):
        missing.append("weights (*.safetensors or pytorch_model*.bin)")
    if missing:
        raise AwsError(f"{directory}: not a Hugging Face model directory, it has no {' and no '.join(missing)}; give "
                       "the folder that `save_pretrained` or `huggingface-cli download ID --local-dir DIR` wrote")
    for index in sorted(n for n in names if n.endswith(".index.json") and "/" not in n):
        try:
            shards = set(json.loads((directory / index).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise AwsError(f"{directory / index}: not a weight index with a weight_map ({exc}); download it again") from None
        absent = sorted(shards - names)
        if absent:
            raise AwsError(f"{directory / index} lists shards that are not in the folder: {', '.join(absent)}; "
                           "download the model again (an interrupted download leaves shards out)")
    if not names & set(TOKENIZER_FILES):
        print(f"ftstack: warning: {directory} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); the job then "
              "needs tokenizer.name=HUB_ID_OR_DIR", file=sys.stderr)


def download(hub_id: str, target: Path) -> Path:
    """Downloads the hub model ``hub_id`` into ``target`` (real files, resumable) with huggingface_hub;
    AwsError saying how to do it by hand when huggingface_hub is missing or the hub cannot be reached."""
    by_hand = (f"download it where there is network (`huggingface-cli download {hub_id} --local-dir DIR`), "
               "then run `ftstack stage-model DIR`")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise AwsError(f"{hub_id}: not a directory here, and huggingface_hub is not installed to download it as a "
                       f"hub id; {by_hand}") from None
    try:
        return Path(snapshot_download(repo_id=hub_id, local_dir=target))
    except Exception as exc:  # offline, unknown or gated repository: each needs the same fix from the operator
        raise AwsError(f"{hub_id}: not a directory here, and downloading it from the Hugging Face hub failed "
                       f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {by_hand}") from None


def resolve_source(source: str, name: str | None) -> tuple[Path | None, str]:
    """The model directory (None for a hub id, still to download) and the folder name in the bucket."""
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise AwsError(f"{source}: not a directory; give the model's folder (with config.json and its weights)")
        return path, check_name(name or path.resolve().name)
    if not _HUB_ID.match(source):
        raise AwsError(f"{source}: no such directory, and not a Hugging Face hub id (ORG/NAME)")
    return None, check_name(name or source.rsplit("/", 1)[-1])


@dataclass(frozen=True)
class Staged:
    """What one run of stage-model did."""

    uri: str
    """``s3://<bucket>/base-models/<name>/``: what ``ftstack start --base-model`` takes."""
    uploaded: tuple[str, ...]
    """Files this run sent."""
    skipped: tuple[str, ...]
    """Files already there with the same SHA-256."""
    total_bytes: int
    """The model's size."""


def _upload(s3: Any, bucket: str, key: str, file: ModelFile, digest: str, out: TextIO) -> None:
    transfer(s3, bucket, key, file.path, digest, file.relative, out, part_mb=64)


def _verify(s3: Any, bucket: str, key: str, file: ModelFile, digest: str) -> None:
    head = s3.head_object(Bucket=bucket, Key=key)
    got = (head.get("Metadata", {}).get(DIGEST_METADATA), head["ContentLength"])
    if got != (digest, file.size):
        raise AwsError(f"s3://{bucket}/{key} has SHA-256 {got[0]} and {got[1]} bytes, not {digest} and {file.size} "
                       f"as {file.path}; the file changed while it was uploaded, or the object was overwritten: run "
                       "stage-model again")


def _staged_keys(s3: Any, bucket: str, prefix: str) -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"][len(prefix):] for page in pages for item in page.get("Contents", [])}


def _check_no_strangers(bucket: str, prefix: str, there: set[str], files: list[ModelFile]) -> None:
    # The job downloads the whole folder: a file of another model left there would be loaded with this one.
    strangers = sorted(there - {f.relative for f in files} - {MANIFEST})
    if strangers:
        shown = ", ".join(strangers[:5]) + (f" and {len(strangers) - 5} more" if len(strangers) > 5 else "")
        raise AwsError(f"s3://{bucket}/{prefix} holds files that are not in the model directory: {shown}; stage it "
                       f"under another --name, or delete that folder first (`aws s3 rm --recursive s3://{bucket}/{prefix}`)")


def stage(s3: Any, bucket: str, name: str, files: list[ModelFile], *, out: TextIO = sys.stderr, pipeline_prefix: str = "") -> Staged:
    """Uploads ``files`` to ``<prefix>base-models/<name>/`` (skipping those already there with the
    same SHA-256), checks every object, then writes the manifest."""
    prefix = f"{Layout(pipeline_prefix).base_models}{name}/"
    digests = {f.relative: sha256_file(f.path) for f in files}
    with aws_errors(f"staging the model in s3://{bucket}/{prefix}"):
        there = _staged_keys(s3, bucket, prefix)
        _check_no_strangers(bucket, prefix, there, files)
        todo = [f for f in files if f.relative not in there
                or stored_digest(s3, bucket, prefix + f.relative) != digests[f.relative]]
        if todo and MANIFEST in there:  # the folder is about to change: until the new manifest, it is partial
            s3.delete_object(Bucket=bucket, Key=prefix + MANIFEST)
        for number, file in enumerate(todo, 1):
            print(f"uploading {file.relative} ({file.size / _MB:.1f} MB, {number}/{len(todo)})", file=out)
            _upload(s3, bucket, prefix + file.relative, file, digests[file.relative], out)
            # The object carries the digest taken before the upload; hashing again after it
            # catches a file rewritten (at the same size) while it was being sent.
            if sha256_file(file.path) != digests[file.relative]:
                raise AwsError(f"{file.path} changed while it was uploaded; let whatever writes it finish, then run "
                               "stage-model again")
        for file in files:
            _verify(s3, bucket, prefix + file.relative, file, digests[file.relative])
        manifest = {"name": name, "files": [{"path": f.relative, "sha256": digests[f.relative], "size": f.size}
                                            for f in files]}
        s3.put_object(Bucket=bucket, Key=prefix + MANIFEST, Body=json.dumps(manifest, indent=1).encode(),
                      ContentType="application/json")
    sent = {f.relative for f in todo}
    return Staged(uri=f"s3://{bucket}/{prefix}", uploaded=tuple(sorted(sent)),
                  skipped=tuple(sorted(set(digests) - sent)), total_bytes=sum(f.size for f in files))


def stage_model(args: argparse.Namespace) -> int:
    """``ftstack stage-model``: resolves the source, checks it, stages it and prints the URI for ``--base-model``."""
    directory, name = resolve_source(args.source, args.name)
    files = model_files(directory) if directory else None  # a local folder is checked before any AWS call
    boto = session(args.region)
    outputs = find_stack(boto, args.stack)
    if files is None:  # a hub id: downloaded once the stack is known to be there
        files = model_files(download(args.source, Path(BASE_MODELS) / name))
    staged = stage(boto.client("s3"), outputs.bucket, name, files, pipeline_prefix=outputs.prefix)
    if args.json:
        print(json.dumps({"uri": staged.uri, "uploaded": list(staged.uploaded), "skipped": list(staged.skipped),
                          "bytes": staged.total_bytes}))
        return 0
    print(f"staged {len(files)} files ({staged.total_bytes / _MB:.1f} MB): {len(staged.uploaded)} uploaded, "
          f"{len(staged.skipped)} already there, all checked (SHA-256 and size)")
    print(f"base model: {staged.uri}\n  use it with: ftstack start --train FILE --base-model {staged.uri}")
    return 0
