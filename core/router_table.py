"""The router table: every router config in ``conf/router/`` with its family, the domains it can
serve and its routing time relative to ``topk`` on the same input.

    python -m core.router_table                    # S=4096, d=512, E=32, one group, median of 5
    python -m core.router_table --rounds 3 --group-size 1024

Family: ``family`` declared by the router class, else read off one routing (soft, merging, expert
choice when every expert fills exactly its capacity, dense when every token uses every expert,
token choice otherwise). Domains: those of ``core.run``'s registry whose task accepts the router (a
domain without token ids refuses hash routing; a causal one, nlp, refuses routers that are not causal).
Timing: the router's forward alone (no experts), training mode (the routing used in training,
with its noise and auxiliary losses), under ``torch.no_grad``; the eval column routes in eval mode.

Legend: G groups, S tokens per group, D width, E experts.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from core.routers.base import Router
from core.routing import Routing

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def router_names(conf_dir: Path = CONF_DIR) -> list[str]:
    return sorted(p.stem for p in (conf_dir / "router").glob("*.yaml"))


def build_router(name: str, dim: int, num_experts: int, conf_dir: Path = CONF_DIR) -> Router:
    """Compose ``conf/router/<name>.yaml`` as Hydra does (aliases with a defaults list included)."""
    import hydra

    from core.router_config import router_config

    return hydra.utils.instantiate(router_config(name, conf_dir=conf_dir))(dim=dim, num_experts=num_experts)


def infer_family(router: Router, routing: Routing) -> str:
    declared = getattr(type(router), "family", None)
    if declared:
        return declared
    if routing.is_soft:
        return "soft"
    if routing.is_merged:
        return "merging"
    G, S, E = routing.num_groups, routing.group_size, routing.num_experts
    per_token = torch.bincount(routing.token_idx_N, minlength=G * S)
    if bool((per_token == E).all()):
        return "dense"
    key = torch.div(routing.token_idx_N, S, rounding_mode="floor") * E + routing.expert_idx_N
    per_expert = torch.bincount(key, minlength=G * E)
    if routing.capacity is not None and bool((per_expert == routing.capacity).all()) \
            and not bool((per_token == per_token[0]).all()):
        return "expert choice"
    return "token choice"


def domains(router: Router) -> list[str]:
    """The registered domains whose task accepts this router (``core.run.Task.accepts``)."""
    from core.run import task_classes

    return [name for name, task in task_classes().items() if task.accepts(router)]


def _route_once(router: Router, x_GSD: torch.Tensor, kwargs: dict) -> tuple[float, Routing]:
    sync = torch.cuda.synchronize if x_GSD.is_cuda else (lambda: None)
    with torch.no_grad():
        sync()
        t0 = time.perf_counter()
        routing = router(x_GSD, None, **kwargs)
        sync()
        return time.perf_counter() - t0, routing


def router_table(names: list[str] | None = None, group_size: int = 4096, dim: int = 512, num_experts: int = 32,
                 num_groups: int = 1, rounds: int = 5, seed: int = 0, device: str = "cpu") -> list[dict]:
    """One row per router: name, class, family, domains, median routing time (train and eval mode,
    seconds) and both relative to ``topk``. Rounds are interleaved (every router once per round) so
    that a change in machine load hits all routers alike."""
    names = router_names() if names is None else names
    gen = torch.Generator().manual_seed(seed)
    x_GSD = torch.randn(num_groups, group_size, dim, generator=gen).to(device)
    kwargs = {"token_ids_GS": torch.randint(0, 50_000, (num_groups, group_size), generator=gen).to(device)}
    rows, routers = [], {}
    for name in ["topk"] + [n for n in names if n != "topk"]:
        torch.manual_seed(seed)
        row = {"router": name, "train": [], "eval": []}
        try:
            router = build_router(name, dim, num_experts).to(device)
            _, routing = _route_once(router.train(), x_GSD, kwargs)  # warm-up, and the family
            _route_once(router.eval(), x_GSD, kwargs)
            row.update({"class": type(router).__name__, "family": infer_family(router, routing),
                        "domains": domains(router)})
            routers[name] = router
        except ValueError as err:  # a router that cannot take this input says why
            row.update(error=str(err), family="?", domains=[])
        rows.append(row)
    for _ in range(rounds):
        for mode in ("train", "eval"):
            for row in rows:
                if row["router"] in routers:
                    router = routers[row["router"]].train(mode == "train")
                    row[mode].append(_route_once(router, x_GSD, kwargs)[0])
    for row in rows:
        for mode in ("train", "eval"):
            times = row.pop(mode)
            if times:
                row[f"{mode}_s"] = statistics.median(times)
    ref = rows[0]
    for row in rows:
        for mode in ("train", "eval"):
            if f"{mode}_s" in row and f"{mode}_s" in ref:
                row[f"{mode}_rel"] = row[f"{mode}_s"] / ref[f"{mode}_s"]
    return rows if "topk" in names else rows[1:]


def format_table(rows: list[dict]) -> str:
    """Markdown table of ``router_table`` rows."""
    lines = ["| router | family | domains | train time vs topk | eval time vs topk | train ms |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        doms = ", ".join(r["domains"]) or "n/a"
        if "error" in r:
            lines.append(f"| {r['router']} | {r['family']} | {doms} | n/a ({r['error']}) | n/a | n/a |")
            continue
        lines.append(f"| {r['router']} | {r['family']} | {doms} | {r['train_rel']:.2f} | {r['eval_rel']:.2f} "
                     f"| {1000 * r['train_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--group-size", type=int, default=4096)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--num-experts", type=int, default=32)
    p.add_argument("--num-groups", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--routers", nargs="*", default=None, help="config names (default: all)")
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    args = p.parse_args(argv)
    rows = router_table(args.routers, args.group_size, args.dim, args.num_experts, args.num_groups, args.rounds,
                        device=args.device)
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"Routing time, S={args.group_size}, d={args.dim}, E={args.num_experts}, G={args.num_groups}, "
          f"median of {args.rounds} forwards (router only, no experts), {where}")
    print(format_table(rows))


if __name__ == "__main__":
    main()
