"""A trained model's files in S3, pinned when the model is registered and checked before it is served.

The manifest (``ftstack_train.manifest``) lists each file's SHA-256 and size, and its own digest is
registered with the model package. Hashing the weights again before every deployment would mean
reading tens of gigabytes; a check of sizes alone passes a file overwritten with other weights of
the same shape. S3 object versions close that gap at the cost of one listing:

- **At registration** (``pin_s3_model``, the training workflow's ``CheckModel`` step): every object
  in the model's folder must have exactly one version, so that nothing has overwritten what the
  training job uploaded (in a versioned bucket every write is a new version), and the folder must
  hold exactly the files the manifest lists, at their sizes. The digest of every object's version
  id (``model_versions_sha256``) is registered with the package.
- **At deployment** (``verify_s3_model``: the deploy-on-approval workflow and ``ftstack deploy``):
  the folder's current versions must give that same digest. S3 gives every write a new version id
  of its own choosing, so no writer, however it is allowed in, can put other content under the
  registered ids; an added, deleted or overwritten object changes the digest.

The bucket must have versioning on (the pipeline's own bucket does): in a bucket without it every
version id is ``null`` and nothing can be pinned, so registration refuses. What is left is the
time between the check and SageMaker's copy of the files, minutes, during which only the
pipeline's own roles can write there.

Pure Python like ``ftstack.serving``: it runs in the CLI and in the model-check Lambda
(``ftstack.infra.model_check``); S3 is whatever client is passed.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from typing import Any

from ftstack.serving import split_s3_uri
from ftstack_train.contract import MANIFEST_FILE, MANIFEST_SHA256
from ftstack_train.manifest import _OWN_PREFIX, UNLISTED, ModelIntegrityError, compare, read_manifest

VERSIONS_SHA256 = "model_versions_sha256"
"""The model package's metadata key for the digest of the model folder's object versions."""
MANIFEST_MAX_BYTES = 1 << 20
"""A manifest lists a few dozen files; anything larger is not one."""
_DIGEST = re.compile(r"[0-9a-fA-F]{64}")


def pin_s3_model(s3: Any, uri: str, manifest_sha256: str) -> dict[str, Any]:
    """Checks the model folder ``uri`` as its training job left it and returns its summary with
    ``model_versions_sha256``, the digest to register. Raises ModelIntegrityError when an object
    was written more than once, the bucket keeps no versions, or the files are not the manifest's."""
    bucket, prefix = split_s3_uri(uri)
    _check_digest(uri, MANIFEST_SHA256, manifest_sha256)
    latest, writes = _versions(s3, bucket, prefix)
    unversioned = sorted(name for name, version in latest.items() if version["VersionId"] == "null")
    if unversioned:
        raise ModelIntegrityError(f"s3://{bucket}/{prefix}{unversioned[0]}: no version id; bucket {bucket} does not keep "
                                  "object versions, so the model cannot be pinned against later overwrites: turn on "
                                  "versioning for the bucket (S3 console, Properties, Bucket Versioning) and train again")
    rewritten = sorted(name for name, count in writes.items() if count > 1)
    if rewritten:
        raise ModelIntegrityError(f"s3://{bucket}/{prefix}: {', '.join(rewritten)} written {writes[rewritten[0]]} times "
                                  "(versions and deletes) since the training job uploaded the model; it may not be the "
                                  "job's output, so it is not registered: find out who wrote it (the objects' versions "
                                  "in S3, CloudTrail) and train again")
    return _check_files(s3, bucket, prefix, latest, manifest_sha256) | {VERSIONS_SHA256: _versions_digest(latest)}


def verify_s3_model(s3: Any, uri: str, manifest_sha256: str, versions_sha256: str) -> dict[str, Any]:
    """Checks the model folder ``uri`` against what was registered: the current version of every
    object is the one pinned at registration (``versions_sha256``), and the files are the
    manifest's (``manifest_sha256``). Raises ModelIntegrityError; returns a summary."""
    bucket, prefix = split_s3_uri(uri)
    _check_digest(uri, MANIFEST_SHA256, manifest_sha256)
    _check_digest(uri, VERSIONS_SHA256, versions_sha256)
    latest, writes = _versions(s3, bucket, prefix)
    if _versions_digest(latest) != versions_sha256.lower():
        rewritten = sorted(name for name, count in writes.items() if count > 1)
        hint = f" ({', '.join(rewritten)} written more than once)" if rewritten else ""
        raise ModelIntegrityError(f"s3://{bucket}/{prefix}: its objects are not the versions registered with the model "
                                  f"package{hint}: objects were added, deleted or overwritten after registration; do not "
                                  "serve it, and find out who wrote them (the objects' versions in S3, CloudTrail)")
    return _check_files(s3, bucket, prefix, latest, manifest_sha256) | {VERSIONS_SHA256: versions_sha256.lower()}


def _check_digest(uri: str, name: str, value: Any) -> None:
    if not isinstance(value, str) or not _DIGEST.fullmatch(value):
        raise ModelIntegrityError(f"{uri}: the package has no {name} (64 hex digits) to check the model against; only "
                                  "models registered by ftstack's workflow can be deployed")


def _versions(s3: Any, bucket: str, prefix: str) -> tuple[dict[str, dict[str, Any]], Counter]:
    """The current version of each object under ``prefix`` by its name there (deleted objects are
    absent), and how many versions and delete markers each name has. A name with ``/`` is in a
    subfolder: SageMaker would copy it too, so it counts as a file the manifest must list."""
    latest: dict[str, dict[str, Any]] = {}
    writes: Counter = Counter()
    for page in s3.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for version in page.get("Versions", []):
            name = version["Key"][len(prefix):]
            writes[name] += 1
            if version.get("IsLatest"):
                latest[name] = version
        for marker in page.get("DeleteMarkers", []):
            writes[marker["Key"][len(prefix):]] += 1
            if marker.get("IsLatest"):
                latest.pop(marker["Key"][len(prefix):], None)
    return latest, writes


def _versions_digest(latest: dict[str, dict[str, Any]]) -> str:
    """SHA-256 of ``{name: version id}`` for every current object, in a canonical text."""
    pins = {name: version["VersionId"] for name, version in latest.items()}
    return hashlib.sha256(json.dumps(pins, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _check_files(s3: Any, bucket: str, prefix: str, latest: dict[str, dict[str, Any]], manifest_sha256: str) -> dict[str, Any]:
    """The manifest (the listed version) against its digest, and the folder against the manifest:
    exactly its files, at their sizes."""
    where = f"s3://{bucket}/{prefix}{MANIFEST_FILE}"
    listed = latest.get(MANIFEST_FILE)
    if listed is None:
        raise ModelIntegrityError(f"{where}: missing; only a model exported by ftstack can be registered or deployed")
    if listed["Size"] > MANIFEST_MAX_BYTES:
        raise ModelIntegrityError(f"{where}: {listed['Size']} bytes is not a model manifest")
    read = s3.get_object(Bucket=bucket, Key=prefix + MANIFEST_FILE)
    if read.get("VersionId", "null") != listed["VersionId"]:
        raise ModelIntegrityError(f"{where}: overwritten while the model was being checked; do not use it")
    entries = read_manifest(read["Body"].read(), where, manifest_sha256)
    names = [n for n in latest if n not in UNLISTED and not n.startswith(_OWN_PREFIX)]
    compare(entries, names, f"s3://{bucket}/{prefix}")
    for name, entry in sorted(entries.items()):
        if latest[name]["Size"] != entry["bytes"]:
            raise ModelIntegrityError(f"s3://{bucket}/{prefix}{name}: {latest[name]['Size']} bytes where {MANIFEST_FILE} "
                                      f"lists {entry['bytes']}; do not use this model")
    return {"model_uri": f"s3://{bucket}/{prefix}", "files": len(entries),
            "bytes": sum(e["bytes"] for e in entries.values()), MANIFEST_SHA256: manifest_sha256.lower()}
