"""Tabulate recsys runs: a view of ``core.compare`` with the synthetic data's task correlation as columns.

``python -m recsys.summarize multirun/recsys/mmoe_synthetic`` prints (and writes ``summary.md`` next
to the runs) a Markdown table with one row per model and configuration and one column per task
correlation for the synthetic data (test mean MSE), or one column per task metric (AUC, MSE) for other
data. Rows are ``core.compare``'s configurations (runs equal apart from the seed; the label names the
router and what differs, e.g. ``dense lr=0.01``; other budgets are other rows), a cell is
``mean ± std (n=k)`` over k distinct seeds. Routers that could not serve as gates (``status: n/a``)
and run directories that could not be read are listed below it. ``python -m core.compare`` gives the
full report (intervals, differences to a baseline, plots).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from core.compare import configurations, per_seed, scan

__all__ = ["collect", "main", "mean_std", "table"]

# the synthetic data's correlation is a column, not part of a row's configuration
CORRELATION = ("data.dataset.correlation",)


def collect(roots: list[str]) -> list[dict]:
    """Every readable recsys run under the given directories (``core.compare.scan``)."""
    runs, _ = scan(roots)
    return [r for r in runs if r.get("domain") == "recsys"]


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


def _rows(runs: list[dict], drop: tuple[str, ...] = ()) -> list[tuple[str, str, list[dict]]]:
    """``(model, configuration, runs)``, configurations labelled within each model."""
    models = list(dict.fromkeys(str(r.get("model")) for r in runs))
    return [(m, label, members) for m in models
            for label, members in configurations([r for r in runs if str(r.get("model")) == m], drop)]


def table(runs: list[dict], metric: str = "test_mse_mean", digits: int = 4) -> str:
    """Markdown table. Synthetic runs: rows model and configuration, columns correlation, cells
    ``metric``. Other data: rows model and configuration, columns every ``test_<task>_auc`` /
    ``test_<task>_mse``."""
    na = [r for r in runs if r.get("status") == "n/a"]
    runs = [r for r in runs if r.get("status") != "n/a"]
    synthetic = [r for r in runs if r.get("data") == "synthetic"]
    other = [r for r in runs if r.get("data") != "synthetic"]
    parts = []
    if synthetic:
        ps = sorted({r["data_info"]["correlation"] for r in synthetic}, reverse=True)
        head = "| model | router | " + " | ".join(f"p = {p}" for p in ps) + " |"
        lines = [f"{metric}, mean ± std over seeds", "", head, "|" + "---|" * (len(ps) + 2)]
        for model, label, members in _rows(synthetic, CORRELATION):
            cells = [list(per_seed([r for r in members if r["data_info"]["correlation"] == p], metric).values())
                     for p in ps]
            lines.append(f"| {model} | {label} | " + " | ".join(_fmt(c, digits) for c in cells) + " |")
        parts.append("\n".join(lines))
    for data in sorted({r.get("data") for r in other}):
        sel = [r for r in other if r.get("data") == data]
        cols = [k for k in sel[0] if k.startswith("test_") and (k.endswith("_auc") or k.endswith("_mse"))]
        lines = [f"data: {data}, mean ± std over seeds", "",
                 "| model | router | " + " | ".join(cols) + " |", "|" + "---|" * (len(cols) + 2)]
        for model, label, members in _rows(sel):
            lines.append(f"| {model} | {label} | "
                         + " | ".join(_fmt(list(per_seed(members, c).values()), digits) for c in cols) + " |")
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
    runs, problems = scan(args.dirs)
    runs = [r for r in runs if r.get("domain") == "recsys"]
    if not runs:
        raise SystemExit(f"no recsys metrics.json under {args.dirs}")
    text = table(runs, args.metric, args.digits)
    if problems:
        text += "\n\nRun directories not used:\n\n" + "\n".join(f"- `{p}`: {why}" for p, why in problems)
    print(text)
    (Path(args.dirs[0]) / "summary.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
