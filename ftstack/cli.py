"""``ftstack``: the operator's command line.

User mistakes print one message naming the input and the fix, and exit non-zero; never a
traceback. Commands import what they need when they run, so ``ftstack validate`` starts fast and
needs no torch.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse's own exit code 2, with our hint
        self.print_usage(sys.stderr)
        print(f"ftstack: error: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(EXIT_USAGE)


def _validate(args: argparse.Namespace) -> int:
    from ftstack_train.validation import validate_files

    report = validate_files(args.files, max_problems=args.max_problems)
    print(report.format())
    return 0 if report.ok else 1


def _local(args: argparse.Namespace) -> int:
    from ftstack.local import LocalRun, run_local

    run = LocalRun(
        train=args.train, test=args.test, model=args.model, nproc=args.nproc, config=args.config,
        output=args.output, overrides=tuple(args.overrides),
    )
    return run_local(run)


def _generate(args: argparse.Namespace) -> int:
    from ftstack.generate import generate

    for prompt, completion in zip(args.prompts, generate(args.model_dir, args.prompts, args.max_new_tokens)):
        print(f"prompt:   {prompt}\nresponse: {completion}\n")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from ftstack_train.manifest import verify_model

    digest = verify_model(args.model_dir, args.sha256)
    against = "the registered digest" if args.sha256 else "its own manifest (give --sha256 to check it is the registered model)"
    print(f"{args.model_dir}: every file matches {against}; manifest SHA-256 {digest}")
    return 0


def _sha256(text: str) -> str:
    if len(text) != 64 or any(c not in "0123456789abcdefABCDEF" for c in text):
        from ftstack_train.contract import MANIFEST_SHA256

        raise argparse.ArgumentTypeError(f"{text!r} is not a SHA-256 (64 hex digits); copy the model package's "
                                         f"{MANIFEST_SHA256} metadata")
    return text.lower()


def _examples(*lines: str) -> dict:
    """The help's closing examples, printed as written."""
    return {"epilog": "examples:\n" + "\n".join(f"  {line}" for line in lines), "formatter_class": argparse.RawDescriptionHelpFormatter}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ftstack", description="Fine-tune Hugging Face causal LMs on Amazon SageMaker.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    validate = commands.add_parser("validate", help="check prompt/response JSONL files", description=(
        "Streams each JSONL file and prints a summary (records, bytes, prompt/response lengths), or the problems "
        "with their line numbers. Exits 0 when every file is valid."), **_examples(
        "ftstack validate data/train.jsonl data/test.jsonl",
        "ftstack validate --max-problems 100 data/train.jsonl    # list more of the problems"))
    validate.add_argument("files", nargs="+", type=Path, metavar="FILE")
    validate.add_argument("--max-problems", type=int, default=20, help="problems to list (all are counted)")
    validate.set_defaults(func=_validate)

    local = commands.add_parser("local", help="run the training job on this machine's CPUs", description=(
        "Lays out the SageMaker /opt/ml tree under --output and runs the training container's entrypoint with "
        "--nproc CPU processes. The same command on the same --output resumes from the last checkpoint."), **_examples(
        "ftstack local --train data/train.jsonl --model tiny-mpt --output runs/try max_duration=2ep",
        "ftstack local --train data/train.jsonl --test data/test.jsonl --config examples/demo.yaml --nproc 2 \\",
        "    --output runs/demo optimizer.lr=1e-3"))
    local.add_argument("--train", type=Path, required=True, metavar="FILE", help="training JSONL")
    local.add_argument("--test", type=Path, metavar="FILE", help="evaluation JSONL (default: every 20th training record)")
    local.add_argument("--model", metavar="DIR|tiny-mpt|tiny-llama", help="base model directory or a tiny random model")
    local.add_argument("--nproc", type=int, default=2, help="training processes (default 2)")
    local.add_argument("--config", type=Path, metavar="YAML", help="training config (llm-foundry style keys)")
    local.add_argument("--output", type=Path, default=Path("runs/local"), metavar="DIR", help="the run's folder (default runs/local)")
    local.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optimizer.lr=1e-4 max_duration=2ep")
    local.set_defaults(func=_local)

    gen = commands.add_parser("generate", help="try an exported model on prompts", description=(
        "Loads an exported model folder with transformers and answers each prompt, formatted with the chat "
        "template saved at training time."), **_examples(
        'ftstack generate runs/demo/model "What is the capital of Greece?" "What is the opposite of big?"'))
    gen.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="e.g. runs/demo/model")
    gen.add_argument("prompts", nargs="+", metavar="PROMPT")
    gen.add_argument("--max-new-tokens", type=int, default=48)
    gen.set_defaults(func=_generate)

    verify = commands.add_parser("verify", help="check an exported model's files against its manifest", description=(
        "Hashes every file of an exported model folder and compares it with model-manifest.json, and the manifest "
        "with --sha256 (the model package's model_manifest_sha256 metadata). Exits 0 only when all match."), **_examples(
        "ftstack verify runs/demo/model",
        "ftstack verify ./model --sha256 <model_manifest_sha256 of the model package>"))
    verify.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="e.g. runs/demo/model, or a downloaded model")
    verify.add_argument("--sha256", type=_sha256, metavar="DIGEST", help="the registered manifest digest")
    verify.set_defaults(func=_verify)

    from ftstack.aws_commands import add_commands  # start, status, list, logs, stop, approve, reject: the deployed stack

    add_commands(commands)

    from ftstack.estimate_cli import add_parser as add_estimate  # pure Python: no torch at start-up

    add_estimate(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # transformers' load reports and progress bars would bury the command's own output.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args = build_parser().parse_args(argv)
    if args.command == "validate" and args.max_problems < 0:
        print("ftstack: error: --max-problems must be 0 or more", file=sys.stderr)
        return EXIT_USAGE
    from ftstack_train.errors import USER_ERRORS

    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"ftstack: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
