"""One way to run every domain: a domain describes its work as a ``Task``; ``run(cfg, task)`` does the
rest, the same way for vision, recsys, multimodal and nlp.

In order, before any data is read:

1. **the router**: without ``+router=``, the model config's ``default_router`` names a
   ``conf/router/<name>.yaml`` (optionally with ``key=value`` overrides: ``[topk, top_k=1]``) that
   becomes the run's ``router`` node, so the recorded config always holds the router that ran;
2. **validation**: the task's checks (``Task.validate``), then the shared ones: seed, threads, the
   trainer keys against the model's experts;
3. **the run directory** (``output_dir``, else Hydra's): a new run refuses one that holds another
   run's work, a resume needs a readable checkpoint whose recorded config differs only in keys safe
   to change, and a lock keeps a second process out (``core.rundir``); then its ``config.yaml``.

Then: the global RNGs seeded and the data read (``Task.load_data``), the RNGs seeded again and the
model, loaders, loss and evaluation built (``Task.build``), the engine trained (``core.engine``),
``Task.finish`` adding the domain's metrics before ``metrics.json`` is written (once), and one
summary printed, the same for every domain, ending with the run directory.

Failures read the same in every domain: a config or data problem prints one line,
``error: <key>=<value> is not allowed: <what is allowed>``, and exits with status 2 (no traceback;
``HYDRA_FULL_ERROR=1`` re-raises); a non-finite loss, or a file of the run that cannot be written (a
full disk: the previous checkpoint stays intact), exits with status 1; in a Hydra multirun, a
router that cannot serve the domain writes ``metrics.json`` with ``status: n/a`` and the reason, and
the sweep goes on; anything else is a bug and keeps its traceback. Under torchrun, rank 0 alone
reports.

A domain's ``train.py`` is its task and a thin entry point::

    class VisionTask(Task):
        name, metric, higher_is_better, unit = "vision", "test_acc", True, "image"
        def validate(self, cfg): ...
        def load_data(self, cfg): ...
        def build(self, cfg, data) -> TaskRun: ...

    @hydra.main(config_path="pkg://conf/vision", config_name="train", version_base="1.3")
    def main(cfg):
        return run(cfg, VisionTask())

The domains are registered in their configs: ``conf/<domain>/train.yaml`` names its task
(``task: vision.train.VisionTask``), so the tools in ``core`` (``compare``, ``router_table``) find
every domain, and load its task on demand, without importing any domain package.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

import torch
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from torch import nn

from core.checks import ConfigError, NotApplicableError, check_int
from core.distributed import is_main_process
from core.memory import TRAINING_COPIES, check_allocation
from core.engine import (Callback, NonFiniteLossError, Trainer, WriteError, batch_size_of, seed_everything,
                         write_json_atomic, write_text_atomic)
from core.routers.base import Router
from core.rundir import RunLock, check_fresh_directory, readable_checkpoint, resume_changes
from core.runs import hydra_choice, run_dir
from core.validate import check_trainer

log = logging.getLogger(__name__)

__all__ = ["AnalysisInputs", "CONFIG_ERROR_EXIT", "NONFINITE_EXIT", "Task", "TaskRun", "check_config", "command_line", "is_multirun",
           "prepare", "router_label", "run", "summary", "task_class", "task_classes", "task_paths", "train",
           "with_default_router"]

CONFIG_ERROR_EXIT = 2   # the config or the data it names cannot work
NONFINITE_EXIT = 1      # training failed: it diverged (NaN/inf loss) or a file of the run could not be written
CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
ROUTER_CONF = CONF_DIR / "router"

# raised while preparing a run (data, model): the config or its files are at fault (a missing ``???``
# value or a broken interpolation is an OmegaConf error)
_PREPARE_ERRORS = (ValueError, OSError, OmegaConfBaseException)


@dataclasses.dataclass
class TaskRun:
    """What a task builds for one run, handed to the engine.

    Args:
        model: the model to train.
        train_loader: a ``core.engine.TensorLoader`` or any re-iterable of batches with ``len``.
        eval_loaders: ``{name: loader}``; metrics appear as ``<name>_<metric>``.
        loss_fn: ``(model, batch) -> (task_loss, logs)``; the engine adds the routers' auxiliary losses.
        evaluate: ``(model, batches) -> {metric: value}``.
        info: constant fields of ``metrics.json`` (``model``, ``dataset``, sizes, ...).
        callbacks: ``core.engine.Callback``s of the domain (routing snapshots, ...).
        count_examples: examples in a batch (throughput).
        state: anything else the task wants back in ``finish`` (data, tokenizer, ...).
    """

    model: nn.Module
    train_loader: Any
    eval_loaders: Mapping[str, Any]
    loss_fn: Callable
    evaluate: Callable
    info: dict = dataclasses.field(default_factory=dict)
    callbacks: list = dataclasses.field(default_factory=list)
    count_examples: Callable[[Any], int] = batch_size_of
    state: Any = None


@dataclasses.dataclass
class AnalysisInputs:
    """What the routing analyses of ``core.analytics`` route (``Task.analysis_inputs``).

    Args:
        batches: the batches (an evaluation loader; the first ``analysis.max_batches`` are used).
        forward: ``(model, batch) -> None`` (default: the model on ``batch[0]``).
        labels: ``batch -> {name: tensor or provider}`` (``core.analytics.position_labels``, ...);
            None: the token ids the MoE layers receive.
        not_applicable: ``{analysis: reason}`` for what the domain cannot offer, recorded as is.
    """

    batches: Any
    forward: Callable | None = None
    labels: Callable | None = None
    not_applicable: dict = dataclasses.field(default_factory=dict)


class Task:
    """One domain's part of a run (see the module docstring). Class attributes:

    - ``name``: the domain (``metrics.json``'s ``domain``);
    - ``metric``, ``higher_is_better``: the headline quality metric of ``metrics.json`` (the
      comparison tables' quality column);
    - ``unit``: what an example is (``image``, ``example``, ``pair``, ``sequence``), for the summary;
    - ``active_per``: what ``params_active`` is counted per (default: ``unit``; ``token`` in nlp);
    - ``token_ids``: the models give their MoE layers token ids (so routers that need them apply);
    - ``causal``: routing must not look at later tokens (a language model);
    - ``not_applicable``: the domain's own exception types meaning "this router cannot serve here"
      (an ``n/a`` row in a sweep), besides ``core.checks.NotApplicableError``.
    """

    name: ClassVar[str] = ""
    metric: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True
    unit: ClassVar[str] = "example"
    active_per: ClassVar[str] = ""
    token_ids: ClassVar[bool] = False
    causal: ClassVar[bool] = False
    not_applicable: ClassVar[tuple[type[BaseException], ...]] = ()

    @classmethod
    def accepts(cls, router: Router | type[Router]) -> bool:
        """Whether routers of this class can serve this domain (token ids, causality)."""
        router_cls = router if isinstance(router, type) else type(router)
        if router_cls.needs_token_ids and not cls.token_ids:
            return False
        return not cls.causal or (router.is_causal if isinstance(router, Router) else router_cls.token_local)

    def validate(self, cfg: DictConfig) -> int | None:
        """Check the domain's keys before any data is read (raise ``ConfigError`` naming the key);
        return the largest number of experts of a MoE layer (None without MoE layers), which the
        trainer's expert-parallel check needs."""
        return None

    def load_data(self, cfg: DictConfig) -> Any:
        """Read the data (the global RNGs are seeded just before)."""
        raise NotImplementedError

    def build(self, cfg: DictConfig, data: Any) -> TaskRun:
        """Build the model and what trains and evaluates it (the RNGs are seeded again just before)."""
        raise NotImplementedError

    def router_label(self, name: str, model: nn.Module) -> str:
        """The run's row name given the router's name (a domain may qualify it)."""
        return name

    def finish(self, cfg: DictConfig, task_run: TaskRun, metrics: dict) -> None:
        """Add the domain's own metrics to ``metrics`` in place, before ``metrics.json`` is written."""

    def analysis_inputs(self, cfg: DictConfig, task_run: TaskRun) -> AnalysisInputs | None:
        """What the routing analyses route when ``analysis.enabled`` (``analysis.json``, and the
        scalars in ``metrics.json``'s ``analysis``); None: the domain offers none."""
        return None

    def summary(self, metrics: Mapping) -> list[str]:
        """The domain's lines of the printed summary (quality first)."""
        return []

    def objective(self, metrics: Mapping) -> float:
        """The value a Hydra sweeper optimises."""
        return metrics[self.metric]


def task_paths(conf_dir: Path = CONF_DIR) -> dict[str, str]:
    """``{domain: dotted path of its Task class}``: the ``task`` key of every ``conf/<domain>/train.yaml``."""
    paths = {}
    for primary in sorted(conf_dir.glob("*/train.yaml")):
        task = OmegaConf.load(primary).get("task")
        if isinstance(task, str):
            paths[primary.parent.name] = task
    return paths


@functools.cache
def task_class(domain: str) -> type[Task]:
    """The ``Task`` class of ``domain`` (imported on first use)."""
    from core.checks import locate

    paths = task_paths()
    if domain not in paths:
        raise ConfigError("domain", domain, f"use one of the registered domains {sorted(paths)} (conf/<domain>/train.yaml)")
    cls = locate(paths[domain])
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(f"conf/{domain}/train.yaml: task", paths[domain], "name an importable core.run.Task subclass")
    return cls


def task_classes() -> dict[str, type[Task]]:
    """``{domain: Task class}`` of every registered domain."""
    return {domain: task_class(domain) for domain in task_paths()}


# ------------------------------------------------------------------------------------------ router


def with_default_router(cfg: DictConfig, conf_dir: Path = ROUTER_CONF) -> str | None:
    """Without a ``router`` node, make ``cfg.model.default_router`` (``name`` or ``[name, key=value,
    ...]``, a ``conf/router`` file and overrides) the run's ``router``; the model key is removed
    either way (model classes do not take it). Returns the default's label, or None when the run
    names its router itself or the model has no default."""
    spec = cfg.model.get("default_router") if OmegaConf.is_dict(cfg.get("model")) else None
    if spec is not None:
        with open_dict(cfg.model):
            cfg.model.pop("default_router")
    if spec is None or cfg.get("router") is not None:
        return None
    name, *overrides = [spec] if isinstance(spec, str) else list(spec)
    path = conf_dir / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError("model.default_router", name, f"name a router config of {conf_dir}")
    node = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist([str(o) for o in overrides]))
    with open_dict(cfg):
        cfg.router = node
    return " ".join([name, *map(str, overrides)])


def router_label(cfg: DictConfig, model: nn.Module, task: Task, default: str | None) -> str:
    """``none`` for a model without routers (the dense baseline row), else ``router_name``, else the
    ``+router=`` choice (the router's module name when composed without Hydra's runtime), else the
    model's default; qualified by the task."""
    if not any(isinstance(m, Router) for m in model.modules()):
        return "none"
    name = cfg.get("router_name") or hydra_choice("router") or default
    if not name:
        name = str(cfg.router.get("_target_", "custom")).rsplit(".", 2)[-2]
    return task.router_label(str(name), model)


# --------------------------------------------------------------------------------------------- run


@dataclasses.dataclass
class Prepared:
    """A run ready to train: what ``prepare`` builds and ``fit`` consumes."""

    cfg: DictConfig
    task: Task
    task_run: TaskRun
    trainer: Trainer
    restore_threads: int | None = None
    lock: RunLock | None = None


def check_config(cfg: DictConfig, task: Task):
    """The checks of a run before any data is read: the default router put in place, the task's
    checks, then seed, threads, the trainer keys and the keys added with ``+key=value`` on the command
    line (``core.overrides``: a misspelled one is refused, not ignored) and the ``logger`` backends
    (``core.tracking``: a missing package is refused); returns the ``TrainerConfig``."""
    from core.overrides import check_hydra_overrides
    from core.tracking import check_logger

    with_default_router(cfg)
    check_hydra_overrides(cfg)
    check_logger(cfg.get("logger"))
    num_experts = task.validate(cfg)
    if isinstance(cfg.get("seed"), bool) or not isinstance(cfg.get("seed"), int):
        raise ConfigError("seed", cfg.get("seed"), "it must be an integer")
    check_int("threads", cfg.get("threads"), optional=True)
    return check_trainer(cfg.trainer, num_experts)


def _output_key(cfg: DictConfig) -> str:
    return "output_dir" if cfg.get("output_dir") else "hydra.run.dir"


def prepare(cfg: DictConfig, task: Task) -> Prepared:
    """Everything that can fail because of the config: the default router, validation, the run
    directory (its ownership, its lock, a resume's checkpoint and config) and its ``config.yaml``, the
    data, the model and the trainer."""
    default = with_default_router(cfg)
    trainer_cfg = check_config(cfg, task)
    out_dir, key = run_dir(cfg.get("output_dir")), _output_key(cfg)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    changes = {}
    if trainer_cfg.resume:
        _, checkpoint = readable_checkpoint(trainer_cfg.resume, out_dir)
        changes = resume_changes(checkpoint.get("config"), resolved)
        del checkpoint
    else:
        check_fresh_directory(out_dir, key)
    lock = RunLock(out_dir, key).acquire() if is_main_process() else None
    restore = None
    try:
        if is_main_process():
            write_text_atomic(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        if cfg.get("threads"):  # small models: one thread per run avoids oversubscription when runs share a machine
            restore = torch.get_num_threads()
            torch.set_num_threads(int(cfg.threads))
        seed_everything(int(cfg.seed))
        data = task.load_data(cfg)
        seed_everything(int(cfg.seed))
        task_run = task.build(cfg, data)
        _add_routing_snapshots(cfg, task, task_run, out_dir)
        _check_training_memory(task_run.model, cfg, trainer_cfg.device)
        info = {"domain": task.name, "router": router_label(cfg, task_run.model, task, default),
                **task_run.info, "metric": task.metric, "higher_is_better": task.higher_is_better}
        if changes:  # what this resume changed, for the record
            info["resume_changes"] = {k: list(v) for k, v in changes.items() if k != "trainer.resume"}
        trainer = Trainer(trainer_cfg, out_dir, seed=int(cfg.seed), info=info, run_config=resolved)
    except BaseException:
        if restore is not None:
            torch.set_num_threads(restore)
        if lock is not None:
            lock.release()
        raise
    n_params = sum(p.numel() for p in task_run.model.parameters())
    log.info("%s: model=%s router=%s, %.3fM parameters", task.name, info.get("model"), info["router"], n_params / 1e6)
    return Prepared(cfg, task, task_run, trainer, restore, lock)


def _check_training_memory(model: nn.Module, cfg: DictConfig, device: str) -> None:
    """Before the first step: the weights are allocated; training adds gradients and AdamW's two
    moments, about three more copies of the trainable weights."""
    from core.engine import resolve_device

    extra = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad) * (TRAINING_COPIES - 1)
    model_name = cfg.get("model_name") or hydra_choice("model") or type(model).__name__
    check_allocation(extra, "training the model (gradients and AdamW's two moments of its trainable weights)",
                     "model", model_name, device=str(resolve_device(device)))


class _Finish(Callback):
    """The task's own metrics, added before the engine writes ``metrics.json``."""

    def __init__(self, prepared: Prepared):
        self.prepared = prepared

    def on_fit_end(self, trainer, model, metrics) -> None:
        p = self.prepared
        p.task.finish(p.cfg, p.task_run, metrics)
        _routing_analyses(p.cfg, p.task, p.task_run, metrics)


def _analysis(cfg: DictConfig, task: Task, task_run: TaskRun):
    """``(analysis config, AnalysisInputs)`` when the run's analyses are on and it has MoE layers."""
    from core.analytics import moe_layers

    a = cfg.get("analysis")
    if not a or not a.get("enabled") or not moe_layers(task_run.model):
        return None, None
    inputs = task.analysis_inputs(cfg, task_run)
    return (a, inputs) if inputs is not None else (None, None)


def _add_routing_snapshots(cfg: DictConfig, task: Task, task_run: TaskRun, out_dir: Path) -> None:
    """The early-routing-learning snapshots (``analysis.snapshot_fractions`` of the training steps)."""
    from core.analytics import RoutingSnapshots, snapshot_steps

    a, inputs = _analysis(cfg, task, task_run)
    if a is None:
        return
    total = cfg.trainer.max_epochs * len(task_run.train_loader)
    if cfg.trainer.get("max_steps") is not None:
        total = min(total, cfg.trainer.max_steps)
    steps = snapshot_steps(a.get("snapshot_fractions"), total)
    if steps:
        task_run.callbacks.append(RoutingSnapshots(steps, inputs.batches, a.max_batches, out_dir, inputs.forward,
                                                   inputs.labels))


def _routing_analyses(cfg: DictConfig, task: Task, task_run: TaskRun, metrics: dict) -> None:
    """``core.analytics.analyse_routing`` at the end of training: ``analysis.json`` in the run
    directory and its scalars in ``metrics["analysis"]``."""
    import json

    from core.analytics import RoutingSnapshots, analyse_routing, analysis_summary, plain

    a, inputs = _analysis(cfg, task, task_run)
    if a is None:
        return
    snaps = next((c.snapshots for c in task_run.callbacks if isinstance(c, RoutingSnapshots)), None)
    analysis = analyse_routing(task_run.model, inputs.batches, a, snaps, inputs.forward, inputs.labels,
                               inputs.not_applicable)
    if is_main_process():
        write_text_atomic(run_dir(cfg.get("output_dir")) / "analysis.json",
                          json.dumps(analysis, indent=2, default=plain) + "\n")
    metrics["analysis"] = analysis_summary(analysis)


def fit(p: Prepared) -> dict:
    """Train a prepared run; returns the metrics written to ``metrics.json``."""
    from core.tracking import build_tracking

    r = p.task_run
    tracking = build_tracking(p.cfg.get("logger"), p.trainer.run_config, r.evaluate, r.eval_loaders, r.state)
    try:
        metrics = p.trainer.fit(r.model, r.train_loader, r.loss_fn, r.evaluate, eval_loaders=dict(r.eval_loaders),
                                count_examples=r.count_examples, callbacks=[*r.callbacks, tracking, _Finish(p)])
        if p.cfg.get("plots") and p.trainer.is_main:
            from core.plots import draw_run

            for path in draw_run(p.trainer.out_dir):
                log.info("figure written: %s", path)
        return metrics
    finally:
        tracking.close()
        if p.restore_threads is not None:
            torch.set_num_threads(p.restore_threads)
        if p.lock is not None:
            p.lock.release()


def train(cfg: DictConfig, task: Task | None = None) -> dict:
    """Prepare and train one run without the command line's error handling (tests, notebooks);
    returns the metrics written to ``metrics.json``. ``task`` defaults to the registered task of
    ``cfg.domain``."""
    if task is None:
        task = task_class(str(cfg.get("domain")))()
    return fit(prepare(cfg, task))


def summary(metrics: Mapping, task: Task) -> str:
    """The printed summary of a finished run: the same lines in every domain, the task's quality
    lines first, the run directory last."""
    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    unit = task.unit
    eval_rates = [v for k, v in metrics.items() if k.endswith("_examples_per_s") and k != "examples_per_s"]
    lines = [
        f"{metrics.get('model')} on {metrics.get('dataset')}, router {metrics.get('router')}: "
        f"{metrics['epochs']} epochs, {metrics['steps']} steps, {metrics['wall_time_s'] / 60:.1f} min on {metrics['device']}",
        *task.summary(metrics),
        f"  throughput      {metrics['examples_per_s']:.0f} {unit}s/s training"
        + (f", {eval_rates[0]:.0f} {unit}s/s evaluation" if eval_rates else ""),
        f"  parameters      {metrics['params_total'] / 1e6:.3f}M total, {metrics['params_active'] / 1e6:.3f}M active per {task.active_per or unit}",
    ]
    if metrics.get("router") != "none":
        lines.append(f"  load balance    CV² {fmt(metrics.get('load_cv2'), '.4f')}, dropped "
                     f"{fmt(metrics.get('dropped_fraction'), '.2%')} of choices, "
                     f"{fmt(metrics.get('experts_per_token'), '.2f')} experts per token")
    if metrics.get("skipped_steps"):
        lines.append(f"  skipped steps   {metrics['skipped_steps']} (non-finite loss)")
    lines.append(f"  run directory   {metrics.get('run_dir')}")
    return "\n".join(lines)


# -------------------------------------------------------------------------------- the command line


def is_multirun() -> bool:
    """Whether this process runs one job of a Hydra multirun (``-m``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _unwrap(err: BaseException) -> BaseException:
    """Hydra's ``InstantiationException`` around a constructor's own ``ValueError``/``OSError``."""
    from hydra.errors import InstantiationException

    while isinstance(err, InstantiationException) and isinstance(err.__cause__, _PREPARE_ERRORS):
        err = err.__cause__
    return err


def _fail(err: BaseException, code: int) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    message = " ".join(str(err).split("\n")) or type(err).__name__
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _not_applicable(cfg: DictConfig, task: Task, err: BaseException) -> None:
    out = run_dir(cfg.get("output_dir"))
    check_fresh_directory(out, _output_key(cfg))  # an n/a record never replaces an earlier run's work
    out.mkdir(parents=True, exist_ok=True)
    router = cfg.get("router_name") or hydra_choice("router")
    if not router and OmegaConf.is_dict(cfg.get("router")):
        router = str(cfg.router.get("_target_", "custom")).rsplit(".", 2)[-2]
    record = {"domain": task.name, "router": router, "model": cfg.get("model_name") or hydra_choice("model"), "status": "n/a",
              "reason": str(err)}
    write_json_atomic(out / "metrics.json", record)
    print(f"n/a: {err}", file=sys.stderr, flush=True)


def run(cfg: DictConfig, task: Task) -> Any:
    """The command line's run: ``prepare`` and ``fit`` with the error handling of the module
    docstring; prints the summary and returns the sweeper's objective (rank 0; None elsewhere)."""
    na_types = (NotApplicableError, *task.not_applicable)
    try:
        prepared = prepare(cfg, task)
    except Exception as err:
        err = _unwrap(err)
        if not isinstance(err, _PREPARE_ERRORS):
            raise
        # a ConfigError that is not a NotApplicableError always stops: the sweep's shared config is at fault
        na = isinstance(err, na_types) and (isinstance(err, NotApplicableError) or not isinstance(err, ConfigError))
        if na and is_multirun():
            try:
                _not_applicable(cfg, task, err)
            except ConfigError as taken:
                _fail(taken, CONFIG_ERROR_EXIT)
            return None
        _fail(err, CONFIG_ERROR_EXIT)
    try:
        metrics = fit(prepared)
    except (NonFiniteLossError, WriteError) as err:  # diverged, or a file of the run could not be written
        _fail(err, NONFINITE_EXIT)
    except ConfigError as err:
        _fail(err, CONFIG_ERROR_EXIT)
    if not is_main_process():
        return None
    print(summary({**metrics, "run_dir": prepared.trainer.out_dir.resolve()}, task), flush=True)
    return task.objective(metrics)


def hydra_error_line(err: BaseException) -> str:
    """Hydra's report of a command line it could not compose, as one line: an option that no config
    group holds names the group's options; an override of a key the config lacks, or one that does not
    parse, keeps Hydra's own words without the search path and node details."""
    from hydra.errors import MissingConfigException

    missing = getattr(err, "missing_cfg_file", None)
    options = getattr(err, "options", None)
    if isinstance(err, MissingConfigException) and missing and options and "/" in missing:
        group, name = missing.rsplit("/", 1)
        return (f"{group}={name} is not allowed: config group '{group}' has no option '{name}'; "
                f"use one of {', '.join(options)}")
    def lines(e: BaseException | None) -> list[str]:
        kept = []
        for line in str(e or "").splitlines():
            line = line.strip()
            if line.startswith("Config search path"):
                break
            if line not in ("", "^") and not line.startswith(("full_key:", "object_type", "reference_type")):
                kept.append(line)
        return kept

    message = " ".join(lines(err)) or type(err).__name__
    override = getattr(err, "override", None)
    if override and override not in message:
        message = f"cannot parse the override {override!r}: {message}"
    cause = " ".join(lines(err.__cause__))
    return f"{message} ({cause})" if cause and cause not in message else message


def command_line(main: Callable[[], Any]) -> None:
    """Run a domain's ``@hydra.main`` function as the command line does, with Hydra's own errors before
    the run (composing the config from the overrides) answered like the suite's: one line,
    ``error: ...``, exit status 2. ``HYDRA_FULL_ERROR=1`` keeps Hydra's report."""
    import hydra._internal.utils as hydra_utils
    from hydra.errors import ConfigCompositionException, OverrideParseException

    report = hydra_utils.run_and_report

    def one_line(func: Callable[[], Any]) -> Any:
        try:
            return func()
        except (ConfigCompositionException, OverrideParseException) as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {hydra_error_line(err)}", file=sys.stderr, flush=True)
            sys.exit(CONFIG_ERROR_EXIT)
        except Exception as err:  # Hydra's own report: the traceback of a bug, without Hydra's frames
            return report(functools.partial(_raise, err))

    hydra_utils.run_and_report = one_line
    try:
        main()
    finally:
        hydra_utils.run_and_report = report


def _raise(err: BaseException) -> None:
    raise err
