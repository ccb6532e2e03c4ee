"""Routing you can see: the figures of one run, drawn from the records it left in its directory.

``python -m core.plots <run dir> [--out DIR]`` (default ``<run dir>/plots``; a run with ``plots=true``
draws them at its end) writes, as far as the records allow:

- ``learning_curves.png``: training loss, learning rate and gradient norm per logged step
  (``history.jsonl``), and the evaluations' headline metric and loss;
- ``expert_load.png``: per MoE layer, each expert's share of the assignments over training (a heatmap
  expert × step from ``routing.jsonl``; recsys: each gate's mean probability per expert at every
  evaluation, from ``history.jsonl``'s ``<split>_gates``);
- ``token_expert_map.png``: who went where for one evaluation batch (``routing_sample.json``): image
  patches coloured by their top expert (vision), text tokens coloured by expert per layer (nlp),
  the expert shares of image and text tokens per layer (multimodal, CLIP-MoE towers), the gates'
  probabilities per example and task (recsys);
- ``drop_rate_by_position.png``: the share of tokens with a choice dropped by capacity at each
  position (nlp: ``analysis.json``, with and without Batch Prioritized Routing; else the sample).

A directory without ``history.jsonl`` or ``metrics.json`` is refused in one line (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FIGURES", "draw_run", "main"]

FIGURES = ("learning_curves.png", "expert_load.png", "token_expert_map.png", "drop_rate_by_position.png")
MAX_LAYERS = 8          # panels of a figure: more MoE layers are subsampled evenly
EXPERT_COLOURS = "tab10"


def _read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return out


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "figure.titlesize": 13})
    return plt


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    fig.clf()
    return path


def _evenly(names: list[str], n: int = MAX_LAYERS) -> list[str]:
    if len(names) <= n:
        return names
    return [names[round(i * (len(names) - 1) / (n - 1))] for i in range(n)]


def _title(metrics: dict) -> str:
    return f"{metrics.get('domain', '?')}: {metrics.get('model', '?')}, router {metrics.get('router', '?')}"


def _expert_cmap(E: int):
    from matplotlib.colors import ListedColormap

    plt = _pyplot()
    base = plt.get_cmap(EXPERT_COLOURS if E <= 10 else "tab20")
    return ListedColormap([base(i % base.N) for i in range(E)])


# ---------------------------------------------------------------------------------- learning curves


def learning_curves(history: list[dict], metrics: dict, path: Path) -> Path | None:
    steps = [r for r in history if not r.get("end_of_epoch")]
    evals = [r for r in history if r.get("end_of_epoch")]
    if not steps and not evals:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    ax = axes[0, 0]
    for key, label in (("loss", "total loss"), ("task_loss", "task loss")):
        pts = [(r["step"], r[key]) for r in steps if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), label=label, marker="." if len(pts) < 30 else None)
    pts = [(r["step"], r["train_loss"]) for r in evals if "train_loss" in r]
    if pts:
        ax.plot(*zip(*pts), "s--", label="epoch mean")
    ax.set(title="training loss", xlabel="step", ylabel="loss")
    ax.legend()
    panels = ((axes[0, 1], "lr", "learning rate"), (axes[1, 0], "grad_norm", "gradient norm (before clipping)"))
    for ax, key, label in panels:
        pts = [(r["step"], r[key]) for r in steps if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), marker="." if len(pts) < 30 else None)
        else:
            ax.text(0.5, 0.5, f"no {label} recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=label, xlabel="step", ylabel=label)
    ax = axes[1, 1]
    headline = metrics.get("metric")
    last = evals[-1] if evals else {}
    losses = sorted(k for k in last if k.endswith("_loss") and k not in ("train_loss", headline))
    lines = []
    for axis, keys, style in ((ax, [headline] if headline else [], "o-"), (None, losses, "s--")):
        pts_by_key = {k: [(r["step"], r[k]) for r in evals if isinstance(r.get(k), (int, float))] for k in keys}
        pts_by_key = {k: v for k, v in pts_by_key.items() if v}
        if not pts_by_key:
            continue
        if axis is None:            # losses on their own scale, right
            axis = ax.twinx() if lines else ax
            axis.set_ylabel("loss")
        else:
            axis.set_ylabel(headline)
        for k, pts in pts_by_key.items():
            lines += axis.plot(*zip(*pts), style, color=f"C{len(lines)}", label=k)
    if lines:
        ax.legend(lines, [ln.get_label() for ln in lines])
    else:
        ax.text(0.5, 0.5, "no evaluation recorded", ha="center", va="center", transform=ax.transAxes)
    ax.set(title="evaluations", xlabel="step")
    fig.suptitle(f"Learning curves — {_title(metrics)}")
    fig.tight_layout()
    return _save(fig, path)


# -------------------------------------------------------------------------------------- expert load


def _load_series(routing: list[dict], history: list[dict]) -> tuple[str, dict[str, list[tuple[int, list[float]]]]]:
    """(what the colour is, {layer: [(step, share per expert)]}) from routing.jsonl (training
    intervals, else evaluations), else recsys' gates in history.jsonl."""
    splits = list(dict.fromkeys(r.get("split") for r in routing))
    split = "train" if "train" in splits else next(iter(splits), None)
    series: dict[str, list] = {}
    for rec in routing:
        if rec.get("split") != split:
            continue
        for name, st in rec.get("layers", {}).items():
            n = np.asarray(st.get("tokens_per_expert", []), dtype=float)
            if n.sum() > 0:
                series.setdefault(name, []).append((rec["step"], (n / n.sum()).tolist()))
    if series:
        kind = "training" if split == "train" else f"evaluation on {split}"
        return f"share of the layer's assignments ({kind})", series
    series = {}
    for rec in history:
        gates = next((v for k, v in rec.items() if k.endswith("_gates") and isinstance(v, dict)), None)
        for name, st in (gates or {}).items():
            imp = st.get("importance")
            if imp:
                series.setdefault(name, []).append((rec["step"], list(imp)))
    return "mean gate probability (evaluation)", series


def expert_load(routing: list[dict], history: list[dict], metrics: dict, path: Path) -> Path | None:
    what, series = _load_series(routing, history)
    if not series:
        return None
    plt = _pyplot()
    names = _evenly(list(series))
    cols = min(2, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 3.2 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps, shares = zip(*series[name])
        S = np.asarray(shares).T  # experts × points
        E = S.shape[0]
        im = ax.imshow(S, aspect="auto", origin="lower", cmap="magma", interpolation="nearest",
                       vmin=0.0, vmax=max(2.0 / E, float(S.max())))
        ax.set_yticks(range(E))
        ticks = list(range(len(steps)))
        stride = max(1, len(ticks) // 10)
        ax.set_xticks(ticks[::stride], [str(s) for s in steps][::stride])
        ax.set(title=f"{name}  (balanced = {1 / E:.3g})", xlabel="training step", ylabel="expert")
        fig.colorbar(im, ax=ax, label="share")
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"Expert load over training: {what}\n{_title(metrics)}")
    fig.tight_layout()
    return _save(fig, path)


# --------------------------------------------------------------------------------- token -> expert


def _legend(fig, E: int) -> None:
    from matplotlib.patches import Patch

    cmap = _expert_cmap(E)
    handles = [Patch(color=cmap(e), label=f"expert {e}") for e in range(E)]
    fig.legend(handles=handles, loc="lower center", ncol=min(E, 8), frameon=False, bbox_to_anchor=(0.5, -0.02))


def _with_legend(fig, E: int, title: str, path: Path, bottom: float) -> Path:
    """The expert colours' legend under the panels, the title above, saved."""
    _legend(fig, E)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    return _save(fig, path)


def _image_map(sample: dict, metrics: dict, path: Path, plt) -> Path | None:
    images = np.asarray(sample["images"], dtype=float)      # B×C×H×W
    layers = {n: l for n, l in sample["layers"].items() if l.get("modality", "image") == "image"}
    if not layers:
        return None
    names = _evenly(list(layers), 4)
    B = min(4, images.shape[0], *(layers[n]["shape"][0] for n in names))
    E = max(layers[n]["num_experts"] for n in names)
    cmap = _expert_cmap(E)
    fig, axes = plt.subplots(B, 1 + len(names), figsize=(2.4 * (1 + len(names)), 2.4 * B + 0.6), squeeze=False)
    for b in range(B):
        img = images[b].transpose(1, 2, 0)
        img = (img - img.min()) / max(1e-8, float(img.max() - img.min()))
        img = img[..., 0] if img.shape[-1] == 1 else img
        axes[b, 0].imshow(img, cmap="gray")
        axes[b, 0].set_title("input" if b == 0 else "")
        for j, name in enumerate(names):
            top = np.asarray(layers[name]["top_expert"][b])
            side = math.isqrt(len(top))
            prefix = len(top) - side * side      # class token(s) first (timm)
            grid = top[prefix:].reshape(side, side).astype(float)
            grid[grid < 0] = np.nan              # every choice dropped
            ax = axes[b, 1 + j]
            ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-0.5, vmax=E - 0.5,
                      extent=(0, side, side, 0), interpolation="nearest")
            for k in range(side + 1):   # patch borders
                ax.axhline(k, color="white", lw=0.5)
                ax.axvline(k, color="white", lw=0.5)
            if b == 0:
                ax.set_title(name, fontsize=9)
        for ax in axes[b]:
            ax.set_xticks([])
            ax.set_yticks([])
    title = f"Image patches coloured by their top expert (white: every choice dropped)\n{_title(metrics)}"
    return _with_legend(fig, E, title, path, bottom=0.05)


def _sample_layers(sample: dict) -> tuple[dict, list[str], int, Any]:
    """A routing sample's layers, their names, the most experts any has, and one colour per expert."""
    layers = sample["layers"]
    E = max(l["num_experts"] for l in layers.values())
    return layers, list(layers), E, _expert_cmap(E)


def _text_map(sample: dict, metrics: dict, path: Path, plt) -> Path | None:
    layers, names, E, cmap = _sample_layers(sample)
    seqs = min(3, len(sample["tokens"]))
    width = min(40, len(sample["tokens"][0]))
    fig, axes = plt.subplots(seqs, 1, figsize=(0.36 * width + 2, (0.42 * len(names) + 0.9) * seqs + 0.6), squeeze=False)
    for s in range(seqs):
        ax = axes[s, 0]
        grid = np.asarray([layers[n]["top_expert"][s][:width] for n in names], dtype=float)
        grid[grid < 0] = np.nan
        ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=-0.5, vmax=E - 0.5, aspect="auto",
                  interpolation="nearest")
        for i, tok in enumerate(sample["tokens"][s][:width]):
            shown = tok.replace("\n", "⏎").replace(" ", "␣") or "·"
            for r in range(len(names)):
                ax.text(i, r, shown[:3], ha="center", va="center", fontsize=8, family="monospace")
        ax.set_yticks(range(len(names)), names)
        ax.set_xticks(range(0, width, 5))
        ax.set(xlabel="position in the sequence", title=f"sequence {s}")
    title = f"Text tokens coloured by their top expert, per MoE layer\n{_title(metrics)}"
    return _with_legend(fig, E, title, path, bottom=0.05)


def _modality_map(sample: dict, metrics: dict, path: Path, plt) -> Path | None:
    layers, names, E, cmap = _sample_layers(sample)
    fig, ax = plt.subplots(figsize=(9, 0.55 * len(names) + 1.8))
    for r, name in enumerate(names):
        top = np.asarray(layers[name]["top_expert"]).ravel()
        top = top[top >= 0]                      # padding and dropped tokens left out
        share = np.bincount(top, minlength=E) / max(1, len(top))
        left = 0.0
        for e in range(E):
            ax.barh(r, share[e], left=left, color=cmap(e))
            if share[e] > 0.06:
                ax.text(left + share[e] / 2, r, f"{share[e]:.0%}", ha="center", va="center", fontsize=8)
            left += share[e]
    ax.set_yticks(range(len(names)), [f"{layers[n].get('modality', 'all tokens')}: {n}" for n in names])
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="share of the layer's tokens whose top expert is e")
    return _with_legend(fig, E, f"Routing by modality (one evaluation batch)\n{_title(metrics)}", path, bottom=0.08)


def _gate_map(sample: dict, metrics: dict, path: Path, plt) -> Path | None:
    gates = sample["gates"]
    names = list(gates)
    tasks = list((metrics.get("tasks") or {}))
    fig, axes = plt.subplots(1, len(names), figsize=(3.6 * len(names) + 1, 4.6), squeeze=False)
    for j, name in enumerate(names):
        P = np.asarray(gates[name])[:32]         # examples × experts
        ax = axes[0, j]
        im = ax.imshow(P, aspect="auto", cmap="viridis", vmin=0, vmax=max(1e-6, float(P.max())),
                       interpolation="nearest")
        label = f"task {tasks[j]}" if len(tasks) == len(names) else name
        ax.set(title=f"{label}\n({name})", xlabel="expert", ylabel="example" if j == 0 else "")
        ax.set_xticks(range(P.shape[1]))
        fig.colorbar(im, ax=ax, label="gate probability")
    fig.suptitle(f"Task gates: each example's mixture over the experts\n{_title(metrics)}")
    fig.tight_layout()
    return _save(fig, path)


def token_expert_map(sample: dict, metrics: dict, path: Path) -> Path | None:
    if not sample:
        return None
    plt = _pyplot()
    layers = sample.get("layers") or {}
    # one row per example: the layer saw the batch's images as (B, tokens, D), not one flat group
    per_image = bool(layers) and all(l["shape"][0] == len(sample.get("images", [])) for l in layers.values())
    if per_image and all(l.get("modality", "image") == "image" for l in layers.values()):
        return _image_map(sample, metrics, path, plt)
    if layers and sample.get("tokens"):
        return _text_map(sample, metrics, path, plt)
    if layers:   # towers by modality (CLIP-MoE); a flat joint group (LIMoE) shows as "all tokens"
        return _modality_map(sample, metrics, path, plt)
    if sample.get("gates"):
        return _gate_map(sample, metrics, path, plt)
    return None


# ----------------------------------------------------------------------------------- drop by position


def drop_rate_by_position(sample: dict, analysis: dict, metrics: dict, path: Path) -> Path | None:
    curves: dict[str, list[float]] = {}
    note = ""
    drops = analysis.get("drop_rate_by_position") or {}
    for key, label in (("no_bpr", "without BPR"), ("bpr", "with Batch Prioritized Routing")):
        if drops.get(key, {}).get("per_position"):
            curves[f"mean over layers, {label}"] = drops[key]["per_position"]
    if curves:
        cf, own = drops.get("capacity_factor"), drops.get("router_capacity_factor")
        note = f"capacity factor {cf}" + ("" if own is not None else " set by the analysis: the router is dropless")
    else:
        for name, layer in (sample.get("layers") or {}).items():
            if "dropped" in layer and layer["shape"][0] > 1:   # positions of examples, not of one flat group
                curves[name] = np.asarray(layer["dropped"], dtype=float).mean(0).tolist()
        note = "one evaluation batch"
    if not curves:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    for label, rate in list(curves.items())[:MAX_LAYERS]:
        ax.plot(range(len(rate)), rate, marker="." if len(rate) <= 64 else None, label=label)
    peak = max(max((v for v in rate if v == v), default=0.0) for rate in curves.values())
    ax.set(xlabel="position in the sequence (token index)",
           ylabel="share of tokens with a dropped choice", ylim=(0, max(0.05, 1.1 * peak)))
    ax.legend(fontsize=8)
    fig.suptitle(f"Drop rate by position ({note}{'; no choice dropped' if peak == 0 else ''})\n{_title(metrics)}")
    fig.tight_layout()
    return _save(fig, path)


# ------------------------------------------------------------------------------------------- entry


def draw_run(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """Draw every figure the run's records allow into ``out`` (default ``<run dir>/plots``); returns
    the paths written. ``FileNotFoundError`` when ``run_dir`` holds neither ``history.jsonl`` nor
    ``metrics.json``."""
    from core.tracking import ROUTING_FILE, SAMPLE_FILE

    run_dir = Path(run_dir)
    history_path, metrics_path = run_dir / "history.jsonl", run_dir / "metrics.json"
    if not history_path.exists() and not metrics_path.exists():
        raise FileNotFoundError(f"{run_dir} holds no run records (history.jsonl, metrics.json): give the "
                                "directory of a run (its hydra.run.dir or output_dir)")
    out = Path(out) if out is not None else run_dir / "plots"
    out.mkdir(parents=True, exist_ok=True)
    history, metrics = _read_jsonl(history_path), _read_json(metrics_path)
    routing, sample = _read_jsonl(run_dir / ROUTING_FILE), _read_json(run_dir / SAMPLE_FILE)
    analysis = _read_json(run_dir / "analysis.json")
    written = [
        learning_curves(history, metrics, out / FIGURES[0]),
        expert_load(routing, history, metrics, out / FIGURES[1]),
        token_expert_map(sample, metrics, out / FIGURES[2]),
        drop_rate_by_position(sample, analysis, metrics, out / FIGURES[3]),
    ]
    _pyplot().close("all")
    return [p for p in written if p is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m core.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run's directory (history.jsonl, metrics.json, routing.jsonl, ...)")
    parser.add_argument("--out", default=None, help="where the PNGs go (default: <run dir>/plots)")
    args = parser.parse_args(argv)
    try:
        paths = draw_run(args.run_dir, args.out)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for p in paths:
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
