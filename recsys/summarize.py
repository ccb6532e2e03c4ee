"""Tabulate recsys runs: mean ± std over seeds of the test metrics, per model × router × data setting.

``python -m recsys.summarize multirun/recsys/mmoe_synthetic`` prints (and writes ``summary.md`` next
to the runs) a Markdown table with one row per (model, router) and one column per task correlation
for the synthetic data (test mean MSE), or one column per task metric (AUC, MSE) for other data;
routers that could not serve as gates (``status: n/a``) are listed below it.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

__all__ = ["collect", "main", "mean_std", "table"]


def collect(roots: list[str]) -> list[dict]:
    """Every ``metrics.json`` under the given directories, of recsys runs."""
    runs = []
    for root in roots:
        for path in sorted(Path(root).rglob("metrics.json")):
            m = json.loads(path.read_text())
            if m.get("domain") == "recsys":
                m["_path"] = str(path.parent)
                runs.append(m)
    return runs


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def _fmt(values: list[float], digits: int) -> str:
    if not values:
        return "—"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f} (n={len(values)})"


def table(runs: list[dict], metric: str = "test_mse_mean", digits: int = 4) -> str:
    """Markdown table. Synthetic runs: rows model (router), columns correlation, cells ``metric``.
    Other data: rows model (router), columns every ``test_<task>_auc`` / ``test_<task>_mse``."""
    na = [r for r in runs if r.get("status") == "n/a"]
    runs = [r for r in runs if r.get("status") != "n/a"]
    synthetic = [r for r in runs if r.get("data") == "synthetic"]
    other = [r for r in runs if r.get("data") != "synthetic"]
    parts = []
    if synthetic:
        cells: dict = defaultdict(list)
        ps = sorted({r["data_info"]["correlation"] for r in synthetic}, reverse=True)
        rows = []
        for r in synthetic:
            key = (r["model"], r["router"])
            if key not in rows:
                rows.append(key)
            cells[key, r["data_info"]["correlation"]].append(r[metric])
        head = "| model | router | " + " | ".join(f"p = {p}" for p in ps) + " |"
        lines = [f"{metric}, mean ± std over seeds", "", head, "|" + "---|" * (len(ps) + 2)]
        for key in rows:
            lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(_fmt(cells[key, p], digits) for p in ps) + " |")
        parts.append("\n".join(lines))
    for data in sorted({r.get("data") for r in other}):
        sel = [r for r in other if r.get("data") == data]
        cols = [k for k in sel[0] if k.startswith("test_") and (k.endswith("_auc") or k.endswith("_mse"))]
        rows, cells = [], defaultdict(list)
        for r in sel:
            key = (r["model"], r["router"])
            if key not in rows:
                rows.append(key)
            for c in cols:
                if c in r and r[c] == r[c]:   # skip NaN
                    cells[key, c].append(r[c])
        lines = [f"data: {data}, mean ± std over seeds", "",
                 "| model | router | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
        for key in rows:
            lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(_fmt(cells[key, c], digits) for c in cols) + " |")
        parts.append("\n".join(lines))
    if na:
        parts.append("\n".join(["n/a (the router cannot serve as a gate):", ""] + sorted(
            {f"- {r.get('model')} / {r.get('router')}: {r.get('reason')}" for r in na})))
    return "\n\n".join(parts)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="run or multirun directories")
    parser.add_argument("--metric", default="test_mse_mean", help="cell metric for synthetic runs")
    parser.add_argument("--digits", type=int, default=4)
    args = parser.parse_args(argv)
    runs = collect(args.dirs)
    if not runs:
        raise SystemExit(f"no recsys metrics.json under {args.dirs}")
    text = table(runs, args.metric, args.digits)
    print(text)
    (Path(args.dirs[0]) / "summary.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
