"""The cross-domain router comparison: ``python -m core.compare DIR... [--out DIR] [--page FILE]``.

Reads every run directory under the given run or multirun directories (any domain): its
``metrics.json`` and the composed config it ran with (``config.yaml``, written by ``core.run``; the
``debug`` overlay is read from Hydra's ``.hydra/hydra.yaml``). Writes a Markdown report, a CSV and
one PNG per domain.

- **A row is one configuration.** Two runs share a row only when their composed configs are equal
  apart from the seed (and keys that follow it, such as ``data.dataset.seed: ${seed}``) and the keys
  that say where and how a run reports (``IGNORED``: output paths, logging and checkpoint cadence,
  the device, threads). A row's label is the router (``none`` is the
  dense baseline) followed by the keys whose values differ between rows of the same router, e.g.
  ``topk lr=0.01``.
- **n counts distinct seeds.** Runs of one configuration with the same seed are one seed: their values
  are averaged and the report says so.
- **Cells**: mean ± sample std, the 95% Student-t confidence interval of the mean
  (mean ± t₀.₉₇₅,ₙ₋₁·s/√n) and n. Each table has a column with the difference of the quality metric to
  the domain's baseline row (``--baseline``, default ``none``) and its 95% interval: paired by seed
  over the seeds both rows have when they share at least two, Welch's unequal-variance interval
  otherwise (Student 1908; Welch 1947).
- **Budgets are never averaged together.** Runs whose budget (``BUDGET``: step and epoch limits,
  data caps, the ``debug`` overlay; and the device and precision they ran at) differs from the most
  common one of their domain go into a separate table headed by what differs.
- **Nothing is dropped silently.** Unreadable ``metrics.json`` or ``config.yaml`` files and run
  directories without ``metrics.json`` (unfinished or crashed runs) are listed in the report with the
  reason, as are runs without a ``config.yaml`` (grouped by the settings ``metrics.json`` records).

``compare.md`` (or ``--page``) opens with the command that made it, the machines and dates of the
runs and the commands given with ``--command``; then one table of task quality across domains (main
budget tables only), then every table of every domain. ``compare.csv`` has one line per row of every
table: ``domain, budget, configuration, router, metric, seeds, n, mean, std, ci95`` (the half-width),
``ci95_low, ci95_high``, the difference to the baseline and its interval, then the other metrics.
``compare_<domain>.png`` plots quality (95% interval as error bars) against training examples/s.

Runs that wrote the routing analyses (``analysis.enabled``, ``core.analytics``) get one line each in
a section "Routing analyses": the share of routing explained by each label (token id, patch position,
class, modality), early routing learning (agreement of each snapshot with the end), drop rate in the
first and last quarter of positions without BPR, and X-MoE's representation-collapse measure.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import statistics
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

# Columns shown for every domain after the quality metric: (metrics.json key, header, format).
COMMON = [
    ("flops_per_example", "FLOPs/ex", "{:.3g}"),
    ("examples_per_s", "ex/s", "{:.0f}"),
    ("params_active", "active params", "{:.3g}"),
    ("load_cv2", "load CV²", "{:.3f}"),
    ("dropped_fraction", "dropped", "{:.3f}"),
    # mean entropy (nats) of a token's routing distribution: ln E (2.08 for 8 experts) is uniform routing
    ("routing_entropy", "entropy", "{:.2f}"),
]
NA = "n/a"
# config keys (and everything below them) that do not make a run another configuration: the seed,
# names, where the run writes, how often it reports or checkpoints, what it runs on
IGNORED = (
    "seed", "output_dir", "router_name", "model_name", "task", "threads", "sharding", "hydra",
    "trainer.device", "trainer.resume", "trainer.progress", "trainer.log_every_steps", "trainer.checkpoint",
    "trainer.checkpoint_every_steps", "trainer.save_model", "trainer.expert_parallel", "trainer.expert_parallel_size",
    "trainer.data_parallel",
    "trainer.eval_every_epochs",
    "data.root", "data.system_dir", "data.download",
)
# keys that set a run's budget: runs that differ here are listed in separate tables, never averaged
BUDGET = ("trainer.max_steps", "trainer.max_epochs", "data.limit_train", "data.limit_eval", "debug")
# what a run without config.yaml is grouped by (the settings metrics.json records)
METRICS_IDENTITY = ("model", "dataset", "num_experts", "moe_blocks")
UNSET = "unset"


@dataclass
class Stat:
    """Mean, sample std, n and the 95% Student-t interval of one row's values (one per seed)."""

    values: list[float]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float | None:
        return statistics.stdev(self.values) if self.n > 1 else None

    @property
    def ci95(self) -> float | None:
        """Half-width of the 95% interval of the mean; None for one value."""
        return None if self.n < 2 else t_quantile(self.n - 1) * self.std / math.sqrt(self.n)


def t_quantile(dof: float, level: float = 0.95) -> float:
    """The two-sided Student-t quantile (``scipy.stats.t``)."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, dof))


@dataclass
class Diff:
    """A row's quality minus the baseline row's, with its 95% interval and how it was formed."""

    value: float
    half: float | None
    test: str  # "paired n=3", "Welch", "" (no interval possible)


def difference(row: dict[object, float], base: dict[object, float]) -> Diff:
    """``row - base`` over per-seed values: paired by seed when both have at least two seeds in
    common (the t interval of the per-seed differences), else Welch's interval of two means."""
    common = sorted(set(row) & set(base), key=str)
    if len(common) >= 2:
        s = Stat([row[k] - base[k] for k in common])
        return Diff(s.mean, s.ci95, f"paired n={len(common)}")
    a, b = Stat(list(row.values())), Stat(list(base.values()))
    value = a.mean - b.mean
    if a.n < 2 or b.n < 2:
        return Diff(value, None, "")
    va, vb = a.std ** 2 / a.n, b.std ** 2 / b.n
    se = math.sqrt(va + vb)
    if se == 0:
        return Diff(value, 0.0, "Welch")
    dof = (va + vb) ** 2 / (va ** 2 / (a.n - 1) + vb ** 2 / (b.n - 1))  # Welch-Satterthwaite
    return Diff(value, t_quantile(dof) * se, "Welch")


# ------------------------------------------------------------------------------------- reading runs


def _flatten(node, prefix: str = "") -> dict[str, str]:
    """``{"a.b.c": json text}`` for every leaf of a nested config (lists are leaves)."""
    if isinstance(node, dict) and node:
        out = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(node, sort_keys=True, default=str)}


def _under(key: str, names: tuple[str, ...]) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def _read_yaml(path: Path):
    import yaml

    return yaml.safe_load(path.read_text())


def _debug_choice(run_dir: Path) -> str | None:
    """The ``debug`` overlay Hydra recorded for this run (None when not recorded)."""
    path = run_dir / ".hydra" / "hydra.yaml"
    if not path.is_file():
        return None
    try:
        choices = (_read_yaml(path) or {}).get("hydra", {}).get("runtime", {}).get("choices", {}) or {}
    except Exception:  # noqa: BLE001 - an unreadable hydra.yaml only loses the debug choice; config.yaml still rules
        return None
    return choices.get("debug")


def scan(paths: list[str | Path]) -> tuple[list[dict], list[tuple[str, str]]]:
    """Every run below ``paths`` (run directories or multirun trees) and the directories that could not
    be used, as ``(path, reason)``. A run is its ``metrics.json`` plus ``_path``, ``_config`` (the
    flattened composed config, or None without ``config.yaml``) and ``_seed``."""
    runs, problems = [], []
    for root in map(Path, paths):
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist: pass run or multirun directories that hold metrics.json files.")
        files = [root] if root.is_file() else sorted(root.rglob("metrics.json"))
        for f in files:
            try:
                m = json.loads(f.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                problems.append((str(f.parent), f"unreadable metrics.json: {err}"))
                continue
            if not isinstance(m, dict) or "domain" not in m or "router" not in m:
                problems.append((str(f.parent), "metrics.json names no domain or router"))
                continue
            m["_path"], m["_config"] = str(f.parent), None
            config = f.parent / "config.yaml"
            if config.is_file():
                try:
                    composed = _read_yaml(config)
                except Exception as err:  # noqa: BLE001 - listed in the report, not swallowed
                    problems.append((str(f.parent), f"unreadable config.yaml: {str(err).splitlines()[0]}"))
                    continue
                flat = _flatten(composed if isinstance(composed, dict) else {})
                flat["debug"] = json.dumps(_debug_choice(f.parent))
                m["_config"] = flat
                m["_seed"] = composed.get("seed", m.get("seed")) if isinstance(composed, dict) else m.get("seed")
            else:
                m["_seed"] = m.get("seed")
            runs.append(m)
        if root.is_dir():  # run directories that never wrote metrics.json
            dirs = {p.parent for p in root.rglob("config.yaml") if p.parent.name != ".hydra"}
            dirs |= {p.parent.parent for p in root.rglob(".hydra/config.yaml")}
            for d in sorted(dirs):
                if not (d / "metrics.json").exists():
                    problems.append((str(d), "no metrics.json: the run did not finish (its train.log may say why)"))
    return runs, problems


def find_runs(paths: list[str | Path]) -> list[dict]:
    """Every readable run below ``paths`` (see ``scan``; the others are warned about on stderr)."""
    runs, problems = scan(paths)
    for path, reason in problems:
        print(f"warning: skipping {path}: {reason}", file=sys.stderr)
    return runs


def row_label(run: dict) -> str:
    """The router part of a row's label."""
    label = str(run["router"])
    if run.get("noncausal"):
        label += " (non-causal)"
    return label


def seed_derived_keys(runs: list[dict]) -> set[str]:
    """Config keys that follow the seed (``data.dataset.seed: ${seed}``, resolved in ``config.yaml``):
    named ``*seed*`` and equal to the run's seed in every run that has them."""
    keys = {k for r in runs if r["_config"] for k in r["_config"] if "seed" in k.rsplit(".", 1)[-1] and k != "seed"}
    return {k for k in keys if all(json.loads(r["_config"][k]) == r.get("_seed")
                                   for r in runs if r["_config"] and k in r["_config"])}


# the names metrics.json gives a run's model and data (``model=ple``, ``data=adult``): a label shows
# them, instead of every model or data key, when they differ between rows of one router
NAMED = (("model", ("model",)), ("data", ("data", "dataset")))


def _names(run: dict) -> tuple:
    out = []
    for label, keys in NAMED:
        value = next((run[k] for k in keys if isinstance(run.get(k), str)), None)
        out.append((f"~{label}", json.dumps(value)))
    return tuple(out)


def _identity(run: dict, follow_seed: set[str] = frozenset()) -> tuple:
    """``(("router", label), ("~model", name), ("~data", name), *config items)``: equal for two runs
    exactly when they are one configuration."""
    head = (("router", json.dumps(row_label(run))),) + _names(run)
    if run["_config"] is None:
        return head + tuple((k, json.dumps(run.get(k), default=str)) for k in METRICS_IDENTITY if k in run)
    return head + tuple(sorted(
        (k, v) for k, v in run["_config"].items()
        if not _under(k, IGNORED) and not _under(k, BUDGET) and k not in follow_seed))


def _budget(run: dict) -> tuple:
    """The run's budget keys, then the device and precision it ran at (``metrics.json``: a cuda bf16
    run is not averaged with cpu fp32 runs; the CPU model and thread count are not part of it)."""
    where = (("device", json.dumps(f"{run['device']} {run.get('precision')}")),) if run.get("device") else ()
    if run["_config"] is None:
        return where
    return tuple((k, run["_config"].get(k, json.dumps(None))) for k in BUDGET) + where


def _show(text: str) -> str:
    value = json.loads(text)
    if isinstance(value, float):
        return f"{value:g}"
    return "null" if value is None else str(value) if not isinstance(value, (list, dict)) else json.dumps(value)


def budget_text(budget: tuple) -> str:
    return ", ".join(f"{k}={_show(v)}" for k, v in budget) or "not recorded (no config.yaml)"


def _budget_difference(budget: tuple, main: tuple) -> tuple:
    """The entries of ``budget`` that differ from (or are missing in) the main table's ``main``."""
    ref = dict(main)
    return tuple((k, v) for k, v in budget if ref.get(k) != v) or budget


# ----------------------------------------------------------------------------------------- tables


# what a label shows after the router: (name shown, value shown, config key; ``~model`` / ``~data``
# for the names metrics.json gives)
Setting = tuple[str, str, str]


@dataclass
class Row:
    label: str
    router: str
    runs: list[dict]
    settings: tuple[Setting, ...] = ()  # what the label shows after the router
    not_applicable: bool = False
    # metric -> {seed: value averaged over that seed's runs}
    per_seed: dict[str, dict] = field(default_factory=dict)
    repeated: dict = field(default_factory=dict)  # seed -> number of runs with that seed (> 1)

    def stat(self, key: str) -> Stat | None:
        values = self.per_seed.get(key)
        return Stat(list(values.values())) if values else None

    @property
    def seeds(self) -> int:
        return max((len(v) for v in self.per_seed.values()), default=0)


@dataclass
class Table:
    """One domain's rows at one budget."""

    domain: str
    budget: tuple
    main: bool
    metric: str | None
    higher_is_better: bool
    rows: list[Row]
    baseline: Row | None
    diffs: dict[str, Diff]  # label -> difference to the baseline


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


def _varying(dicts: list[dict]) -> list[str]:
    """Config keys whose values differ between ``dicts``; of keys that agree in every one (the model
    reads the router node: ``model.gate.top_k`` repeats ``router.top_k``) only the shortest name."""
    keys = sorted({k for d in dicts for k in d if not k.startswith("~")})
    varying = [k for k in keys if len({d.get(k, UNSET) for d in dicts}) > 1]
    kept: list[str] = []
    for k in sorted(varying, key=lambda k: (k.count("."), k)):
        if not any(all(d.get(k, UNSET) == d.get(o, UNSET) for d in dicts) for o in kept):
            kept.append(k)
    return sorted(kept)


def _label_text(head: str, settings: tuple[Setting, ...]) -> str:
    return " ".join([head, *(f"{name}={value}" for name, value, _ in settings)])


def _labels(groups: dict[tuple, list[dict]]) -> dict[tuple, tuple[str, tuple[Setting, ...]]]:
    """Per group, the router name and the settings its label shows: the model and data names where
    they differ between rows of that router (``topk model=ple``); then the keys whose values differ
    between rows of the same router, model and data (``topk lr=0.01``)."""
    by_router: dict[str, list[dict]] = defaultdict(list)
    for ident in groups:
        by_router[json.loads(ident[0][1])].append(dict(ident))
    labels = {}
    for router, dicts in by_router.items():
        shown = [n for n, _ in NAMED if len({d[f"~{n}"] for d in dicts}) > 1]
        subgroups: dict[tuple, list[dict]] = defaultdict(list)
        for d in dicts:
            subgroups[tuple(d[f"~{n}"] for n in shown)].append(d)
        for names, members in subgroups.items():
            varying = _varying(members)
            tails = Counter(k.rsplit(".", 1)[-1] for k in varying)
            for d in members:
                settings = [(n, _show(v), f"~{n}") for n, v in zip(shown, names)]
                for k in varying:
                    name = k.rsplit(".", 1)[-1] if tails[k.rsplit(".", 1)[-1]] == 1 else k
                    settings.append((name, _show(d[k]) if k in d else UNSET, k))
                labels[tuple(d.items())] = (router, tuple(settings))
    return labels


def configurations(runs: list[dict], drop: tuple[str, ...] = ()) -> list[tuple[str, list[dict]]]:
    """``runs`` (from ``scan``) grouped into configurations as the tables group them, except that the
    budget is part of the configuration (its keys join the label where they differ) and config keys
    under ``drop`` are left out (a view that makes them columns); labelled, in first-seen order."""
    follow_seed = seed_derived_keys(runs)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[tuple(kv for kv in _identity(r, follow_seed) if not _under(kv[0], drop)) + _budget(r)].append(r)
    labels = _labels(groups)
    return [(_label_text(*labels[ident]), members) for ident, members in groups.items()]


def per_seed(runs: list[dict], key: str) -> dict[str, float]:
    """``{seed: value}`` of ``key`` over ``runs``, runs of one seed averaged (n = distinct seeds)."""
    by_seed: dict[str, list[float]] = defaultdict(list)
    for r in runs:
        v = r.get(key)
        if r.get("status") != NA and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            by_seed[_seed_key(r)].append(float(v))
    return {s: statistics.fmean(v) for s, v in by_seed.items()}


def _metric_keys(metric: str | None) -> list[str]:
    return ([metric] if metric else []) + [k for k, _, _ in COMMON]


def build_tables(runs: list[dict], baseline: str = "none") -> list[Table]:
    """Per domain: the table at its most common budget, then one per other budget."""
    by_domain: dict[str, list[dict]] = defaultdict(list)
    for r in runs:
        by_domain[r["domain"]].append(r)
    tables = []
    for domain in sorted(by_domain):
        metric, higher = quality_key(domain, by_domain[domain])
        by_budget: dict[tuple, list[dict]] = defaultdict(list)
        for r in by_domain[domain]:
            by_budget[_budget(r)].append(r)
        _join_refused_runs(by_budget)
        ran = {b: sum(r.get("status") != NA for r in rs) for b, rs in by_budget.items()}
        order = sorted(by_budget, key=lambda b: (-ran[b], -len(by_budget[b]), str(b)))
        follow_seed = seed_derived_keys(by_domain[domain])
        for i, budget in enumerate(order):
            tables.append(_table(domain, budget, i == 0, metric, higher, by_budget[budget], baseline, follow_seed))
    return tables


def _join_refused_runs(by_budget: dict[tuple, list[dict]]) -> None:
    """A run refused before it started (n/a) records no device: move the runs of a budget without one
    into the budget with a device that is otherwise equal and holds the most runs, if there is one."""
    for budget in [b for b in by_budget if "device" not in dict(b)]:
        same = [b for b in by_budget if "device" in dict(b) and tuple(kv for kv in b if kv[0] != "device") == budget]
        if same and all(r.get("status") == NA for r in by_budget[budget]):
            target = max(same, key=lambda b: len(by_budget[b]))
            by_budget[target] += by_budget.pop(budget)


def _seed_key(run: dict) -> str:
    """What makes a seed distinct: its value, or the run itself when it recorded none."""
    return f"seed {_show(json.dumps(run['_seed'], default=str))}" if run.get("_seed") is not None else f"run {run['_path']} (no seed)"


def _table(domain, budget, main, metric, higher, runs, baseline, follow_seed=frozenset()) -> Table:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in runs:
        groups[_identity(r, follow_seed)].append(r)
    labels = _labels(groups)
    rows = []
    for ident, members in groups.items():
        row = Row(_label_text(*labels[ident]), row_label(members[0]), members, settings=labels[ident][1])
        seed_runs = Counter(_seed_key(r) for r in members if r.get("status") != NA)
        row.repeated = {s: c for s, c in seed_runs.items() if c > 1}
        row.not_applicable = all(r.get("status") == NA for r in members)
        for key in _metric_keys(metric):
            values = per_seed(members, key)
            if values:
                row.per_seed[key] = values
        rows.append(row)
    rows.sort(key=lambda r: (r.router != baseline, r.label))
    base = next((r for r in rows if r.router == baseline or r.label == baseline), None)
    diffs = {}
    if base is not None and metric and base.per_seed.get(metric):
        for r in rows:
            if r is not base and r.per_seed.get(metric):
                diffs[r.label] = difference(r.per_seed[metric], base.per_seed[metric])
    return Table(domain, budget, main, metric, higher, rows, base, diffs)


def _f(x: float, spec: str) -> str:
    return spec.format(x)


def fmt_stat(s: Stat, spec: str = "{:.4f}", interval: bool = True) -> str:
    """``mean ± std [low, high] n=k`` (one value: ``mean n=1``); ``mean ± std`` without ``interval``."""
    if not interval:
        return _f(s.mean, spec) if s.n == 1 else f"{_f(s.mean, spec)} ± {_f(s.std, spec)}"
    if s.n == 1:
        return f"{_f(s.mean, spec)} n=1"
    return f"{_f(s.mean, spec)} ± {_f(s.std, spec)} [{_f(s.mean - s.ci95, spec)}, {_f(s.mean + s.ci95, spec)}] n={s.n}"


def fmt_diff(d: Diff, spec: str = "{:+.4f}") -> str:
    if d.half is None:
        return f"{_f(d.value, spec)} (no interval: n=1)"
    return f"{_f(d.value, spec)} [{_f(d.value - d.half, spec)}, {_f(d.value + d.half, spec)}] {d.test}"


def table_rows(t: Table) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one table as text."""
    header = ["configuration", "seeds"]
    if t.metric:
        header += [f"{t.metric} {'↑' if t.higher_is_better else '↓'}",
                   f"Δ vs {t.baseline.label if t.baseline else 'baseline'}"]
    header += [h for _, h, _ in COMMON]
    rows = []
    for r in t.rows:
        cells = [r.label, str(r.seeds)]
        if t.metric:
            s = r.stat(t.metric)
            cells.append(NA if r.not_applicable else fmt_stat(s) if s else "")
            cells.append("baseline" if r is t.baseline else fmt_diff(t.diffs[r.label]) if r.label in t.diffs else "")
        for key, _, spec in COMMON:
            s = r.stat(key)
            cells.append(NA if r.not_applicable else fmt_stat(s, spec, interval=False) if s else "")
        rows.append(cells)
    return header, rows


def quality_table(runs_or_tables, baseline: str = "none") -> tuple[list[str], list[list[str]]]:
    """Configurations × domains (main-budget tables), each cell the domain's task-quality metric
    (``mean ± std [95% interval] n``, ``n/a``, or blank where not run), then the seeds of the row."""
    tables = runs_or_tables if runs_or_tables and isinstance(runs_or_tables[0], Table) else build_tables(runs_or_tables, baseline)
    tables = [t for t in tables if t.main and t.metric]
    header = ["configuration"] + [f"{t.domain} {t.metric} {'↑' if t.higher_is_better else '↓'}" for t in tables] + ["seeds"]
    cross = _cross_labels(tables)
    labels = sorted(set(cross.values()), key=lambda x: (x.split(" ")[0] != baseline, x))
    out = []
    for label in labels:
        cells, seeds = [label], 0
        for t in tables:
            row = next((r for r in t.rows if cross[(t.domain, r.label)] == label), None)
            s = row.stat(t.metric) if row else None
            cells.append("" if row is None else NA if row.not_applicable else fmt_stat(s) if s else "")
            seeds = max(seeds, row.seeds if row else 0)
        out.append(cells + [str(seeds)])
    return header, out


def _cross_labels(tables: list[Table]) -> dict[tuple[str, str], str]:
    """(domain, row label) -> the row's label across domains. A domain's labels show the router keys
    that differ between its own rows of a router; across domains every row of that router shows the
    router keys any domain shows, so equal settings share a line (one domain's ``soft
    slots_per_expert=1`` and another's ``soft normalize=False`` are both ``soft normalize=False
    slots_per_expert=1`` when both ran with normalize=false and one slot)."""
    rows = [(t.domain, r) for t in tables for r in t.rows]
    shown: dict[str, set[str]] = defaultdict(set)  # router -> router keys some domain's label shows
    for _, r in rows:
        shown[r.router] |= {key for _, _, key in r.settings if key.startswith("router.")}
    out = {}
    for domain, r in rows:
        config = r.runs[0].get("_config") or {}
        own = {s[2]: s for s in r.settings}
        other = tuple(s for s in r.settings if s[2] not in shown[r.router])
        router_keys = tuple(own.get(key) or (key.removeprefix("router."), _show(config[key]), key)
                            for key in sorted(shown[r.router]) if key in own or key in config)
        out[(domain, r.label)] = _label_text(r.router, other + router_keys)
    return out


CSV_HEADER = ["domain", "budget", "main_budget", "configuration", "router", "metric", "seeds", "n", "mean", "std",
              "ci95", "ci95_low", "ci95_high", "diff_to_baseline", "diff_ci95_low", "diff_ci95_high", "diff_test",
              *[k for k, _, _ in COMMON], "runs"]


def csv_rows(tables: list[Table]) -> list[list]:
    """One line per row of every table (numbers unformatted)."""
    out = []
    for t in tables:
        for r in t.rows:
            s = r.stat(t.metric) if t.metric else None
            d = t.diffs.get(r.label)
            line = [t.domain, budget_text(t.budget), t.main, r.label, r.router, t.metric or "",
                    r.seeds, s.n if s else 0]
            if s is None:
                line += [NA if r.not_applicable else ""] + [""] * 5
            else:
                line += [s.mean, s.std if s.std is not None else "", s.ci95 if s.ci95 is not None else "",
                         s.mean - s.ci95 if s.ci95 is not None else "", s.mean + s.ci95 if s.ci95 is not None else ""]
            if d is None:
                line += ["", "", "", "baseline" if r is t.baseline else ""]
            else:
                line += [d.value, "" if d.half is None else d.value - d.half, "" if d.half is None else d.value + d.half, d.test]
            for key, _, _ in COMMON:
                c = r.stat(key)
                line.append(c.mean if c else "")
            line.append(";".join(x["_path"] for x in r.runs))
            out.append(line)
    return out


# ----------------------------------------------------------------------------------------- report


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


def _table_notes(t: Table) -> list[str]:
    notes = []
    for r in t.rows:
        for seed, count in sorted(r.repeated.items()):
            notes.append(f"- {r.label}: {seed} has {count} runs; "
                         "their values are averaged and counted as one seed")
    if t.metric and t.baseline is None:
        notes.append("- no baseline row in this table: pass --baseline <router or configuration> for the Δ column")
    reasons = sorted({f"{r.label}: {x['reason']}" for r in t.rows for x in r.runs
                      if x.get("status") == NA and x.get("reason")})
    if reasons:
        notes += ["- not applicable:"] + [f"  - {x}" for x in reasons]
    loose = [r.label for r in t.rows if any(x["_config"] is None for x in r.runs)]
    if loose:
        notes.append("- without config.yaml (grouped by the router and the settings metrics.json records): "
                     + ", ".join(loose))
    return notes


def report(runs: list[dict], title: str = "Router comparison", commands: list[str] | None = None,
           invocation: str | None = None, problems: list[tuple[str, str]] | None = None,
           baseline: str = "none", notes: str | None = None) -> str:
    """The Markdown report: provenance, the commands and ``notes`` (Markdown: the settings and why),
    the cross-domain quality table, every table of every domain, and the run directories that could
    not be used."""
    tables = build_tables(runs, baseline)
    parts = [f"# {title}", ""]
    if invocation:
        parts += [f"Generated by `{invocation}` from {len(runs)} runs.", ""]
    parts += _provenance(runs) + [""]
    if commands:
        parts += ["Commands:", "", "```sh", *commands, "```", ""]
    if notes:
        parts += [notes.strip(), ""]
    parts += ["## Task quality across domains", "",
              "A row is one configuration (runs equal apart from the seed); ↑: higher is better, ↓: lower is "
              "better; cells: mean ± std [95% Student-t interval] n = distinct seeds; n/a: the router does not "
              "apply to the domain; blank: not run. Runs at other budgets are in their domain's section.", "",
              to_markdown(*quality_table(tables, baseline))]
    for t in tables:
        if t.main:
            parts += [f"## {t.domain}", "", f"Budget: {budget_text(t.budget)}.", ""]
        else:
            main = next(m for m in tables if m.domain == t.domain and m.main)
            differ = _budget_difference(t.budget, main.budget)
            parts += [f"### {t.domain}, another budget: {budget_text(differ)}", "",
                      f"Listed apart, not averaged with the runs above. Budget: {budget_text(t.budget)}.", ""]
        parts += [to_markdown(*table_rows(t))]
        table_notes = _table_notes(t)
        if table_notes:
            parts += table_notes + [""]
    analyses = analysis_table(runs)
    if analyses is not None:
        parts += ["## Routing analyses", "",
                  "One line per run with `analysis.json` (`core.analytics`): explained by L = 1 − H(expert|L)/H(expert) "
                  "of each layer's top expert, mean over layers; agreement: share of labels whose modal top "
                  "expert at the snapshot step equals the final one (count-weighted); drops: share of tokens with a "
                  "dropped choice in the first → last quarter of positions (no BPR); gate span: share of the routed "
                  "tokens' variance in the span of the gate vectors (isotropic share in brackets); eff. rank / D.", "",
                  to_markdown(*analyses)]
    if problems:
        parts += ["## Run directories not used", ""] + [f"- `{p}`: {reason}" for p, reason in problems] + [""]
    return "\n".join(parts)


def analysis_table(runs: list[dict]) -> tuple[list[str], list[list[str]]] | None:
    """The routing analyses of every run that has them (``metrics.json``'s ``analysis``), or None."""
    with_analysis = [r for r in runs if isinstance(r.get("analysis"), dict)]
    if not with_analysis:
        return None
    header = ["domain", "configuration", "run", "explained by", "agreement (step)", "drops first → last",
              "gate span", "eff. rank / D"]
    rows = []
    for r in sorted(with_analysis, key=lambda r: (r["domain"], row_label(r), r["_path"])):
        a = r["analysis"]
        explained = ", ".join(f"{k[len('explained_by_'):]} {_f(v, '{:.3f}')}" for k, v in a.items()
                              if k.startswith("explained_by_") and v is not None) or NA
        agree = ", ".join(f"{_f(v, '{:.2f}')} ({s})" for s, v in (a.get("routing_agreement") or {}).items()) or NA
        drop = a.get("drop_rate_no_bpr")
        drops = f"{_f(drop['first_quarter'], '{:.3f}')} → {_f(drop['last_quarter'], '{:.3f}')}" if drop else NA
        span = (f"{_f(a['gate_span_share'], '{:.3f}')} [{_f(a.get('gate_span_isotropic'), '{:.3f}')}]"
                if a.get("gate_span_share") is not None else NA)
        erank = _f(a["effective_rank_ratio"], "{:.3f}") if a.get("effective_rank_ratio") is not None else NA
        rows.append([r["domain"], row_label(r), Path(r["_path"]).name, explained, agree, drops, span, erank])
    return header, rows


def to_markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(tables: list[Table], out_dir: Path) -> list[Path]:
    """One PNG per domain (main budget): quality (mean, 95% interval as error bars) against training
    examples/s (mean ± std), one point per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for t in tables:
        if not t.main or not t.metric:
            continue
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for r in t.rows:
            q, speed = r.stat(t.metric), r.stat("examples_per_s")
            if q is None or speed is None:
                continue
            ax.errorbar(speed.mean, q.mean, yerr=q.ci95 or 0, xerr=speed.std or 0, fmt="o", capsize=3)
            ax.annotate(r.label, (speed.mean, q.mean), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("training examples/s")
        ax.set_ylabel(f"{t.metric} (95% interval)")
        ax.set_title(f"{t.domain}: quality vs throughput")
        ax.grid(alpha=0.3)
        path = out_dir / f"compare_{t.domain}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def compare(paths: list[str | Path], out_dir: str | Path, page: str | Path | None = None,
            title: str = "Router comparison", commands: list[str] | None = None,
            invocation: str | None = None, baseline: str = "none", notes: str | None = None) -> dict:
    """Write ``compare.md`` (the report), ``compare.csv`` and ``compare_<domain>.png`` into
    ``out_dir``, and the report also to ``page`` when given."""
    runs, problems = scan(paths)
    if not runs:
        listed = "".join(f"\n  {p}: {why}" for p, why in problems)
        raise FileNotFoundError(f"no metrics.json with a domain and a router found under {[str(p) for p in paths]}.{listed}")
    tables = build_tables(runs, baseline)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown = report(runs, title, commands, invocation, problems, baseline, notes)
    (out / "compare.md").write_text(markdown)
    if page is not None:
        Path(page).parent.mkdir(parents=True, exist_ok=True)
        Path(page).write_text(markdown)
    rows = csv_rows(tables)
    with open(out / "compare.csv", "w", newline="") as f:
        csv.writer(f).writerows([CSV_HEADER, *rows])
    plots = plot(tables, out)
    return {"markdown": markdown, "quality_markdown": to_markdown(*quality_table(tables, baseline)),
            "tables": tables, "header": CSV_HEADER, "rows": rows, "plots": plots, "num_runs": len(runs),
            "problems": problems}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", help="run or multirun directories (searched for metrics.json)")
    parser.add_argument("--out", default="comparison", help="directory for compare.md, compare.csv and the plots")
    parser.add_argument("--page", default=None, help="also write the report to this Markdown file (a results page)")
    parser.add_argument("--title", default="Router comparison", help="the report's title")
    parser.add_argument("--command", action="append", default=[], help="a command that produced the runs (repeatable)")
    parser.add_argument("--baseline", default="none",
                        help="the router (or configuration label) of the row the Δ column compares with (default: none, the dense model)")
    parser.add_argument("--notes", default=None, metavar="FILE",
                        help="a Markdown file whose text the report shows after the commands (the settings and why)")
    args = parser.parse_args(argv)
    notes = None
    if args.notes is not None:
        try:
            notes = Path(args.notes).read_text()
        except OSError as err:
            print(f"error: --notes {args.notes}: {err.strerror}: give a readable Markdown file", file=sys.stderr)
            return 2
    invocation = "python -m core.compare " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    try:
        result = compare(args.dirs, args.out, args.page, args.title, args.command, invocation, args.baseline, notes)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(result["quality_markdown"])
    for path, reason in result["problems"]:
        print(f"not used: {path}: {reason}")
    print(f"{result['num_runs']} runs; wrote {args.out}/compare.md, compare.csv and {len(result['plots'])} plot(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
