"""core.parallel and core.distributed with two real processes on gloo: a MoE layer trained through
DDP or FSDP2, with its experts spread over the ranks (DTensor shards, all-to-all dispatch) or not,
equals the single-process layer (outputs, input gradients, every parameter gradient, the clipped
norm); whole-layout state round trips; and the pieces that need no process group."""

from __future__ import annotations

import functools
import json
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from core import after_optimizer_step, collect_aux_loss
from core.distributed import (
    full_optimizer_state_dict, full_state_dict, get_rank, get_world_size, load_full_optimizer_state_dict,
    load_full_state_dict, sum_router_loads, sum_routing_stats,
)
from core.lora_experts import LoRAExperts
from core.moe import MoE
from core.parallel import Parallel, device_mesh, gather_experts, shard_experts
from core.routers.deepseek import DeepSeekRouter
from core.routers.expert_choice import ExpertChoiceRouter
from core.routers.soft import SoftRouter
from core.routers.topk import TopKRouter

pytestmark = pytest.mark.distributed

WORLD = 2
B, S, D, F, E = 3, 10, 8, 12, 4

CASES = {
    "topk_dropless": dict(router=functools.partial(TopKRouter, top_k=2, capacity_factor=None, noise_std=0.0)),
    "topk_capacity": dict(router=functools.partial(TopKRouter, top_k=2, capacity_factor=0.75, noise_std=0.0,
                                                   batch_priority=True)),
    "expert_choice": dict(router=functools.partial(ExpertChoiceRouter, capacity_factor=1.5, noise_std=0.0)),
    "deepseek_shared": dict(router=functools.partial(DeepSeekRouter, top_k=2, bias_update_rate=0.01),
                            num_shared_experts=1, glu=True, act_layer=torch.nn.SiLU),
    "lora_experts": dict(router=functools.partial(TopKRouter, top_k=2, capacity_factor=None, noise_std=0.0),
                         experts=functools.partial(LoRAExperts, rank=2, freeze_base=False)),
}


def _spawn(fn, *args) -> None:
    """Run ``fn(rank, world, *args)`` in WORLD processes joined by a gloo group; a worker's
    exception fails the caller with its traceback."""
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_entry, args=(fn, os.path.join(tmp, "store"), args), nprocs=WORLD, join=True)


def _entry(rank: int, fn, store: str, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        fn(rank, WORLD, *args)
    finally:
        dist.destroy_process_group()


def _run_checks(rank: int, world: int, out_dir: str) -> None:
    """Every two-process check in one pair of processes (starting them costs more than the checks);
    each check's outcome, ``ok`` or its traceback, goes to ``<out_dir>/<rank>.json``."""
    results = {}
    for name, check in CHECKS.items():
        try:
            check(rank, world)
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
        dist.barrier()
    with open(os.path.join(out_dir, f"{rank}.json"), "w") as f:
        json.dump(results, f)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, list[str]]:
    out = tmp_path_factory.mktemp("ep")
    _spawn(_run_checks, str(out))
    per_rank = [json.loads((out / f"{r}.json").read_text()) for r in range(WORLD)]
    return {name: [res[name] for res in per_rank] for name in per_rank[0]}


def _assert_ok(outcomes, name: str) -> None:
    for rank, res in enumerate(outcomes[name]):
        assert res == "ok", f"rank {rank}: {res}"


def _layer(case: str) -> MoE:
    torch.manual_seed(0)
    kw = dict(CASES[case])
    return MoE(D, F, num_experts=E, router=kw.pop("router"), **kw)


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD, B, S, D, generator=g)
    cot = torch.randn(WORLD, B, S, D, generator=g)  # a fixed cotangent: loss = <y, cot> + aux
    return x, cot


def _step(layer: MoE, x: torch.Tensor, cot: torch.Tensor):
    x = x.clone().requires_grad_(True)
    y = layer(x)
    loss = (y * cot).sum() + collect_aux_loss(layer)
    loss.backward()
    return y.detach(), x.grad


def _loss(layer, batch):
    x, cot = batch
    y = layer(x)
    return (y * cot).sum(), {"y": y}


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _equivalence_check(rank: int, world: int) -> None:
    from torch.distributed.tensor import DTensor

    x, cot = _inputs()
    for case in CASES:
        ref = _layer(case)
        ref_out, ref_dx = [], []
        for r in range(world):  # one process: every rank's tokens through the same layer, losses summed
            y, dx = _step(ref, x[r], cot[r])
            ref_out.append(y)
            ref_dx.append(dx)
        ref_grads = {n: p.grad for n, p in ref.named_parameters()}
        ref_norm = float(torch.nn.utils.clip_grad_norm_(list(ref.parameters()), 1e9))
        for mode in ("ddp", "fsdp"):
            for experts_spread in (True, False):
                what = f"{case} {mode} expert_parallel={experts_spread}"
                par = Parallel(_layer(case), _loss, mode, expert_parallel=experts_spread)
                layer = par.model
                if experts_spread:
                    assert layer.experts.num_experts == E // world and not layer.dispatcher.is_local
                    per_expert = [p for _, p in layer.experts.named_parameters(recurse=False)]
                    assert per_expert and all(isinstance(p, DTensor) and p.to_local().shape[0] == E // world
                                              for p in per_expert)
                xr = x[rank].clone().requires_grad_(True)
                task, logs, aux = par.module((xr, cot[rank]))
                (task + collect_aux_loss(layer)).backward()
                par.after_backward()
                torch.testing.assert_close(logs["y"].detach(), ref_out[rank], msg=f"{what}: outputs differ")
                torch.testing.assert_close(xr.grad, ref_dx[rank], msg=f"{what}: input gradients differ")
                grads = {n: p.grad for n, p in layer.named_parameters()}
                assert set(grads) == set(ref_grads), what
                for name, g in grads.items():
                    torch.testing.assert_close(_whole(g), ref_grads[name], msg=f"{what}: {name} grad differs")
                norm = par.clip_grad_norm_([p for p in layer.parameters()], 1e9)
                assert norm == pytest.approx(ref_norm, rel=1e-5), what
                # routing statistics: each rank counts its own tokens; summed over ranks they are one process's
                sum_routing_stats(layer)
                torch.testing.assert_close(layer.stat_tokens_E, ref.stat_tokens_E)
                torch.testing.assert_close(layer.stat_counters[:4], ref.stat_counters[:4])
        # DeepSeek's bias update sees the global batch's load once the pending loads are summed
        sum_router_loads(layer)
        after_optimizer_step(ref)
        after_optimizer_step(layer)
        for (name, a), b in zip(ref.named_buffers(), layer.buffers()):
            if name.startswith("router."):
                torch.testing.assert_close(b, a, msg=f"{case}: {name} differs after the optimizer step")


def test_expert_parallel_layer_equals_one_process(outcomes):
    """topk without and with capacity (BPR), expert choice, DeepSeek with a shared GLU expert."""
    _assert_ok(outcomes, "equivalence")


def _state_check(rank: int, world: int) -> None:
    full = _layer("topk_dropless")
    reference = {k: v.clone() for k, v in full.state_dict().items()}
    ep = _layer("topk_dropless")
    shard_experts(ep, device_mesh("cpu"))
    # the whole layout, gathered, is the unsharded state dict
    sd = full_state_dict(ep)
    assert set(sd) == set(reference)
    for k in reference:
        torch.testing.assert_close(sd[k], reference[k])
    # loading a whole state dict takes each rank's part
    other = {k: v + 1 for k, v in reference.items()}
    load_full_state_dict(ep, other)
    L = E // world
    torch.testing.assert_close(ep.experts.w1_EDF.to_local(), other["experts.w1_EDF"][rank * L:(rank + 1) * L])
    torch.testing.assert_close(ep.router.weight, other["router.weight"])
    # optimizer state: gathered to E rows, each rank's part back on load
    opt = torch.optim.AdamW(ep.parameters(), lr=0.1)
    x, cot = _inputs()
    _step(ep, x[rank], cot[rank])
    opt.step()
    osd = full_optimizer_state_dict(opt)
    exp_avg = [s["exp_avg"] for s in osd["state"].values()]
    assert any(t.shape[0] == E and t.ndim == 3 and not hasattr(t, "to_local") for t in exp_avg)
    opt2 = torch.optim.AdamW(ep.parameters(), lr=0.1)
    load_full_optimizer_state_dict(ep, opt2, osd)
    for s1, s2 in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        torch.testing.assert_close(_whole(s1["exp_avg"]), _whole(s2["exp_avg"]))
    # back to one whole layer on every rank
    gather_experts(ep)
    assert ep.dispatcher.is_local and ep.experts.num_experts == E
    assert ep.experts.w1_EDF.shape[0] == E and not hasattr(ep.experts.w1_EDF, "to_local")


def test_full_layout_state_round_trips(outcomes):
    _assert_ok(outcomes, "state")


def _soft_check(rank: int, world: int) -> None:
    torch.manual_seed(0)
    layer = MoE(D, F, num_experts=E, router=functools.partial(SoftRouter))
    # refused when sharding, before any forward: the router declares supports_expert_parallel = False
    with pytest.raises(ValueError, match="expert_parallel.*SoftRouter"):
        shard_experts(layer, device_mesh("cpu"))


def test_soft_routing_is_refused_under_expert_parallelism(outcomes):
    _assert_ok(outcomes, "soft")


CHECKS = {"equivalence": _equivalence_check, "state": _state_check, "soft": _soft_check}


def test_helpers_without_a_process_group():
    assert get_rank() == 0 and get_world_size() == 1
    layer = _layer("topk_dropless")
    par = Parallel(layer, _loss, "fsdp", expert_parallel=True)  # one process: nothing to spread or wrap
    assert par.mode is None and par.model is layer and layer.dispatcher.is_local
    assert full_state_dict(layer).keys() == layer.state_dict().keys()
    with pytest.raises(ValueError, match="data_parallel='zero'.*ddp"):
        Parallel(layer, _loss, "zero")


def test_loader_slices_cover_every_global_batch_whatever_the_ranks():
    """Rank slices of a TensorLoader batch are the one-process batch cut in order (so the global batch,
    the steps per epoch and resume positions do not depend on the number of ranks); a batch smaller
    than the number of ranks is filled by repeating examples."""
    from core.engine import TensorLoader, iter_batches

    loader = TensorLoader((torch.arange(23),), batch_size=8, shuffle=True)
    whole = [b[0] for b in iter_batches(loader, epoch=1, seed=3)]
    for world in (2, 3):
        per_rank = [[b[0] for b in iter_batches(loader, 1, 0, 3, r, world)] for r in range(world)]
        assert all(len(batches) == len(whole) for batches in per_rank)
        for i, batch in enumerate(whole):
            assert torch.equal(torch.cat([per_rank[r][i] for r in range(world)]), batch)
        resumed = [b[0] for b in iter_batches(loader, 1, 1, 3, 1, world)]
        assert all(torch.equal(a, b) for a, b in zip(resumed, per_rank[1][1:]))
    tiny = TensorLoader((torch.arange(5),), batch_size=4)  # last batch: one example for 2 ranks
    assert [b[0].tolist() for b in iter_batches(tiny, 0, 1, 0, 1, 2)] == [[4]]
