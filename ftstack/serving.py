"""What the CLI (``ftstack deploy``/``invoke``/``undeploy``) and the stack (registration and
deploy-on-approval) share about serving a fine-tuned model: the default endpoint instance type,
the naming rules of endpoints, endpoint configs and models, the vLLM container's environment, the
request body an endpoint takes, and the check of a model's files in S3 against its manifest.

Pure Python (the standard library and ``ftstack_train``'s standard-library modules): it loads in
the CLI without boto3, in the CDK app, and in the deploy Lambda. S3 is whatever client is passed.

The container is the Hugging Face vLLM container for SageMaker (sagemaker-core's
``huggingface-vllm``; ``ftstack.infra.images.inference_image``). Its variables follow the
SageMaker vLLM convention: every ``SM_VLLM_<NAME>`` becomes the ``vllm serve`` flag
``--<name>`` (lower case, ``_`` -> ``-``), and ``/opt/ml/model`` is used when SageMaker mounts
model data there. Sources, checked for each name below:

- AWS Deep Learning Containers, vLLM, "Configuration" and "Amazon SageMaker AI Deployment":
  https://aws.github.io/deep-learning-containers/vllm/configuration/ and
  https://aws.github.io/deep-learning-containers/vllm/deployment/sagemaker/ (SM_VLLM_MODEL,
  SM_VLLM_MAX_MODEL_LEN, SM_VLLM_DTYPE, SM_VLLM_TENSOR_PARALLEL_SIZE; the model resolved from
  SM_VLLM_MODEL, then /opt/ml/model, then HF_MODEL_ID);
- vLLM's own SageMaker entrypoint, which does the conversion:
  https://github.com/vllm-project/vllm/blob/main/examples/online_serving/sagemaker-entrypoint.sh;
- the flags themselves (``--chat-template`` takes a file path, ``--dtype``, ``--max-model-len``):
  vLLM's ``vllm serve`` reference (https://docs.vllm.ai/en/latest/cli/serve.html).
A page of Hugging Face's own for the ``huggingface-vllm`` image was not found in the references
available when this was written; the image is built on the same entrypoint convention.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from ftstack_train.contract import CHAT_TEMPLATE_FILE, DEFAULT_ROOT, MANIFEST_FILE, MANIFEST_SHA256, SageMakerPaths
from ftstack_train.manifest import _OWN_PREFIX, UNLISTED, ModelIntegrityError, compare, read_manifest

DEFAULT_INSTANCE_TYPE = "ml.g5.2xlarge"
"""One A10G (24 GB): a 7B model in bf16 (about 13.5 GB of weights) with room for the KV cache."""

MODEL_DIR = str(SageMakerPaths(Path(DEFAULT_ROOT)).model_dir)
"""Where SageMaker mounts a Model's uncompressed ``ModelDataSource``: ``/opt/ml/model``, the same
folder a training job exports to."""

VARIANT_NAME = "AllTraffic"
"""The endpoint's one production variant."""


ENV_MODEL = "SM_VLLM_MODEL"
ENV_DTYPE = "SM_VLLM_DTYPE"
ENV_MAX_MODEL_LEN = "SM_VLLM_MAX_MODEL_LEN"
ENV_CHAT_TEMPLATE = "SM_VLLM_CHAT_TEMPLATE"
ENV_TENSOR_PARALLEL = "SM_VLLM_TENSOR_PARALLEL_SIZE"
ENV_HUB_OFFLINE = "HF_HUB_OFFLINE"
"""huggingface_hub's switch: the model is local and the endpoint runs with network isolation, so
no hub lookup is tried (and none times out)."""

SERVING_DTYPE = "bfloat16"
"""What training computes in (bf16 mixed precision) and what the export writes by default."""

NAME_MAX = 63
"""ModelName, EndpointConfigName and EndpointName: at most 63 characters (botocore's model)."""
_NAME = re.compile(r"[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}")
"""EndpointName's and EndpointConfigName's pattern; ModelName's is the same set of names."""
SUFFIX_CHARS = 32
"""The unique part of a model's and a config's name: an MD5 in hex (``States.Hash`` in the workflow)."""
PREFIX_MAX = NAME_MAX - 1 - SUFFIX_CHARS
"""The longest prefix that leaves room for ``-<suffix>``."""


class ServingError(ValueError):
    """A serving input (a name, an instance type, a package) cannot be used; the message names the fix."""


def check_endpoint_name(name: str) -> str:
    """``name`` if SageMaker takes it as an endpoint name, else ServingError naming the rule."""
    if not isinstance(name, str) or len(name) > NAME_MAX or not _NAME.fullmatch(name):
        raise ServingError(f"endpoint name {name!r}: use 1-{NAME_MAX} letters, digits and hyphens, starting and "
                           "ending with a letter or digit (e.g. ftstack-models)")
    return name


def resource_prefix(endpoint: str) -> str:
    """The prefix of the endpoint's models and configs (``<prefix>-<32 hex>``): the endpoint name
    itself when it is short enough, else its start and a digest of the whole name, so that two long
    names that start alike still get prefixes of their own."""
    check_endpoint_name(endpoint)
    if len(endpoint) <= PREFIX_MAX:
        return endpoint
    digest = hashlib.sha256(endpoint.encode()).hexdigest()[:8]
    return f"{endpoint[:PREFIX_MAX - 9].rstrip('-')}-{digest}"


def resource_name(endpoint: str, unique: str) -> str:
    """The name of a model or endpoint config for ``endpoint``: ``<prefix>-<md5 of unique>``."""
    return f"{resource_prefix(endpoint)}-{hashlib.md5(unique.encode()).hexdigest()}"


def vllm_environment(*, max_model_len: int | None = None) -> dict[str, str]:
    """The container environment registered with a model package: the uncompressed model at
    ``/opt/ml/model``, served in bf16 with the chat template exported with it (the training prompt
    format), up to ``max_model_len`` tokens (default: the model's own maximum, from config.json).
    No ``--trust-remote-code``: the export names transformers' native classes only."""
    env = {
        ENV_MODEL: MODEL_DIR,
        ENV_DTYPE: SERVING_DTYPE,
        ENV_CHAT_TEMPLATE: f"{MODEL_DIR}/{CHAT_TEMPLATE_FILE}",
        ENV_HUB_OFFLINE: "1",
    }
    if max_model_len is not None:
        if isinstance(max_model_len, bool) or not isinstance(max_model_len, int) or max_model_len < 1:
            raise ServingError(f"max_model_len {max_model_len!r}: give a whole number of tokens, e.g. 2048")
        env[ENV_MAX_MODEL_LEN] = str(max_model_len)
    return env


def registration_environment(max_model_len_path: str | None = None) -> dict[str, str]:
    """``vllm_environment`` as an ASL fragment for CreateModelPackage's container ``Environment``;
    ``max_model_len_path`` is the JSONPath of the run's ``max_seq_len`` in the state, if any
    (it must be present whenever the state runs: a missing path is States.Runtime)."""
    env: dict[str, str] = vllm_environment()
    if max_model_len_path is not None:
        if not max_model_len_path.startswith("$."):
            raise ServingError(f"max_model_len_path {max_model_len_path!r}: give a JSONPath such as $.staged.max_seq_len")
        env[f"{ENV_MAX_MODEL_LEN}.$"] = f"States.Format('{{}}', {max_model_len_path})"
    return env


def deploy_environment(instance_gpus: int) -> dict[str, str]:
    """What deployment adds to the registered environment: one tensor-parallel shard per GPU of
    the endpoint's instance type (vLLM uses one GPU unless told)."""
    return {ENV_TENSOR_PARALLEL: str(instance_gpus)}


def instance_gpus(instance_type: str) -> int:
    """GPUs of a SageMaker GPU instance type (``ftstack.instances``); ServingError for others."""
    from ftstack.instances import INSTANCE_TYPES

    if instance_type not in INSTANCE_TYPES:
        raise ServingError(f"instance type {instance_type!r}: vLLM needs a GPU instance type ftstack knows, e.g. "
                           f"{DEFAULT_INSTANCE_TYPE}; known: {', '.join(sorted(INSTANCE_TYPES))}")
    return INSTANCE_TYPES[instance_type].gpus


def invoke_body(prompt: str, max_tokens: int = 256) -> dict[str, Any]:
    """An OpenAI-style chat request, which the vLLM container's /invocations takes: the server
    applies the model's chat template, so the prompt is formatted exactly as in training."""
    return {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens}


def invoke_command(endpoint: str, region: str | None = None, prompt: str = "What is the capital of Greece?") -> str:
    """An ``aws sagemaker-runtime invoke-endpoint`` command line that asks ``endpoint`` one question."""
    body = json.dumps(invoke_body(prompt, 128)).replace("'", "'\\''")
    where = f" --region {region}" if region else ""
    return (f"aws sagemaker-runtime invoke-endpoint{where} --endpoint-name {endpoint} --content-type application/json "
            f"--cli-binary-format raw-in-base64-out --body '{body}' /dev/stdout")


def answer_text(response: Any) -> str:
    """The generated text of a chat completion response (``choices[0].message.content``)."""
    try:
        return response["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise ServingError(f"the endpoint's answer is not a chat completion: {json.dumps(response)[:500]}") from None


def split_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/prefix/`` as (bucket, prefix with a trailing slash)."""
    match = re.fullmatch(r"s3://([^/]+)/(.*)", uri or "")
    if not match:
        raise ServingError(f"{uri!r} is not an s3:// URI of a model folder")
    prefix = match[2] if match[2].endswith("/") or not match[2] else match[2] + "/"
    return match[1], prefix


MANIFEST_MAX_BYTES = 1 << 20
"""A manifest lists a few dozen files; anything larger is not one."""


def verify_s3_model(s3: Any, uri: str, expected_sha256: str) -> dict[str, Any]:
    """Checks the model folder ``uri`` against its registered manifest digest before it is served:
    the manifest's SHA-256 is ``expected_sha256``, the folder holds exactly the files it lists, and
    each has the listed size (HeadObject; hashing gigabytes of weights again is left to
    ``ftstack verify`` on a download). Raises ModelIntegrityError; returns a summary."""
    bucket, prefix = split_s3_uri(uri)
    if not isinstance(expected_sha256, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", expected_sha256):
        raise ModelIntegrityError(f"{uri}: the package has no {MANIFEST_SHA256} (64 hex digits) to check the model "
                                  "against; only models registered by ftstack can be deployed")
    where = f"s3://{bucket}/{prefix}{MANIFEST_FILE}"
    head = s3.head_object(Bucket=bucket, Key=prefix + MANIFEST_FILE)
    if head["ContentLength"] > MANIFEST_MAX_BYTES:
        raise ModelIntegrityError(f"{where}: {head['ContentLength']} bytes is not a model manifest")
    text = s3.get_object(Bucket=bucket, Key=prefix + MANIFEST_FILE)["Body"].read()
    entries = read_manifest(text, where, expected_sha256)
    sizes = _listed_sizes(s3, bucket, prefix)
    names = [n for n in sizes if n not in UNLISTED and not n.startswith(_OWN_PREFIX)]
    compare(entries, names, uri)
    for name, entry in sorted(entries.items()):
        size = s3.head_object(Bucket=bucket, Key=prefix + name)["ContentLength"]
        if size != entry["bytes"]:
            raise ModelIntegrityError(f"s3://{bucket}/{prefix}{name}: {size} bytes where {MANIFEST_FILE} "
                                      f"lists {entry['bytes']}; the model was changed after it was registered: do not serve it")
    return {"model_uri": f"s3://{bucket}/{prefix}", "files": len(entries),
            "bytes": sum(e["bytes"] for e in entries.values()), MANIFEST_SHA256: expected_sha256.lower()}


def _listed_sizes(s3: Any, bucket: str, prefix: str) -> dict[str, int]:
    """Every object under ``prefix`` by its name there (a name with ``/`` is in a subfolder: SageMaker
    would mount it too, so it counts as a file the manifest must list)."""
    sizes: dict[str, int] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            sizes[item["Key"][len(prefix):]] = item["Size"]
    return sizes
