"""The cross-domain router comparison: ``python -m core.compare DIR... [--out DIR] [--page FILE]``.

Reads every ``metrics.json`` under the given run or multirun directories (any domain), groups runs
by (domain, router), and writes a Markdown report, a CSV and one PNG per domain (task quality
against training throughput). Rows are routers (``none`` is the dense baseline); columns are
domain × metric; a cell is ``mean ± std`` over seeds, ``n/a`` where the router does not apply to
the domain (a run that recorded ``status: n/a``) and blank where it was not run.

The report (``compare.md``, or ``--page``) opens with the command that made it, the machines and
dates of the runs and the commands given with ``--command``; then one table of task quality across
domains, then one table per domain with every metric. ``compare.csv`` holds the wide table.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import statistics
import sys
from collections import defaultdict
from pathlib import Path

# Columns shown for every domain after the quality metric: (metrics.json key, header, format).
COMMON = [
    ("examples_per_s", "ex/s", "{:.0f}"),
    ("params_active", "active params", "{:.3g}"),
    ("load_cv2", "load CV²", "{:.3f}"),
    ("dropped_fraction", "dropped", "{:.3f}"),
]
NA = "n/a"


def find_runs(paths: list[str | Path]) -> list[dict]:
    """Every ``metrics.json`` below ``paths`` (a run directory or a multirun tree)."""
    runs = []
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist: pass run or multirun directories that hold metrics.json files.")
        files = [root] if root.is_file() else sorted(root.rglob("metrics.json"))
        for f in files:
            try:
                m = json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as err:
                print(f"warning: skipping unreadable {f}: {err}", file=sys.stderr)
                continue
            if "domain" not in m or "router" not in m:
                print(f"warning: skipping {f}: it names no domain or router", file=sys.stderr)
                continue
            m["_path"] = str(f.parent)
            runs.append(m)
    return runs


def quality_key(domain: str, runs: list[dict]) -> tuple[str | None, bool]:
    """The quality metric of this domain's runs and whether higher is better: what the runs recorded
    (``metric``, ``higher_is_better``), else the domain task's headline metric (``core.run``'s
    registry) when the runs have it."""
    for run in runs:
        if isinstance(run.get("metric"), str):
            return run["metric"], bool(run.get("higher_is_better", True))
    try:
        from core.run import task_class

        task = task_class(domain)
    except (ValueError, ImportError):
        return None, True
    if any(isinstance(r.get(task.metric), (int, float)) for r in runs):
        return task.metric, task.higher_is_better
    return None, True


def row_label(run: dict) -> str:
    label = str(run["router"])
    if run.get("noncausal"):
        label += " (non-causal)"
    return label


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _fmt(values: list[float], spec: str) -> str:
    mean, std = _mean_std(values)
    text = spec.format(mean)
    return text if std is None else f"{text} ± {spec.format(std)}"


def build_table(runs: list[dict]) -> tuple[list[str], list[list[str]], dict]:
    """Header, rows and the raw cell values ``{(router, domain, key): [values]}``."""
    by_domain: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_domain[r["domain"]].append(r)
    domains = sorted(by_domain)
    columns: list[tuple[str, str, str, str]] = []  # (domain, key, header, fmt)
    for d in domains:
        key, higher = quality_key(d, by_domain[d])
        if key is not None:
            arrow = "↑" if higher else "↓"
            columns.append((d, key, f"{d} {key} {arrow}", "{:.4f}"))
        columns += [(d, k, f"{d} {h}", f) for k, h, f in COMMON]
    values: dict = defaultdict(list)
    not_applicable: set = set()
    routers: set[str] = set()
    for r in runs:
        label = row_label(r)
        routers.add(label)
        if r.get("status") == NA:
            not_applicable.add((label, r["domain"]))
            continue
        for d, key, _, _ in columns:
            if d == r["domain"] and isinstance(r.get(key), (int, float)) and math.isfinite(r[key]):
                values[(label, d, key)].append(float(r[key]))
    order = sorted(routers, key=lambda x: (x != "none", x))
    header = ["router", "seeds"] + [c[2] for c in columns]
    rows = []
    for label in order:
        seeds = {len(values[(label, d, k)]) for d, k, _, _ in columns if values.get((label, d, k))}
        row = [label, str(max(seeds)) if seeds else "0"]
        for d, key, _, spec in columns:
            if (label, d) in not_applicable and not values.get((label, d, key)):
                row.append(NA)
            elif values.get((label, d, key)):
                row.append(_fmt(values[(label, d, key)], spec))
            else:
                row.append("")
        rows.append(row)
    return header, rows, {"columns": columns, "values": values, "domains": domains}


def quality_table(runs: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Routers × domains, each cell the domain's task-quality metric (``mean ± std``, ``n/a``, or
    blank where not run), then the number of seeds behind each cell."""
    header, rows, raw = build_table(runs)
    qcols = [i for i, c in enumerate(raw["columns"]) if c[1] not in {k for k, _, _ in COMMON}]
    out_header = ["router"] + [raw["columns"][i][2] for i in qcols] + ["seeds"]
    out_rows = [[r[0]] + [r[2 + i] for i in qcols] + [r[1]] for r in rows]
    return out_header, out_rows


def _provenance(runs: list[dict]) -> list[str]:
    machines = sorted({str(r["machine"]) for r in runs if r.get("machine")})
    dates = sorted(str(r["finished_at"])[:10] for r in runs if r.get("finished_at"))
    lines = []
    if dates:
        lines.append(f"- runs finished: {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else ""))
    lines.append("- machine: " + ("; ".join(machines) if machines else "not recorded in metrics.json"))
    devices = sorted({f"{r.get('device')} {r.get('precision')}" for r in runs if r.get("device")})
    if devices:
        lines.append("- device and precision: " + ", ".join(devices))
    return lines


def report(runs: list[dict], title: str = "Router comparison", commands: list[str] | None = None,
           invocation: str | None = None) -> str:
    """The Markdown report: provenance, the cross-domain quality table, one full table per domain."""
    parts = [f"# {title}", ""]
    if invocation:
        parts += [f"Generated by `{invocation}` from {len(runs)} runs.", ""]
    parts += _provenance(runs) + [""]
    if commands:
        parts += ["Commands:", "", "```sh", *commands, "```", ""]
    parts += ["## Task quality across domains", "",
              "↑: higher is better, ↓: lower is better; mean ± std over seeds; n/a: the router does not "
              "apply to the domain; blank: not run.", "", to_markdown(*quality_table(runs))]
    by_domain: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_domain[r["domain"]].append(r)
    for d in sorted(by_domain):
        header, rows, _ = build_table(by_domain[d])
        parts += [f"## {d}", "", to_markdown(header, rows)]
        reasons = sorted({f"{row_label(r)}: {r['reason']}" for r in by_domain[d]
                          if r.get("status") == NA and r.get("reason")})
        if reasons:
            parts += ["Not applicable:", ""] + [f"- {x}" for x in reasons] + [""]
    return "\n".join(parts)


def to_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(raw: dict, out_dir: Path) -> list[Path]:
    """One PNG per domain: quality (mean, ± std bars) against training examples/s, one point per router."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    values = raw["values"]
    for d in raw["domains"]:
        qcols = [c for c in raw["columns"] if c[0] == d and c[1] not in {k for k, _, _ in COMMON}]
        if not qcols:
            continue
        qkey = qcols[0][1]
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for (label, dom, key), qs in sorted(values.items()):
            if dom != d or key != qkey:
                continue
            speeds = values.get((label, d, "examples_per_s"))
            if not speeds:
                continue
            qm, qs_std = _mean_std(qs)
            sm, ss_std = _mean_std(speeds)
            ax.errorbar(sm, qm, yerr=qs_std or 0, xerr=ss_std or 0, fmt="o", capsize=3)
            ax.annotate(label, (sm, qm), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("training examples/s")
        ax.set_ylabel(qkey)
        ax.set_title(f"{d}: quality vs throughput")
        ax.grid(alpha=0.3)
        path = out_dir / f"compare_{d}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def compare(paths: list[str | Path], out_dir: str | Path, page: str | Path | None = None,
            title: str = "Router comparison", commands: list[str] | None = None,
            invocation: str | None = None) -> dict:
    """Write ``compare.md`` (the report), ``compare.csv`` and ``compare_<domain>.png`` into
    ``out_dir``, and the report also to ``page`` when given."""
    runs = find_runs(paths)
    if not runs:
        raise FileNotFoundError(f"no metrics.json with a domain and a router found under {[str(p) for p in paths]}.")
    header, rows, raw = build_table(runs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = report(runs, title, commands, invocation)
    (out / "compare.md").write_text(markdown)
    if page is not None:
        Path(page).parent.mkdir(parents=True, exist_ok=True)
        Path(page).write_text(markdown)
    with open(out / "compare.csv", "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])
    plots = plot(raw, out)
    return {"markdown": markdown, "quality_markdown": to_markdown(*quality_table(runs)), "header": header, "rows": rows, "plots": plots, "num_runs": len(runs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="run or multirun directories (searched for metrics.json)")
    parser.add_argument("--out", default="comparison", help="directory for compare.md, compare.csv and the plots")
    parser.add_argument("--page", default=None, help="also write the report to this Markdown file (a results page)")
    parser.add_argument("--title", default="Router comparison", help="the report's title")
    parser.add_argument("--command", action="append", default=[], help="a command that produced the runs (repeatable)")
    args = parser.parse_args(argv)
    invocation = "python -m core.compare " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        result = compare(args.dirs, args.out, args.page, args.title, args.command, invocation)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result["quality_markdown"])
    print(f"{result['num_runs']} runs; wrote {args.out}/compare.md, compare.csv and {len(result['plots'])} plot(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
