"""core.compare on synthetic run directories (metrics.json only): rows, columns, means ± std, intervals
and n/a cells. Rows as configurations: test_compare_rows.py."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core.compare import compare, find_runs, main, quality_table

ROOT = Path(__file__).resolve().parents[2]


def _run(root, name, **metrics):
    d = root / name
    d.mkdir(parents=True)
    (d / "metrics.json").write_text(json.dumps(metrics))
    return d


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "multirun"
    for seed, acc in enumerate([0.80, 0.84]):
        _run(root, f"topk_{seed}", domain="vision", router="topk", seed=seed, test_acc=acc, examples_per_s=100.0,
             params_active=1e6, load_cv2=0.1, dropped_fraction=0.02)
    _run(root, "none_0", domain="vision", router="none", seed=0, test_acc=0.79, examples_per_s=150.0,
         params_active=8e5, load_cv2=None, dropped_fraction=None)
    _run(root, "hash_0", domain="vision", router="hash", status="n/a", reason="hash routing needs token ids")
    _run(root, "lm_topk", domain="nlp", router="topk", seed=0, val_ppl=5.5, examples_per_s=2000.0,
         params_active=2e6, load_cv2=0.2, dropped_fraction=0.0)
    _run(root, "lm_hash", domain="nlp", router="hash", seed=0, val_ppl=6.0, examples_per_s=2100.0,
         params_active=2e6, load_cv2=0.3, dropped_fraction=0.0)
    return root


def test_rows_columns_means_and_na(sweep, tmp_path):
    out = compare([sweep], tmp_path / "cmp")
    tables = {t.domain: t for t in out["tables"]}
    from core.compare import table_rows

    header, rows = table_rows(tables["vision"])
    rows = {r[0]: r for r in rows}
    assert header[:4] == ["configuration", "seeds", "test_acc ↑", "Δ vs none"] and "ex/s" in header
    assert "FLOPs/ex" in header
    assert list(rows) == ["none", "hash", "topk"]  # the dense baseline first
    assert rows["topk"][2] == "0.8200 ± 0.0283 [0.5659, 1.0741] n=2"  # sample std, t(1) interval
    assert rows["topk"][1] == "2"
    assert rows["topk"][3] == "+0.0300 (no interval: n=1)"  # the baseline has one seed
    assert rows["none"][2] == "0.7900 n=1" and rows["none"][3] == "baseline"
    assert rows["hash"][2] == "n/a"
    qh, qrows = quality_table(out["tables"])
    qrows = {r[0]: r for r in qrows}
    assert qrows["none"][qh.index("nlp val_ppl ↓")] == ""  # not run there
    assert qrows["hash"][qh.index("nlp val_ppl ↓")] == "6.0000 n=1"
    report = (tmp_path / "cmp" / "compare.md").read_text()
    assert "## Task quality across domains" in report and "## vision" in report and "## nlp" in report
    assert "  - hash: hash routing needs token ids" in report  # why a cell is n/a
    assert report.count("| topk |") == 3  # the quality table and both domain tables
    assert (tmp_path / "cmp" / "compare.csv").exists()
    assert {p.name for p in out["plots"]} == {"compare_vision.png", "compare_nlp.png"}


def test_cli_reports_missing_directory(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_quality_table_and_provenance(sweep, tmp_path):
    _run(sweep, "topk_2", domain="vision", router="topk", seed=2, test_acc=0.88, examples_per_s=90.0,
         machine="Test CPU, 2 torch threads of 2 CPUs; torch 9.9", finished_at="2026-01-02T03:04:05+00:00")
    header, rows = quality_table(find_runs([sweep]))
    assert header == ["configuration", "nlp val_ppl ↓", "vision test_acc ↑", "seeds"]
    rows = {r[0]: r for r in rows}
    assert rows["topk"] == ["topk", "5.5000 n=1", "0.8400 ± 0.0400 [0.7406, 0.9394] n=3", "3"]
    assert rows["hash"] == ["hash", "6.0000 n=1", "n/a", "1"]
    page = tmp_path / "docs" / "page.md"
    out = compare([sweep], tmp_path / "cmp", page=page, title="Study", commands=["python -m vision.train -m x"])
    text = page.read_text()
    assert text == out["markdown"] and text.startswith("# Study\n")
    assert "Test CPU, 2 torch threads of 2 CPUs; torch 9.9" in text and "2026-01-02" in text
    assert "python -m vision.train -m x" in text


def test_notes_file_goes_after_the_commands_and_a_missing_one_is_named(sweep, tmp_path, capsys):
    notes = tmp_path / "settings.md"
    notes.write_text("Settings: topk uses capacity factor 1.05, because V-MoE does.\n")
    page = tmp_path / "page.md"
    assert main([str(sweep), "--out", str(tmp_path / "cmp"), "--page", str(page), "--command", "make study",
                 "--notes", str(notes)]) == 0
    text = page.read_text()
    assert text.index("make study") < text.index("Settings: topk uses") < text.index("## Task quality")
    assert main([str(sweep), "--out", str(tmp_path / "cmp2"), "--notes", str(tmp_path / "nope.md")]) == 2
    err = capsys.readouterr().err
    assert "--notes" in err and "nope.md" in err and not (tmp_path / "cmp2").exists()


def test_tiny_real_multirun_gives_a_row_per_router(tmp_path):
    """Two routers through Hydra's multirun (recsys debug config, real processes) -> both rows."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "recsys.train", "-m", "+router=topk,expert_choice", "debug=default",
           f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert main([str(sweep), "--out", str(tmp_path / "cmp")]) == 0
    header, rows = quality_table(find_runs([sweep]))
    assert [r[0] for r in rows] == ["expert_choice", "topk"]
    assert all(r[1] not in ("", "n/a") and 0.0 <= float(r[1].split()[0]) <= 1.0 for r in rows)  # test AUC
    assert (tmp_path / "cmp" / "compare_recsys.png").stat().st_size > 0


@pytest.mark.parametrize("domain", ["vision", "recsys", "multimodal", "nlp"])
def test_router_study_and_launcher_configs_compose(domain):
    """experiment=router_study sweeps the same routers and seeds in every domain, the dense row sweeps
    seeds only, and the launcher/sweeper configs of the README resolve to Hydra's plugins."""
    from omegaconf import OmegaConf

    from tests.conftest import compose

    study = compose(domain, "experiment=router_study", "hydra/launcher=parallel", return_hydra_config=True)
    dense = compose(domain, "experiment=router_study_dense", "hydra/launcher=slurm", "hydra/sweeper=router_search",
                    return_hydra_config=True)
    params = OmegaConf.to_container(study.hydra.sweeper.params)
    assert params["+router"] == "topk,mixtral,expert_choice,soft" and "seed" in params
    assert "+router" not in OmegaConf.to_container(dense.hydra.sweeper.params or {})
    assert study.hydra.launcher._target_.endswith("JoblibLauncher")
    assert dense.hydra.launcher._target_.endswith("SlurmLauncher")
    assert dense.hydra.sweeper._target_.endswith("OptunaSweeper") and dense.hydra.sweeper.direction == "minimize"
