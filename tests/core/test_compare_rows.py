"""core.compare rows are configurations (issue 24): run directories fabricated from the real composed
config (``config.yaml`` as ``core.run`` writes it) plus a ``metrics.json``, no training."""

import csv
import json
import math

import pytest
import yaml
from omegaconf import OmegaConf
from scipy import stats

from core.compare import compare, difference, quality_table, scan
from tests.conftest import compose


@pytest.fixture(scope="module")
def vision_debug_config() -> dict:
    return OmegaConf.to_container(compose("vision", "debug=default", "+router=topk"), resolve=True)


def _set(cfg: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for p in parents:
        cfg = cfg[p]
    cfg[last] = value


def _run(root, name, config, debug="default", **metrics):
    """A run directory as a finished run leaves it: config.yaml, .hydra/hydra.yaml (the debug choice)
    and metrics.json."""
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump(config))
    (d / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"runtime": {"choices": {"debug": debug}}}}))
    metrics = {"domain": "vision", "metric": "test_acc", "higher_is_better": True, "seed": config["seed"],
               "examples_per_s": 100.0, "flops_per_example": 1e6, **metrics}
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


def _config(base: dict, seed: int, **changes) -> dict:
    cfg = json.loads(json.dumps(base))
    cfg["seed"] = seed
    cfg["output_dir"] = f"/somewhere/{seed}/{sorted(changes.items())}"  # paths never make a new row
    for k, v in changes.items():
        _set(cfg, k, v)
    return cfg


def _csv(out_dir):
    with open(out_dir / "compare.csv") as f:
        return list(csv.DictReader(f))


def test_lr_sweep_gives_one_row_per_lr_with_t_intervals(tmp_path, vision_debug_config):
    """The issue's sweep (topk, lr 1e-3 and 1e-2, seeds 0 and 1) is two rows of n=2, not one of n=4."""
    root = tmp_path / "sweep"
    acc = {(0.001, 0): 0.50, (0.001, 1): 0.54, (0.01, 0): 0.60, (0.01, 1): 0.70}
    for (lr, seed), a in acc.items():
        _run(root, f"{lr}_{seed}", _config(vision_debug_config, seed, **{"trainer.lr": lr}), router="topk", test_acc=a)
    out = compare([root], tmp_path / "cmp", baseline="topk lr=0.001")
    rows = {r["configuration"]: r for r in _csv(tmp_path / "cmp")}
    assert set(rows) == {"topk lr=0.001", "topk lr=0.01"}
    slow = rows["topk lr=0.01"]
    assert int(slow["n"]) == 2 and int(slow["seeds"]) == 2
    assert float(slow["mean"]) == pytest.approx(0.65)
    sd = math.sqrt(((0.6 - 0.65) ** 2 + (0.7 - 0.65) ** 2) / 1)
    assert float(slow["ci95"]) == pytest.approx(stats.t.ppf(0.975, 1) * sd / math.sqrt(2))
    # paired by seed: differences 0.10 and 0.16 against the lr=0.001 row
    assert float(slow["diff_to_baseline"]) == pytest.approx(0.13)
    half = stats.t.ppf(0.975, 1) * math.sqrt(2 * 0.03 ** 2) / math.sqrt(2)
    assert float(slow["diff_ci95_high"]) == pytest.approx(0.13 + half)
    assert slow["diff_test"] == "paired n=2"
    assert "| topk lr=0.01 | 2 | 0.6500 ± 0.0707 [0.0147, 1.2853] n=2 |" in out["markdown"]


def test_capacity_and_model_differences_make_rows_router_keys_do_not(tmp_path):
    """The issue's MMoE and PLE at capacity factors 1 and 4 (real composed configs) are four topk rows
    named by model and capacity, not one "topk, 4 seeds" row; expert_choice's own router keys are
    explained by its name and the dense baseline's model by its router."""
    root = tmp_path / "runs"
    i = 0
    for model in ("mmoe", "ple"):
        base = OmegaConf.to_container(compose("recsys", "debug=default", f"model={model}", "+router=topk"),
                                      resolve=True)
        for cf in (1.0, 4.0):
            for seed in (0, 1):
                cfg = _config(base, seed, **{"router.capacity_factor": cf, "model.gate.capacity_factor": cf})
                _run(root, f"r{i}", cfg, router="topk", model=model, domain="recsys", metric="test_auc",
                     test_auc=0.7 + 0.01 * i)
                i += 1
    ec = OmegaConf.to_container(compose("recsys", "debug=default", "+router=expert_choice"), resolve=True)
    _run(root, "ec", _config(ec, 0), router="expert_choice", model="mmoe", domain="recsys", metric="test_auc",
         test_auc=0.8)
    dense = OmegaConf.to_container(compose("recsys", "debug=default", "model=shared_bottom"), resolve=True)
    _run(root, "sb", _config(dense, 0), router="none", model="shared_bottom", domain="recsys", metric="test_auc",
         test_auc=0.6)
    rows = {r["configuration"]: r for r in _csv_of(root, tmp_path)}
    assert sorted(rows) == ["expert_choice", "none", "topk model=mmoe capacity_factor=1",
                            "topk model=mmoe capacity_factor=4", "topk model=ple capacity_factor=1",
                            "topk model=ple capacity_factor=4"]
    assert all(int(rows[k]["n"]) == 2 for k in rows if k.startswith("topk"))


def _csv_of(root, tmp_path):
    compare([root], tmp_path / "cmp")
    return _csv(tmp_path / "cmp")


def test_repeated_seed_counts_once_and_is_said(tmp_path, vision_debug_config):
    root = tmp_path / "runs"
    _run(root, "a", _config(vision_debug_config, 0), router="topk", test_acc=0.5)
    _run(root, "b", _config(vision_debug_config, 0), router="topk", test_acc=0.7)
    _run(root, "c", _config(vision_debug_config, 1), router="topk", test_acc=0.8)
    out = compare([root], tmp_path / "cmp")
    (row,) = _csv(tmp_path / "cmp")
    assert int(row["n"]) == 2 and float(row["mean"]) == pytest.approx((0.6 + 0.8) / 2)
    assert "- topk: seed 0 has 2 runs; their values are averaged and counted as one seed" in out["markdown"]


def test_other_budgets_are_listed_apart(tmp_path, vision_debug_config):
    """A run with more steps, or without the debug overlay, is its own table, never averaged in."""
    root = tmp_path / "runs"
    for seed in (0, 1, 2):
        _run(root, f"s{seed}", _config(vision_debug_config, seed), router="topk", test_acc=0.5)
    _run(root, "long", _config(vision_debug_config, 0, **{"trainer.max_steps": 400}), router="topk", test_acc=0.9)
    _run(root, "nodebug", _config(vision_debug_config, 1), debug=None, router="topk", test_acc=0.8)
    _run(root, "gpu", _config(vision_debug_config, 2), router="topk", test_acc=0.7, device="cuda", precision="bf16")
    out = compare([root], tmp_path / "cmp")
    rows = _csv(tmp_path / "cmp")
    main = [r for r in rows if r["main_budget"] == "True"]
    assert len(main) == 1 and int(main[0]["n"]) == 3 and float(main[0]["mean"]) == pytest.approx(0.5)
    apart = sorted(float(r["mean"]) for r in rows if r["main_budget"] == "False")
    assert apart == [0.7, 0.8, 0.9]
    assert "### vision, another budget: device=cuda bf16" in out["markdown"]
    assert "### vision, another budget: trainer.max_steps=400" in out["markdown"]
    assert "### vision, another budget: debug=null" in out["markdown"]


def test_refused_runs_join_the_table_of_the_runs_that_ran(tmp_path, vision_debug_config):
    """A run refused before it started (n/a: a non-causal router in a language model) records no device;
    it joins the table of its budget's runs that ran, which stays the main one however many were refused."""
    root = tmp_path / "runs"
    for seed in (0, 1):
        _run(root, f"ran{seed}", _config(vision_debug_config, seed), router="topk", test_acc=0.5, device="cpu",
             precision="fp32")
    for seed in (0, 1, 2):
        for router in ("soft", "expert_choice"):
            _run(root, f"{router}{seed}", _config(vision_debug_config, seed, **{"router.top_k": None}),
                 router=router, status="n/a", reason=f"{router} is not causal")
    out = compare([root], tmp_path / "cmp")
    assert [t.main for t in out["tables"]] == [True]
    rows = {r["configuration"]: r for r in _csv(tmp_path / "cmp")}
    assert int(rows["topk"]["n"]) == 2 and set(rows) == {"topk", "soft", "expert_choice"}
    assert "another budget" not in out["markdown"]


def test_equal_router_settings_share_a_line_across_domains(tmp_path):
    """Domain A's soft rows differ in normalize, domain B's in slots_per_expert: in the cross-domain
    table A's ``soft normalize=False`` and B's ``soft slots_per_expert=1`` (normalize=False too) are
    one line, ``soft normalize=False slots_per_expert=1``; A's normalize=True row stays its own."""
    soft = OmegaConf.to_container(compose("vision", "debug=default", "+router=soft"), resolve=True)
    root = tmp_path / "runs"
    for seed in (0, 1):
        for normalize, acc in ((True, 0.5), (False, 0.7)):
            _run(root, f"a_{normalize}_{seed}", _config(soft, seed, **{"router.normalize": normalize}),
                 router="soft", test_acc=acc)
        for slots, auc in ((1, 0.91), (12, 0.92)):
            _run(root, f"b_{slots}_{seed}", _config(soft, seed, **{"router.normalize": False,
                 "router.slots_per_expert": slots}), domain="recsys", metric="test_auc", router="soft",
                 test_auc=auc)
    header, rows = quality_table(compare([root], tmp_path / "cmp")["tables"])
    rows = {r[0]: r for r in rows}
    assert set(rows) == {"soft normalize=False slots_per_expert=1", "soft normalize=True slots_per_expert=1",
                         "soft normalize=False slots_per_expert=12"}
    both = rows["soft normalize=False slots_per_expert=1"]
    assert both[header.index("vision test_acc ↑")].startswith("0.7000")
    assert both[header.index("recsys test_auc ↑")].startswith("0.9100")
    assert rows["soft normalize=True slots_per_expert=1"][header.index("recsys test_auc ↑")] == ""


def test_unreadable_and_unfinished_runs_are_listed_in_the_report(tmp_path, vision_debug_config):
    root = tmp_path / "runs"
    _run(root, "ok", _config(vision_debug_config, 0), router="topk", test_acc=0.5)
    bad = root / "bad"
    bad.mkdir()
    (bad / "metrics.json").write_text('{"domain": "vision", ')
    crashed = root / "crashed"
    crashed.mkdir()
    (crashed / "config.yaml").write_text(yaml.safe_dump(vision_debug_config))
    runs, problems = scan([root])
    assert len(runs) == 1
    out = compare([root], tmp_path / "cmp")
    text = out["markdown"]
    assert "## Run directories not used" in text
    assert f"- `{bad}`: unreadable metrics.json:" in text
    assert f"- `{crashed}`: no metrics.json: the run did not finish" in text


def test_dense_baseline_difference_uses_welch_without_shared_seeds(tmp_path, vision_debug_config):
    root = tmp_path / "runs"
    dense = json.loads(json.dumps(vision_debug_config))
    dense["model"]["moe"] = False
    for seed, a in ((0, 0.40), (1, 0.44)):
        _run(root, f"d{seed}", _config(dense, seed), router="none", test_acc=a)
    for seed, a in ((2, 0.50), (3, 0.60), (4, 0.55)):
        _run(root, f"t{seed}", _config(vision_debug_config, seed), router="topk", test_acc=a)
    compare([root], tmp_path / "cmp")
    rows = {r["configuration"]: r for r in _csv(tmp_path / "cmp")}
    assert rows["none"]["diff_test"] == "baseline"
    assert rows["topk"]["diff_test"] == "Welch"
    ref = stats.ttest_ind([0.5, 0.6, 0.55], [0.40, 0.44], equal_var=False).confidence_interval(0.95)
    assert float(rows["topk"]["diff_ci95_low"]) == pytest.approx(ref.low)
    assert float(rows["topk"]["diff_ci95_high"]) == pytest.approx(ref.high)


def test_paired_difference_matches_scipy():
    row = {"seed 0": 0.6, "seed 1": 0.7, "seed 2": 0.65, "seed 9": 0.1}
    base = {"seed 0": 0.5, "seed 1": 0.55, "seed 2": 0.6}
    d = difference(row, base)
    ref = stats.ttest_rel([0.6, 0.7, 0.65], [0.5, 0.55, 0.6]).confidence_interval(0.95)
    assert d.test == "paired n=3"
    assert d.value - d.half == pytest.approx(ref.low) and d.value + d.half == pytest.approx(ref.high)


def test_keys_that_follow_the_seed_do_not_split_rows(tmp_path):
    """data=synthetic resolves ``data.dataset.seed: ${seed}``: seeds 0-2 are still one row, while a fixed
    key named like a seed (``sine_seed``) set apart makes its own row."""
    base = OmegaConf.to_container(compose("recsys", "debug=default", "data=synthetic"), resolve=True)
    root = tmp_path / "runs"
    for seed in (0, 1, 2):
        cfg = _config(base, seed, **{"data.dataset.seed": seed})
        _run(root, f"s{seed}", cfg, router="dense", domain="recsys", metric="test_mse_mean", test_mse_mean=1.0 + seed)
    _run(root, "other", _config(base, 0, **{"data.dataset.sine_seed": 7}), router="dense", domain="recsys",
         metric="test_mse_mean", test_mse_mean=2.0)
    rows = {r["configuration"]: r for r in _csv_of(root, tmp_path)}
    assert set(rows) == {"dense sine_seed=0", "dense sine_seed=7"}
    assert int(rows["dense sine_seed=0"]["n"]) == 3


def test_runs_without_config_yaml_are_listed_apart(tmp_path, vision_debug_config):
    """A run whose config is unknown has an unknown budget: its own table, never averaged in."""
    root = tmp_path / "runs"
    _run(root, "new", _config(vision_debug_config, 0), router="topk", test_acc=0.5)
    old = root / "old"
    old.mkdir()
    (old / "metrics.json").write_text(json.dumps({"domain": "vision", "router": "topk", "seed": 0, "test_acc": 0.6,
                                                  "metric": "test_acc"}))
    out = compare([root], tmp_path / "cmp")
    rows = _csv(tmp_path / "cmp")
    assert [(r["configuration"], r["n"]) for r in rows] == [("topk", "1"), ("topk", "1")]
    assert "### vision, another budget: not recorded (no config.yaml)" in out["markdown"]
    assert "- without config.yaml (grouped by the router and the settings metrics.json records): topk" \
        in out["markdown"]


def test_cross_domain_labels_keep_values_with_spaces_whole(tmp_path):
    """A router key whose value prints with a space (a list: ``[1, 2]``) stays one setting in the
    cross-domain table; reading the settings back from the label text split it at the space."""
    soft = OmegaConf.to_container(compose("vision", "debug=default", "+router=soft"), resolve=True)
    root = tmp_path / "runs"
    for seed in (0, 1):
        for groups, acc in (([1, 2], 0.5), ([3, 4], 0.7)):
            _run(root, f"a_{groups[0]}_{seed}", _config(soft, seed, **{"router.slot_groups": groups}),
                 router="soft", test_acc=acc)
        _run(root, f"b_{seed}", _config(soft, seed, **{"router.slot_groups": [1, 2]}), domain="recsys",
             metric="test_auc", router="soft", test_auc=0.9)
    header, rows = quality_table(compare([root], tmp_path / "cmp")["tables"])
    rows = {r[0]: r for r in rows}
    assert set(rows) == {"soft slot_groups=[1, 2]", "soft slot_groups=[3, 4]"}
    assert rows["soft slot_groups=[1, 2]"][header.index("recsys test_auc ↑")].startswith("0.9000")
