"""recsys.summarize is a view of core.compare (issue 24): rows are configurations, n counts distinct
seeds, the synthetic correlation stays a column."""

import json

import yaml
from omegaconf import OmegaConf

from recsys.summarize import collect, main, table
from tests.conftest import compose


def test_lr_sweep_is_two_rows_and_correlation_a_column(tmp_path):
    base = OmegaConf.to_container(compose("recsys", "debug=default", "data=synthetic"), resolve=True)
    root = tmp_path / "sweep"
    for lr in (0.001, 0.01):
        for p in (0.5, 1.0):
            for seed in (0, 1, 1):  # seed 1 ran twice: one seed
                cfg = json.loads(json.dumps(base))
                cfg["trainer"]["lr"], cfg["seed"] = lr, seed
                cfg["data"]["dataset"].update(correlation=p, seed=seed)
                d = root / f"{lr}_{p}_{seed}_{len(list(root.glob('*'))) if root.exists() else 0}"
                d.mkdir(parents=True)
                (d / "config.yaml").write_text(yaml.safe_dump(cfg))
                (d / "metrics.json").write_text(json.dumps({
                    "domain": "recsys", "router": "dense", "model": "mmoe", "data": "synthetic", "seed": seed,
                    "data_info": {"correlation": p}, "test_mse_mean": lr * 100 + p + seed}))
    (root / "broken").mkdir()
    (root / "broken" / "metrics.json").write_text("{")
    text = table(collect([str(root)]))
    assert "| model | router | p = 1.0 | p = 0.5 |" in text
    assert "| mmoe | dense lr=0.001 | 1.6000 ± 0.7071 (n=2) | 1.1000 ± 0.7071 (n=2) |" in text
    assert "| mmoe | dense lr=0.01 | 2.5000 ± 0.7071 (n=2) | 2.0000 ± 0.7071 (n=2) |" in text
    assert "unreadable metrics.json" in main([str(root)])
