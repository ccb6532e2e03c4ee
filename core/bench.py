"""``python -m core.bench``: how fast the MoE layer is, next to a dense FFN of the same activated FLOPs.

Three tables:

1. ``layer``: our ``MoE`` layer (router included: top-K with renormalised gates, dropless, no noise,
   bias-free GELU experts) against the dense FFN with hidden width K·F, against the same layer
   with the other layout of its expert function (``ours_grouped`` on CPU), and against the other
   implementation styles of ``core.bench_styles`` (per-expert loop, capacity buffer + bmm, one-hot
   einsum), forward (``inference_mode``) and forward+backward (a contiguous upstream gradient),
   for E=8/K=2/F=1024, E=32/K=8/F=256 and E=64/K=8/F=128 (``--layers`` picks others) at T=4096,
   D=512. ``experts_only`` is a bound rather than a layer (``ExpertsCeiling``): each expert's FFN
   on its own contiguous rows, as many as our router gives it, with nothing else: the layer's
   time if routing and data movement were free.
2. ``routers``: every ``conf/router/*.yaml`` router's forward time at T=4096 (one group), D=512,
   E=32 relative to ``topk``, and as a share of the MoE layer's forward time with that router;
   shares above 25% are flagged.
3. ``e2e`` (opt-in, ``--e2e``): training throughput (forward, backward, AdamW step) of the default
   V-MoE (ViT patch 4 on 28×28×1, width 96, depth 6, E=8 top-2 cf 1.05 in every other block)
   against the dense ViT whose MLPs in those blocks are K times wider (same activated FLOPs).

``--compile`` adds ``torch.compile``d copies of ``dense`` and ``ours`` to the layer table (and of both
ViTs to the e2e table), named ``<engine>+compile``, compiled before the timed rounds (the first
call's seconds are recorded as ``compile_s``), and prints them next to their eager engines: eager
and compiled median ms and the speedup eager/compiled (from the minima and per round).

Method: one process, warm-ups, then interleaved rounds (every engine
once per round, in a seeded random order per round) and the minimum and median per engine;
``ratio_to_dense`` = t_dense / t_engine from the minima, so 1.0 is the dense speed, and
``ratio_to_dense_paired`` the median of the per-round ratios, which a slow stretch of a shared
machine moves less. On CPU the run uses fp32 and all cores, with the allocator
the process was started with: by default glibc's, as every training run gets it, where each fresh
buffer of more than 32 MiB is mapped and page-faulted anew (glibc's default mmap threshold). ``--malloc tuned``
re-executes the process with ``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_`` raised, so that
freed memory is reused; that removes most of the page faults of the engines with big temporaries
(dense included) and is the harder comparison for our layer. The settings used go into the JSON.
On GPU (``--device cuda``) it uses bf16 autocast.

Example::

    python -m core.bench                        # layer + routers tables, JSON in bench_results/
    python -m core.bench --quick --tables layer # a small smoke run
    python -m core.bench --tables layer --layers 16:4:512 --styles loop   # your own shape
    python -m core.bench --e2e --out bench_results/full.json
    python -m core.bench --e2e --malloc tuned   # glibc tuned to reuse freed memory
    python -m core.bench --compile --e2e        # eager against torch.compile, side by side
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import functools
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from core.bench_styles import CapacityBmmMoE, DenseFFN, EinsumMoE, ExpertsCeiling, LoopMoE
from core.moe import MoE
from core.routers.topk import TopKRouter

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "4294967296", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
LAYER_CONFIGS = ((8, 2, 1024), (32, 8, 256), (64, 8, 128))  # (E, K, F)
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
ROUTER_SHARE_LIMIT = 0.25


# ---- timing ------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], None]], rounds: int, warmups: int, device: torch.device,
                     budget_s: float = float("inf"), clock: Callable[[], float] = time.perf_counter) -> dict[str, list[float]]:
    """Seconds per call of every function, measured in interleaved rounds after warm-ups.

    Every round runs the functions in its own order, shuffled with a fixed seed, so that a
    function which leaves the caches, the allocator or the clock in a bad state (a style with huge
    temporaries) does not always slow the same neighbour. ``times[name][r]`` is round r's time
    (for the rounds the function ran). A function whose warm-up shows it would
    exceed ``budget_s`` over all rounds gets fewer rounds (at least 2), so one very slow style does
    not dominate the run. ``clock`` is wall time, or
    ``time.process_time`` (CPU seconds of this process: with one thread, a measure that other
    processes sharing the cores barely disturb).
    """
    allowed = {}
    for name, fn in fns.items():
        t0 = clock()
        for _ in range(max(1, warmups)):
            fn()
            _sync(device)
        per_call = (clock() - t0) / max(1, warmups)
        fits = rounds if budget_s == float("inf") else int(budget_s / max(per_call, 1e-9))
        allowed[name] = max(2, min(rounds, fits))
    times: dict[str, list[float]] = {name: [] for name in fns}
    order, rng = list(fns), random.Random(0)
    for r in range(rounds):
        rng.shuffle(order)
        for name in order:
            if r >= allowed[name]:
                continue
            fn = fns[name]
            _sync(device)
            t0 = clock()
            fn()
            _sync(device)
            times[name].append(clock() - t0)
    return times


def paired_ratio(t_ref: list[float], ts: list[float]) -> float:
    """Median over rounds of ``t_ref[r] / ts[r]`` (the rounds both ran): each round's two times were
    taken seconds apart, so a slow stretch of the machine cancels out of that round's ratio."""
    return statistics.median(a / b for a, b in zip(t_ref, ts))


def _summary(ts: list[float], t_ref: list[float]) -> dict:
    """Timing fields of a record: ``ratio_to_dense`` from the minima, ``ratio_to_dense_paired`` the
    median of the per-round ratios, and every round's time."""
    return {"ratio_to_dense": min(t_ref) / min(ts), "ratio_to_dense_paired": paired_ratio(t_ref, ts),
            "min_ms": min(ts) * 1e3, "median_ms": statistics.median(ts) * 1e3, "rounds": len(ts),
            "times_ms": [t * 1e3 for t in ts]}


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _forward_fn(model: nn.Module, x: torch.Tensor, device: torch.device) -> Callable[[], None]:
    def run():
        with torch.inference_mode(), _autocast(device):
            model(x)
    return run


def _train_fn(model: nn.Module, x: torch.Tensor, grad: torch.Tensor, device: torch.device) -> Callable[[], None]:
    params = [p for p in model.parameters() if p.requires_grad]

    def run():
        with _autocast(device):
            y = model(x)
        y.backward(grad.to(y.dtype))
        x.grad = None
        for p in params:
            p.grad = None
    return run


COMPILED = "+compile"


def add_compiled(fns: dict[str, Callable[[], None]], make: dict[str, Callable[[], None]], device: torch.device) -> dict[str, float]:
    """Add ``make``'s functions (named ``<engine>+compile``) to ``fns`` after one call each, which
    compiles them outside the timed rounds; returns those calls' seconds. A graph that Dynamo
    recompiles once for a new shape (dropping routers vary the assignment count) gets a second call."""
    seconds = {}
    for name, fn in make.items():
        t0 = time.perf_counter()
        fn()
        _sync(device)
        seconds[name] = time.perf_counter() - t0
        fn()
        fns[name] = fn
    return seconds


def compile_pairs(records: list[dict]) -> list[tuple[dict, dict]]:
    """(eager record, compiled record) pairs of the same table row."""
    def key(r):
        return tuple(r.get(k) for k in ("table", "E", "K", "F", "pass"))
    by_name = {(key(r), r["engine"]): r for r in records if "engine" in r}
    return [(by_name[(key(r), r["engine"][:-len(COMPILED)])], r) for r in records
            if r.get("engine", "").endswith(COMPILED) and (key(r), r["engine"][:-len(COMPILED)]) in by_name]


# ---- table 1: the layer against dense and the other styles -------------------------------------

def moe_router(top_k: int) -> Callable:
    """The benchmark's router: Mixtral-style dropless top-K (renormalised, no noise, no aux loss)."""
    return functools.partial(TopKRouter, top_k=top_k, capacity_factor=None, noise_std=0.0, renormalize=True,
                             importance_loss_weight=0.0, load_loss_weight=0.0)


STYLES = ("loop", "capacity_bmm", "einsum")


def build_engines(D: int, E: int, K: int, F: int, capacity_factor: float, styles: tuple[str, ...] = STYLES,
                  variants: bool = True, device: torch.device | str = "cpu") -> dict[str, nn.Module]:
    engines: dict[str, nn.Module] = {
        "dense": DenseFFN(D, K * F),
        "ours": MoE(D, F, bias=False, num_experts=E, router=moe_router(K)),
    }
    if variants:  # our layer with the other layout of the fused expert function
        other = "grouped" if engines["ours"].experts.engine(torch.zeros(1, D, device=device)) == "chunked" else "chunked"
        engines[f"ours_{other}"] = MoE(D, F, bias=False, num_experts=E, router=moe_router(K), expert_impl=other)
    builders = {"loop": lambda: LoopMoE(D, F, E, K), "capacity_bmm": lambda: CapacityBmmMoE(D, F, E, K, capacity_factor),
                "einsum": lambda: EinsumMoE(D, F, E, K, capacity_factor)}
    engines.update({name: builders[name]() for name in styles})
    return engines


def saved_activation_bytes(module: nn.Module, *inputs) -> int:
    """Bytes autograd keeps for the backward of ``module(*inputs)``, parameters excluded (each
    storage counted once): the activation memory a training step holds per layer."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs)
    return sum(saved.values())


def _ceiling_fns(ceiling: ExpertsCeiling, device: torch.device) -> tuple[Callable[[], None], Callable[[], None]]:
    """Forward and forward+backward of the experts-only bound."""
    def fwd():
        with torch.inference_mode(), _autocast(device):
            ceiling()

    def train():
        with _autocast(device):
            outs = ceiling()
        torch.autograd.backward(outs, [g.to(y.dtype) for g, y in zip(ceiling.grads, outs)])
        for t in (*ceiling.parameters(), *ceiling.inputs):
            t.grad = None
    return fwd, train


def layer_table(args, device: torch.device) -> list[dict]:
    T, D = (512, 128) if args.quick else (args.tokens, args.dim)
    records = []
    for E, K, F in args.layers:
        if args.quick:
            F = max(16, F // 8)
        torch.manual_seed(0)
        engines = {n: m.to(device) for n, m in build_engines(D, E, K, F, args.capacity_factor, args.styles, device=device).items()}
        x = torch.randn(T, D, device=device)
        x_req = x.clone().requires_grad_(True)
        grad = torch.randn(T, D, device=device)
        with torch.no_grad():  # the bound gets the row counts our router gives this x
            counts = engines["ours"].router(x[None]).tokens_per_expert().tolist()
        ceiling = ExpertsCeiling(D, F, counts, device=device)
        ceiling_fns = _ceiling_fns(ceiling, device)
        compiled_engines = {n: torch.compile(engines[n]) for n in ("dense", "ours")} if args.compile else {}
        for pass_name in ("fwd", "fwd+bwd"):
            for m in engines.values():
                m.train(pass_name == "fwd+bwd")
            fns = {n: (_forward_fn(m, x, device) if pass_name == "fwd" else _train_fn(m, x_req, grad, device))
                   for n, m in engines.items()}
            fns["experts_only"] = ceiling_fns[pass_name == "fwd+bwd"]
            compile_s = {}
            if args.compile:
                compiled = {n: compiled_engines[n] for n in ("dense", "ours")}
                compile_s = add_compiled(fns, {
                    n + COMPILED: (_forward_fn(m, x, device) if pass_name == "fwd" else _train_fn(m, x_req, grad, device))
                    for n, m in compiled.items()}, device)
            times = time_interleaved(fns, args.rounds, args.warmups, device, args.style_budget_s, args.clock_fn)
            saved = {}
            if pass_name == "fwd+bwd":
                with _autocast(device):
                    saved = {n: saved_activation_bytes(m, x_req) / 2**20 for n, m in engines.items()}
            for name, ts in times.items():
                records.append({"table": "layer", "engine": name, "E": E, "K": K, "F": F, "T": T, "D": D,
                                "pass": pass_name, "tokens_per_s": T / min(ts), **_summary(ts, times["dense"]),
                                **({"saved_for_backward_mb": saved[name]} if name in saved else {}),
                                **({"compile_s": compile_s[name]} if name in compile_s else {})})
            _print_partial(records[-len(times):])
        del engines, ceiling, ceiling_fns, compiled_engines
        torch._dynamo.reset()
    return records


def _print_partial(recs: list[dict]) -> None:
    r0 = recs[0]
    line = "  ".join(f"{r['engine']}={r['ratio_to_dense']:.2f}|{r['ratio_to_dense_paired']:.2f}" for r in recs)
    print(f"  [E={r0['E']} K={r0['K']} F={r0['F']} {r0['pass']}] {line}", file=sys.stderr, flush=True)


# ---- table 2: routing cost of every configured router ------------------------------------------

def router_partials() -> dict[str, Callable]:
    """Every ``conf/router/*.yaml`` instantiated as Hydra composes it (aliases included)."""
    import hydra
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    out = {}
    for path in sorted((CONF_DIR / "router").glob("*.yaml")):
        cfg = OmegaConf.load(path)
        if "defaults" in cfg:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = compose(overrides=[f"+router={path.stem}"]).router
        out[path.stem] = hydra.utils.instantiate(cfg)
    return out


def routers_table(args, device: torch.device) -> list[dict]:
    """Router forward alone and the whole MoE layer forward, both in training mode without autograd
    (noise, capacity and auxiliary losses as in training), one group of T tokens."""
    T, D, E, F = (512, 64, 32, 32) if args.quick else (args.tokens, args.dim, 32, 256)
    torch.manual_seed(0)
    x_GSD = torch.randn(1, T, D, device=device)
    ids_GS = torch.randint(0, 50_000, (1, T), device=device)
    records, fns, meta = [], {}, {}
    for name, partial in router_partials().items():
        try:
            layer = MoE(D, F, bias=False, num_experts=E, router=partial).to(device).train()
        except (ValueError, TypeError) as err:
            records.append({"table": "routers", "router": name, "E": E, "T": T, "D": D, "F": F,
                            "error": f"{type(err).__name__}: {err}"})
            continue
        kw = {"token_ids_GS": ids_GS} if layer.router.needs_token_ids else {}
        layer_kw = {"token_ids": ids_GS} if layer.router.needs_token_ids else {}

        def run_router(r=layer.router, kw=kw):
            with torch.no_grad(), _autocast(device):
                r(x_GSD, None, **kw)

        def run_layer(m=layer, kw=layer_kw):
            with torch.no_grad(), _autocast(device):
                m(x_GSD, **kw)
        fns[f"{name}/router"], fns[f"{name}/layer"] = run_router, run_layer
        meta[name] = type(layer.router).__name__
    times = time_interleaved(fns, args.rounds, args.warmups, device, clock=args.clock_fn)
    t_topk = min(times["topk/router"]) if "topk/router" in times else float("nan")
    for name, cls in meta.items():
        t_r, t_l = min(times[f"{name}/router"]), min(times[f"{name}/layer"])
        share = t_r / t_l
        records.append({"table": "routers", "router": name, "class": cls, "E": E, "T": T, "D": D, "F": F,
                        "router_ms": t_r * 1e3, "router_median_ms": statistics.median(times[f"{name}/router"]) * 1e3,
                        "layer_ms": t_l * 1e3, "relative_to_topk": t_r / t_topk, "share_of_layer": share,
                        "over_limit": share > ROUTER_SHARE_LIMIT, "rounds": len(times[f"{name}/router"])})
    return records


# ---- table 3: end-to-end V-MoE training throughput ---------------------------------------------

def vit_pair() -> tuple[nn.Module, nn.Module, str]:
    """(V-MoE, dense ViT of the same activated FLOPs, where the V-MoE came from)."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import VisionTransformer

    args = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=96, depth=6, num_heads=3,
                mlp_ratio=4.0, global_pool="avg", class_token=False)
    E, K, hidden = 8, 2, 384
    # vision's vmoe_tiny_patch4_28, built from timm and core alone (core never imports a domain)
    moe_model = VisionTransformer(**args)
    blocks = list(range(1, args["depth"], 2))
    for i in blocks:
        moe_model.blocks[i].mlp = MoE(96, hidden, num_experts=E,
                                      router=functools.partial(TopKRouter, top_k=K, capacity_factor=1.05))
    source = "timm VisionTransformer + core.moe.MoE in blocks 1, 3, 5 (vmoe_tiny_patch4_28)"
    dense = VisionTransformer(**args)
    for i in blocks:  # K times the expert width: the activated FLOPs of a top-K MoE MLP
        layer = moe_model.blocks[i].mlp
        width = getattr(layer.router, "top_k", K) * layer.experts.hidden_features
        dense.blocks[i].mlp = Mlp(layer.in_features, width)
    return moe_model, dense, source


def e2e_table(args, device: torch.device) -> list[dict]:
    import core

    B = 16 if args.quick else args.batch_size
    steps = 1 if args.quick else args.e2e_steps
    torch.manual_seed(0)
    moe_model, dense, source = vit_pair()
    x = torch.randn(B, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (B,), device=device)
    fns, make_compiled = {}, {}
    models = [("dense_vit", dense), ("vmoe", moe_model)]
    if args.compile:  # copies: each model keeps its own optimizer state and step count
        models += [(n + COMPILED, copy.deepcopy(m).to(device)) for n, m in models]
        for _, m in models[2:]:
            m.compile()
    for name, model in models:
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        def run(model=model, opt=opt):
            for _ in range(steps):
                with _autocast(device):
                    loss = nn.functional.cross_entropy(model(x), y) + core.collect_aux_loss(model)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                core.after_optimizer_step(model)
        (make_compiled if name.endswith(COMPILED) else fns)[name] = run
    compile_s = add_compiled(fns, make_compiled, device)
    times = time_interleaved(fns, args.rounds, args.warmups, device, clock=args.clock_fn)
    moe = next(m for m in moe_model.modules() if isinstance(m, MoE))
    config = {"num_experts": moe.num_experts, "top_k": getattr(moe.router, "top_k", None),
              "capacity_factor": getattr(moe.router, "capacity_factor", None), "router": type(moe.router).__name__,
              "moe_blocks": [i for i, b in enumerate(moe_model.blocks) if isinstance(b.mlp, MoE)]}
    return [{"table": "e2e", "engine": name,
             "source": source if name.startswith("vmoe") else "timm VisionTransformer",
             "vmoe": config,
             "batch_size": B, "steps_per_round": steps, "images_per_s": B * steps / min(ts),
             **_summary(ts, times["dense_vit"]), **({"compile_s": compile_s[name]} if name in compile_s else {})}
            for name, ts in times.items()]


# ---- output ------------------------------------------------------------------------------------

def format_tables(records: list[dict]) -> str:
    lines = []
    layer = [r for r in records if r["table"] == "layer"]
    if layer:
        lines += ["", "Layer: tokens/s from the minimum over rounds (ratio to dense from the minima | median of "
                  "the per-round ratios)",
                  f"{'E':>3} {'K':>2} {'F':>5} {'pass':<8} " + " ".join(f"{e:>20}" for e in _engines(layer))]
        for key in dict.fromkeys((r["E"], r["K"], r["F"], r["pass"]) for r in layer):
            row = {r["engine"]: r for r in layer if (r["E"], r["K"], r["F"], r["pass"]) == key}
            cells = [f"{row[e]['tokens_per_s']:>8.0f} ({row[e]['ratio_to_dense']:.2f}|{row[e]['ratio_to_dense_paired']:.2f})"
                     if e in row else f"{'-':>20}"
                     for e in _engines(layer)]
            lines.append(f"{key[0]:>3} {key[1]:>2} {key[2]:>5} {key[3]:<8} " + " ".join(f"{c:>20}" for c in cells))
        saved = [r for r in layer if "saved_for_backward_mb" in r]
        if saved:
            lines.append("Saved for backward, MB (parameters excluded): " + "; ".join(
                f"E={E} " + " ".join(f"{r['engine']} {r['saved_for_backward_mb']:.1f}" for r in saved if r["E"] == E)
                for E in dict.fromkeys(r["E"] for r in saved)))
        lines.append("Median ms: " + "; ".join(
            f"E={r['E']} {r['pass']} {r['engine']} {r['median_ms']:.1f}" for r in layer if r["engine"] == "ours"))
    routers = [r for r in records if r["table"] == "routers"]
    if routers:
        r0 = routers[0]
        lines += ["", f"Routers: forward time at T={r0['T']} (one group), D={r0['D']}, E={r0['E']}, F={r0['F']}",
                  f"{'router':<24} {'ms':>8} {'x topk':>7} {'layer ms':>9} {'share':>6}"]
        for r in routers:
            if "error" in r:
                lines.append(f"{r['router']:<24} n/a  {r['error'][:70]}")
                continue
            flag = "  > 25%" if r["over_limit"] else ""
            lines.append(f"{r['router']:<24} {r['router_ms']:>8.2f} {r['relative_to_topk']:>7.2f} "
                         f"{r['layer_ms']:>9.2f} {r['share_of_layer']:>6.1%}{flag}")
    e2e = [r for r in records if r["table"] == "e2e"]
    if e2e:
        lines += ["", f"End-to-end training (batch {e2e[0]['batch_size']}, fwd+bwd+AdamW): images/s"]
        for r in e2e:
            lines.append(f"{r['engine']:<10} {r['images_per_s']:>9.1f}  ratio {r['ratio_to_dense']:.2f} "
                         f"(per-round median {r['ratio_to_dense_paired']:.2f})  "
                         f"median {r['median_ms']:.1f} ms  ({r['source']})")
    pairs = compile_pairs(records)
    if pairs:
        lines += ["", "torch.compile against eager: median ms, speedup eager/compiled from the minima | median of "
                  "the per-round ratios, first call (compile) seconds",
                  f"{'table':<6} {'E':>3} {'K':>2} {'F':>5} {'pass':<8} {'engine':<10} {'eager ms':>9} "
                  f"{'compiled ms':>12} {'speedup':>13} {'compile s':>10}"]
        for eager, comp in pairs:
            paired = paired_ratio(eager["times_ms"], comp["times_ms"])
            shape = [eager.get(k, "") for k in ("E", "K", "F")]
            lines.append(f"{eager['table']:<6} {shape[0]:>3} {shape[1]:>2} {shape[2]:>5} {eager.get('pass', 'train'):<8} "
                         f"{eager['engine']:<10} {eager['median_ms']:>9.1f} {comp['median_ms']:>12.1f} "
                         f"{eager['min_ms'] / comp['min_ms']:>6.2f}|{paired:<6.2f} {comp['compile_s']:>10.1f}")
    return "\n".join(lines)


def _engines(layer: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["engine"] for r in layer))


def busy_cores(interval_s: float = 0.5) -> float | None:
    """Cores kept busy by other processes right now (this one sleeps while it samples): the
    non-idle share of all CPU time in /proc/stat over ``interval_s``, times the core count. Unlike
    the load average it does not remember a run that has just ended. None off Linux."""
    def sample():
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait
    try:
        total0, idle0 = sample()
        time.sleep(interval_s)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return 0.0
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def environment(args, device: torch.device) -> dict:
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": "bf16 autocast" if device.type == "cuda" else "fp32",
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "allocator": {k: os.environ.get(k) for k in (*MALLOC_ENV, "LD_PRELOAD")},
        "openmp": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "busy_cores_at_start": busy_cores(),
        "quick": args.quick, "rounds": args.rounds, "warmups": args.warmups, "clock": args.clock,
        "compile": args.compile,
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m core.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--tables", default="layer,routers", help="comma list of layer, routers, e2e")
    p.add_argument("--e2e", action="store_true", help="add the end-to-end V-MoE table")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile'd dense and MoE (layer and e2e tables), next to eager")
    p.add_argument("--quick", action="store_true", help="small shapes and 2 rounds (smoke test)")
    p.add_argument("--out", default="bench_results/bench.json", help="JSON output path")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 9; --quick 2)")
    p.add_argument("--warmups", type=int, default=None, help="warm-up calls per engine (default 2; --quick 1)")
    p.add_argument("--layers", default=",".join(":".join(map(str, c)) for c in LAYER_CONFIGS),
                   help="comma list of E:K:F layer shapes (experts, top-k, expert hidden width)")
    p.add_argument("--tokens", type=int, default=4096, help="T")
    p.add_argument("--dim", type=int, default=512, help="D")
    p.add_argument("--capacity-factor", type=float, default=1.25, help="cf of the capacity and einsum styles")
    p.add_argument("--style-budget-s", type=float, default=30.0,
                   help="seconds per engine and pass beyond which a slow style runs fewer rounds (min 2)")
    p.add_argument("--styles", default=",".join(STYLES), help=f"comma list of other styles to time (of {', '.join(STYLES)}; '' for none)")
    p.add_argument("--batch-size", type=int, default=128, help="e2e batch size")
    p.add_argument("--e2e-steps", type=int, default=3, help="training steps per e2e round")
    p.add_argument("--malloc", choices=("default", "tuned"), default="default",
                   help="glibc as the process has it, or re-executed with its mmap/trim thresholds raised")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or this process's CPU time (use with --threads 1 on a shared machine)")
    args = p.parse_args(argv)
    if args.clock == "cpu" and args.device != "cpu":
        p.error("--clock cpu measures host CPU time: use it with --device cpu")
    args.clock_fn = time.process_time if args.clock == "cpu" else time.perf_counter
    args.rounds = args.rounds or (2 if args.quick else 9)
    args.warmups = args.warmups if args.warmups is not None else (1 if args.quick else 2)
    tables = [t.strip() for t in args.tables.split(",") if t.strip()]
    if args.e2e and "e2e" not in tables:
        tables.append("e2e")
    unknown = set(tables) - {"layer", "routers", "e2e"}
    if unknown:
        p.error(f"--tables: unknown table(s) {sorted(unknown)}; use layer, routers, e2e")
    args.tables = tables
    args.layers = _parse_layers(p, args.layers)
    args.styles = tuple(t.strip() for t in args.styles.split(",") if t.strip())
    if set(args.styles) - set(STYLES):
        p.error(f"--styles: unknown style(s) {sorted(set(args.styles) - set(STYLES))}; use {', '.join(STYLES)}")
    return args


def _parse_layers(p: argparse.ArgumentParser, text: str) -> tuple[tuple[int, int, int], ...]:
    """``--layers 8:2:1024,32:8:256`` as ((E, K, F), ...), each positive with K ≤ E."""
    layers = []
    for item in filter(None, (t.strip() for t in text.split(","))):
        try:
            E, K, F = (int(v) for v in item.split(":"))
        except ValueError:
            p.error(f"--layers: {item!r} is not E:K:F (three integers, e.g. 8:2:1024)")
        if min(E, K, F) < 1 or K > E:
            p.error(f"--layers: {item!r} needs E, K, F ≥ 1 and K ≤ E")
        layers.append((E, K, F))
    if not layers:
        p.error("--layers: give at least one E:K:F, e.g. 8:2:1024")
    return tuple(layers)


def _reexec_with_allocator(args) -> None:
    """``--malloc tuned``: glibc returns big blocks to the OS, so every fresh T·K×F buffer
    page-faults; raise the mmap/trim thresholds by re-executing with them set."""
    if args.malloc == "default" or all(k in os.environ for k in MALLOC_ENV) or platform.system() != "Linux":
        return
    env = dict(os.environ, **MALLOC_ENV)
    os.execve(sys.executable, [sys.executable, "-m", "core.bench", *sys.argv[1:]], env)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if argv is None:
        _reexec_with_allocator(args)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count())
    env = environment(args, device)
    print(f"core.bench on {env['device']} ({env['dtype']}), torch {env['torch']}, {env['threads']} threads, "
          f"{args.clock} clock, allocator {env['allocator']}", flush=True)
    busy = env["busy_cores_at_start"]
    if device.type == "cpu" and args.clock == "wall" and busy is not None and busy > 0.5:
        print(f"warning: other processes keep {busy:.1f} of {os.cpu_count()} cores busy, so wall-clock ratios "
              "are unreliable (try --threads 1 --clock cpu)", flush=True)
    records: list[dict] = []
    builders = {"layer": layer_table, "routers": routers_table, "e2e": e2e_table}
    for table in args.tables:
        records += builders[table](args, device)
    print(format_tables(records), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"environment": env, "records": records}, indent=1))
    print(f"\nwrote {out}", flush=True)
    return records


if __name__ == "__main__":
    main()
