"""The ``ftstack`` subcommands that talk to the deployed stack: their arguments, help and examples.

``add_commands`` registers them on ``ftstack``'s subparsers; each runs through ``_reported``, which
prints an AwsError's message (what failed and the fix) instead of a traceback.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable

from .aws import AwsError, default_stack
from .serving import DEFAULT_INSTANCE_TYPE

EXIT_AWS_ERROR = 2
"""The same code as the CLI's other user errors: the message says what to fix."""

_STATUSES = ("RUNNING", "SUCCEEDED", "FAILED", "TIMED_OUT", "ABORTED")

START_EXAMPLES = """examples:
  ftstack start --train train.jsonl
  ftstack start --train train.jsonl --wait      # follow it to the model package ARN
  ftstack start --train train.jsonl --test test.jsonl --name mpt7b-lr5e6-001 \\
      --instance-type ml.g5.48xlarge --spot max_duration=2ep optimizer.lr=5e-6
  ftstack start --train s3://BUCKET/incoming/abc/train.jsonl --base-model s3://BUCKET/base-models/mpt-7b/
"""

STAGE_MODEL_EXAMPLES = """examples:
  huggingface-cli download mosaicml/mpt-7b --local-dir mpt-7b    # where there is network
  ftstack stage-model mpt-7b                  # -> s3://BUCKET/base-models/mpt-7b/
  ftstack stage-model ./checkpoints/merged --name mpt-7b-merged
  ftstack stage-model mosaicml/mpt-7b         # downloads it to ./base-models/mpt-7b first (needs network)
  ftstack start --train train.jsonl --base-model s3://BUCKET/base-models/mpt-7b/
"""


def _reported(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except AwsError as exc:
            print(f"ftstack: error: {exc}", file=sys.stderr)
            return EXIT_AWS_ERROR
    return run


def _lazy(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """The command ``module.name``, imported when it runs (boto3 is slow to import)."""
    def run(args: argparse.Namespace) -> int:
        import importlib

        return getattr(importlib.import_module(f"ftstack.{module}"), name)(args)
    return _reported(run)


def _max_results(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 1000:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number from 1 to 1000 (ListExecutions' limit)")
    return int(text)


def _stack_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--stack", default=default_stack(), metavar="NAME",
                        help="the deployed stack (default: cdk.json's stack_name, else ftstack)")
    common.add_argument("--region", metavar="REGION", help="where it is deployed (default: AWS_REGION or the profile's)")
    return common


def _add(commands: argparse._SubParsersAction, name: str, target: tuple[str, str], help: str, description: str,
         examples: str, parents: list) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help, description=description, epilog=examples, parents=parents,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=_lazy(*target))
    return parser


def _add_start(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    start = _add(commands, "start", ("runs", "start_run"), "start a fine-tuning run on AWS", (
        "Checks the data (as ftstack validate does) and the hyperparameters here, uploads local files to the "
        "stack's bucket under incoming/ (skipped when the same content is there already), and starts an execution "
        "of the stack's workflow. Options left out take the stack's defaults."), START_EXAMPLES, [common])
    start.add_argument("--train", required=True, metavar="FILE|S3URI", help="training JSONL")
    start.add_argument("--test", metavar="FILE|S3URI", help="evaluation JSONL (default: every 20th training record)")
    start.add_argument("--base-model", metavar="ID|S3URI", help="hub id, or s3://BUCKET/base-models/NAME/")
    start.add_argument("--instance-type", metavar="TYPE", help="first instance type to try, e.g. ml.p4d.24xlarge")
    start.add_argument("--instance-count", type=int, metavar="N", help="training nodes")
    start.add_argument("--spot", action=argparse.BooleanOptionalAction, default=None, help="managed spot training")
    start.add_argument("--name", metavar="NAME", help="execution name, 1-80 of A-Z a-z 0-9 - _ (default: FILE-TIME-XXXX)")
    start.add_argument("--resume-from", metavar="EXECUTION", help="continue from that execution's checkpoints")
    start.add_argument("--force", action="store_true", default=None, help=(
        "start even if the staging step's memory estimate says no instance type can hold the run "
        "(check first with ftstack estimate)"))
    start.add_argument("--wait", action="store_true", help=(
        "follow the run state by state with its training metrics; exit 0 with the model package ARN, 1 if it fails"))
    start.add_argument("--poll", type=float, default=15.0, metavar="SECONDS", help=argparse.SUPPRESS)
    start.add_argument("overrides", nargs="*", metavar="key=value", help="hyperparameters, e.g. optimizer.lr=5e-6")


def _add_watching(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    status = _add(commands, "status", ("executions", "show_status"), "show a run's state", (
        "Status, current state, training job, model package and failure reason of an execution (a name or an ARN; "
        "default: the latest)."), "examples:\n  ftstack status\n  ftstack status mpt7b-lr5e6-001 --json\n", [common])
    status.add_argument("execution", nargs="?", metavar="EXECUTION", help="name or ARN (default: the latest)")
    status.add_argument("--json", action="store_true", help="print a JSON object")

    runs = _add(commands, "list", ("executions", "list_runs"), "list recent runs", "The stack's recent executions, "
                "newest first.", "examples:\n  ftstack list\n  ftstack list --status FAILED --json\n", [common])
    runs.add_argument("--max", type=_max_results, default=20, metavar="N", help="at most N, up to 1000 (default 20)")
    runs.add_argument("--status", choices=_STATUSES, help="only executions with this status")
    runs.add_argument("--json", action="store_true", help="print a JSON array")

    logs = _add(commands, "logs", ("executions", "print_logs"), "print a run's training logs", (
        "Prints the CloudWatch logs of the execution's latest training job (/aws/sagemaker/TrainingJobs, one stream "
        "per host). --follow keeps printing until the execution ends."),
        "examples:\n  ftstack logs mpt7b-lr5e6-001\n  ftstack logs mpt7b-lr5e6-001 --follow\n", [common])
    logs.add_argument("execution", metavar="EXECUTION", help="name or ARN")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until the run ends")
    logs.add_argument("--poll", type=float, default=10.0, metavar="SECONDS", help=argparse.SUPPRESS)

    stop = _add(commands, "stop", ("executions", "stop_run"), "stop a run and its training job", (
        "Stops the execution and its training jobs still in progress (each saves a checkpoint first: "
        "start again with --resume-from EXECUTION to continue)."), "examples:\n  ftstack stop mpt7b-lr5e6-001\n",
        [common])
    stop.add_argument("execution", metavar="EXECUTION", help="name or ARN")


def _add_approval(commands: argparse._SubParsersAction) -> None:
    region = argparse.ArgumentParser(add_help=False)
    region.add_argument("--region", metavar="REGION", help="default: the one the ARN names")
    approve = _add(commands, "approve", ("models", "approve"), "approve a registered model", (
        "Sets a model package's approval status to Approved."),
        "examples:\n  ftstack approve arn:aws:sagemaker:us-east-1:123456789012:model-package/ftstack-models/3\n", [region])
    approve.add_argument("model_package_arn", metavar="MODEL_PACKAGE_ARN")
    approve.add_argument("--reason", metavar="TEXT", help="recorded as the approval description")
    reject = _add(commands, "reject", ("models", "reject"), "reject a registered model", (
        "Sets a model package's approval status to Rejected, with the reason."),
        "examples:\n  ftstack reject arn:aws:sagemaker:us-east-1:123456789012:model-package/ftstack-models/3 "
        "--reason 'eval loss regressed'\n", [region])
    reject.add_argument("model_package_arn", metavar="MODEL_PACKAGE_ARN")
    reject.add_argument("--reason", required=True, metavar="TEXT", help="why (recorded as the approval description)")


def _add_stage_model(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    stage = _add(commands, "stage-model", ("stage_model", "stage_model"), "copy a base model into the stack's bucket", (
        "Copies a Hugging Face model directory (config.json, weights, tokenizer files) to base-models/NAME/ in the "
        "stack's bucket, where training jobs read it without network access, and prints the URI to pass to "
        "ftstack start --base-model. Each file carries its SHA-256; files already there with the same digest are "
        "skipped, so running it again after an interruption sends only what is missing. Every object's "
        "recorded digest and size are checked, and each sent file hashed again, before base-models/NAME/.ftstack-staged.json, the list of files, is written last. "
        "A hub id is downloaded first with huggingface_hub, which needs network access."), STAGE_MODEL_EXAMPLES, [common])
    stage.add_argument("source", metavar="DIR|HUB_ID", help="a model directory, or a Hugging Face hub id such as mosaicml/mpt-7b")
    stage.add_argument("--name", metavar="NAME", help="folder under base-models/ (default: the directory's name or the "
                       "hub id's last part); 1-128 of A-Z a-z 0-9 . _ -")
    stage.add_argument("--json", action="store_true", help="print a JSON object: uri, uploaded, skipped, bytes")


def _add_serving(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    region = argparse.ArgumentParser(add_help=False)
    region.add_argument("--region", metavar="REGION", help="default: the ARN's region, else AWS_REGION or the profile's")
    arn = "arn:aws:sagemaker:us-east-1:123456789012:model-package/ftstack-models/3"
    deploy_parser = _add(commands, "deploy", ("deploy", "deploy"), "serve an approved model behind an endpoint", (
        "Checks the package's model files against its registered manifest digest, creates a model and an endpoint "
        "config of their own, and creates the endpoint or updates it to the new config; waits until it is InService. "
        "A failed update leaves the endpoint serving its previous config."),
        f"examples:\n  ftstack deploy {arn}\n  ftstack deploy {arn} --instance-type ml.g5.12xlarge --endpoint mpt7b-chat\n",
        [common])
    deploy_parser.add_argument("model_package_arn", metavar="MODEL_PACKAGE_ARN")
    deploy_parser.add_argument("--instance-type", default=DEFAULT_INSTANCE_TYPE, metavar="TYPE",
                               help=f"a GPU instance type (default {DEFAULT_INSTANCE_TYPE}: one A10G, a 7B model in bf16)")
    deploy_parser.add_argument("--endpoint", metavar="NAME", help="endpoint name (default: the package's group name)")
    deploy_parser.add_argument("--role", metavar="ARN", help="the model's execution role (default: the stack's ServingRoleArn output)")
    deploy_parser.add_argument("--wait", action=argparse.BooleanOptionalAction, default=True, help="wait until InService")
    deploy_parser.add_argument("--poll", type=float, default=30.0, help=argparse.SUPPRESS)
    invoke_parser = _add(commands, "invoke", ("deploy", "invoke"), "ask a deployed model", (
        "Sends the prompt as a chat message; the endpoint formats it with the model's chat template, as in training."),
        'examples:\n  ftstack invoke ftstack-models "What is the capital of Greece?"\n'
        '  ftstack invoke mpt7b-chat "Summarize: ..." --max-tokens 400\n', [region])
    invoke_parser.add_argument("endpoint", metavar="ENDPOINT")
    invoke_parser.add_argument("prompt", metavar="PROMPT")
    invoke_parser.add_argument("--max-tokens", type=int, default=256, metavar="N", help="longest answer in tokens (default 256)")
    undeploy_parser = _add(commands, "undeploy", ("deploy", "undeploy"), "delete an endpoint and its config", (
        "Deletes the endpoint and its endpoint config; the model package stays registered."),
        "examples:\n  ftstack undeploy ftstack-models\n", [region])
    undeploy_parser.add_argument("endpoint", metavar="ENDPOINT")


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Registers start, status, list, logs, stop, approve, reject, stage-model, deploy, invoke and undeploy
    on ``ftstack``'s subparsers."""
    common = _stack_options()
    _add_start(commands, common)
    _add_watching(commands, common)
    _add_approval(commands)
    _add_stage_model(commands, common)
    _add_serving(commands, common)
