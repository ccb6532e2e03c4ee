"""Multi-task models: every model learns on random KJT batches, the PLE/CGC/MMoE structure, every
router config as a gate, and the paper's parameter budget."""

from __future__ import annotations


import pytest
import torch

import core
from core.routers.dense import DenseRouter
from recsys.data import make_batch, random_multitask
from recsys.models import CGC, ESMM, MMoE, OMoE, PLE, MultiGateMixture, SharedBottom, SingleTask, gate_stats
from recsys.training import build_model, make_loss_fn
from tests.conftest import compose

MODEL_NAMES = ["single_task", "shared_bottom", "omoe", "mmoe", "cgc", "ple", "esmm"]


def compose_recsys(*overrides: str):
    return compose("recsys", *overrides)


def _full_batch(split):
    return make_batch(split.dense, split.sparse, split.labels, split.keys)


def _train_steps(model, dataset, steps: int, lr: float = 1e-2, batch_size: int = 256) -> tuple[float, float]:
    """Task loss on the training set before and after ``steps`` Adam steps over KJT minibatches."""
    torch.manual_seed(0)
    loss_fn = make_loss_fn(dataset.tasks)
    full = _full_batch(dataset.train)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    with torch.no_grad():
        model.eval()
        before = float(loss_fn(model, full)[0])
    model.train()
    n = len(dataset.train)
    for step in range(steps):
        idx = torch.arange(step * batch_size, (step + 1) * batch_size) % n
        loss, _ = loss_fn(model, dataset.train.batch(idx))
        loss = loss + core.collect_aux_loss(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        core.after_optimizer_step(model)
    with torch.no_grad():
        model.eval()
        after = float(loss_fn(model, full)[0])
    return before, after


@pytest.mark.parametrize("model_name", MODEL_NAMES)
def test_every_model_learns_on_random_kjt_batches(model_name):
    # binary + regression tasks, except ESMM, which models a binary funnel
    kinds = ("binary", "binary") if model_name == "esmm" else ("binary", "regression")
    dataset = random_multitask(task_kinds=kinds, num_train=1024, num_eval=64, seed=1)
    cfg = compose_recsys(f"model={model_name}")
    torch.manual_seed(0)
    model = build_model(cfg, dataset)
    before, after = _train_steps(model, dataset, steps=40)
    assert after < 0.8 * before, (model_name, before, after)


def test_output_is_one_column_per_task_and_depends_on_sparse_ids():
    dataset = random_multitask(num_train=64, num_eval=8, task_kinds=("binary", "binary", "regression"))
    cfg = compose_recsys("model=mmoe")
    model = build_model(cfg, dataset).eval()
    batch = dataset.train.batch(torch.arange(16))
    out = model(batch.dense_features, batch.sparse_features)
    assert out.shape == (16, 3)
    other = dataset.train.batch(torch.arange(16))
    other.sparse_features = make_batch(dataset.train.dense[:16], (dataset.train.sparse[:16] + 1) % 20,
                                       dataset.train.labels[:16], dataset.train.keys).sparse_features
    assert not torch.allclose(out, model(other.dense_features, other.sparse_features))


def test_esmm_ctcvr_is_ctr_times_cvr():
    torch.manual_seed(0)
    model = ESMM(None, 6, 2, tower_layer_sizes=[8])
    x = torch.randn(32, 6)
    out = model(x)
    p_ctcvr = torch.sigmoid(out[:, 1])
    expected = torch.sigmoid(out[:, 0]) * torch.sigmoid(model.cvr_logits(x))
    torch.testing.assert_close(p_ctcvr, expected, rtol=1e-5, atol=1e-6)
    assert (p_ctcvr <= torch.sigmoid(out[:, 0]) + 1e-6).all()
    with pytest.raises(ValueError, match="num_tasks=3"):
        ESMM(None, 6, 3)


def test_esmm_rejects_regression_tasks():
    dataset = random_multitask(task_kinds=("binary", "regression"), num_train=32, num_eval=8)
    with pytest.raises(ValueError, match="binary tasks"):
        build_model(compose_recsys("model=esmm"), dataset)


# ----------------------------------------------------------------------------- gate structure


def _expert(mixture: MultiGateMixture, e: int, x: torch.Tensor) -> torch.Tensor:
    return mixture.experts.forward_expert(e, x)


def test_mmoe_is_the_papers_formula():
    """MMoE Eq. 6-8 by hand: y_k = tower_k(Σ_i softmax(W_k x)_i f_i(x))."""
    torch.manual_seed(0)
    model = MMoE(None, 10, 2, num_experts=4, expert_hidden_features=8, expert_out_features=6).eval()
    x = torch.randn(5, 10)
    mix = model.body.mixture
    f = torch.stack([_expert(mix, e, x) for e in range(4)], 1)            # B×E×O
    for k in range(2):
        g = torch.softmax(x @ mix.gates[k].weight.t(), -1)                  # B×E
        expected = model.tower_arch[k]((g[..., None] * f).sum(1))
        torch.testing.assert_close(model(x)[:, k], expected, rtol=1e-5, atol=1e-5)


def test_omoe_has_one_gate_shared_by_every_task():
    torch.manual_seed(0)
    model = OMoE(None, 10, 3, num_experts=4)
    assert len(model.body.mixture.gates) == 1
    reps = model.task_representations(torch.randn(7, 10), None)
    assert len(reps) == 3 and all(r is reps[0] for r in reps)


def test_ple_one_level_without_shared_experts_is_one_moe_per_task():
    """PLE(num_levels=1, num_shared_experts=0): task k's gate has exactly task k's m experts, no shared
    gate exists, task k's output is tower_k(Σ_{i<m} softmax(W_k x)_i f_{k,i}(x)), and changing another
    task's experts leaves task k's output unchanged."""
    torch.manual_seed(0)
    K, m = 3, 2
    model = PLE(None, 10, K, num_levels=1, num_task_experts=m, num_shared_experts=0,
                expert_hidden_features=8, expert_out_features=6).eval()
    (level,) = model.body.levels
    assert len(level.gates) == K                                            # no shared gate
    for k in range(K):
        assert level.gate_experts(k).tolist() == list(range(k * m, (k + 1) * m))
        assert level.gates[k].num_experts == m
    x = torch.randn(5, 10)
    out = model(x)
    for k in range(K):
        g = torch.softmax(x @ level.gates[k].weight.t(), -1)
        f = torch.stack([_expert(level, e, x) for e in range(k * m, (k + 1) * m)], 1)
        torch.testing.assert_close(out[:, k], model.tower_arch[k]((g[..., None] * f).sum(1)), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        level.experts.w1_EDF[m:].normal_()                                   # experts of tasks 1..K-1
    out2 = model(x)
    torch.testing.assert_close(out2[:, 0], out[:, 0])
    assert not torch.allclose(out2[:, 1], out[:, 1])


def test_ple_with_one_level_equals_cgc_and_cgc_without_task_experts_equals_mmoe():
    torch.manual_seed(0)
    ple = PLE(None, 10, 2, num_levels=1, num_task_experts=2, num_shared_experts=3).eval()
    cgc = CGC(None, 10, 2, num_task_experts=2, num_shared_experts=3).eval()
    assert ple.state_dict().keys() == cgc.state_dict().keys()
    cgc.load_state_dict(ple.state_dict())
    x = torch.randn(6, 10)
    torch.testing.assert_close(cgc(x), ple(x))
    # CGC with only shared experts: every task gate mixes the same E experts, as MMoE
    cgc0 = CGC(None, 10, 2, num_task_experts=0, num_shared_experts=4).eval()
    mmoe = MMoE(None, 10, 2, num_experts=4).eval()
    level = cgc0.body.levels[0]
    assert [level.gate_experts(k).tolist() for k in range(2)] == [[0, 1, 2, 3]] * 2
    mix = mmoe.body.mixture
    mix.experts.load_state_dict(level.experts.state_dict())
    for k in range(2):
        mix.gates[k].load_state_dict(level.gates[k].state_dict())
        mmoe.tower_arch[k].load_state_dict(cgc0.tower_arch[k].state_dict())
    torch.testing.assert_close(mmoe(x), cgc0(x))


def test_two_level_ple_wiring():
    """Level 1 has a shared gate over all experts; the last level has none; level 2 reads level 1's
    outputs (task experts their task's, shared experts the shared one)."""
    torch.manual_seed(0)
    model = PLE(None, 10, 2, num_levels=2, num_task_experts=1, num_shared_experts=2, expert_out_features=6).eval()
    l1, l2 = model.body.levels
    assert len(l1.gates) == 3 and len(l2.gates) == 2
    assert l1.gate_experts(2).tolist() == [0, 1, 2, 3]
    assert l2.experts.in_features == 6 and l2.gates[0].dim == 6
    assert l2.expert_inputs == [0, 1, 2, 2] and l2.gate_inputs == [0, 1]
    x = torch.randn(5, 10)
    h = l1([x, x, x])
    expected = model.tower_arch[0](l2(h)[0])
    torch.testing.assert_close(model(x)[:, 0], expected)


# ------------------------------------------------------------------------------ routers as gates


def test_every_router_config_serves_as_a_gate_or_fails_clearly(router_name, make_router):
    """Every conf/router/*.yaml: MMoE and CGC build with it as every gate, train one step (finite
    outputs, gradients reach the gates unless the router has no parameters) and evaluate; or
    construction raises a ValueError that names the problem."""
    gate = make_router(router_name)
    torch.manual_seed(0)
    dataset = random_multitask(task_kinds=("binary", "regression"), num_train=64, num_eval=8)
    for cls, kwargs in ((MMoE, {"num_experts": 4}), (CGC, {"num_task_experts": 2, "num_shared_experts": 2})):
        try:
            model = cls(None, len(dataset.dense_features), 2, gate=gate, **kwargs)
        except ValueError as err:
            assert "is not allowed" in str(err) or "cannot serve" in str(err), str(err)
            assert len(str(err)) > 30
            continue
        batch = dataset.train.batch(torch.arange(32))
        model.train()
        out = model(batch.dense_features)
        assert out.shape == (32, 2) and torch.isfinite(out).all()
        loss = make_loss_fn(dataset.tasks)(model, batch)[0] + core.collect_aux_loss(model)
        loss.backward()
        gate_params = [p for m in model.modules() if isinstance(m, core.Router) for p in m.parameters()]
        if gate_params:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gate_params), router_name
        core.after_optimizer_step(model)
        model.eval()
        with torch.no_grad():
            assert torch.isfinite(model(batch.dense_features)).all()


def test_hash_router_fails_at_construction_with_a_clear_message(make_router):
    with pytest.raises(ValueError, match="token ids"):
        MMoE(None, 8, 2, gate=make_router("hash"))


def test_base_layer_gate_needs_matching_widths(make_router):
    with pytest.raises(ValueError, match="expert_out_features=8"):
        MMoE(None, 8, 2, num_experts=4, gate=make_router("base"))
    model = MMoE(None, 8, 2, num_experts=4, expert_out_features=8, gate=make_router("base"))
    assert torch.isfinite(model(torch.randn(16, 8))).all()


def test_expert_choice_gate_lets_experts_pick_examples_in_the_batch(make_router):
    torch.manual_seed(0)
    model = MMoE(None, 8, 2, num_experts=4, gate=make_router("expert_choice"))
    mix = model.body.mixture
    mix.keep_last_routing = True
    model(torch.randn(32, 8))
    routing = mix.last_routings[0]
    assert routing.num_groups == 1 and routing.group_size == 32      # the batch is one routing group
    # capacity_factor 2: every expert takes C = 2·32/4 = 16 examples
    assert routing.tokens_per_expert().tolist() == [16] * 4
    stats = gate_stats(model)
    assert stats["gates"]["body.mixture.gate0"]["tokens_per_expert"] == [16.0] * 4
    assert stats["gates"]["body.mixture.gate0"]["experts_per_example"] == 2.0    # 64 picks over 32 examples


def test_dense_gate_is_the_default():
    model = MMoE(None, 8, 2)
    assert all(isinstance(g, DenseRouter) for g in model.body.mixture.gates)


def test_gate_aux_losses_are_collected(make_router):
    model = MMoE(None, 8, 2, num_experts=4, gate=make_router("topk"))
    model.train()
    model(torch.randn(16, 8))
    assert float(core.collect_aux_loss(model).detach()) > 0


def test_shared_bottom_budget_matches_mmoe_on_the_synthetic_data():
    """MMoE §5.1 compares models of equal parameter count: the configs' shared bottom of 145 units
    matches MMoE's 8 experts of 16 units on the 100-dimensional synthetic input (within 1%)."""
    from recsys.data import make_synthetic

    dataset = make_synthetic(num_train=8, num_val=8, num_test=8)
    counts = {name: sum(p.numel() for p in build_model(compose_recsys(f"model={name}"), dataset).parameters())
              for name in ("shared_bottom", "omoe", "mmoe")}
    assert abs(counts["shared_bottom"] - counts["mmoe"]) / counts["mmoe"] < 0.01, counts
    assert counts["omoe"] < counts["mmoe"]   # one gate fewer


def test_single_task_shares_nothing():
    dataset = random_multitask(num_train=64, num_eval=8)
    model = build_model(compose_recsys("model=single_task"), dataset)
    assert isinstance(model, SingleTask)
    batch = dataset.train.batch(torch.arange(16))
    out = model(batch.dense_features, batch.sparse_features)
    out[:, 0].sum().backward()
    tables1 = model.task_input_archs[0].sparse_arch.embedding_bag_collection.parameters()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in tables1)
    assert model.task_input_archs[0].sparse_arch.embedding_bag_collection is not model.input_arch.sparse_arch.embedding_bag_collection


def test_shared_bottom_shares_the_bottom():
    model = SharedBottom(None, 8, 2, bottom_layer_sizes=[16])
    reps = model.task_representations(torch.randn(4, 8), None)
    assert reps[0] is reps[1]
