"""Experiment tracking: a run's scalars sent to TensorBoard, a CSV file or Weights & Biases through the
engine's callbacks (``core.engine.Callback``), and the per-layer routing of every evaluation kept in
``routing.jsonl`` for ``core.plots``.

The ``logger`` config group (``conf/logger/``, shared by every domain) picks the backends:
``logger=tensorboard``, ``logger=[csv,tensorboard]``, ``logger=wandb``, ``logger=[]`` for none
(default: ``csv``). Each file holds one node ``<name>: {_target_: core.tracking.<Backend>, ...}``,
as the Lightning Hydra template lays out its loggers; ``core.run`` builds them and hands them to one
``Tracking`` callback, for every domain.

What is logged, by tag (the same in every backend):

- every logged training step (``trainer.log_every_steps``): ``train/loss``, ``train/task_loss``,
  ``train/lr``, ``train/grad_norm``, ``train/aux_<term>``, the loss function's numeric logs
  (``train/<key>``) and ``train/examples_per_s`` (training throughput so far);
- every evaluation: ``<loader>/<metric>`` (e.g. ``test/acc``, ``val/ppl``), ``<loader>/examples_per_s``,
  the layer averages ``<loader>/routing/<stat>``, and per MoE layer (the first loader's, as in
  ``metrics.json``) ``moe/<layer>/tokens_per_expert/<e>`` (one scalar per expert),
  ``moe/<layer>/load_cv2``, ``moe/<layer>/dropped_fraction``, ``moe/<layer>/entropy`` and
  ``moe/<layer>/experts_per_token``.

``routing.jsonl`` (written whatever the backends): one line per evaluation loader per evaluation,
``{"step", "epoch", "split": <loader>, "layers": {layer: core.routing_stats' per-layer stats}}``, and
one per logged training step, ``"split": "train"``, with each layer's tokens per expert since the
previous line (rank 0's tokens under torchrun). A resumed run drops the lines after its checkpoint,
as ``history.jsonl`` does.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from core import stats
from core.checks import ConfigError
from core.engine import Callback, TrainState, append_history, truncate_history
from core.moe import MoE

log = logging.getLogger(__name__)

__all__ = ["CSVLogger", "ROUTING_FILE", "SAMPLE_FILE", "TensorBoardLogger", "Tracking", "WandbLogger", "build_tracking",
           "check_logger", "eval_scalars", "routing_sample", "step_scalars"]

ROUTING_FILE = "routing.jsonl"
# per-layer statistics of core.routing_stats logged as one scalar each
LAYER_STATS = ("load_cv2", "dropped_fraction", "entropy", "experts_per_token")


def _number(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


# --------------------------------------------------------------------------------------- backends


class CSVLogger:
    """Scalars as rows ``step,tag,value`` of ``<run dir>/<filename>`` (long format: any tag, any step).

    Args:
        out_dir: the run directory.
        filename: the file's name in it.
        resume_step: a resumed run's first step: rows of later steps (an interrupted process's) are dropped.
    """

    def __init__(self, out_dir: str | Path, filename: str = "tracking.csv", resume_step: int | None = None):
        self.path = Path(out_dir) / filename
        rows = []
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.reader(f) if r and r[0] != "step" and int(r[0]) <= resume_step]
        self._file = open(self.path, "w", newline="")
        self._writer = csv.writer(self._file)
        self._writer.writerows([["step", "tag", "value"], *rows])

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        self._writer.writerows([step, tag, repr(float(v))] for tag, v in scalars.items())

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardLogger:
    """``torch.utils.tensorboard.SummaryWriter`` writing event files into ``<run dir>/<subdir>``
    (``tensorboard --logdir <run dir>``).

    Args:
        out_dir: the run directory.
        subdir: the event files' directory in it.
        flush_secs: how often the writer flushes by itself.
        resume_step: a resumed run's first step: TensorBoard hides the later events of the interrupted process.
    """

    def __init__(self, out_dir: str | Path, subdir: str = "tensorboard", flush_secs: int = 30,
                 resume_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError("logger", "tensorboard", f"the tensorboard package is not installed ({err}); "
                              "pip install tensorboard (requirements/base.txt pins it), or use logger=csv") from err
        self.writer = SummaryWriter(log_dir=str(Path(out_dir) / subdir), flush_secs=flush_secs,
                                    purge_step=None if resume_step is None else resume_step + 1)

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        for tag, v in scalars.items():
            self.writer.add_scalar(tag, v, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """Weights & Biases (optional; imported only when chosen). ``mode=offline`` by default: the run is
    written under ``<run dir>/wandb`` and can be uploaded later with ``wandb sync``.

    Args:
        out_dir: the run directory.
        project: the W&B project.
        name: the run's name (default: the run directory's name).
        mode: ``offline``, ``online`` or ``disabled``.
        run_config: the run's resolved config, recorded as the W&B config.
        resume_step: unused (a resumed run is a new W&B run).
    """

    def __init__(self, out_dir: str | Path, project: str = "moe-suite", name: str | None = None,
                 mode: str = "offline", run_config: Mapping | None = None, resume_step: int | None = None):
        try:
            import wandb
        except ImportError as err:
            raise ConfigError("logger", "wandb", f"the wandb package is not installed ({err}); pip install wandb, "
                              "or use logger=tensorboard or logger=csv") from err
        self.run = wandb.init(project=project, name=name or Path(out_dir).name, mode=mode, dir=str(out_dir),
                              config=dict(run_config or {}), reinit=True)

    def log_scalars(self, scalars: Mapping[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.run.finish()


# ---------------------------------------------------------------------------------- what is logged


def step_scalars(record: Mapping[str, Any], state: TrainState) -> dict[str, float]:
    """A training step's tags: its ``history.jsonl`` record's numbers and the throughput so far."""
    out = {f"train/{k}": float(v) for k, v in record.items()
           if k not in ("step", "epoch") and _number(v) is not None}
    if state.train_time_s:
        out["train/examples_per_s"] = state.train_examples / state.train_time_s
    return out


def eval_scalars(metrics: Mapping[str, Any], loaders: Sequence[str]) -> dict[str, float]:
    """An evaluation's tags (see the module docstring) from ``state.last_eval``."""
    out: dict[str, float] = {}
    for key, v in metrics.items():
        loader = next((n for n in loaders if key.startswith(f"{n}_")), None)
        if loader is None:
            continue
        name = key[len(loader) + 1:]
        if name == "routing" and isinstance(v, Mapping):
            out.update({f"{loader}/routing/{k}": float(x) for k, x in v.items() if _number(x) is not None})
        elif _number(v) is not None:
            out[f"{loader}/{name}"] = float(v)
    layers = metrics.get(f"{loaders[0]}_routing_layers") if loaders else None
    for layer, st in (layers or {}).items():
        for e, n in enumerate(st.get("tokens_per_expert", [])):
            out[f"moe/{layer}/tokens_per_expert/{e}"] = float(n)
        out.update({f"moe/{layer}/{k}": float(st[k]) for k in LAYER_STATS if _number(st.get(k)) is not None})
    return out


def _training_tokens(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each MoE layer's training assignments per expert since the engine's last reset (no reset here)."""
    return {name: m.stat_tokens_E.detach().to("cpu", torch.float64).clone()
            for name, m in model.named_modules() if isinstance(m, MoE)}


# --------------------------------------------------------------------------------------- callback


class Tracking(Callback):
    """Sends the run's scalars to the chosen backends and writes ``routing.jsonl`` (module docstring).
    Backends are built on rank 0 at the start of ``fit``, in the run directory.

    At the end of ``fit`` it also writes ``routing_sample.json`` (``routing_sample`` on the first batch
    of the first evaluation loader; every rank runs the forward, rank 0 writes), when given the
    task's ``evaluate`` and loaders and the model has routers.

    Args:
        backends: ``{name: factory(out_dir=..., resume_step=...)}`` (the ``logger`` node's partials);
            empty: only ``routing.jsonl``.
        run_config: the run's resolved config, handed to backends that record it (W&B).
        evaluate: the task's ``(model, batches) -> dict`` (None: no routing sample).
        eval_loaders: the task's ``{name: loader}``.
        tokenizer: decodes the sample's token ids (nlp).
    """

    def __init__(self, backends: Mapping[str, Any] | None = None, run_config: Mapping | None = None,
                 evaluate=None, eval_loaders: Mapping | None = None, tokenizer=None):
        self.factories = dict(backends or {})
        self.run_config = run_config
        self.evaluate, self.eval_loaders, self.tokenizer = evaluate, dict(eval_loaders or {}), tokenizer
        self.backends: dict[str, Any] = {}
        self.loaders: list[str] = []
        self._tokens: dict[str, torch.Tensor] = {}
        self.routing_path: Path | None = None

    def on_fit_start(self, trainer, model: nn.Module, state: TrainState) -> None:
        if not trainer.is_main:
            return
        self.routing_path = trainer.out_dir / ROUTING_FILE
        resume_step = state.step if trainer.cfg.resume else None
        if resume_step is None:
            self.routing_path.unlink(missing_ok=True)
        else:
            truncate_history(self.routing_path, resume_step)
        for name, factory in self.factories.items():
            kwargs = {"out_dir": trainer.out_dir, "resume_step": resume_step}
            if getattr(factory, "func", factory) is WandbLogger:
                kwargs["run_config"] = self.run_config
            self.backends[name] = factory(**kwargs)
        self._tokens = _training_tokens(model)

    def log(self, scalars: Mapping[str, float], step: int) -> None:
        """``scalars`` at ``step`` to every backend (non-finite values are kept: a diverging run shows)."""
        for backend in self.backends.values():
            backend.log_scalars(scalars, step)

    def on_step_end(self, trainer, model: nn.Module, state: TrainState, record: dict | None) -> None:
        if not trainer.is_main or record is None or state.step % trainer.cfg.log_every_steps:
            return
        self.log(step_scalars(record, state), state.step)
        tokens = _training_tokens(model)
        layers = {}
        for name, now in tokens.items():
            before = self._tokens.get(name)
            delta = now - before if before is not None and before.shape == now.shape and (now >= before).all() else now
            if delta.sum() > 0:
                layers[name] = {"tokens_per_expert": delta.tolist(), "load_cv2": stats._cv2(delta)}
        self._tokens = tokens
        if layers:
            append_history(self.routing_path, {"step": state.step, "epoch": state.epoch, "split": "train",
                                               "layers": layers})

    def on_evaluate(self, trainer, model: nn.Module, state: TrainState, metrics: dict) -> None:
        if not trainer.is_main:
            return
        self.loaders = [k[:-len("_examples_per_s")] for k in metrics if k.endswith("_examples_per_s")]
        self.log(eval_scalars(metrics, self.loaders), state.step)
        for loader in self.loaders:
            layers = metrics.get(f"{loader}_routing_layers")
            if layers:
                append_history(self.routing_path, {"step": state.step, "epoch": state.epoch, "split": loader,
                                                   "layers": layers})
        for backend in self.backends.values():
            backend.flush()

    def on_epoch_end(self, trainer, model: nn.Module, state: TrainState) -> None:
        # the engine reset the training counters at the epoch's end (and the evaluation did)
        self._tokens = _training_tokens(model) if trainer.is_main else {}

    def on_fit_end(self, trainer, model: nn.Module, metrics: dict) -> None:
        self.close()
        self.save_sample(trainer, model)

    def save_sample(self, trainer, model: nn.Module) -> None:
        """``routing_sample.json`` in the run directory (see the class docstring)."""
        from core.engine import iter_batches, move_to, write_json_atomic
        from core.routers.base import Router

        loader = next(iter(self.eval_loaders.values()), None)
        if self.evaluate is None or loader is None or not any(isinstance(m, Router) for m in model.modules()):
            return
        batch = next(iter_batches(loader, 0, 0, trainer.seed), None)
        if batch is None:
            return
        sample = routing_sample(model, self.evaluate, move_to(batch, trainer.device), tokenizer=self.tokenizer,
                                autocast=trainer.autocast)
        if trainer.is_main:
            write_json_atomic(trainer.out_dir / SAMPLE_FILE, sample)

    def close(self) -> None:
        """Close every backend (also after a failed run, so what was logged is on disk)."""
        backends, self.backends = self.backends, {}
        for backend in backends.values():
            backend.close()


# ---------------------------------------------------------------------------------- routing sample

SAMPLE_FILE = "routing_sample.json"


def _first_tensors(batch) -> list[torch.Tensor]:
    """The tensors of a batch (tuple, list or dict), in order."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, Mapping):
        return [v for v in batch.values() if isinstance(v, torch.Tensor)]
    if isinstance(batch, (tuple, list)):
        return [v for v in batch if isinstance(v, torch.Tensor)]
    return []


@torch.no_grad()
def routing_sample(model: nn.Module, evaluate, batch, max_examples: int = 8, tokenizer=None,
                   autocast=None) -> dict:
    """Who went where for one evaluation batch, for ``core.plots``' token→expert maps: per MoE layer
    (its first call in ``evaluate(model, [batch])``) the top expert of each of the first
    ``max_examples`` examples' tokens (``top_expert``: examples × tokens, −1 = every choice dropped),
    the tokens with a dropped choice (``dropped``), the layer's ``modality`` when it has one; per
    router outside a MoE layer (a multi-task gate) its probabilities for the first examples
    (``gates``); the first images of the batch (``images``, a 4-d float input) or the first sequences
    as text tokens (``tokens``, an integer input decoded by ``tokenizer``)."""
    import contextlib

    from core.analytics import choices_per_token, experts_per_token, top_expert, valid_tokens
    from core.routers.base import Router

    layers: dict[str, dict] = {}
    gates: dict[str, list] = {}
    moes = {name: m for name, m in model.named_modules() if isinstance(m, MoE)}
    inside = tuple(f"{name}." for name in moes)
    handles, saved = [], {}

    def moe_hook(name):
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs.get("x")
            if name in layers or module.last_routing is None or x is None:
                return
            routing, lead = module.last_routing, tuple(x.shape[:-1])
            T = math.prod(lead)
            rows = lead[0] if len(lead) >= 2 else 1
            keep = min(rows, max_examples) * (T // rows)
            entry = {"shape": [min(rows, max_examples), T // rows], "num_experts": routing.num_experts,
                     "top_expert": top_expert(routing)[:T][:keep].view(-1, T // rows).tolist()}
            if not (routing.is_soft or routing.is_merged):
                try:
                    k = choices_per_token(routing, None)
                except ValueError:
                    k = None
                if k is not None:
                    dropped = (experts_per_token(routing) < k) & valid_tokens(routing)
                    entry["dropped"] = dropped[:T][:keep].view(-1, T // rows).int().tolist()
            if getattr(module, "modality", None):
                entry["modality"] = module.modality
            layers[name] = entry
        return hook

    def gate_hook(name):
        def hook(module, args, output):
            scores = getattr(output, "scores_GSE", None)
            if name in gates or scores is None:
                return
            gates[name] = scores.reshape(-1, scores.shape[-1])[:64].float().cpu().tolist()
        return hook

    for name, m in moes.items():
        saved[m] = (m.keep_last_routing, m.track_stats)
        m.keep_last_routing, m.track_stats = True, False
        handles.append(m.register_forward_hook(moe_hook(name), with_kwargs=True))
    for name, m in model.named_modules():
        if isinstance(m, Router) and not name.startswith(inside):
            handles.append(m.register_forward_hook(gate_hook(name)))
    was_training = model.training
    model.eval()
    try:
        with autocast() if autocast is not None else contextlib.nullcontext():
            evaluate(model, [batch])
    finally:
        for h in handles:
            h.remove()
        for m, (keep, track) in saved.items():
            m.keep_last_routing, m.track_stats, m.last_routing = keep, track, None
        model.train(was_training)
    sample: dict = {"layers": layers, "gates": gates}
    for t in _first_tensors(batch):
        if t.is_floating_point() and t.dim() == 4 and "images" not in sample:
            sample["images"] = t[:max_examples].float().cpu().tolist()
        elif not t.is_floating_point() and t.dim() == 2 and "tokens" not in sample and tokenizer is not None \
                and hasattr(tokenizer, "decode"):
            sample["tokens"] = [[tokenizer.decode([int(i)]) for i in row] for row in t[:max_examples].tolist()]
    return sample


def check_logger(logger_cfg) -> None:
    """The ``logger`` node before any data is read: ``{name: backend node with _target_}`` (None or empty:
    no backend); a backend whose package is missing is a ``ConfigError`` naming it."""
    import importlib.util

    from omegaconf import OmegaConf

    if logger_cfg is None:
        return
    if not OmegaConf.is_dict(logger_cfg):
        raise ConfigError("logger", logger_cfg, "choose backends of conf/logger/: logger=tensorboard, "
                          "logger=[csv,tensorboard], logger=[] for none")
    needs = {"core.tracking.TensorBoardLogger": "tensorboard", "core.tracking.WandbLogger": "wandb"}
    for name, node in logger_cfg.items():
        if not OmegaConf.is_dict(node) or "_target_" not in node:
            raise ConfigError(f"logger.{name}", node, "give a backend node with _target_ (a conf/logger/ file)")
        package = needs.get(str(node._target_))
        if package and importlib.util.find_spec(package) is None:
            raise ConfigError("logger", name, f"the {package} package is not installed: pip install {package}, "
                              "or choose another backend (logger=csv)")


def build_tracking(logger_cfg, run_config: Mapping | None = None, evaluate=None,
                   eval_loaders: Mapping | None = None, state: Any = None) -> Tracking:
    """The ``Tracking`` callback of a run from its ``logger`` node (``check_logger``), with the task's
    ``evaluate``, evaluation loaders and state (a ``tokenizer`` in it decodes the sample's tokens) for
    ``routing_sample.json``."""
    import hydra

    check_logger(logger_cfg)
    backends = {str(name): hydra.utils.instantiate(node, _partial_=True) for name, node in (logger_cfg or {}).items()}
    tokenizer = state.get("tokenizer") if isinstance(state, Mapping) else None
    return Tracking(backends, run_config, evaluate, dict(eval_loaders or {}), tokenizer)
