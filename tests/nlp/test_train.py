"""Training: every causal router lowers the loss; ``nlp.train.train`` end to end on the composed
config (metrics, analyses, labels); generation from a checkpoint is deterministic under a seed."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import core
from nlp.generate import generate_text, load_model
from nlp.generate import main as generate_main
from core.run import router_label, train, with_default_router
from nlp.train import LanguageModelTask, build_model
from tests.conftest import make_router_partial
from tests.nlp.conftest import SEQ, VOCAB, causal_router_names, compose_nlp, tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread


@pytest.mark.parametrize("name", causal_router_names())
def test_every_causal_router_lowers_the_loss(name):
    """A few AdamW steps (task + auxiliary losses, after_optimizer_step hooks) on a fixed batch of a
    periodic sequence lower the next-token loss."""
    model = tiny_lm(make_router_partial(name)).train()
    period = torch.randint(0, VOCAB, (7,), generator=torch.Generator().manual_seed(0))
    ids = period.repeat(10)[: 4 * (SEQ + 1)].view(4, SEQ + 1)
    x, y = ids[:, :-1], ids[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(12):
        torch.manual_seed(step)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        (loss + core.collect_aux_loss(model)).backward()
        opt.step()
        core.after_optimizer_step(model)
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("nlp_default")
    cfg = compose_nlp("trainer.max_steps=8", "trainer.checkpoint_every_steps=null", f"output_dir={out}")
    return out, train(cfg)


def test_default_run_writes_metrics_and_analyses(default_run):
    out, metrics = default_run
    assert metrics["router"] == "mixtral" and metrics["causal"] is True and metrics["domain"] == "nlp"
    assert metrics["steps"] == 8 and 1.0 < metrics["val_ppl"] < 259
    assert metrics["tokens_per_s"] > 0 and metrics["params_active"] < metrics["params_total"]
    assert metrics["experts_per_token"] == pytest.approx(2.0)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk["val_loss"] == pytest.approx(metrics["val_loss"]) and "analysis" in on_disk
    analysis = json.loads((out / "analysis.json").read_text())
    assert 0.0 <= analysis["explained_by_token_id"] <= 1.0
    assert analysis["uniform_purity"] <= analysis["token_id_purity"] <= 1.0
    assert set(analysis["stability"]) == {"0", "4"}  # snapshots at 10% and 50% of 8 steps
    assert all(0.0 <= v["agreement"] <= 1.0 for v in analysis["stability"].values())
    drops = analysis["drop_rate_by_position"]
    assert drops["router_capacity_factor"] is None and drops["capacity_factor"] == 1.0
    no_bpr, bpr = drops["no_bpr"], drops["bpr"]
    assert len(no_bpr["per_position"]) == 32 and len(bpr["per_position"]) == 32
    # without BPR the buffers fill in position order: late tokens are dropped at least as often
    assert no_bpr["last_quarter"] >= no_bpr["first_quarter"]
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "last.ckpt").is_file()


def test_generation_from_a_checkpoint_is_deterministic(default_run, capsys):
    out, _ = default_run
    model, tok = load_model(out)
    a = generate_text(model, tok, "dog: a", max_new_tokens=30, seed=3, temperature=1.0, top_k=None)
    b = generate_text(model, tok, "dog: a", max_new_tokens=30, seed=3, temperature=1.0, top_k=None)
    c = generate_text(model, tok, "dog: a", max_new_tokens=30, seed=4, temperature=1.0, top_k=None)
    assert a == b != c and a.startswith("dog: a")
    cli = generate_main([f"checkpoint={out / 'checkpoints' / 'last.ckpt'}", "prompt=dog: a", "max_new_tokens=30",
                         "seed=3", "temperature=1.0", "top_k=0"])
    assert cli == a and a in capsys.readouterr().out
    with pytest.raises(ValueError, match="not an option"):
        generate_main([f"checkpoint={out}", "length=3"])


def test_adamoe_run_reports_true_experts_and_flop_ratio(tmp_path):
    metrics = train(compose_nlp("+router=adamoe", "trainer.max_steps=4", f"output_dir={tmp_path}"))
    assert metrics["router"] == "adamoe" and metrics["causal"] is True
    nulls = json.loads((tmp_path / "analysis.json").read_text())["null_experts"]
    assert nulls["top_k"] == 4 and 0.0 <= nulls["true_experts_per_token"] <= 4.0
    assert nulls["expert_flop_ratio_to_baseline"] == pytest.approx(nulls["true_experts_per_token"] / 2)
    assert metrics["analysis"]["true_experts_per_token"] == pytest.approx(nulls["true_experts_per_token"])


def test_dense_baseline_and_noncausal_label(tmp_path):
    dense = train(compose_nlp("model=tiny_dense", "trainer.max_steps=3", f"output_dir={tmp_path / 'dense'}"))
    assert dense["router"] == "none" and dense["params_active"] == dense["params_total"]
    assert "analysis" not in dense and not (tmp_path / "dense" / "analysis.json").exists()
    with pytest.raises(ValueError, match="not causal"):
        train(compose_nlp("+router=expert_choice", "trainer.max_steps=3", f"output_dir={tmp_path / 'ec0'}"))
    ec = train(compose_nlp("+router=expert_choice", "model.allow_noncausal_routing=true", "trainer.max_steps=3",
                           f"output_dir={tmp_path / 'ec'}"))
    assert ec["router"] == "expert_choice (non-causal)" and ec["causal"] is False


def _label(*overrides: str) -> str:
    cfg = compose_nlp(*overrides)
    default = with_default_router(cfg)
    return router_label(cfg, build_model(cfg, VOCAB), LanguageModelTask(), default)


def test_row_labels_name_the_router_and_the_expert_form():
    assert _label("model=tiny_lora") == "mixtral (lora experts)"
    assert _label("+router=switch") == "switch"  # no Hydra runtime here: the router's module names it
    assert _label("+router=soft", "model.allow_noncausal_routing=true", "router_name=soft_moe") == "soft_moe (non-causal)"
