"""torch.compile: the experts engines trace without graph breaks, compiled models match eager ones,
and ``trainer.compile=true`` trains and saves weights an uncompiled model loads.

The default run uses Dynamo with the ``aot_eager`` backend (graph capture and AOT autograd, which
run the fused engines' custom ops through their fake and autograd registrations) to stay fast; the
``slow`` tests compile with Inductor, as a user's ``torch.compile`` does.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from core.engine.config import TrainerConfig
from core.experts import Experts
from tests.conftest import compose
from vision.train import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[2]
DIGITS = type("D", (), {"img_size": 8, "in_chans": 1, "num_classes": 10})()
IMPLS = ("auto", "chunked", "grouped", "loop")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _routing(T: int, E: int, K: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    token_N = torch.arange(T).repeat_interleave(K)
    expert_N = torch.randint(0, E, (T * K,), generator=g)
    expert_N[:E] = torch.arange(E)  # every expert has rows, and block cuts happen (block_rows below)
    weight_N = torch.rand(T * K, generator=g)
    return token_N, expert_N, weight_N


@pytest.mark.parametrize("glu", [False, True])
@pytest.mark.parametrize("impl", ["auto", "chunked", "grouped"])
def test_fused_engines_compile_in_one_graph_and_match_eager(impl, glu):
    """``forward_routed`` of the fused engines under ``fullgraph=True`` (a graph break would raise):
    output and every gradient equal eager's."""
    torch.manual_seed(0)
    act = torch.nn.SiLU if glu else torch.nn.GELU
    experts = Experts(4, 16, 32, act_layer=act, glu=glu, impl=impl, block_rows=8)
    token_N, expert_N, weight_N = _routing(T=24, E=4, K=2)
    x = torch.randn(24, 16)

    def run(fn):
        xr, wr = x.clone().requires_grad_(True), weight_N.clone().requires_grad_(True)
        y = fn(xr, token_N, expert_N, wr)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads = [xr.grad, wr.grad] + [p.grad.clone() for p in experts.parameters()]
        experts.zero_grad(set_to_none=True)
        return y.detach(), grads

    y_eager, g_eager = run(experts.forward_routed)
    compiled = torch.compile(experts.forward_routed, backend="aot_eager", fullgraph=True)
    y_comp, g_comp = run(compiled)
    torch.testing.assert_close(y_comp, y_eager, rtol=1e-5, atol=1e-5)
    for a, b in zip(g_comp, g_eager):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # the inference variant of the op
        torch.testing.assert_close(compiled(x, token_N, expert_N, weight_N), y_eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["grouped", "loop"])
def test_composed_engine_compiles_in_fp32(impl):
    """Experts the fused function cannot run (a norm layer: sort, gather, ``forward``, scatter under
    autograd) compile in fp32 too, where grouped_mm's shape function takes bf16 only."""
    torch.manual_seed(0)
    experts = Experts(4, 16, 32, norm_layer=torch.nn.LayerNorm, impl=impl)
    token_N, expert_N, weight_N = _routing(T=24, E=4, K=2)
    x = torch.randn(24, 16)
    want = experts.forward_routed(x, token_N, expert_N, weight_N)
    got = torch.compile(experts.forward_routed, backend="aot_eager")(x, token_N, expert_N, weight_N)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def _vmoe(impl: str = "auto") -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(compose("vision", "debug=default", f"model.expert_impl={impl}"), DIGITS)


@pytest.mark.parametrize("impl", IMPLS)
def test_compiled_vmoe_matches_eager(impl):
    """The debug V-MoE (eval mode: no router noise) gives eager's logits when compiled."""
    model = _vmoe(impl).eval()
    x = torch.randn(8, 1, 8, 8)
    with torch.no_grad():
        want = model(x)
        got = torch.compile(model, backend="aot_eager")(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _train_two_steps(backend: str) -> None:
    model = _vmoe().train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.compile(backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        x, y = torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
        loss = F.cross_entropy(model(x), y)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert any(".experts." in n for n in changed), "no expert weight changed"
    assert any(".router." in n for n in changed), "no router weight changed"
    assert set(model.state_dict()) == set(_vmoe().state_dict())  # no _orig_mod. prefix


def test_vmoe_trains_two_steps_compiled():
    _train_two_steps("aot_eager")


@pytest.mark.slow
def test_vmoe_trains_two_steps_compiled_inductor():
    _train_two_steps("inductor")


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_trainer_compile_must_be_a_bool(value):
    with pytest.raises(ValueError, match="trainer.compile"):
        TrainerConfig(compile=value)


@pytest.mark.slow
def test_cli_compile_run_saves_weights_an_uncompiled_model_loads(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    proc = subprocess.run([sys.executable, "-m", "vision.train", "debug=default", "trainer.compile=true",
                           "trainer.max_steps=2", f"hydra.run.dir={tmp_path}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = torch.load(tmp_path / "model.pt", map_location="cpu")
    model = _vmoe()
    initial = {n: t.clone() for n, t in model.state_dict().items()}
    model.load_state_dict(weights)  # strict: the same keys, no _orig_mod. prefix
    assert any(not torch.equal(weights[n], initial[n]) for n in initial), "the run changed no weight"
    with torch.no_grad():
        assert torch.isfinite(model.eval()(torch.randn(2, 1, 8, 8))).all()


def test_bench_prints_compiled_next_to_eager():
    """``core.bench --compile``'s records: each ``<engine>+compile`` row is printed beside its eager
    engine with the speedup eager/compiled; without compiled rows the section is absent."""
    from core.bench import format_tables

    def rec(engine, ms, **extra):
        return {"table": "e2e", "engine": engine, "source": "s", "batch_size": 4, "images_per_s": 4e3 / ms,
                "ratio_to_dense": 1.0, "ratio_to_dense_paired": 1.0, "min_ms": ms, "median_ms": ms,
                "times_ms": [ms, ms], **extra}
    eager = [rec("dense_vit", 10.0), rec("vmoe", 20.0)]
    text = format_tables(eager + [rec("vmoe+compile", 8.0, compile_s=30.0)])
    row = next(line for line in text.splitlines() if line.startswith("e2e") and " vmoe " in line)
    assert row.split()[-4:] == ["20.0", "8.0", "2.50|2.50", "30.0"]
    assert "torch.compile against eager" not in format_tables(eager)
