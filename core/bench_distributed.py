"""Expert-parallel MoE layer step (forward + backward) over W ranks on loopback, against one process.

    python -m core.bench_distributed                      # 2 ranks (gloo), defaults below
    python -m core.bench_distributed --tokens 4096 --experts 16 --steps 20
    python -m core.bench_distributed --routers topk,locmoe   # LocMoE against top-k at 2 and 4 ranks
    python -m core.bench_distributed --data-parallel ddp,fsdp  # DDP against FSDP2 at 2 and 4 ranks

Both sides do the same work: W·T tokens of width D through E experts (top-K, dropless) and back.
One process runs the whole layer on all W·T tokens with W intra-op threads; W processes (one thread
each) run it expert-parallel, T tokens and E/W experts per rank (``core.distributed``). A step is
the time from a barrier to the slowest rank's end of backward; the all-to-all share is the time
spent inside ``all_to_all_single`` (the count exchange and the four token/gradient exchanges) over
the step time, on the slowest rank. Prints one table; ``--json PATH`` also writes the figures.

LocMoE against top-k (``--routers topk,locmoe``; Li et al., "LocMoE: A Low-Overhead MoE for Large
Language Model Training", IJCAI 2024): the same expert-parallel step for each router at each of
``--worlds`` (default 2,4) ranks, on the same tokens and experts, with, per rank and step, the bytes
the rank sends to other ranks in every ``all_to_all_single`` of the layer (counts, tokens out,
outputs back and the two gradient exchanges; the rank's own block stays in memory and is not
counted), the share of kept assignments whose expert lives on the token's own rank (LocMoE's own
rank is the process rank when ``torch.distributed`` is initialised), and the step time. The
capacity columns set LocMoE's lower bound ``C_min = ⌈T·A_D(δ)⌉`` (``core.routers.locmoe``; δ the
maximal angle between a token and its expert's gate vector in this routing) against the capacity
top-k would use, ``⌈T·K·cf/E⌉`` at ``--capacity-factor``, and the largest load an expert receives
(both routers run dropless). Without ``--routers`` the output is the one above.

DDP against FSDP2 (``--data-parallel ddp,fsdp``; ``core.parallel``): a training step (forward,
backward, AdamW) of a stack of ``--blocks`` pre-norm blocks (a D×D projection and a MoE FFN each)
on T tokens per rank, through ``core.parallel.Parallel`` exactly as the engine trains, with the
experts on every rank or spread over the ranks (``+ep``), at each of ``--worlds`` ranks, and one
process as the reference. Per rank: the step time (median of the slowest rank), the bytes that left
the processes over loopback during the timed steps (``/proc/net/dev``, divided by W and the steps:
DDP's bucketed all-reduce runs in C++ and cannot be counted from Python), the model state the rank
holds (its parameters, gradients and AdamW moments: local shards under FSDP and for spread experts)
and the process's peak resident memory.

Legend: T tokens per rank, D width, F expert hidden width, E experts, K experts per token, W ranks.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from core import distributed as dist_utils
from core.moe import MoE
from core.parallel import Parallel, device_mesh, shard_experts
from core.routers.locmoe import LocMoERouter, capacity_lower_bound, max_angular_deviation
from core.routers.topk import TopKRouter

ROUTERS = ("topk", "locmoe")


def _layer(args, router_name: str = "topk", world: int | None = None) -> MoE:
    torch.manual_seed(0)
    if router_name == "locmoe":
        router = functools.partial(LocMoERouter, top_k=args.top_k, capacity_factor=None, noise_std=0.0,
                                   num_ranks=world or args.world, local_bias=args.local_bias)
    else:
        router = functools.partial(TopKRouter, top_k=args.top_k, capacity_factor=None, noise_std=0.0)
    return MoE(args.dim, args.hidden, num_experts=args.experts, router=router)


def cross_rank_bytes(tensor: torch.Tensor, split_sizes, rank: int, world: int) -> int:
    """Bytes of ``tensor`` that ``all_to_all_single`` sends to ranks other than ``rank`` when its
    rows are cut into ``split_sizes`` (None: W equal blocks)."""
    rows = tensor.shape[0] if tensor.dim() else 1
    row_bytes = (tensor.numel() // max(rows, 1)) * tensor.element_size()
    splits = list(split_sizes) if split_sizes else [rows // world] * world
    return row_bytes * sum(n for j, n in enumerate(splits) if j != rank)


def _inputs(args, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, args.dim, generator=g), torch.randn(tokens, args.dim, generator=g)


def _step(layer: MoE, x: torch.Tensor, cot: torch.Tensor) -> None:
    x = x.clone().requires_grad_(True)
    (layer(x) * cot).sum().backward()
    layer.zero_grad(set_to_none=True)


def single_process(args) -> list[float]:
    """Step times of the whole layer on W·T tokens in this process (W threads)."""
    torch.set_num_threads(args.world)
    layer = _layer(args)
    x, cot = _inputs(args, args.world * args.tokens, 0)
    times = []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        _step(layer, x, cot)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return times


def _worker(rank: int, args, store: str, out: str, router_name: str = "topk", world: int | None = None) -> None:
    world = world or args.world
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        layer = _layer(args, router_name, world)
        layer.keep_last_routing = True
        shard_experts(layer, device_mesh("cpu"))
        x, cot = _inputs(args, args.tokens, 1 + rank)
        spent, sent = [0.0], [0]
        a2a = dist.all_to_all_single

        def timed(output, input, output_split_sizes=None, input_split_sizes=None, **kw):
            # time inside the exchange (the layer's only collective) and count what leaves this rank
            sent[0] += cross_rank_bytes(input, input_split_sizes, rank, world)
            t0 = time.perf_counter()
            try:
                return a2a(output, input, output_split_sizes, input_split_sizes, **kw)
            finally:
                spent[0] += time.perf_counter() - t0

        dist_utils.dist.all_to_all_single = timed
        steps, shares, rows = [], [], []
        L = args.experts // world
        for i in range(args.warmup + args.steps):
            dist.barrier()
            spent[0], sent[0] = 0.0, 0
            t0 = time.perf_counter()
            _step(layer, x, cot)
            dt = time.perf_counter() - t0
            routing = layer.last_routing
            expert_N = routing.expert_idx_N
            own = float((expert_N // L == rank).double().mean()) if expert_N.numel() else 0.0
            load = int(torch.bincount(expert_N, minlength=args.experts).max()) if expert_N.numel() else 0
            angle = float(routing.extras["max_angle"]) if "max_angle" in routing.extras else \
                float(max_angular_deviation(x, layer.router.weight, routing.token_idx_N, expert_N))
            both = torch.tensor([dt, spent[0], sent[0], own, load, angle], dtype=torch.float64)
            gathered = [torch.empty_like(both) for _ in range(world)]
            dist.all_gather(gathered, both)
            if i >= args.warmup:
                slowest = max(gathered, key=lambda t: float(t[0]))
                steps.append(float(slowest[0]))
                shares.append(float(slowest[1] / slowest[0]))
                rows.append([t.tolist() for t in gathered])
        dist_utils.dist.all_to_all_single = a2a
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"steps": steps, "a2a_share": shares, "per_rank": rows}, f)
    finally:
        dist.barrier()  # every rank done with the mesh's groups before any rank tears them down
        dist.destroy_process_group()


def expert_parallel(args, router_name: str = "topk", world: int | None = None) -> dict:
    world = world or args.world
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(args, os.path.join(tmp, "store"), out, router_name, world), nprocs=world, join=True)
        with open(out) as f:
            return json.load(f)


def locality(args, router_name: str, world: int) -> dict:
    """One router's expert-parallel figures at ``world`` ranks (see the module docstring): medians
    over the timed steps of the step time, of each rank's cross-rank bytes per step (mean and max over
    ranks), of the own-rank share of assignments (mean over ranks), of the largest expert load and of
    δ (max over ranks), with LocMoE's capacity bound for δ and top-k's capacity at ``capacity_factor``."""
    ep = expert_parallel(args, router_name, world)
    per = torch.tensor(ep["per_rank"], dtype=torch.float64)  # steps x W x (dt, a2a s, bytes, own, load, angle)
    med = lambda t: float(t.median())  # noqa: E731
    angle = med(per[:, :, 5].max(1).values)
    return {"router": router_name, "world": world, "tokens_per_rank": args.tokens, "dim": args.dim,
            "experts": args.experts, "top_k": args.top_k,
            "step_ms": 1e3 * statistics.median(ep["steps"]),
            "all_to_all_share": statistics.median(ep["a2a_share"]),
            "cross_rank_bytes_per_rank": med(per[:, :, 2].mean(1)),
            "cross_rank_bytes_max_rank": med(per[:, :, 2].max(1).values),
            "own_rank_share": med(per[:, :, 3].mean(1)),
            "max_expert_load": med(per[:, :, 4].max(1).values),
            "max_angle": angle,
            "capacity_lower_bound": capacity_lower_bound(args.tokens, args.dim, angle),
            "topk_capacity": math.ceil(args.tokens * args.top_k * args.capacity_factor / args.experts)}


def _choices(args, option: str, allowed) -> tuple[list[str], list[int]]:
    """The comma list of ``--<option>`` (each in ``allowed``) and of ``--worlds`` (each >= 2 and
    dividing ``--experts``); ``SystemExit`` naming the option otherwise."""
    value = getattr(args, option)
    names = [m.strip() for m in value.split(",") if m.strip()]
    flag = "--" + option.replace("_", "-")
    if not names or any(n not in allowed for n in names):
        raise SystemExit(f"error: {flag}={value} is not allowed: a comma list of {', '.join(allowed)}.")
    worlds = [int(w) for w in str(args.worlds).split(",") if w.strip()]
    for w in worlds:
        if w < 2 or args.experts % w:
            raise SystemExit(f"error: --worlds={args.worlds} is not allowed: each must be >= 2 and divide "
                             f"--experts={args.experts}.")
    return names, worlds


def locality_table(args) -> list[dict]:
    """``locality`` for every router of ``--routers`` at every world size of ``--worlds``; prints the table."""
    routers, worlds = _choices(args, "routers", ROUTERS)
    rows = [locality(args, r, w) for w in worlds for r in routers]
    print(f"MoE layer fwd+bwd expert parallel (gloo loopback, 1 thread per rank), T={args.tokens} tokens per rank, "
          f"D={args.dim} F={args.hidden} E={args.experts} K={args.top_k}, dropless, LocMoE local_bias="
          f"{args.local_bias}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"{'W':>2} {'router':<7} {'MB sent/rank/step':>17} {'own-rank share':>14} {'ms/step':>8} "
          f"{'a2a %':>6} {'delta':>6} {'C_min':>6} {'C_topk':>6} {'max load':>8}")
    for r in rows:
        print(f"{r['world']:>2} {r['router']:<7} {r['cross_rank_bytes_per_rank'] / 2**20:>17.2f} "
              f"{100 * r['own_rank_share']:>13.1f}% {r['step_ms']:>8.1f} {100 * r['all_to_all_share']:>6.1f} "
              f"{r['max_angle']:>6.3f} {r['capacity_lower_bound']:>6d} {r['topk_capacity']:>6d} "
              f"{r['max_expert_load']:>8.0f}")
    print(f"  MB sent: bytes a rank sends to other ranks per step in the layer's all-to-alls (counts, tokens, outputs, "
          f"two gradient exchanges), mean over ranks; own-rank share: kept assignments to an expert on the token's "
          f"rank; delta: max angle (rad) token-gate of the routing; C_min = ceil(T*A_D(delta)) (LocMoE's capacity "
          f"lower bound); C_topk = ceil(T*K*cf/E) at cf={args.capacity_factor}; max load: largest expert's "
          f"assignments from one rank's tokens.")
    return rows


# ----------------------------------------------------------------------------- DDP against FSDP2


class _Block(torch.nn.Module):
    """Pre-norm block: x + proj(norm(x)), then x + MoE(norm(x))."""

    def __init__(self, args):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(args.dim), torch.nn.LayerNorm(args.dim)
        self.proj = torch.nn.Linear(args.dim, args.dim)
        self.moe = _layer(args)

    def forward(self, x):
        x = x + self.proj(self.norm1(x))
        return x + self.moe(self.norm2(x))


class _Stack(torch.nn.Module):
    def __init__(self, args):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = torch.nn.ModuleList(_Block(args) for _ in range(args.blocks))
        self.head = torch.nn.Linear(args.dim, args.dim)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def _mse(model, batch):
    x, target = batch
    return torch.nn.functional.mse_loss(model(x), target), {}


def _loopback_bytes() -> int:
    """Bytes sent over the loopback interface so far (0 where /proc/net/dev is absent)."""
    try:
        with open("/proc/net/dev") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if name.strip() == "lo":
                    return int(rest.split()[8])
    except OSError:
        pass
    return 0


def _held_bytes(model, optimizer) -> dict:
    """Bytes of parameters, gradients and optimizer state this rank holds (local shards)."""
    def nbytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()
    params = list(model.parameters())
    return {"params": sum(nbytes(p) for p in params),
            "grads": sum(nbytes(p.grad) for p in params if p.grad is not None),
            "optimizer": sum(nbytes(v) for st in optimizer.state.values() for v in st.values()
                             if torch.is_tensor(v) and v.dim())}


def _dp_worker(rank: int, args, store: str, out: str, mode: str, spread: bool, world: int) -> None:
    import resource

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        par = Parallel(_Stack(args), _mse, mode, expert_parallel=spread)
        opt = torch.optim.AdamW(par.model.parameters(), lr=1e-3)
        x, target = _inputs(args, args.tokens, 1 + rank)
        times, held, before = [], None, 0
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                if world > 1:
                    dist.barrier()
                before = _loopback_bytes() if rank == 0 else 0
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            task, _, _ = par.module((x, target))
            task.backward()
            par.after_backward()
            held = _held_bytes(par.model, opt)
            opt.step()
            opt.zero_grad(set_to_none=True)
            dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(dt, dist.ReduceOp.MAX)
            if i >= args.warmup:
                times.append(float(dt))
        if world > 1:
            dist.barrier()
        sent = (_loopback_bytes() - before) / world / args.steps if rank == 0 else 0.0
        held = {**_held_bytes(par.model, opt), "grads": held["grads"]}
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        figures = [held["params"], held["grads"], held["optimizer"], rss]
        if world > 1:
            per = dist_utils.all_gather_object(figures)
        else:
            per = [figures]
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"step_ms": 1e3 * statistics.median(times), "bytes_per_rank_step": sent,
                           "per_rank": per}, f)
    finally:
        if world > 1:
            dist.destroy_process_group()


def data_parallel(args, mode: str, spread: bool, world: int) -> dict:
    """One configuration's figures (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        wargs = (args, os.path.join(tmp, "store"), out, mode, spread, world)
        if world == 1:
            _dp_worker(0, *wargs)
        else:
            mp.spawn(_dp_worker, args=wargs, nprocs=world, join=True)
        with open(out) as f:
            res = json.load(f)
    per = torch.tensor(res["per_rank"], dtype=torch.float64)
    return {"world": world, "mode": mode if world > 1 else "one process", "expert_parallel": spread,
            "step_ms": res["step_ms"], "mb_sent_per_rank_step": res["bytes_per_rank_step"] / 2**20,
            "params_mb": float(per[:, 0].max()) / 2**20, "grads_mb": float(per[:, 1].max()) / 2**20,
            "optimizer_mb": float(per[:, 2].max()) / 2**20, "peak_rss_mb": float(per[:, 3].max()) / 2**20}


def data_parallel_table(args) -> list[dict]:
    """``data_parallel`` for one process and every mode of ``--data-parallel`` (with and without the
    experts spread) at every world size of ``--worlds``; prints the table."""
    modes, worlds = _choices(args, "data_parallel", ("ddp", "fsdp"))
    rows = [data_parallel(args, "ddp", False, 1)]
    rows += [data_parallel(args, m, spread, w) for w in worlds for m in modes for spread in (False, True)]
    n_params = sum(p.numel() for p in _Stack(args).parameters())
    print(f"training step (fwd+bwd+AdamW) of {args.blocks} blocks (D={args.dim}, MoE F={args.hidden} E={args.experts} "
          f"K={args.top_k} dropless), {n_params / 1e6:.2f}M parameters, T={args.tokens} tokens per rank, gloo "
          f"loopback, 1 thread per rank, torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"{'W':>2} {'mode':<12} {'ms/step':>8} {'MB sent/rank/step':>17} {'params MB':>9} {'grads MB':>8} "
          f"{'AdamW MB':>8} {'state MB':>8} {'peak RSS MB':>11}")
    for r in rows:
        name = r["mode"] + ("+ep" if r["expert_parallel"] else "")
        state = r["params_mb"] + r["grads_mb"] + r["optimizer_mb"]
        print(f"{r['world']:>2} {name:<12} {r['step_ms']:>8.1f} {r['mb_sent_per_rank_step']:>17.2f} "
              f"{r['params_mb']:>9.2f} {r['grads_mb']:>8.2f} {r['optimizer_mb']:>8.2f} {state:>8.2f} "
              f"{r['peak_rss_mb']:>11.0f}")
    print("  params/grads/AdamW MB: what the most loaded rank holds after the backward (local shards); state MB: their "
          "sum; MB sent: loopback bytes of the timed steps / W / steps; peak RSS includes the torch libraries.")
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--world", type=int, default=2, help="ranks W (gloo on loopback)")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per rank T")
    p.add_argument("--dim", type=int, default=256, help="width D")
    p.add_argument("--hidden", type=int, default=512, help="expert hidden width F")
    p.add_argument("--experts", type=int, default=8, help="experts E (divisible by W)")
    p.add_argument("--top-k", type=int, default=2, help="experts per token K")
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--json", default=None, help="also write the figures to this file")
    p.add_argument("--routers", default=None,
                   help="compare these routers expert parallel (comma list of topk, locmoe) instead")
    p.add_argument("--worlds", default="2,4", help="with --routers or --data-parallel: the ranks W to run (comma list)")
    p.add_argument("--local-bias", type=float, default=0.1, help="with --routers: LocMoE's local_bias")
    p.add_argument("--capacity-factor", type=float, default=1.0, help="with --routers: cf of top-k's capacity column")
    p.add_argument("--data-parallel", default=None,
                   help="compare these data-parallel engines (comma list of ddp, fsdp) at --worlds instead")
    p.add_argument("--blocks", type=int, default=4, help="with --data-parallel: blocks in the stack")
    args = p.parse_args(argv)
    for option, table, key in ((args.data_parallel, data_parallel_table, "data_parallel"),
                               (args.routers, locality_table, "locality")):
        if option is not None:
            rows = table(args)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=2)
            return {key: rows}
    if args.world < 2 or args.experts % args.world:
        raise SystemExit(f"error: --world={args.world} must be >= 2 and divide --experts={args.experts}.")
    one = statistics.median(single_process(args))
    ep = expert_parallel(args)
    step = statistics.median(ep["steps"])
    share = statistics.median(ep["a2a_share"])
    res = {"world": args.world, "tokens_per_rank": args.tokens, "dim": args.dim, "hidden": args.hidden,
           "experts": args.experts, "top_k": args.top_k, "single_process_step_ms": 1e3 * one,
           "expert_parallel_step_ms": 1e3 * step, "ratio_ep_to_single": step / one,
           "all_to_all_share": share, "all_to_all_ms": 1e3 * step * share}
    print(f"MoE layer fwd+bwd, {args.world}x{args.tokens} tokens, D={args.dim} F={args.hidden} E={args.experts} "
          f"K={args.top_k}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    print(f"  one process ({args.world} threads)          {1e3 * one:8.1f} ms/step")
    print(f"  expert parallel ({args.world} ranks x 1 thread)  {1e3 * step:8.1f} ms/step  "
          f"({step / one:.2f}x one process)")
    print(f"  all-to-all share of the EP step        {100 * share:8.1f} %  ({1e3 * step * share:.1f} ms)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return res


if __name__ == "__main__":
    main()
