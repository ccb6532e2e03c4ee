"""core.compare on synthetic run directories: rows, columns, means ± std and n/a cells."""

import json

import pytest

from core.compare import compare, main


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
    header, rows = out["header"], {r[0]: r for r in out["rows"]}
    assert header[:3] == ["router", "seeds", "nlp val_ppl ↓"]
    assert "vision test_acc ↑" in header and "vision ex/s" in header
    assert list(rows) == ["none", "hash", "topk"]  # the dense baseline first
    col = header.index("vision test_acc ↑")
    assert rows["topk"][col] == "0.8200 ± 0.0283"  # mean ± sample std of 0.80 and 0.84
    assert rows["topk"][1] == "2"
    assert rows["none"][col] == "0.7900"
    assert rows["hash"][col] == "n/a"
    assert rows["none"][header.index("nlp val_ppl ↓")] == ""  # not run there
    assert rows["hash"][header.index("nlp val_ppl ↓")] == "6.0000"
    assert (tmp_path / "cmp" / "compare.md").read_text().count("\n") == 2 + 3
    assert (tmp_path / "cmp" / "compare.csv").exists()
    assert {p.name for p in out["plots"]} == {"compare_vision.png", "compare_nlp.png"}


def test_cli_reports_missing_directory(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
