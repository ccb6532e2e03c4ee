"""Bad inputs on the real command line, one row each: ``python tests/bad_inputs_table.py [-j N] [filter]``.

Runs ``python -m <domain>.train debug=default <bad input> hydra.run.dir=/tmp/bad/<n>`` for every case
below, then the Python API's cases (``API_CASES``) in this process, and prints a Markdown table ``| domain | input | exit | message |``: the exit status and the
first line of stderr (truncated). A row whose message starts with ``TRACEBACK`` (an uncaught
exception), ``NO ERROR`` (exit 0: the input was silently accepted) or ``NOT ONE LINE`` (more than one
stderr line) needs a fix. Not collected by pytest (no ``test_`` prefix); a run takes minutes (each
case starts a Python process), ``tests/test_bad_inputs.py`` holds the fast checks.

Fixture files (an empty directory, a Latin-1 text, a file that is not PyTorch weights, ...) are made
under ``/tmp/bad/fixtures``; ``{name}`` in a case is replaced by that fixture's path.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BAD = Path("/tmp/bad")
FIX = BAD / "fixtures"

# (domain, the bad input: command-line arguments after debug=default)
CASES: list[tuple[str, list[str]]] = [
    # ---- the issue's own cases
    ("vision", ["trainer.min_lr=0.01"]),                                    # min_lr > lr: the lr would climb
    ("vision", ["trainer.warmup_steps=100"]),                               # warmup longer than the 40-step run
    ("vision", ["trainer.skip_nonfinite=true", "trainer.lr=1e30"]),          # (diverges: exit 1, or skips)
    ("vision", ["+router=topk", "router.capacity_factor=inf"]),
    ("vision", ["+router=topk", "router.capacity_factor=nan"]),
    ("vision", ["data=imagefolder", "data.root=/nonexistent"]),             # the debug overlay must not swap in digits
    ("vision", ["+data.limt_train=5"]),
    ("vision", ["+model.num_expert=4"]),
    ("vision", ["+sed=1"]),
    ("vision", ["+trainer.epochs=3"]),
    ("vision", ["model.upcycle_from=/nonexistent/model.pt"]),
    ("vision", ["model.upcycle_from={dir}"]),
    ("vision", ["model.upcycle_from={text}"]),
    # ---- router keys
    ("vision", ["+router=topk", "router.noise_std=inf"]),
    ("vision", ["+router=expert_choice", "router.noise_std=-1"]),
    ("vision", ["+router=topk", "router.batch_priority=maybe"]),
    ("vision", ["+router=topk", "router.load_loss_weight=-0.1"]),
    ("vision", ["+router=topk", "router.top_k=9"]),
    ("vision", ["+router=soft", "router.slots_per_expert=1.5"]),
    ("vision", ["+router=dense", "router.temperature=0"]),
    ("vision", ["+router=deepseek", "router.route_scale=inf"]),
    ("vision", ["+router=xmoe", "router.temperature_init=nan"]),
    ("vision", ["+router=gshard", "router.z_loss_weight=-1"]),
    ("vision", ["+router=sinkhorn_token_choice", "router.num_iters=0"]),
    ("vision", ["+router=sparse_expert_choice", "router.lr=inf"]),
    ("vision", ["+router=topk", "router.capacity_factor=abc"]),
    ("vision", ["+router=nope"]),
    ("vision", ["+router.top_k=1"]),                                        # a router key without a router
    ("vision", ["+router=topk", "+router.top_kk=1"]),
    # ---- trainer keys
    ("vision", ["trainer.lr=abc"]),
    ("vision", ["trainer.device=tpu"]),
    ("vision", ["trainer.precision=fp16"]),
    ("vision", ["trainer.max_steps=-1"]),
    ("vision", ["trainer.betas=[0.9]"]),
    ("vision", ["trainer.betas=[a,b]"]),
    ("vision", ["trainer.betas=0.9"]),
    ("vision", ["trainer.grad_clip=inf"]),
    ("nlp", ["trainer.data_parallel=zero"]),
    ("vision", ["trainer.skip_nonfinite=maybe"]),
    ("vision", ["trainer.max_skipped_fraction=2"]),
    ("vision", ["trainer.resume=/nonexistent/run"]),
    ("vision", ["trainer.checkpoint_every_steps=0"]),
    ("vision", ["trainer.eval_every_epochs=0"]),
    ("vision", ["trainer.max_epochs=1.5"]),
    # ---- top-level keys, model and data keys
    ("vision", ["seed=abc"]),
    ("vision", ["seed=1.5"]),
    ("vision", ["threads=0"]),
    ("vision", ["output_dir=/proc/forbidden/run"]),
    ("vision", ["model=nope"]),
    ("vision", ["model.name=vmoe_huge"]),
    ("vision", ["model.placement=[0,99]"]),
    ("vision", ["model.placement=weird"]),
    ("vision", ["model.placement=last_n", "model.num_last=-1"]),
    ("vision", ["model.expert_impl=fast"]),
    ("vision", ["model.group_size=0"]),
    ("vision", ["model.num_shared_experts=-1"]),
    ("vision", ["model.timm_kwargs.depth=0"]),
    ("vision", ["model.num_experts=1000000000"]),                         # too large
    ("vision", ["data.batch_size=-5"]),
    ("vision", ["data.batch_size=1.5"]),
    ("vision", ["data.augment=rotate"]),
    ("vision", ["data.crop_padding=-1"]),
    ("vision", ["data.limit_train=0"]),
    ("vision", ["data.name=mnist"]),
    ("vision", ["data=imagefolder", "data.root={empty}"]),                # no train/ and val/ inside
    ("vision", ["data=imagefolder", "data.root={imagefolder_bad}"]),      # train/ and val/ with non-images
    ("vision", ["data=imagefolder", "data.root={imagefolder_bad}", "data.img_size=null"]),
    ("vision", ["data=cifar10", "data.root={empty}"]),                     # download=false and no files
    ("vision", ["data.root=" + "\udcff"]),                                # a non-UTF-8 byte in a path
    # ---- recsys
    ("recsys", ["data=census_kdd", "data.path=/nonexistent"]),
    ("recsys", ["data=census_kdd", "data.path={empty}"]),
    ("recsys", ["data=census_kdd", "data.path={text}"]),
    ("recsys", ["+data.dataset.val_fracton=0.2"]),
    ("recsys", ["model.num_experts=0"]),
    ("recsys", ["task_weights=[1]"]),
    ("recsys", ["task_weights=[-1,1]"]),
    ("recsys", ["data.dataset.val_fraction=1.5"]),
    ("recsys", ["sharding=weird"]),
    ("recsys", ["sharding=table_wise", "trainer.data_parallel=fsdp"]),
    ("recsys", ["model.embedding_dim=0"]),
    ("recsys", ["model=nope"]),
    ("recsys", ["trainer.warmup_steps=1000"]),
    ("recsys", ["data=synthetic", "data.dataset.correlation=2"]),
    ("recsys", ["model=ple", "model.num_shared_experts=-1"]),
    ("recsys", ["+router=topk", "router.capacity_factor=inf"]),
    ("recsys", ["model.tower_layer_sizes=[0]"]),
    ("recsys", ["threads=0"]),
    ("recsys", ["data.dataset.val_fraction=0.5", "data.dataset.test_fraction=0.5"]),
    # ---- multimodal
    ("multimodal", ["data.root=/nonexistent"]),
    ("multimodal", ["data.root={empty}"]),                                 # a folder without the IDX files
    ("multimodal", ["model.dense_checkpoint=/nonexistent/run"]),
    ("multimodal", ["model.dense_checkpoint={empty}"]),
    ("multimodal", ["data.openmoji_cache={dir}"]),
    ("multimodal", ["data.openmoji_cache={text}"]),
    ("multimodal", ["data.sources=[]"]),
    ("multimodal", ["data.val_fraction=1.5"]),
    ("multimodal", ["model=limoe", "+model.widht=3"]),
    ("multimodal", ["data.image_size=abc"]),
    ("multimodal", ["trainer.warmup_steps=100"]),
    ("multimodal", ["data.fashion_mnist_train=-1"]),
    ("multimodal", ["model=clip", "+model.checkpoint=/nonexistent/model.pt"]),
    ("multimodal", ["+router=topk", "router.capacity_factor=inf"]),
    ("multimodal", ["model=limoe", "model.local_entropy_weight=[0.1]"]),
    ("multimodal", ["model=limoe", "model.global_min_experts=[9,null]"]),
    # ---- nlp
    ("nlp", ["data.path={latin1}"]),
    ("nlp", ["data.path=/nonexistent/book.txt"]),
    ("nlp", ["data=text_file"]),
    ("nlp", ["data.tokenizer=wordpiece"]),
    ("nlp", ["data.seq_len=0"]),
    ("nlp", ["data.val_fraction=1"]),
    ("nlp", ["model.num_experts=0"]),
    ("nlp", ["+model.num_expert=4"]),
    ("nlp", ["+router=expert_choice"]),
    ("nlp", ["trainer.warmup_steps=1000"]),
    ("nlp", ["model.moe_layers=[0,99]"]),
    ("nlp", ["model.pos_embed=alibi"]),
    ("nlp", ["model.norm=batchnorm"]),
    ("nlp", ["model.num_heads=3"]),                                        # dim 32 is not a multiple of 3
    ("nlp", ["model.dropout=1.5"]),
    ("nlp", ["+router=topk", "router.capacity_factor=inf"]),
    ("nlp", ["data.seq_len=100000000"]),                                   # too large
    ("nlp", ["model.num_experts=1000000000"]),                             # too large
    ("nlp", ["+router=topk", "router.top_k=abc"]),
    ("nlp", ["++data.limt_eval=3"]),
]


# Bad inputs of the Python API, run in this process: (what is called, the expression; `x` is a (2, 4, 16)
# batch, `layer` an MoE(16, 32, num_experts=4) with the default router). A row gives the exception's
# first line, or the documented result the expression evaluates to.
API_CASES: list[tuple[str, str]] = [
    ("MoE on an empty batch", "tuple(layer(torch.randn(0, 4, 16)).shape)"),
    ("MoE on sequences of no tokens", "tuple(layer(torch.randn(2, 0, 16)).shape)"),
    ("MoE with every token masked", "layer(x, mask=torch.zeros(2, 4, dtype=torch.bool)).abs().max().item()"),
    ("MoE on integer x", "layer(torch.ones(2, 4, 16, dtype=torch.long))"),
    ("MoE on x of the wrong width", "layer(torch.randn(2, 4, 17))"),
    ("MoE on a scalar", "layer(torch.tensor(1.0))"),
    ("MoE on a list", "layer([[0.0] * 16])"),
    ("MoE on NaN input (documented: NaN stays in the output)",
     "layer(torch.full((2, 4, 16), float('nan'))).isnan().any().item()"),
    ("MoE mask of the wrong shape", "layer(x, mask=torch.ones(2, 5, dtype=torch.bool))"),
    ("MoE float mask", "layer(x, mask=torch.ones(2, 4))"),
    ("MoE token ids of the wrong shape", "layer(x, token_ids=torch.ones(2, 5, dtype=torch.long))"),
    ("MoE float token ids", "layer(x, token_ids=torch.ones(2, 4))"),
    ("MoE(num_experts=0)", "MoE(16, 32, num_experts=0)"),
    ("MoE(num_experts=10**9)", "MoE(16, 32, num_experts=10**9)"),
    ("MoE(in_features=-1)", "MoE(-1, 32, num_experts=4)"),
    ("shared router of another E", "MoE(16, 32, num_experts=8, router=TopKRouter(dim=16, num_experts=4))"),
    ("shared router of another width", "MoE(16, 32, num_experts=4, router=TopKRouter(dim=8, num_experts=4))"),
    ("router factory that is no router", "MoE(16, 32, num_experts=4, router=lambda dim, num_experts: "
     "torch.nn.Linear(dim, num_experts))"),
    ("TopKRouter(top_k=0)", "TopKRouter(dim=16, num_experts=4, top_k=0)"),
    ("TopKRouter(top_k=5) with 4 experts", "TopKRouter(dim=16, num_experts=4, top_k=5)"),
    ("TopKRouter(capacity_factor=inf)", "TopKRouter(dim=16, num_experts=4, capacity_factor=float('inf'))"),
    ("TopKRouter(noise_std=nan)", "TopKRouter(dim=16, num_experts=4, noise_std=float('nan'))"),
    ("ExpertChoiceRouter(capacity_factor=-1)", "ExpertChoiceRouter(dim=16, num_experts=4, capacity_factor=-1)"),
    ("router on a 2-D input", "TopKRouter(dim=16, num_experts=4)(torch.randn(8, 16))"),
    ("router mask of the wrong shape", "TopKRouter(dim=16, num_experts=4)(x, torch.ones(2, 5, dtype=torch.bool))"),
    ("hash router without token ids", "HashRouter(dim=16, num_experts=4)(x)"),
    ("routing_stats before any forward", "routing_stats(torch.nn.Sequential(layer))"),
    ("aux loss after only masked tokens", "(layer.train()(x, mask=torch.zeros(2, 4, dtype=torch.bool)), "
     "collect_aux_loss(layer).item())[1]"),
]


def run_api_case(expression: str) -> tuple[str, str]:
    """(the exception's type or ``result``, its first line or the value) of one API case."""
    if str(REPO) not in sys.path:  # run as a script, ``tests/`` comes first and its ``core`` would shadow ours
        sys.path.insert(0, str(REPO))
    import torch

    from core import collect_aux_loss, routing_stats
    from core.moe import MoE
    from core.routers.expert_choice import ExpertChoiceRouter
    from core.routers.hash import HashRouter
    from core.routers.topk import TopKRouter

    torch.manual_seed(0)
    scope = dict(torch=torch, MoE=MoE, TopKRouter=TopKRouter, ExpertChoiceRouter=ExpertChoiceRouter,
                 HashRouter=HashRouter, routing_stats=routing_stats, collect_aux_loss=collect_aux_loss,
                 x=torch.randn(2, 4, 16), layer=MoE(16, 32, num_experts=4))
    try:
        value = eval(expression, scope)
    except Exception as err:  # the row shows what a user would see
        if not isinstance(err, ValueError):
            return type(err).__name__, f"TRACEBACK: {type(err).__name__}: {err}"
        lines = str(err).strip().splitlines()
        return type(err).__name__, lines[0] if len(lines) == 1 else f"NOT ONE LINE ({len(lines)}): {lines[0]}"
    if isinstance(value, torch.Tensor):
        return "result", f"a tensor of shape {tuple(value.shape)}"
    return "result", repr(value)


def _fixtures() -> dict[str, str]:
    shutil.rmtree(FIX, ignore_errors=True)
    FIX.mkdir(parents=True)
    (FIX / "empty").mkdir()
    (FIX / "dir").mkdir()
    (FIX / "dir" / "something.txt").write_text("x\n")
    (FIX / "text.txt").write_text("this is not a PyTorch weights file\n")
    (FIX / "latin1.txt").write_bytes("café crème brûlée ".encode("latin-1") * 50)
    bad = FIX / "imagefolder_bad"
    for split in ("train", "val"):
        (bad / split / "cat").mkdir(parents=True)
        (bad / split / "cat" / "a.jpg").write_bytes(b"not a jpeg")
    return {"empty": str(FIX / "empty"), "dir": str(FIX / "dir"), "text": str(FIX / "text.txt"),
            "latin1": str(FIX / "latin1.txt"), "imagefolder_bad": str(bad)}


def _limit_memory() -> None:  # a case that allocates without limit must not take the machine down
    limit = 12 << 30
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def run_case(n: int, domain: str, args: list[str], fixtures: dict[str, str]) -> tuple[int, str, list[str], int, str]:
    args = [a.format(**fixtures) if "{" in a else a for a in args]
    run_dir = BAD / str(n)
    shutil.rmtree(run_dir, ignore_errors=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    cmd = [sys.executable, "-m", f"{domain}.train", "debug=default", *args, f"hydra.run.dir={run_dir}"]
    try:
        res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, timeout=600, preexec_fn=_limit_memory)
        code, err = res.returncode, res.stderr.decode("utf-8", "backslashreplace")
    except subprocess.TimeoutExpired:
        return n, domain, args, -1, "TIMEOUT after 600 s"
    lines = [line for line in err.splitlines() if line.strip() and not _is_log(line)]
    if "Traceback" in err:
        last = [line for line in err.splitlines() if line.strip()][-1]
        message = f"TRACEBACK: {last.strip()}"
    elif code == 0:
        message = "NO ERROR: the run finished"
    elif not lines:
        message = "NO MESSAGE"
    else:
        message = lines[0] if len(lines) == 1 else f"NOT ONE LINE ({len(lines)}): {lines[0]}"
    return n, domain, args, code, message


def _is_log(line: str) -> bool:
    """Log lines (``[2024-...][core.engine][WARNING] - ...``) are not the error message."""
    return line.startswith("[") and "][" in line[:40]


def _cell(text: str, width: int = 140) -> str:
    text = text.replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-j", "--jobs", type=int, default=2)
    parser.add_argument("filter", nargs="?", default="", help="only cases whose domain or input contains this")
    opts = parser.parse_args()
    fixtures = _fixtures()
    cases = [(n, d, a) for n, (d, a) in enumerate(CASES, 1) if opts.filter in d or opts.filter in " ".join(a)]
    if opts.filter == "api":
        cases = []
    with concurrent.futures.ThreadPoolExecutor(opts.jobs) as pool:
        rows = sorted(pool.map(lambda c: run_case(*c, fixtures), cases))
    print("| # | domain | input | exit | message |")
    print("|---|---|---|---|---|")
    bad = 0
    for n, domain, args, code, message in rows:
        shown = " ".join(a.replace(str(FIX) + "/", "<fixtures>/") for a in args)
        print(f"| {n} | {domain} | `{_cell(shown, 80)}` | {code} | {_cell(message)} |")
        bad += message.startswith(("TRACEBACK", "NO ERROR", "NOT ONE LINE", "NO MESSAGE", "TIMEOUT"))
    for n, (label, expression) in enumerate(API_CASES, len(CASES) + 1):
        if opts.filter and opts.filter not in ("api", label):
            continue
        outcome, message = run_api_case(expression)
        print(f"| {n} | api | {_cell(label, 80)}: `{_cell(expression, 80)}` | {outcome} | {_cell(message)} |")
        bad += message.startswith(("TRACEBACK", "NOT ONE LINE"))
        rows.append((n,))
    print(f"\n{len(rows)} inputs, {bad} without one clear line", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
