"""What the CLI (``ftstack deploy``/``invoke``/``undeploy``) and the stack (registration and
deploy-on-approval) share about serving a fine-tuned model: the default endpoint instance type,
the naming rules of endpoints, endpoint configs and models, the vLLM container's environment, the
request body an endpoint takes (the check of a model's files in S3 is ``ftstack.s3_model``).

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

from ftstack_train.contract import CHAT_TEMPLATE_FILE, DEFAULT_ROOT, SageMakerPaths

DEFAULT_INSTANCE_TYPE = "ml.g5.2xlarge"
"""One A10G (24 GB): a 7B model in bf16 (about 13.5 GB of weights) with room for the KV cache."""

MODEL_DIR = str(SageMakerPaths(Path(DEFAULT_ROOT)).model_dir)
"""Where SageMaker mounts a Model's uncompressed ``ModelDataSource``: ``/opt/ml/model``, the same
folder a training job exports to."""

VARIANT_NAME = "AllTraffic"
"""The endpoint's one production variant."""

CHANGING = ("Creating", "Updating", "SystemUpdating", "RollingBack")
"""Endpoint states (botocore's EndpointStatus enum) that end by themselves, and in which SageMaker
refuses an update: ``ftstack deploy`` and the deploy workflow wait them out."""

INFERENCE_AMI = "al2023-ami-sagemaker-inference-gpu-4-1"
"""The endpoint's host image (the variant's ``InferenceAmiVersion``): NVIDIA driver 580, CUDA 13.0,
the only one of SageMaker's that runs the CUDA 13 vLLM container (``-cu130-`` tags); the others
have drivers 535 or 550 (botocore's documentation of ``ProductionVariant.InferenceAmiVersion``).
A newer driver also runs the images built for CUDA 12."""


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


DOWNLOAD_TIMEOUT_S = 1800
"""ModelDataDownloadTimeoutInSeconds and ContainerStartupHealthCheckTimeoutInSeconds: a 7B model
is about 13.5 GB to copy and load (the defaults are sized for small models; the maximum is 3600)."""


def production_variant(instance_type: str) -> dict[str, Any]:
    """The endpoint config's one variant on ``instance_type`` (a ServingError for a type models
    cannot be served on), less its ``ModelName``: the same for ``ftstack deploy`` and the
    deploy-on-approval workflow."""
    instance_gpus(instance_type)
    return {"VariantName": VARIANT_NAME, "InstanceType": instance_type, "InitialInstanceCount": 1,
            "InferenceAmiVersion": INFERENCE_AMI, "ModelDataDownloadTimeoutInSeconds": DOWNLOAD_TIMEOUT_S,
            "ContainerStartupHealthCheckTimeoutInSeconds": DOWNLOAD_TIMEOUT_S}


def deploy_environment(instance_gpus: int) -> dict[str, str]:
    """What deployment adds to the registered environment: one tensor-parallel shard per GPU of
    the endpoint's instance type (vLLM uses one GPU unless told)."""
    return {ENV_TENSOR_PARALLEL: str(instance_gpus)}


def serving_instance_types() -> list[str]:
    """The instance types a model can be served on: GPU types ``ftstack.instances`` knows whose GPUs
    compute in bf16 (compute capability 8.0 and up), as the model is served in bf16; vLLM refuses
    bf16 on V100 and T4 (ml.p3, ml.g4dn) at start-up."""
    from ftstack.instances import INSTANCE_TYPES

    return sorted(name for name, found in INSTANCE_TYPES.items() if found.gpu.bf16)


def instance_gpus(instance_type: str) -> int:
    """GPUs of an instance type models can be served on (``serving_instance_types``); ServingError
    naming them for any other."""
    from ftstack.instances import INSTANCE_TYPES

    if instance_type not in serving_instance_types():
        why = (f"its GPUs ({INSTANCE_TYPES[instance_type].gpu.name}) have no bf16, which the model is served in"
               if instance_type in INSTANCE_TYPES else "vLLM needs a GPU instance type ftstack knows")
        raise ServingError(f"instance type {instance_type!r}: {why}; use e.g. {DEFAULT_INSTANCE_TYPE} "
                           f"(one of {', '.join(serving_instance_types())})")
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
