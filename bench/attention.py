"""Time and peak memory of one MPT block's forward and backward pass with each attention path
(eager: transformers' own ``MptAttention`` with the dense packed mask the trainer passes; sdpa and
flex: ``ftstack_train.attention``), at L = 512, 2048 and 4096, on packed rows of short examples and
on one example filling the row (the worst case for the per-example paths). Then the pre-flight
memory estimator (``ftstack.estimate``, what ``ftstack estimate`` prints) against the measured
peaks, and its per-GPU budget for MPT-7B at L=2048, micro batch 4, FULL_SHARD over 8 x A10G.

    .venv/bin/python bench/attention.py     # CPU: a small block (d_model 256, 4 heads, 1 row), fp32
    python bench/attention.py               # GPU: the MPT-7B block (4096, 32 heads, 4 rows), bf16

Peak memory is what one forward+backward adds on top of the block, its gradients and its inputs.
What a training step holds once for all blocks (eager's dense mask, sdpa's ALiBi biases) is
reported next to it as "per step".
On GPU it is ``torch.cuda.max_memory_allocated`` minus the allocation before the pass. On CPU
each case runs in a fresh process with glibc's mmap threshold fixed at 64 KiB, so that every
tensor of any size is its own mapping and freed memory goes back to the system at once; the peak
is the kernel's high-water mark of resident memory (VmHWM, reset through /proc/self/clear_refs
after a warm-up pass) minus the resident memory just before the pass. FlexAttention has no
backward pass on CPU, so there it is reported as not available for training. Times are the best
of several passes (other load on the machine only adds time), the paths of one L and data built
side by side and timed in turn, pass by pass (on CPU in a fresh process with the ordinary
allocator); read the ratios to eager at the same L and data (the same script's baseline).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from ftstack_train.attention import use_packed_attention  # noqa: E402
from ftstack_train.data import attention_bias, pack_rows  # noqa: E402
from ftstack.estimate import (  # noqa: E402
    EAGER_BACKWARD_BYTES, EAGER_SAVED_BYTES, Setup, block_activation_bytes, block_backward_bytes, estimate_memory,
)
from ftstack.instances import instance_type  # noqa: E402
from ftstack.model_shapes import ModelShape, model_shape  # noqa: E402

PATHS = ("eager", "sdpa", "flex")
DATA = ("packed", "long")
GIB = 2**30
MIB = 2**20
MPT_7B = {"d_model": 4096, "n_heads": 32, "n_layers": 32, "vocab_size": 50432}
"""mosaicml/mpt-7b's shape (expansion ratio 4, no biases, tied embeddings)."""


def synthetic_examples(n: int, max_len: int, seed: int) -> list[tuple[int, int]]:
    """(tokens, prompt tokens) of ``n`` instruction examples: a log-normal prompt (with 8 tokens
    of template) and a longer log-normal response, the shapes of ``bench/packing.py``'s synthetic
    records scaled to a real tokenizer's token counts (mean about 145 tokens, a long tail);
    truncated to ``max_len`` with at least one response token, as the job truncates."""
    rng = random.Random(seed)
    examples = []
    for _ in range(n):
        prompt = min(max_len - 1, 8 + int(rng.lognormvariate(3.3, 0.6)))
        examples.append((min(max_len, prompt + 1 + int(rng.lognormvariate(4.2, 0.8))), prompt))
    return examples


def synthetic_lengths(n: int, max_len: int, seed: int) -> list[int]:
    """The token counts of ``synthetic_examples``."""
    return [length for length, _ in synthetic_examples(n, max_len, seed)]


def packed_segment_ids(batch: int, seq: int, seed: int) -> torch.Tensor:
    """(batch, seq) segment ids of packed rows (``data.pack_rows``, best-fit decreasing) of
    synthetic examples: the rows at the middle of each of ``batch`` equal slices of the packing,
    which opens with the longest examples and ends with rows of short ones."""
    lengths = synthetic_lengths(max(64, 8 * batch * seq // 100), seq, seed)
    picked = pick_rows(pack_rows(lengths, seq, packing=True), batch)
    segment_ids = torch.zeros(batch, seq, dtype=torch.long)
    for r, row in enumerate(picked):
        start = 0
        for seg, i in enumerate(row, start=1):
            segment_ids[r, start : start + lengths[i]] = seg
            start += lengths[i]
    return segment_ids


def pick_rows(rows: list[list[int]], k: int) -> list[list[int]]:
    """``k`` rows of a packing, each from the middle of one of ``k`` equal slices of it."""
    if len(rows) < k:
        raise ValueError(f"{len(rows)} packed rows, {k} needed")
    return [rows[(2 * i + 1) * len(rows) // (2 * k)] for i in range(k)]


def segment_ids_for(data: str, batch: int, seq: int, seed: int) -> torch.Tensor:
    """Packed short examples, or (``long``) one example filling each row."""
    if data == "long":
        return torch.ones(batch, seq, dtype=torch.long)
    return packed_segment_ids(batch, seq, seed)


class OneBlock(torch.nn.Module):
    """One ``MptBlock`` with the config ``use_packed_attention`` reads."""

    def __init__(self, d_model: int, heads: int, seq: int) -> None:
        super().__init__()
        from transformers import MptConfig
        from transformers.models.mpt.modeling_mpt import MptBlock

        self.config = MptConfig(d_model=d_model, n_heads=heads, n_layers=1, expansion_ratio=4, max_seq_len=seq)
        self.block = MptBlock(self.config, layer_idx=0)


def block_inputs(block: OneBlock, path: str, segment_ids: torch.Tensor, dtype: torch.dtype) -> tuple[dict, object]:
    """The block's keyword arguments as ``MptModel.forward`` makes them for the trainer's batch
    (the dense mask as bool and the ALiBi tensor for eager; nothing for the packed paths, whose
    layout is prepared on the hook), and that PackedAttention (None for eager)."""
    if path == "eager":
        from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

        seq = segment_ids.shape[1]
        mask = attention_bias(segment_ids, dtype).to(torch.bool)
        alibi = build_mpt_alibi_tensor(block.config.n_heads, seq, device=segment_ids.device)
        return {"attention_mask": mask, "position_bias": alibi}, None
    packed = use_packed_attention(block, path)
    packed.prepare(segment_ids)
    return {"attention_mask": None, "position_bias": None}, packed


def step_input_bytes(kwargs: dict, packed, dtype: torch.dtype) -> int:
    """Memory that a training step holds once for all its blocks, left out of the per-block peak:
    eager's dense mask (the trainer's float bias and MPT's bool copy); the packed paths' ALiBi
    biases, one per distinct example length in the batch (sdpa; flex computes ALiBi in its kernel)."""
    if packed is None:
        mask = kwargs["attention_mask"]
        return mask.numel() * (1 + torch.finfo(dtype).bits // 8)
    return sum(b.numel() * b.element_size() for b in packed.layout._biases.values())


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_high_water_mark() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size


def build_case(case: dict):
    """The block, its inputs and a function running one forward+backward pass, after a warm-up
    pass (which compiles flex and allocates the parameter gradients)."""
    device = torch.device(case["device"])
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    batch, seq, d_model = case["batch"], case["seq"], case["d_model"]
    block = OneBlock(d_model, case["heads"], seq).to(device=device, dtype=dtype)
    segment_ids = segment_ids_for(case["data"], batch, seq, seed=1).to(device)
    kwargs, packed = block_inputs(block, case["path"], segment_ids, dtype)
    x = torch.randn(batch, seq, d_model, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn_like(x)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        out, _ = block.block(x, **kwargs)
        out.backward(grad_out)
        sync()

    step()
    examples = int(sum(len(torch.unique(row[row > 0])) for row in segment_ids.cpu()))
    facts = {"examples": examples, "real_share": float((segment_ids > 0).float().mean()),
             "step_input_bytes": step_input_bytes(kwargs, packed, dtype)}
    return step, facts


def peak_of(step, device: str) -> int:
    """Bytes one pass adds at its peak (see the module docstring for how, on CPU)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        return torch.cuda.max_memory_allocated() - base
    base = _rss("VmRSS")
    _reset_high_water_mark()
    step()
    return _rss("VmHWM") - base


def time_group(cases: list[dict], iters: int, memory: bool) -> list[dict]:
    """The cases of one L and data, built side by side and timed interleaved (pass k of every
    path, then pass k+1), so that a change in the machine's load hits every path alike; best
    seconds per case, and the peak of each when ``memory``."""
    built = [(case, *build_case(case)) for case in cases]
    results = [case | facts | ({"peak_bytes": peak_of(step, case["device"])} if memory else {}) for case, step, facts in built]
    seconds: list[list[float]] = [[] for _ in built]
    for _ in range(iters):
        for i, (_, step, _) in enumerate(built):
            start = time.perf_counter()
            step()
            seconds[i].append(time.perf_counter() - start)
    return [r | {"seconds": min(s)} for r, s in zip(results, seconds)]


def _subprocess(flag: str, payload, env: dict) -> object:
    done = subprocess.run([sys.executable, __file__, flag, json.dumps(payload)], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{flag} {payload} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_cases(cases: list[dict], iters: int, cuda: bool) -> list[dict]:
    """Every case, grouped by L and data. GPU: in this process (the allocator's statistics are
    exact). CPU: the timing in one fresh process per group, and each case's peak in a fresh
    process of its own with every allocation its own mapping (see the module docstring); that
    setting slows allocation, so it stays out of the timing."""
    results = []
    groups: dict[tuple, list[dict]] = {}
    for case in cases:
        groups.setdefault((case["seq"], case["data"]), []).append(case)
    for group in groups.values():
        runnable = [c for c in group if cuda or c["path"] != "flex"]
        if cuda:
            done = time_group(runnable, iters, memory=True)
            torch.cuda.empty_cache()
        else:
            done = _subprocess("--group", {"cases": runnable, "iters": iters}, dict(os.environ))
            mapped = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
            for r in done:
                r["peak_bytes"] = _subprocess("--peak", r, mapped)
        by_path = {r["path"]: r for r in done}
        for case in group:
            results.append(by_path.get(case["path"]) or case | {"seconds": None, "peak_bytes": None,
                                                                  "note": "n/a: FlexAttention has no backward pass on CPU"})
            _print_case(results[-1], results)
    return results


def _print_case(r: dict, results: list[dict]) -> None:
    eager = next((e for e in results if e["path"] == "eager" and e["seq"] == r["seq"] and e["data"] == r["data"]), None)
    if r["seconds"] is None:
        print(f"L={r['seq']:5d} {r['data']:6s} {r['path']:5s}  {r['note']}", flush=True)
        return
    ratio = ""
    if eager is not None and eager is not r:
        ratio = f"  {eager['seconds'] / r['seconds']:5.2f}x eager's speed, {r['peak_bytes'] / eager['peak_bytes']:5.3f}x its memory"
    print(f"L={r['seq']:5d} {r['data']:6s} {r['path']:5s} {r['seconds'] * 1e3:9.1f} ms  peak +{r['peak_bytes'] / MIB:8.1f} MiB"
          f"  (+{r['step_input_bytes'] / MIB:6.1f} MiB per step)  {r['examples']:3d} examples in {r['batch']} rows{ratio}", flush=True)


def estimator_check(results: list[dict]) -> list[dict]:
    """The pre-flight estimator's one-block figure (``ftstack.estimate``: what a block keeps for
    its backward pass plus what the pass adds, with the eager path's score tensors) at each
    measured case's own shape and dtype, next to the measured peak: the memory model checked
    against this run, not only its arithmetic."""
    rows = []
    for r in results:
        if r["seconds"] is None:
            continue
        shape = ModelShape("bench block", "mpt", r["d_model"], 1, r["heads"], r["heads"], 4 * r["d_model"], 1, True, False)
        b = 2 if r["device"].startswith("cuda") else 4
        tokens, scores = r["batch"] * r["seq"], r["batch"] * r["heads"] * r["seq"] ** 2
        estimate = block_activation_bytes(shape, tokens, b, r["path"]) + block_backward_bytes(shape, tokens, b)
        if r["path"] == "eager":
            estimate += scores * ((EAGER_SAVED_BYTES + EAGER_BACKWARD_BYTES) if b == 2 else 12)
        rows.append({"seq": r["seq"], "data": r["data"], "path": r["path"], "measured": r["peak_bytes"], "estimated": estimate})
    return rows


def a10g_estimate() -> dict:
    """The estimator's per-GPU budget for MPT-7B at L=2048, micro batch 4 on ml.g5.48xlarge (8 x
    A10G, FULL_SHARD, activation checkpointing), per attention path."""
    out = {}
    for path in ("eager", "sdpa", "flex"):
        est = estimate_memory(Setup(model_shape("mpt-7b"), instance_type("ml.g5.48xlarge"), 2048, 4, True, path))
        out[path] = {"items": est.items, "step_peak": est.step_peak, "optimizer_peak": est.optimizer_peak,
                     "gpu_bytes": est.setup.instance.gpu_bytes, "budget": est.budget, "fits": est.fits}
    return out


def print_estimates(check: list[dict], a10g: dict) -> None:
    """Both checks as tables, in MiB and GiB."""
    print("\nthe pre-flight estimator's one-block figure against the measured peak:")
    for r in check:
        print(f"  L={r['seq']:5d} {r['data']:6s} {r['path']:5s} measured {r['measured'] / MIB:8.1f} MiB, "
              f"estimated {r['estimated'] / MIB:8.1f} MiB ({r['estimated'] / r['measured']:.2f}x)")
    print("\nMPT-7B, L=2048, micro batch 4, ml.g5.48xlarge (8 x A10G, FULL_SHARD, activation checkpointing), per GPU:")
    for path, est in a10g.items():
        print(f"  {path:5s}: step peak {est['step_peak'] / GIB:6.2f} GiB, optimizer step {est['optimizer_peak'] / GIB:6.2f} GiB "
              f"of {est['gpu_bytes'] / GIB:.2f} GiB; pre-flight budget (80%) {est['budget'] / GIB:.2f} GiB -> "
              f"{'fits' if est['fits'] else 'over the budget'}")


def quadratic_check(results: list[dict], seq: int) -> float | None:
    """Measured bytes per score element (eager minus sdpa, packed rows) at ``seq``: the figure the
    estimate's 14 bytes (bf16) stands for; in fp32 the casts are no-ops and fewer copies exist."""
    same = {r["path"]: r for r in results if r["seconds"] is not None and r["seq"] == seq and r["data"] == "packed"}
    if "eager" not in same or "sdpa" not in same:
        return None
    e = same["eager"]
    return (e["peak_bytes"] - same["sdpa"]["peak_bytes"]) / (e["batch"] * e["heads"] * seq * seq)


def main() -> int:
    """Runs every case, prints the table, the estimate and one JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--d-model", type=int, help="default: 4096 on GPU (MPT-7B), 256 on CPU")
    parser.add_argument("--heads", type=int, help="default: 32 on GPU, 4 on CPU (head dim 64)")
    parser.add_argument("--batch", type=int, help="rows per pass; default: 4 on GPU, 1 on CPU")
    parser.add_argument("--lengths", default="512,2048,4096", help="row lengths L, comma-separated")
    parser.add_argument("--iters", type=int, default=5, help="timed passes per case, interleaved across paths (best)")
    parser.add_argument("--group", help=argparse.SUPPRESS)  # CPU: one group's timing, in a fresh process
    parser.add_argument("--peak", help=argparse.SUPPRESS)  # CPU: one case's peak, in a fresh process
    args = parser.parse_args()
    if args.group:
        group = json.loads(args.group)
        print(json.dumps(time_group(group["cases"], group["iters"], memory=False)))
        return 0
    if args.peak:
        step, _ = build_case(json.loads(args.peak))
        print(json.dumps(peak_of(step, "cpu")))
        return 0
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    d_model, heads, batch = args.d_model or (4096 if cuda else 256), args.heads or (32 if cuda else 4), args.batch or (4 if cuda else 1)
    try:
        lengths = [int(v) for v in args.lengths.split(",")]
    except ValueError:
        parser.error(f"--lengths: {args.lengths!r} is not a comma-separated list of integers")
    if d_model % heads or min(lengths + [batch, args.iters, d_model]) < 1:
        parser.error("--d-model must be a multiple of --heads; --lengths, --batch, --iters must be positive")
    device = "cuda" if cuda else "cpu"
    print(f"one MPT block, d_model {d_model}, {heads} heads, batch {batch}, {'bf16 on ' + torch.cuda.get_device_name() if cuda else 'fp32 on CPU'}; "
          f"peak = {'torch.cuda.max_memory_allocated' if cuda else 'VmHWM - VmRSS in a fresh process'} over the pass", flush=True)
    cases = [{"device": device, "d_model": d_model, "heads": heads, "batch": batch, "seq": seq, "data": data, "path": path}
             for seq in lengths for data in DATA for path in PATHS]
    results = run_cases(cases, args.iters, cuda)
    summary = {"bench": "attention", "device": torch.cuda.get_device_name() if cuda else "cpu", "d_model": d_model,
               "heads": heads, "batch": batch, "cases": results}
    check, a10g = estimator_check(results), a10g_estimate()
    print_estimates(check, a10g)
    summary |= {"estimator_check": check, "a10g_estimate": a10g}
    if 2048 in lengths:
        per_element = quadratic_check(results, 2048)
        print(f"  check: eager's measured extra at L=2048 is {per_element:.1f} bytes per score element here "
              f"({'bf16' if cuda else 'fp32: the fp32 casts are no-ops'}; the 7B figure uses 14 for bf16)")
        summary |= {"eager_bytes_per_score_element": per_element}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
