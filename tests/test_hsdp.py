"""HSDP (fsdp_config.sharding_strategy): which mesh each job layout gets, and that training,
gradient clipping, checkpoints (across a change of mesh) and the export give what an unsharded
model gives.

One real 4-process gloo job on CPU (``_job``) emulates the layouts by giving ``build_sharded_model``
the node size torchrun would give: 2 nodes x 2 processes, 1 node x 4, 4 nodes x 1, and nodes of
unequal size; the HSDP runs accumulate gradients over 2 micro batches a step. Each rank writes what it saw to a file; the tests compare those with a
single-process, unsharded reference trained on the same batches.
"""

from __future__ import annotations

import contextlib
import io
import os
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ftstack_train.config import SHARDING_STRATEGIES
from ftstack_train.distributed import Dist, plan_sharding
from ftstack_train.errors import ConfigError

WORLD = 4
STEPS = 3
SAVED_AT = 2  # the checkpoint is taken after this many steps
MAX_NORM = 0.5  # low enough that the tiny model's gradients are clipped: the clip is checked too
LR, BETAS = 1e-2, (0.9, 0.95)
EPS = 1e-3
"""Adam's step is about lr * sign(gradient) where the gradient is far below eps: a gradient of
1e-9 in one run and -1e-9 in another (summation order) moves a weight by 2 x lr. A large eps
makes such elements' steps proportional to their gradient, so the runs can be compared at fp32
tolerance."""
TRAINED = ("FULL_SHARD", "HYBRID_SHARD", "HYBRID_SHARD 4x1")
"""The runs that train; ``_LAYOUTS`` gives each one's (processes per node, sharding_strategy)."""
METRICS = {"final": {"train_cross_entropy": 5.0, "step": STEPS}, "history": []}
LINEAGE = {"base_model": "tiny-mpt", "run_name": "hsdp-test", "train": "train: 4 x 2 rows per step"}
_LAYOUTS = {"FULL_SHARD": (2, "FULL_SHARD"), "HYBRID_SHARD": (2, "HYBRID_SHARD"), "HYBRID_SHARD 4x1": (1, "HYBRID_SHARD")}
MICRO = {"FULL_SHARD": 1, "HYBRID_SHARD": 2, "HYBRID_SHARD 4x1": 2}
"""Micro batches per step of each run: a rank's 2 rows at once, or one at a time (gradient accumulation)."""


# --- the choice itself (no processes) ------------------------------------------------------------

@pytest.mark.parametrize(("requested", "world", "per_node", "strategy", "shape"), [
    ("auto", 16, (8, 8), "HYBRID_SHARD", (2, 8)),
    ("auto", 8, (8, 8), "FULL_SHARD", (8,)),  # one node
    ("auto", 2, (1, 1), "FULL_SHARD", (2,)),  # one GPU per node: HSDP would not shard at all
    ("auto", 12, (4, 8), "FULL_SHARD", (12,)),  # unequal nodes
    ("FULL_SHARD", 16, (8, 8), "FULL_SHARD", (16,)),
    ("HYBRID_SHARD", 24, (8, 8), "HYBRID_SHARD", (3, 8)),
    ("HYBRID_SHARD", 8, (8, 8), "FULL_SHARD", (8,)),  # on one node the two are the same
    ("HYBRID_SHARD", 2, (1, 1), "HYBRID_SHARD", (2, 1)),  # asked for: replicate only
])
def test_plan_sharding(requested, world, per_node, strategy, shape):
    plan = plan_sharding(requested, world, per_node)
    assert (plan.strategy, plan.shape) == (strategy, shape)
    assert plan.line().startswith(f"sharding: {strategy}, mesh ")


@pytest.mark.parametrize(("world", "per_node"), [(12, (4, 8)), (12, (8, 8))])
def test_hybrid_shard_on_unequal_nodes_is_a_config_error(world, per_node):
    with pytest.raises(ConfigError, match=r"fsdp_config\.sharding_strategy: HYBRID_SHARD needs the same number of processes "
                                          r"on every node.*set fsdp_config\.sharding_strategy to FULL_SHARD or auto"):
        plan_sharding("HYBRID_SHARD", world, per_node)


def test_unknown_strategy_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match="fsdp_config.sharding_strategy: 'SHARD_GRAD_OP' is not supported; use " + ", ".join(SHARDING_STRATEGIES)):
        plan_sharding("SHARD_GRAD_OP", 8, (8, 8))


# --- the 4-process job ---------------------------------------------------------------------------

PRELOAD = ["torch", "torch.distributed.checkpoint", "torch.distributed.fsdp", "transformers.models.auto.tokenization_auto",
           "transformers.models.mpt.modeling_mpt", "ftstack_train.checkpoint", "ftstack_train.export", "ftstack_train.trainer"]
"""What the fork server imports once for all 4 processes: spawned each on its own, 4 processes
importing torch and transformers at once take most of the job's time on 2 cores."""


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank ``rank``'s micro batch at ``step``: (input ids, next-token labels). Ranks mask a
    different number of labels, so that an even split of the loss over ranks would be wrong."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    ids = torch.randint(3, 200, (2, 12), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    labels[:, : rank + 1] = -100
    return ids, labels


def loss_sum(model, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")


def global_targets(step: int) -> int:
    return sum(int((batch(step, r)[1] != -100).sum()) for r in range(WORLD))


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _params(model) -> dict[str, torch.Tensor]:
    """Full parameter values (collective: every rank calls it)."""
    return {n: _full(p).detach().clone() for n, p in model.named_parameters()}


def _train_steps(model, optimizer, steps: range, rank: int, micro: int, counted: list | None = None) -> list[float]:
    """Steps as the trainer takes them (trainer.train): each rank's rows in ``micro`` micro
    batches through the trainer's own accumulate_gradients (the loss sum scaled by world/targets,
    FSDP's gradient average), its clip, AdamW. Returns the gradient norms; appends to ``counted``
    the all-reduces each step's backward passes made across the replicas."""
    import torch.distributed as dist

    from ftstack_train.trainer import _clip, accumulate_gradients
    from ftstack_train.trainer import _full as full_norm

    mesh = next(model.parameters()).device_mesh
    replicas = dist.get_process_group_ranks(mesh.get_group("replicate")) if "replicate" in mesh.mesh_dim_names else None
    norms, all_reduce = [], dist.all_reduce
    for step in steps:
        ids, labels = batch(step, rank)
        calls = []

        def counting(tensor, *args, **kwargs):
            group = kwargs.get("group")
            calls.append(group is not None and dist.get_process_group_ranks(group) == replicas)
            return all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counting  # FSDP2's collectives call torch.distributed.all_reduce
        try:
            accumulate_gradients(model, list(zip(ids.chunk(micro), labels.chunk(micro))), lambda b: loss_sum(model, *b),
                                 WORLD / global_targets(step), torch.device("cpu"))
        finally:
            dist.all_reduce = all_reduce
        if counted is not None:
            counted.append((sum(calls), len(calls)))  # across the replicas, and on any group
        norms.append(full_norm(_clip(model, MAX_NORM)).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norms


def _job(rank: int, port: int, source: str, out: str) -> None:
    """One rank of the job: every scenario in turn, results to ``out/rank-N.pt``."""
    import torch.distributed as dist

    from ftstack_train.distributed import init_distributed

    # What torchrun sets for 2 nodes x 2 processes.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank % 2), LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with contextlib.redirect_stdout(io.StringIO()):  # rank 0's network line
        # A rank that fails makes the others time out rather than wait forever in a collective.
        d = init_distributed(timeout_s=60)
    try:
        torch.save(_scenarios(d, source, Path(out)), Path(out) / f"rank-{rank}.pt")
    except BaseException:
        (Path(out) / f"rank-{rank}.error").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def _scenarios(torchrun: Dist, source: str, out: Path) -> dict:
    """Every layout in turn; ``torchrun``: this rank as init_distributed found it (2 nodes x 2)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule

    from ftstack_train.checkpoint import agree_on_resume, load_checkpoint, save_checkpoint
    from ftstack_train.config import parse_config
    from ftstack_train.distributed import build_sharded_model
    from ftstack_train.export import export_hf_model
    from ftstack_train.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(source)
    rank, cpu = torchrun.rank, torchrun.device

    def load(empty: bool):
        return load_model(source, True, len(tokenizer), empty)

    def build(per_node: int | None, sharding: str):
        """The model as train.py builds it for a job of nodes of ``per_node`` processes (None:
        as torchrun's variables say), with its optimizer and rank 0's log."""
        d = torchrun if per_node is None else Dist(rank, WORLD, rank % per_node, cpu, per_node)
        log = io.StringIO()
        with contextlib.redirect_stdout(log):
            model = build_sharded_model(load, d, "fp32", False, sharding)
        model.train()
        return model, torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS), d, log.getvalue()

    def mesh_of(model) -> dict:
        param = next(model.parameters())
        mesh = param.device_mesh
        groups = {name: dist.get_process_group_ranks(mesh.get_group(name)) for name in mesh.mesh_dim_names}
        return {"shape": tuple(mesh.shape), "groups": groups, "placements": [(type(p).__name__, getattr(p, "dim", None)) for p in param.placements]}

    results: dict = {"meshes": {}, "logs": {}, "params": {}, "norms": {}, "resumed": {}, "errors": {}, "all_reduces": {},
                     "torchrun": (torchrun.local_rank, torchrun.local_world_size)}
    for name, per_node in (("auto 2x2", None), ("auto 1x4", 4)):
        model, _, _, log = build(per_node, "auto")
        results["meshes"][name], results["logs"][name] = mesh_of(model), log

    for name in TRAINED:
        model, optimizer, d, log = build(*_LAYOUTS[name])
        results["meshes"][name], results["logs"][name] = mesh_of(model), log
        counted = results["all_reduces"][name] = []
        results["fsdp_modules"] = sum(isinstance(m, FSDPModule) for m in model.modules())
        results["norms"][name] = _train_steps(model, optimizer, range(SAVED_AT), rank, MICRO[name], counted)
        if name != "HYBRID_SHARD 4x1":
            save_checkpoint(out / "checkpoints" / name, SAVED_AT, model, optimizer, {"step": SAVED_AT}, 2, d.is_local_main)
        results["norms"][name] += _train_steps(model, optimizer, range(SAVED_AT, STEPS), rank, MICRO[name], counted)
        results["params"][name] = _params(model)
        if name == "HYBRID_SHARD":
            cfg, _ = parse_config(None, {"export.dtype": "fp32"})
            (out / "export").mkdir(exist_ok=True)
            export_hf_model(model, tokenizer, cfg, out / "export", METRICS, LINEAGE)

    # A job resumes with whatever mesh its node count gives now: every save loads into either.
    for saved, resumed in (("HYBRID_SHARD", "HYBRID_SHARD"), ("HYBRID_SHARD", "FULL_SHARD"), ("FULL_SHARD", "HYBRID_SHARD")):
        model, optimizer, d, _ = build(*_LAYOUTS[resumed])
        path = agree_on_resume(out / "checkpoints" / saved, d.is_local_main)
        state = load_checkpoint(path, model, optimizer)
        loaded = _params(model)
        _train_steps(model, optimizer, range(SAVED_AT, STEPS), rank, MICRO[resumed])
        results["resumed"][f"{saved} -> {resumed}"] = {"step": state["step"], "path": path.name, "loaded": loaded, "final": _params(model)}

    # Nodes of 3 and 1 processes, and a node size that does not divide the world.
    for per_rank, sharding in (((3, 3, 3, 1), "HYBRID_SHARD"), ((3, 3, 3, 3), "HYBRID_SHARD"), ((3, 3, 3, 1), "auto")):
        name = f"{sharding} {per_rank}"
        try:
            model, _, _, log = build(per_rank[rank], sharding)
            results["meshes"][name], results["logs"][name] = mesh_of(model), log
        except ConfigError as exc:
            results["errors"][name] = str(exc)
    return results


@pytest.fixture(scope="module")
def job(tiny_mpt, free_port, tmp_path_factory) -> list[dict]:
    """Every rank's results from one run of the 4-process job."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("hsdp")
    try:
        context = mp.get_context("forkserver")
        context.set_forkserver_preload(PRELOAD)
        mp.start_processes(_job, args=(free_port(), str(tiny_mpt), str(out)), nprocs=WORLD, join=True, start_method="forkserver")
    except Exception:
        errors = "\n".join(p.read_text() for p in sorted(out.glob("rank-*.error")))
        pytest.fail(f"the 4-process job failed:\n{errors}")
    results = [torch.load(out / f"rank-{r}.pt", weights_only=True) for r in range(WORLD)]
    results[0]["export"] = out / "export"
    return results


@pytest.fixture(scope="module")
def reference(tiny_mpt) -> dict:
    """One process, no sharding, the global batch at once: the parameters after the checkpoint's
    step and at the end, and the gradient norms (clipped with torch's own clip_grad_norm_)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_mpt, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=BETAS, eps=EPS)
    norms, at_save = [], {}
    for step in range(STEPS):
        if step == SAVED_AT:
            at_save = {n: p.detach().clone() for n, p in model.named_parameters()}
        pairs = [batch(step, r) for r in range(WORLD)]
        ids, labels = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        (loss_sum(model, ids, labels) / global_targets(step)).backward()
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_NORM).item())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"norms": norms, "at_save": at_save, "final": {n: p.detach().clone() for n, p in model.named_parameters()}}


def assert_same_params(actual: dict, expected: dict, exact: bool = False) -> None:
    assert actual.keys() == expected.keys()
    tol = {"rtol": 0, "atol": 0} if exact else {}
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], msg=lambda m, name=name: f"{name}: {m}", **tol)


@pytest.mark.slow
def test_auto_picks_hybrid_shard_on_two_nodes_and_full_shard_on_one(job):
    for rank, seen in enumerate(job):
        node, index = divmod(rank, 2)
        assert seen["torchrun"] == (index, 2)  # init_distributed read LOCAL_WORLD_SIZE
        # 2 nodes x 2: the shard group is the node's own processes; replicas pair up across nodes.
        assert seen["meshes"]["auto 2x2"] == {
            "shape": (2, 2), "placements": [("Replicate", None), ("Shard", 0)],
            "groups": {"replicate": [index, index + 2], "shard": [2 * node, 2 * node + 1]},
        }
        assert seen["meshes"]["auto 1x4"] == {"shape": (4,), "placements": [("Shard", 0)], "groups": {"shard": [0, 1, 2, 3]}}
        assert seen["meshes"]["HYBRID_SHARD"] == seen["meshes"]["auto 2x2"]
        assert seen["meshes"]["FULL_SHARD"] == seen["meshes"]["auto 1x4"]
        assert seen["meshes"]["HYBRID_SHARD 4x1"]["shape"] == (4, 1)
    logs = job[0]["logs"]
    assert logs["auto 2x2"] == "sharding: HYBRID_SHARD, mesh 2 replicate x 2 shard; auto: 2 nodes, shard within each node's 2 processes, replicate across nodes\n"
    assert logs["auto 1x4"] == "sharding: FULL_SHARD, mesh 4 shard; auto: one node\n"
    assert all(not seen["logs"]["auto 2x2"] for seen in job[1:])  # rank 0 alone logs


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINED)
def test_training_matches_an_unsharded_reference(job, reference, name):
    """The same parameters after the same steps, whatever the mesh (4x1 replicates only)."""
    for seen in job:
        assert_same_params(seen["params"][name], reference["final"])
    assert_same_params(job[0]["params"][name], job[0]["params"]["FULL_SHARD"])


@pytest.mark.slow
def test_with_gradient_accumulation_gradients_cross_the_nodes_once_per_step(job):
    """HYBRID_SHARD's point is that only one all-reduce of the gradients per step crosses the
    network: with 2 micro batches a step, each sharded module all-reduces across the replicas in
    the last backward pass only (FSDP2 would do it in both); the result is the reference's all
    the same (test_training_matches_an_unsharded_reference). FULL_SHARD's reduce-scatter leaves
    nothing to all-reduce."""
    for seen in job:
        modules = seen["fsdp_modules"]
        assert modules >= 2
        assert seen["all_reduces"]["HYBRID_SHARD"] == [(modules, modules)] * STEPS
        assert seen["all_reduces"]["HYBRID_SHARD 4x1"] == [(modules, modules)] * STEPS
        assert seen["all_reduces"]["FULL_SHARD"] == [(0, 0)] * STEPS


@pytest.mark.slow
@pytest.mark.parametrize("name", TRAINED)
def test_gradient_norm_is_the_global_norm(job, reference, name):
    """The trainer's clip sees the norm of the whole gradient, not of one node's or one shard's
    part (with HSDP each rank holds 1/2 of it, and so does each node's replica group)."""
    assert reference["norms"][0] > MAX_NORM  # the clip takes effect, so a wrong norm would change the weights
    for seen in job:
        torch.testing.assert_close(torch.tensor(seen["norms"][name]), torch.tensor(reference["norms"]))


@pytest.mark.slow
@pytest.mark.parametrize("change", ["HYBRID_SHARD -> HYBRID_SHARD", "HYBRID_SHARD -> FULL_SHARD", "FULL_SHARD -> HYBRID_SHARD"])
def test_checkpoint_resumes_on_either_mesh(job, reference, change):
    saved, mesh = change.split(" -> ")
    for seen in job:
        resumed = seen["resumed"][change]
        assert (resumed["step"], resumed["path"]) == (SAVED_AT, f"step-{SAVED_AT:08d}")
        assert_same_params(resumed["loaded"], reference["at_save"])
        # The optimizer state came back too: the next step lands where the uninterrupted run did
        # (to the bit on the same mesh).
        assert_same_params(resumed["final"], seen["params"][saved], exact=saved == mesh)
        assert_same_params(resumed["final"], reference["final"])


@pytest.mark.slow
def test_export_under_hsdp_equals_the_reference(job, reference):
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(job[0]["export"], dtype=torch.float32)
    weights = dict(exported.named_parameters())
    assert_same_params({n: p.detach() for n, p in weights.items()}, reference["final"])
    assert_same_params(job[0]["params"]["HYBRID_SHARD"], {n: p.detach() for n, p in weights.items()}, exact=True)


@pytest.mark.slow
def test_unequal_nodes(job):
    """HYBRID_SHARD is refused, on every rank alike (none hangs in a collective); auto shards over all."""
    for seen in job:
        for per_rank in ((3, 3, 3, 1), (3, 3, 3, 3)):
            message = seen["errors"][f"HYBRID_SHARD {per_rank}"]
            assert "fsdp_config.sharding_strategy: HYBRID_SHARD needs the same number of processes on every node" in message
            assert "set fsdp_config.sharding_strategy to FULL_SHARD or auto" in message
        assert seen["meshes"]["auto (3, 3, 3, 1)"]["shape"] == (4,)
    assert job[0]["errors"]["HYBRID_SHARD (3, 3, 3, 1)"].count("1 to 3 per node") == 1
    assert job[0]["logs"]["auto (3, 3, 3, 1)"] == "sharding: FULL_SHARD, mesh 4 shard; auto: the nodes run 1 to 3 processes each, so shard over all 4\n"
