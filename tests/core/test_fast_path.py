"""The fused expert path (``Experts.forward_routed``, chunked and grouped layouts) against references:
a per-assignment einsum written independently of any sorting, and the per-expert loop through the
MoE layer; outputs and gradients (input, combine gates / router weight, expert weights), uneven and
empty experts, with and without biases, MLP and GLU. Plus the benchmark's reference styles computing
the same function as our layer, and a smoke run of ``python -m core.bench --quick`` (slow)."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from core.bench import paired_ratio, parse_args, saved_activation_bytes, time_interleaved
from core.bench_styles import CapacityBmmMoE, EinsumMoE, LoopMoE
from core.experts import Experts
from core.moe import MoE
from core.routers.topk import TopKRouter

D, F, E, T = 16, 24, 6, 13
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def per_assignment_reference(experts: Experts, x_TD, token_N, expert_N, weight_N):
    """``out[t] = Σ_n w_n FFN_{e_n}(x[t])`` with every assignment's weights gathered: no sorting, no
    grouping, plain einsums."""
    x_ND = x_TD[token_N]
    h = torch.einsum("nd,ndf->nf", x_ND, experts.w1_EDF[expert_N])
    if experts.b1_EF is not None:
        h = h + experts.b1_EF[expert_N]
    a = experts.act(h)
    if experts.w3_EDF is not None:
        a = a * torch.einsum("nd,ndf->nf", x_ND, experts.w3_EDF[expert_N])
    y = torch.einsum("nf,nfo->no", a, experts.w2_EFO[expert_N])
    if experts.b2_EO is not None:
        y = y + experts.b2_EO[expert_N]
    return torch.zeros(x_TD.shape[0], y.shape[1]).index_add(0, token_N, y * weight_N[:, None])


def _assignments(pattern: str, K: int = 2):
    """Token-choice style assignments (token t appears once per pick) with a given expert load."""
    token_N = torch.arange(T).repeat(K)
    if pattern == "uneven":  # experts 3..5 empty, expert 0 busy
        expert_N = torch.tensor([0, 0, 0, 1, 2] * 6)[: T * K]
    elif pattern == "one_expert":
        expert_N = torch.full((T * K,), 4)
    elif pattern == "random":
        expert_N = torch.stack([torch.randperm(E)[:K] for _ in range(T)], 1).reshape(-1)
    else:  # "none": no assignment at all (every choice dropped)
        token_N, expert_N = token_N[:0], token_N[:0]
    return token_N, expert_N, torch.rand(token_N.shape[0])


FORMS = [
    pytest.param(dict(act_layer=nn.GELU, glu=False, bias=True), id="mlp-bias"),
    pytest.param(dict(act_layer=nn.GELU, glu=False, bias=False), id="mlp-nobias"),
    pytest.param(dict(act_layer=nn.SiLU, glu=True, bias=False), id="glu-nobias"),
    pytest.param(dict(act_layer=nn.SiLU, glu=True, bias=True), id="glu-bias"),
    pytest.param(dict(act_layer=nn.ReLU, glu=False, bias=True), id="relu-bias"),
]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("pattern", ["uneven", "one_expert", "random", "none"])
@pytest.mark.parametrize("impl,block_rows", [("chunked", 4), ("chunked", None), ("grouped", None)])
def test_forward_routed_matches_per_assignment_reference(form, pattern, impl, block_rows):
    experts = Experts(E, D, F, impl=impl, block_rows=block_rows, **form)
    assert experts.engine(torch.zeros(1, D)) == impl
    token_N, expert_N, weight_N = _assignments(pattern)
    x = torch.randn(T, D)
    x1, w1 = x.clone().requires_grad_(True), weight_N.clone().requires_grad_(True)
    x2, w2 = x.clone().requires_grad_(True), weight_N.clone().requires_grad_(True)
    y_fast = experts.forward_routed(x1, token_N, expert_N, w1)
    with torch.no_grad():
        y_infer = experts.forward_routed(x, token_N, expert_N, weight_N)
    g = torch.randn_like(y_fast)
    (y_fast * g).sum().backward()
    fast_grads = {n: p.grad.clone() for n, p in experts.named_parameters()}
    experts.zero_grad(set_to_none=True)
    y_ref = per_assignment_reference(experts, x2, token_N, expert_N, w2)
    (y_ref * g).sum().backward()
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y_infer, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-5)
    for name, p in experts.named_parameters():
        ref = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(fast_grads[name], ref, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("impl", ["chunked", "grouped"])
@pytest.mark.parametrize("learned_gates", [False, True], ids=["fixed-gates", "learned-gates"])
def test_forward_routed_with_frozen_output_projection(form, impl, learned_gates):
    """W2 frozen, gates constant or learned: the backward skips what only the gate and W2 gradients
    use when neither is needed, and what it returns still matches the reference."""
    experts = Experts(E, D, F, impl=impl, **form)
    experts.w2_EFO.requires_grad_(False)
    token_N, expert_N, weight_N = _assignments("random")
    x = torch.randn(T, D)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    w1, w2 = weight_N.clone().requires_grad_(learned_gates), weight_N.clone().requires_grad_(learned_gates)
    g = torch.randn(T, D)
    (experts.forward_routed(x1, token_N, expert_N, w1) * g).sum().backward()
    fast = {n: p.grad.clone() for n, p in experts.named_parameters() if p.requires_grad}
    experts.zero_grad(set_to_none=True)
    (per_assignment_reference(experts, x2, token_N, expert_N, w2) * g).sum().backward()
    assert experts.w2_EFO.grad is None
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-5)
    if learned_gates:
        torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-5)
    for name, p in experts.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fast[name], p.grad, rtol=1e-5, atol=1e-5, msg=name)


def _chunked_step(experts, x, token_N, expert_N, weight_N, g, retain_graph=False):
    x = x.clone().requires_grad_(True)
    y = experts.forward_routed(x, token_N, expert_N, weight_N)
    (y * g).sum().backward(retain_graph=retain_graph)
    return y, x.grad


@pytest.mark.parametrize("glu", [False, True], ids=["mlp", "glu"])
def test_workspace_reuses_the_saved_buffers_only_once_released(glu):
    """Steps after the first reuse the pooled pre-activation buffers (no fresh N×F allocation); two
    forwards before their backwards (gradient accumulation) and a retained graph get their own
    buffers, and every gradient still equals the reference's."""
    experts = Experts(E, D, F, impl="chunked", glu=glu, act_layer=nn.SiLU if glu else nn.GELU, bias=False)
    token_N, expert_N, weight_N = _assignments("random")
    x, g = torch.randn(T, D), torch.randn(T, D)
    x_ref = x.clone().requires_grad_(True)
    (per_assignment_reference(experts, x_ref, token_N, expert_N, weight_N) * g).sum().backward()
    ref = {n: p.grad.clone() for n, p in experts.named_parameters()}
    experts.zero_grad(set_to_none=True)

    _chunked_step(experts, x, token_N, expert_N, weight_N, g)
    pooled = [b.data_ptr() for b in experts.workspace.buffers]
    assert len(pooled) == (2 if glu else 1)
    experts.zero_grad(set_to_none=True)
    _, dx = _chunked_step(experts, x, token_N, expert_N, weight_N, g)
    assert [b.data_ptr() for b in experts.workspace.buffers] == pooled  # reused, not reallocated
    torch.testing.assert_close(dx, x_ref.grad, rtol=1e-5, atol=1e-5)

    # two micro-batches in flight: the second forward must not overwrite the first's saved tensors
    experts.zero_grad(set_to_none=True)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1 = experts.forward_routed(x1, token_N, expert_N, weight_N)
    y2 = experts.forward_routed(x2, token_N, expert_N, weight_N)
    assert len(experts.workspace.buffers) == (4 if glu else 2)
    ((y1 * g).sum() + (y2 * g).sum()).backward()
    torch.testing.assert_close(x1.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x2.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    for name, p in experts.named_parameters():
        torch.testing.assert_close(p.grad, 2 * ref[name], rtol=1e-5, atol=1e-5, msg=name)

    # a retained graph keeps its buffers: a forward in between must not corrupt its second backward
    x3 = x.clone().requires_grad_(True)
    y3 = experts.forward_routed(x3, token_N, expert_N, weight_N)
    (y3 * g).sum().backward(retain_graph=True)
    _chunked_step(experts, torch.randn(T, D), token_N, expert_N, weight_N, torch.randn(T, D))
    x3.grad = None
    (y3 * g).sum().backward()
    torch.testing.assert_close(x3.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


def test_workspace_replaces_a_free_buffer_of_another_dtype_or_size():
    """A full pool follows what the layer runs now: a free buffer of another dtype or a too small
    size is replaced instead of pinning memory that no step can use."""
    experts = Experts(E, D, F, impl="chunked")
    experts.workspace.max_buffers = 1
    token_N, expert_N, weight_N = _assignments("random")
    _chunked_step(experts, torch.randn(T, D), token_N, expert_N, weight_N, torch.randn(T, D))
    assert [b.dtype for b in experts.workspace.buffers] == [torch.float32]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts.forward_routed(torch.randn(T, D, requires_grad=True), token_N, expert_N, weight_N)
    y.float().sum().backward()
    assert [b.dtype for b in experts.workspace.buffers] == [torch.bfloat16]
    del y
    more = torch.arange(3 * T).remainder(T), torch.arange(3 * T).remainder(E), torch.rand(3 * T)
    _chunked_step(experts, torch.randn(T, D), *more, torch.randn(T, D))
    assert len(experts.workspace.buffers) == 1 and experts.workspace.buffers[0].numel() >= 3 * T * F


def test_workspace_is_not_copied_or_pickled():
    """``deepcopy`` (EMA copies) and pickling (``torch.save`` of a module) start from an empty pool."""
    import copy
    import io

    experts = Experts(E, D, F, impl="chunked")
    token_N, expert_N, weight_N = _assignments("random")
    _chunked_step(experts, torch.randn(T, D), token_N, expert_N, weight_N, torch.randn(T, D))
    assert experts.workspace.buffers
    assert copy.deepcopy(experts).workspace.buffers == []
    buf = io.BytesIO()
    torch.save(experts, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert loaded.workspace.buffers == [] and loaded.workspace.max_buffers == experts.workspace.max_buffers
    y = loaded.forward_routed(torch.randn(T, D, requires_grad=True), token_N, expert_N, weight_N)
    assert len(loaded.workspace.buffers) == 1 and y.shape == (T, D)


def test_empty_experts_get_zero_weight_gradients():
    experts = Experts(E, D, F, impl="chunked", block_rows=4)
    token_N, expert_N, weight_N = _assignments("uneven")
    experts.forward_routed(torch.randn(T, D), token_N, expert_N, weight_N).sum().backward()
    for p in (experts.w1_EDF, experts.w2_EFO, experts.b1_EF, experts.b2_EO):
        assert p.grad[3:].abs().max() == 0 and p.grad[:3].abs().max() > 0


@pytest.mark.parametrize("impl", ["chunked", "grouped"])
@pytest.mark.parametrize("glu,bias", [(False, True), (True, False)], ids=["mlp-bias", "glu-nobias"])
def test_moe_fast_path_equals_loop_reference(impl, glu, bias):
    """Through the layer with a renormalised top-2 router, so gradients reach the router weight;
    few tokens over many experts leaves some experts empty."""
    kw = dict(num_experts=8, glu=glu, bias=bias, act_layer=nn.SiLU if glu else nn.GELU,
              router=functools.partial(TopKRouter, top_k=2, capacity_factor=None, noise_std=0.0, renormalize=True))
    fast = MoE(D, F, expert_impl=impl, **kw)
    loop = MoE(D, F, expert_impl="loop", **kw)
    loop.load_state_dict(fast.state_dict())
    fast.keep_last_routing = True
    x = torch.randn(2, 3, D)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, yb = fast(xa), loop(xb)
    assert (fast.last_routing.tokens_per_expert() == 0).any()
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ya)
    (ya * g).sum().backward()
    (yb * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-5)
    assert fast.router.weight.grad.abs().sum() > 0
    for (name, pa), pb in zip(fast.named_parameters(), loop.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-5, atol=1e-5, msg=name)


def test_fast_path_accepts_an_expanded_gradient():
    """``y.sum().backward()`` sends a stride-0 gradient."""
    layer = MoE(D, F, num_experts=4, router=functools.partial(TopKRouter, top_k=2, capacity_factor=None))
    x = torch.randn(3, 5, D, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_engine_choice():
    x = torch.zeros(2, D)
    assert Experts(E, D, F).engine(x) == "chunked"
    assert Experts(E, D, F, impl="grouped").engine(x) == "grouped"
    assert Experts(E, D, F, impl="loop").engine(x) == "composed"
    assert Experts(E, D, F, act_layer=nn.Tanh).engine(x) == "composed"  # no fused kernels for Tanh
    dropping = Experts(E, D, F, drop=0.1)
    assert dropping.engine(x) == "composed"
    assert dropping.eval().engine(x) == "chunked"
    with pytest.raises(ValueError, match="impl"):
        Experts(E, D, F, act_layer=nn.Tanh, impl="chunked")
    with pytest.raises(ValueError, match="block_rows"):
        Experts(E, D, F, block_rows=0)


def test_cpu_autocast_runs_the_experts_in_bf16():
    experts = Experts(E, D, F)
    token_N, expert_N, weight_N = _assignments("random")
    x = torch.randn(T, D)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = experts.forward_routed(x, token_N, expert_N, weight_N)
    assert y.dtype == torch.bfloat16
    ref = per_assignment_reference(experts, x, token_N, expert_N, weight_N)
    torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("glu", [False, True], ids=["mlp", "glu"])
def test_chunked_engine_keeps_only_the_pre_activations(glu):
    """The chunked backward recomputes the activations: besides x and O(N) routing vectors it keeps
    the N×F pre-activations (and the GLU gate), about half of what the dense FFN of the same activated
    FLOPs keeps (its hidden pre-activations and activations)."""
    Tn, Dn, Fn, En, K = 256, 32, 64, 8, 2
    layer = MoE(Dn, Fn, bias=False, num_experts=En, glu=glu, act_layer=nn.SiLU if glu else nn.GELU,
                expert_impl="chunked", router=functools.partial(
                    TopKRouter, top_k=K, capacity_factor=None, noise_std=0.0, renormalize=True)).train()
    x = torch.randn(Tn, Dn, requires_grad=True)
    N = Tn * K
    hidden = (2 if glu else 1) * N * Fn * 4
    routing_slack = N * 64 + Tn * En * 16  # indices, gates, logits: O(N) and O(T·E), not O(N·F)
    assert saved_activation_bytes(layer, x) <= x.numel() * 4 + hidden + routing_slack
    dense = nn.Sequential(nn.Linear(Dn, K * Fn, bias=False), nn.GELU(), nn.Linear(K * Fn, Dn, bias=False))
    if not glu:
        assert saved_activation_bytes(layer, x) < 0.75 * saved_activation_bytes(dense, x)


# ---- the benchmark's reference styles compute our layer's function -----------------------------

def test_bench_styles_compute_the_same_layer():
    """With shared weights and a capacity large enough to drop nothing, the loop, capacity+bmm and
    einsum styles equal our layer (router included)."""
    E_, K, T_ = 4, 2, 10
    loop = LoopMoE(D, F, E_, K)
    cap = CapacityBmmMoE(D, F, E_, K, capacity_factor=E_ / K)  # C = T: nothing dropped
    ein = EinsumMoE(D, F, E_, K, capacity_factor=E_ / K)
    ours = MoE(D, F, bias=False, num_experts=E_, router=functools.partial(
        TopKRouter, top_k=K, capacity_factor=None, noise_std=0.0, renormalize=True))
    with torch.no_grad():
        w1 = torch.stack([m.fc1.weight.t() for m in loop.experts])
        w2 = torch.stack([m.fc2.weight.t() for m in loop.experts])
        for m in (cap, ein):
            m.gate_ED.copy_(loop.gate_ED)
            m.w1_EDF.copy_(w1)
            m.w2_EFD.copy_(w2)
        ours.router.weight.copy_(loop.gate_ED)
        ours.experts.w1_EDF.copy_(w1)
        ours.experts.w2_EFO.copy_(w2)
    x = torch.randn(T_, D)
    expected = ours(x)
    for style in (loop, cap, ein):
        torch.testing.assert_close(style(x), expected, rtol=1e-5, atol=1e-5, msg=type(style).__name__)


@pytest.mark.slow
def test_bench_quick_smoke(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "core.bench", "--quick", "--tables", "layer,routers,e2e",
                           "--malloc", "tuned", "--out", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["environment"]["allocator"]["MALLOC_MMAP_THRESHOLD_"] is not None
    layer = [r for r in data["records"] if r["table"] == "layer"]
    engines = {r["engine"] for r in layer}
    assert {"dense", "ours", "loop", "capacity_bmm", "einsum", "experts_only"} <= engines
    assert {(r["E"], r["K"]) for r in layer} == {(8, 2), (32, 8), (64, 8)}
    assert {r["pass"] for r in layer} == {"fwd", "fwd+bwd"}
    for r in layer:
        assert r["tokens_per_s"] > 0 and r["min_ms"] <= r["median_ms"]
        assert r["engine"] != "dense" or r["ratio_to_dense"] == r["ratio_to_dense_paired"] == 1.0
        assert len(r["times_ms"]) == r["rounds"] and min(r["times_ms"]) == pytest.approx(r["min_ms"])
        if r["engine"] != "experts_only":
            assert (r["pass"] == "fwd+bwd") == ("saved_for_backward_mb" in r)
    routers = [r for r in data["records"] if r["table"] == "routers"]
    names = {p.stem for p in (ROOT / "conf" / "router").glob("*.yaml")}
    assert {r["router"] for r in routers} == names
    assert any(r["router"] == "topk" and r["relative_to_topk"] == 1.0 for r in routers)
    e2e = [r for r in data["records"] if r["table"] == "e2e"]
    assert {r["engine"] for r in e2e} == {"dense_vit", "vmoe"} and all(r["images_per_s"] > 0 for r in e2e)
    assert "Layer: tokens/s" in proc.stdout


def test_bench_layers_option(capsys):
    """``--layers`` picks the layer shapes; a malformed or impossible shape stops before any timing
    with a message that names it and the expected form."""
    assert parse_args(["--layers", "16:4:512, 8:1:64"]).layers == ((16, 4, 512), (8, 1, 64))
    assert parse_args([]).layers == ((8, 2, 1024), (32, 8, 256), (64, 8, 128))
    for bad, expected in (("8:2", "is not E:K:F"), ("8:x:1024", "is not E:K:F"), ("4:8:64", "K ≤ E"),
                          ("8:0:64", "≥ 1"), (",", "at least one")):
        with pytest.raises(SystemExit):
            parse_args(["--layers", bad])
        assert expected in capsys.readouterr().err, bad


def test_interleaved_rounds_shuffle_the_order():
    """Every round runs each function once, in an order of its own, so no function always runs
    right after the same one; the same seed gives the same orders, and each function's times stay
    in round order."""
    calls = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abcd"}
    times = time_interleaved(fns, rounds=12, warmups=0, device=torch.device("cpu"))
    rounds = [calls[i:i + 4] for i in range(4, len(calls), 4)]  # after one warm-up call each
    assert len(rounds) == 12 and all(sorted(r) == list("abcd") for r in rounds)
    for name in "abcd":
        before = {r[r.index(name) - 1] for r in rounds if r.index(name) > 0}
        assert len(before) >= 2, (name, rounds)
    assert {n: len(t) for n, t in times.items()} == dict.fromkeys("abcd", 12)
    first = calls[4:]
    calls.clear()
    time_interleaved(fns, rounds=12, warmups=0, device=torch.device("cpu"))
    assert calls[4:] == first


def test_paired_ratio_cancels_a_slow_stretch():
    """A slow round that hits both engines leaves the per-round ratio alone; the ratio of minima
    takes each engine's best round, whichever it was."""
    dense = [1.0, 2.0, 1.0]
    ours = [1.25, 2.5, 1.25]  # 0.8 of dense in every round
    assert paired_ratio(dense, ours) == pytest.approx(0.8)
    assert paired_ratio(dense, [0.5, 1.0]) == pytest.approx(2.0)  # only the rounds both ran
    assert paired_ratio([2.0, 1.0, 2.0], [1.0, 2.0, 2.0]) == pytest.approx(1.0)  # median of 2, 0.5, 1


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc/stat (Linux)")
def test_busy_cores_sees_another_process_spinning():
    """The bench's contention check counts a core that another process keeps busy right now."""
    from core.bench import busy_cores

    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        busy = busy_cores(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert busy is not None and 0.7 <= busy <= (os.cpu_count() or 1) + 0.01
