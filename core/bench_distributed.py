"""Expert-parallel MoE layer step (forward + backward) over W ranks on loopback, against one process.

    python -m core.bench_distributed                      # 2 ranks (gloo), defaults below
    python -m core.bench_distributed --tokens 4096 --experts 16 --steps 20

Both sides do the same work: W·T tokens of width D through E experts (top-K, dropless) and back.
One process runs the whole layer on all W·T tokens with W intra-op threads; W processes (one thread
each) run it expert-parallel, T tokens and E/W experts per rank (``core.distributed``). A step is
the time from a barrier to the slowest rank's end of backward; the all-to-all share is the time
spent inside ``all_to_all_single`` (the count exchange and the four token/gradient exchanges) over
the step time, on the slowest rank. Prints one table; ``--json PATH`` also writes the figures.

Legend: T tokens per rank, D width, F expert hidden width, E experts, K experts per token, W ranks.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from core import distributed as dist_utils
from core.moe import MoE
from core.routers.topk import TopKRouter


def _layer(args) -> MoE:
    torch.manual_seed(0)
    router = functools.partial(TopKRouter, top_k=args.top_k, capacity_factor=None, noise_std=0.0)
    return MoE(args.dim, args.hidden, num_experts=args.experts, router=router)


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


def _worker(rank: int, args, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=args.world)
    try:
        layer = _layer(args)
        dist_utils.shard_experts(layer)
        x, cot = _inputs(args, args.tokens, 1 + rank)
        spent = [0.0]
        a2a = dist.all_to_all_single

        def timed(*a, **kw):  # time inside the exchange (the layer's only collective)
            t0 = time.perf_counter()
            try:
                return a2a(*a, **kw)
            finally:
                spent[0] += time.perf_counter() - t0

        dist_utils.dist.all_to_all_single = timed
        steps, shares = [], []
        for i in range(args.warmup + args.steps):
            dist.barrier()
            spent[0] = 0.0
            t0 = time.perf_counter()
            _step(layer, x, cot)
            dt = time.perf_counter() - t0
            both = torch.tensor([dt, spent[0]], dtype=torch.float64)
            gathered = [torch.empty_like(both) for _ in range(args.world)]
            dist.all_gather(gathered, both)
            if i >= args.warmup:
                slowest = max(gathered, key=lambda t: float(t[0]))
                steps.append(float(slowest[0]))
                shares.append(float(slowest[1] / slowest[0]))
        dist_utils.dist.all_to_all_single = a2a
        if rank == 0:
            with open(out, "w") as f:
                json.dump({"steps": steps, "a2a_share": shares}, f)
    finally:
        dist.destroy_process_group()


def expert_parallel(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(args, os.path.join(tmp, "store"), out), nprocs=args.world, join=True)
        with open(out) as f:
            return json.load(f)


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
    args = p.parse_args(argv)
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
