"""What each training process runs (started by the launcher through torchrun): parse the config,
join the process group, build, train, export, tear down."""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import NoReturn

import torch
import torch.distributed as dist

from .contract import FINAL_EVAL_CE, TEST_CHANNEL, TRAIN_CHANNEL, SageMakerPaths
from .data import StepPlan, list_data_files, pack_rows, tokenize_files
from .distributed import build_sharded_model, compute_dtype, init_distributed
from .errors import EXIT_USER_ERROR, PID_DIR_ENV, STOPPED_FILE, USER_ERROR_FILE, USER_ERRORS
from .export import export_hf_model
from .job import base_model_source, checkpoint_dir, load_job_config, tokenizer_source, write_failure
from .model import load_model, load_tokenizer
from .trainer import Model, StopRequested, build_optimizer, train

def run(paths: SageMakerPaths, stop: StopRequested) -> bool:
    """One training process from start to export; False when it stopped on request."""
    cfg, _ = load_job_config(paths)  # the launcher already printed the warnings
    d = init_distributed(cfg.dist_timeout)
    torch.manual_seed(cfg.seed)
    torch.use_deterministic_algorithms(d.device.type == "cpu")
    source = base_model_source(cfg, paths)
    tokenizer = load_tokenizer(tokenizer_source(cfg, source))
    splits = {}
    for name in (TRAIN_CHANNEL, TEST_CHANNEL):
        channel = paths.channel(name)
        splits[name] = tokenize_files(
            name, list_data_files(channel), tokenizer, cfg.prompt_template, cfg.max_seq_len, cfg.max_dropped_fraction, channel
        )
        if d.is_main:
            print(splits[name].summary(), flush=True)
    rows = {name: pack_rows([len(a) for a in s.ids], cfg.max_seq_len, cfg.packing) for name, s in splits.items()}
    plan = StepPlan.from_config(cfg, d.world_size, d.device.type)
    module = build_sharded_model(
        lambda empty: load_model(source, cfg.pretrained, len(tokenizer), empty), d, cfg.precision, cfg.activation_checkpointing,
        cfg.sharding,
    )
    model = Model.build(module, cfg.attn_impl, compute_dtype(cfg.precision, d.device), d.device, tokenizer.pad_token_id)
    if d.is_main:
        print(model.describe(), flush=True)
    optimizer = build_optimizer(module, cfg)
    result = train(
        model, optimizer, cfg, d, plan, splits[TRAIN_CHANNEL], rows[TRAIN_CHANNEL],
        splits[TEST_CHANNEL], rows[TEST_CHANNEL], checkpoint_dir(cfg, paths), stop,
    )
    if result.stopped:
        return False
    metrics = {"final": {f"train_{k}": v for k, v in result.final_train.items()}, "history": result.history}
    if result.history:
        last = result.history[-1]
        metrics["final"].update({FINAL_EVAL_CE: last["cross_entropy"], "eval_perplexity": last["perplexity"]})
        metrics["final"]["step"] = result.step
    lineage = {"base_model": cfg.model, "run_name": cfg.run_name,
               "train": splits[TRAIN_CHANNEL].summary(), "test": splits[TEST_CHANNEL].summary()}
    export_hf_model(module, tokenizer, cfg, paths.model_dir, metrics, lineage)
    if d.is_main:
        print(f"exported the model to {paths.model_dir}", flush=True)
    return True


def main() -> int:
    """Entry point of ``python -m ftstack_train.train``; user errors become the failure file."""
    paths = SageMakerPaths.from_env()
    rank = int(os.environ.get("RANK", "0"))
    stop = StopRequested()  # before the pid is published, so an early SIGTERM is not fatal
    pid_dir = os.environ.get(PID_DIR_ENV)
    if pid_dir:
        Path(pid_dir, f"rank-{rank}.pid").write_text(str(os.getpid()))
    try:
        finished = run(paths, stop)
        if not finished and pid_dir:  # every rank: each node's launcher reads only its own pid folder
            Path(pid_dir, STOPPED_FILE).touch()
        code = 0
    except USER_ERRORS as exc:
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        write_failure(paths, str(exc))
        code = EXIT_USER_ERROR
        if pid_dir:
            Path(pid_dir, USER_ERROR_FILE).touch()
            code = 0  # the launcher reports it; see USER_ERROR_FILE
    except Exception as exc:  # noqa: BLE001 - the failure file must name whatever happened
        traceback.print_exc()
        write_failure(paths, f"internal error on rank {rank}: {type(exc).__name__}: {exc} (see the job's logs)")
        code = 1
    if dist.is_initialized():
        dist.destroy_process_group()
    return code


def exit_now(code: int) -> NoReturn:
    """Ends the training process without finalizing the interpreter.

    Why not ``sys.exit``: destroy_process_group does not stop gloo's worker threads (the sharded
    model still refers to the process group, so they live until the interpreter tears everything
    down). A worker marks a collective complete and only then drops its reference to the
    collective's work object. When the main thread's Python tensor is already gone, that reference
    is the tensor's last, and the tensor's Python object goes with it: the worker takes the GIL to
    release it. If the main thread has meanwhile reached interpreter finalization, CPython ends
    the worker thread with ``pthread_exit``, whose unwinding meets the work's ``noexcept``
    destructor: ``std::terminate`` ("terminate called without an active exception"), SIGABRT,
    exit -6, and torchrun reports the run as failed although every rank had saved and finished.
    A run stopped by SIGTERM hit it most: its last collective (the checkpoint's) comes just before
    the exit, and CPU load widens the window. A core dump of such a rank shows the worker in
    ``ProcessGroupGloo::runLoop`` -> ``~AsyncWork`` -> ``TensorImpl::decref_pyobject`` ->
    ``take_gil`` -> ``pthread_exit`` while the main thread is in ``Py_FinalizeEx``.
    ``os._exit`` ends every thread at once, with no finalization to race against. Everything the
    run writes is closed by then; the standard streams are flushed here.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
