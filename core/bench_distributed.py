"""Expert-parallel MoE layer step (forward + backward) over W ranks on loopback, against one process.

    python -m core.bench_distributed                      # 2 ranks (gloo), defaults below
    python -m core.bench_distributed --tokens 4096 --experts 16 --steps 20
    python -m core.bench_distributed --routers topk,locmoe   # LocMoE against top-k at 2 and 4 ranks

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
        dist_utils.shard_experts(layer)
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


def locality_table(args) -> list[dict]:
    """``locality`` for every router of ``--routers`` at every world size of ``--worlds``; prints the table."""
    routers = [r.strip() for r in args.routers.split(",") if r.strip()]
    worlds = [int(w) for w in str(args.worlds).split(",") if w.strip()]
    bad = [r for r in routers if r not in ROUTERS]
    if bad or not routers:
        raise SystemExit(f"error: --routers={args.routers} is not allowed: a comma list of {', '.join(ROUTERS)}.")
    for w in worlds:
        if w < 2 or args.experts % w:
            raise SystemExit(f"error: --worlds={args.worlds} is not allowed: each must be >= 2 and divide "
                             f"--experts={args.experts}.")
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
    p.add_argument("--worlds", default="2,4", help="with --routers: the ranks W to run (comma list)")
    p.add_argument("--local-bias", type=float, default=0.1, help="with --routers: LocMoE's local_bias")
    p.add_argument("--capacity-factor", type=float, default=1.0, help="with --routers: cf of top-k's capacity column")
    args = p.parse_args(argv)
    if args.routers is not None:
        rows = locality_table(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(rows, f, indent=2)
        return {"locality": rows}
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
