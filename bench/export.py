"""Exporting a sharded checkpoint of a ~1B model to Hugging Face safetensors, against ``tar czf`` of
the same checkpoint folder (what SageMaker does to the output when compression is on): seconds and
peak RSS of each side, each measured in processes of its own.

    .venv/bin/python bench/export.py [--params 1e9] [--nproc 2] [--max-shard-size 5GB]

Set-up (not measured): ``--nproc`` gloo processes build a random-init MPT of about ``--params``
parameters in fp32 (the master weights training holds), shard it with FSDP2 as training does
(``apply_fsdp``) and save it with the training job's ``save_checkpoint``. The checkpoint holds the
weights only: a job's checkpoint also holds AdamW's two moments, twice as much data again, which
tar would have to compress and the export skips, so leaving them out can only flatter tar.

The export side is what a job runs, in ``--nproc`` fresh processes: ``agree_on_resume`` (which
checks every file against its SHA-256), ``load_checkpoint`` into the model built on the meta device
and sharded, then ``export_hf_model`` in bf16 (the code that ends every job). Its seconds run from
the start of the processes to their exit, imports included; the export call alone is reported too.

Peak RSS is each process's own high-water mark: VmHWM for the ranks (the export's, and the sum
over ranks), ``wait4``'s ``ru_maxrss`` for tar and gzip, started from a small interpreter (a child's
``ru_maxrss`` includes what it had from its parent before exec). On this CPU bench every rank also
holds its fp32 shard of the weights in host memory; on GPUs those live on the device, so the host
memory the export call itself adds (rank 0's high-water mark during ``export_hf_model`` above its
RSS just before) is reported as well. The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BENCH = Path(__file__).resolve()
STEP = 1
DIST_TIMEOUT_S = 3600.0
HEAD_DIM = 64
DEPTH_RATIO = 85
"""Width per layer of MPT-1B (2048 wide, 24 layers), kept for every size."""
BIG_VOCAB = 50368
"""MPT's vocabulary, for models of 1e8 parameters and more; smaller ones take the tokenizer's."""


def mpt_shape(params: float, vocab: int) -> tuple[int, int]:
    """(d_model, n_layers) of an MPT (12 d^2 per layer, tied embedding of vocab x d) with about
    ``params`` parameters and about MPT-1B's width per layer."""
    best = None
    for d in range(HEAD_DIM, 16384 + 1, HEAD_DIM):
        layers = max(1, round((params - vocab * d) / (12 * d * d)))
        error = abs(12 * layers * d * d + vocab * d - params) / params + abs(layers * DEPTH_RATIO - d) / d
        if best is None or error < best[0]:
            best = (error, d, layers)
    return best[1], best[2]


def vm_kib(field: str) -> int:
    """A size from /proc/self/status, in KiB (VmRSS: now; VmHWM: the high-water mark)."""
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def reset_high_water_mark() -> bool:
    """Resets VmHWM to the current RSS (Linux 4.0+); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rank_main(task: str, folder: Path, shard_size: str) -> None:
    """One process of the set-up (``save``) or of the export side (``export``), started with
    torchrun's environment variables; writes its figures to ``folder/results``."""
    import torch
    import torch.distributed as dist

    from ftstack_train.checkpoint import agree_on_resume, load_checkpoint, save_checkpoint
    from ftstack_train.config import parse_config
    from ftstack_train.distributed import apply_fsdp, init_distributed
    from ftstack_train.export import export_hf_model
    from ftstack_train.model import load_model, load_tokenizer
    from ftstack_train.train import exit_now

    d = init_distributed(DIST_TIMEOUT_S)
    cfg, _ = parse_config(overrides=["run_name=bench-export", "export.dtype=bf16", f"export.max_shard_size={shard_size}"])
    tokenizer = load_tokenizer(str(folder / "source"))
    clock = {"started": time.perf_counter()}
    model = apply_fsdp(load_model(str(folder / "source"), False, len(tokenizer), empty=True), d.device, cfg.precision, False)
    model.to_empty(device=d.device)
    clock["built"] = time.perf_counter()
    result = {"rank": d.rank, "params": sum(p.numel() for p in model.parameters())}
    checkpoints = folder / "checkpoints"
    if task == "save":
        generator = torch.Generator().manual_seed(d.rank)
        with torch.no_grad():
            for p in model.parameters():  # the local shard of each DTensor, in place
                p.to_local().normal_(0.0, 0.02, generator=generator)
        save_checkpoint(checkpoints, STEP, model, (), {"step": STEP}, keep=1, is_local_main=d.is_local_main)
    else:
        path = agree_on_resume(checkpoints, d.is_local_main)
        clock["verified"] = time.perf_counter()
        load_checkpoint(path, model, ())
        clock["loaded"] = time.perf_counter()
        result |= {"hwm_before_export_kib": vm_kib("VmHWM"), "rss_before_export_kib": vm_kib("VmRSS")}
        result["hwm_reset"] = reset_high_water_mark()
        export_hf_model(model, tokenizer, cfg, folder / "model", {"final": {}}, {"base_model": "random-init MPT (bench)"})
        clock["exported"] = time.perf_counter()
    # VmHWM of this process's own image: ru_maxrss would also count the parent's pages from before exec.
    result["hwm_kib"] = vm_kib("VmHWM")
    result["seconds"] = {k: round(v - clock["started"], 3) for k, v in clock.items() if k != "started"}
    (folder / "results").mkdir(exist_ok=True)
    (folder / "results" / f"{task}-{d.rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()
    exit_now(0)


def prepare_source(folder: Path, params: float) -> dict:
    """Writes the model's config and a small tokenizer to ``folder/source`` (the ranks build the
    weights); returns the shape."""
    from transformers import MptConfig

    from ftstack_train.model import load_tokenizer, make_tiny_model

    texts = ["the model answers the question with a value"] * 4
    tokenizer = load_tokenizer(str(make_tiny_model("tiny-mpt", texts, folder / "tiny", seed=0)))
    vocab = BIG_VOCAB if params >= 1e8 else len(tokenizer)
    d_model, n_layers = mpt_shape(params, vocab)
    config = MptConfig(d_model=d_model, n_heads=d_model // HEAD_DIM, n_layers=n_layers, expansion_ratio=4, max_seq_len=2048,
                       vocab_size=vocab, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config.save_pretrained(folder / "source")
    tokenizer.save_pretrained(folder / "source")
    shutil.rmtree(folder / "tiny")
    return {"d_model": d_model, "n_layers": n_layers, "vocab": vocab}


def free_port() -> int:
    """A loopback TCP port nothing listens on now, for the ranks' rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(task: str, folder: Path, nproc: int, shard_size: str) -> tuple[float, list[dict]]:
    """Runs ``nproc`` rank processes of ``task`` to the end; returns the wall seconds and each
    rank's figures. Raises when one fails (the others are stopped)."""
    port = free_port()
    start = time.perf_counter()
    procs = {}
    for rank in range(nproc):
        env = os.environ | {"RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nproc),
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        command = [sys.executable, str(BENCH), "--rank-task", task, "--folder", str(folder), "--max-shard-size", shard_size]
        proc = subprocess.Popen(command, env=env)
        procs[proc.pid] = proc
    while any(p.returncode is None for p in procs.values()):
        # Any child: a rank that fails ends the wait at once, not behind one blocked in a collective.
        pid, status = os.waitpid(-1, 0)
        procs[pid].returncode = code = os.waitstatus_to_exitcode(status)
        if code != 0:
            for other in procs.values():
                if other.returncode is None:
                    other.kill()
                    other.wait()
            raise RuntimeError(f"a {task} process (pid {pid}) failed with exit code {code}; its output is above")
    seconds = time.perf_counter() - start
    return seconds, [json.loads((folder / "results" / f"{task}-{r}.json").read_text()) for r in range(nproc)]


def peak_rss_of(command: list[str]) -> None:
    """Runs ``command`` and prints its wall seconds and peak RSS (bytes) as JSON. Started as a
    process of its own from a small interpreter, because ``ru_maxrss`` counts the pages a child
    had from its parent before exec: from this process, that floor is a few MB, not the GBs of
    the bench's."""
    start = time.perf_counter()
    proc = subprocess.Popen(command)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    print(json.dumps({"seconds": time.perf_counter() - start, "peak_rss_bytes": usage.ru_maxrss * 1024, "code": proc.returncode}))


def run_tar(folder: Path) -> dict:
    """``tar czf`` of the checkpoint folder, as SageMaker compresses the output; the archive is
    deleted afterwards to spare the disk."""
    archive = folder / "checkpoint.tar.gz"
    tar = ["tar", "czf", str(archive), "-C", str(folder / "checkpoints"), f"step-{STEP:08d}"]
    out = subprocess.run([sys.executable, "-I", str(BENCH), "--peak-rss-of", *tar], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.splitlines()[-1])
    if result["code"] != 0:
        raise RuntimeError(f"tar failed with exit code {result['code']}: {out.stderr.strip()}")
    size = archive.stat().st_size
    archive.unlink()
    return {"tar_seconds": result["seconds"], "tar_peak_rss_bytes": result["peak_rss_bytes"], "tar_gz_bytes": size}


def folder_bytes(folder: Path, pattern: str = "*") -> int:
    """Total size of the files under ``folder`` matching ``pattern``."""
    return sum(p.stat().st_size for p in folder.rglob(pattern) if p.is_file())


def measure(folder: Path, args: argparse.Namespace) -> dict:
    """Set-up, then each side once; every figure of the bench."""
    figures = {"nproc": args.nproc, "max_shard_size": args.max_shard_size} | prepare_source(folder, args.params)
    setup_seconds, saved = run_ranks("save", folder, args.nproc, args.max_shard_size)
    figures["params"] = saved[0]["params"]
    figures["bf16_bytes"] = 2 * figures["params"]
    figures["checkpoint_bytes"] = folder_bytes(folder / "checkpoints")
    print(f"set-up: MPT d_model {figures['d_model']}, {figures['n_layers']} layers, {figures['params'] / 1e9:.3f}B parameters; "
          f"fp32 checkpoint of {figures['checkpoint_bytes'] / 1e9:.2f} GB saved by {args.nproc} processes in {setup_seconds:.1f} s")
    figures |= run_tar(folder)
    seconds, ranks = run_ranks("export", folder, args.nproc, args.max_shard_size)
    clock = ranks[0]["seconds"]
    peaks = [max(r["hwm_before_export_kib"], r["hwm_kib"]) * 1024 for r in ranks]
    figures |= {
        "export_seconds": seconds,
        "export_phases_seconds": {"build": clock["built"], "verify": clock["verified"] - clock["built"],
                                  "load": clock["loaded"] - clock["verified"], "export": clock["exported"] - clock["loaded"]},
        "export_peak_rss_bytes": max(peaks),
        "export_peak_rss_sum_bytes": sum(peaks),
        "export_rank_peak_rss_bytes": peaks,
        "export_rank0_rss_before_export_bytes": ranks[0]["rss_before_export_kib"] * 1024,
        "export_added_rss_bytes": (ranks[0]["hwm_kib"] - ranks[0]["rss_before_export_kib"]) * 1024 if ranks[0]["hwm_reset"] else None,
        "safetensors_bytes": folder_bytes(folder / "model", "*.safetensors"),
    }
    figures["peak_rss_ratio"] = figures["export_peak_rss_bytes"] / figures["bf16_bytes"]
    if figures["export_added_rss_bytes"] is not None:
        figures["added_rss_ratio"] = figures["export_added_rss_bytes"] / figures["bf16_bytes"]
    figures["speedup"] = figures["tar_seconds"] / seconds
    figures["speedup_export_call"] = figures["tar_seconds"] / figures["export_phases_seconds"]["export"]
    return figures


def report(f: dict) -> None:
    """Prints the figures for a reader."""
    gb = 1e9
    print(f"tar czf:  {f['tar_seconds']:7.1f} s, peak RSS {f['tar_peak_rss_bytes'] / gb:.3f} GB, archive {f['tar_gz_bytes'] / gb:.2f} GB")
    phases = ", ".join(f"{k} {v:.1f} s" for k, v in f["export_phases_seconds"].items())
    print(f"export:   {f['export_seconds']:7.1f} s from process start to exit ({phases}); "
          f"{f['safetensors_bytes'] / gb:.2f} GB of bf16 safetensors")
    print(f"export peak RSS: largest process {f['export_peak_rss_bytes'] / gb:.2f} GB, all {f['nproc']} processes "
          f"{f['export_peak_rss_sum_bytes'] / gb:.2f} GB; bf16 model {f['bf16_bytes'] / gb:.2f} GB; "
          f"ratio {f['peak_rss_ratio']:.2f} (target <= 1.3)")
    if f["export_added_rss_bytes"] is not None:
        print(f"host memory the export call adds on rank 0: {f['export_added_rss_bytes'] / gb:.2f} GB, "
              f"{f['added_rss_ratio']:.2f}x the bf16 model")
    print(f"export is {f['speedup']:.1f}x faster than tar czf, {f['speedup_export_call']:.1f}x counting the export call alone "
          "(target >= 5x)")


def main() -> int:
    """Runs the bench (or, with the hidden ``--rank-task``, one of its processes)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, default=1e9, help="about how many parameters (default 1e9)")
    parser.add_argument("--nproc", type=int, default=2, help="processes that save and export the sharded model")
    parser.add_argument("--max-shard-size", default="5GB", help="export.max_shard_size (the job's default: 5GB)")
    parser.add_argument("--workdir", help="where the temporary folder goes (default: the system's temporary folder)")
    parser.add_argument("--rank-task", choices=("save", "export"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--peak-rss-of", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak_rss_of:
        peak_rss_of(args.peak_rss_of)
        return 0
    if args.rank_task:
        rank_main(args.rank_task, args.folder, args.max_shard_size)
    if args.params < 1e4 or args.nproc < 1:
        parser.error("--params must be at least 1e4 and --nproc at least 1")
    with tempfile.TemporaryDirectory(prefix="ftstack-bench-export-", dir=args.workdir) as tmp:
        figures = measure(Path(tmp), args)
    report(figures)
    print(json.dumps({"bench": "export"} | figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
