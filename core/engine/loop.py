"""The training loop, ``Trainer`` (what it does: the ``core.engine`` package docstring).

``Trainer.fit`` reads as the loop it runs: prepare (device, ranks, optimizer, schedule), start or
resume, then per epoch the training steps (``_train_step``) with their in-epoch checkpoints and the
epoch's end (history line, evaluation when due, checkpoint), and last the final evaluation and
metrics (``_finish``). The position is a ``TrainState``; the rest that one ``fit`` shares between its
pieces is a ``_Run``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from core import distributed as dist_utils
from core import stats
from core.checks import ConfigError
from core.engine.callbacks import Callback, TrainState
from core.engine.checkpoint import (find_checkpoint, load_distributed_tensors, rng_state, save_checkpoint,
                                    save_distributed_checkpoint, set_rng_state)
from core.engine.config import TrainerConfig, derive_seed, resolve_device
from core.engine.loaders import batch_size_of, iter_batches, move_to
from core.engine.optim import build_optimizer, build_scheduler
from core.engine.records import (EvalFn, append_history, final_metrics, json_value, truncate_history, write_atomic,
                                 write_json_atomic)

# one logger for the whole engine: log lines keep the name (``core.engine``) they had in one module
log = logging.getLogger(__package__)

LossFn = Callable[[nn.Module, Any], "tuple[torch.Tensor, dict]"]


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the tensor itself otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


class NonFiniteLossError(FloatingPointError):
    """The loss (or one of its terms, or the gradient norm) became NaN or infinite."""


@dataclasses.dataclass
class _Run:
    """One call of ``Trainer.fit``: what its pieces share besides the ``TrainState`` (nothing here is
    checkpointed; a resumed run rebuilds it)."""

    model: nn.Module
    train_loader: Any
    loss_fn: LossFn
    evaluate: EvalFn
    eval_loaders: dict
    count_examples: Callable[[Any], int]
    callbacks: tuple
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    parallel: Any             # ``core.parallel.Parallel``: the module called for the loss, DDP/FSDP's hooks
    params: list              # the trainable parameters (clipping)
    steps_per_epoch: int
    total_steps: int
    step_records: bool        # a callback overrides on_step_end: build every step's record, logged or not
    t_start: float = 0.0      # perf_counter when training started in this process
    wall_before: float = 0.0  # the run's wall time before this process (a resumed run)
    t_step: float = 0.0       # where the current step's timing window opened
    bar: Any = None           # the tqdm bar, or None


def _overrides(callback: Callback, hook: str) -> bool:
    """Whether ``callback`` has its own ``hook`` rather than ``Callback``'s no-op."""
    return getattr(type(callback), hook, None) is not getattr(Callback, hook)


class Trainer:
    """The training loop (see the ``core.engine`` package docstring).

    Callbacks read ``out_dir``, ``cfg``, ``device``, ``rank``, ``world_size`` and ``is_main``.

    Args:
        config: a ``TrainerConfig``.
        out_dir: run directory for ``metrics.json``, ``history.jsonl`` and ``checkpoints/``.
        seed: the run's seed (data order, augmentation; global RNGs are seeded by the caller).
        info: constant fields copied into ``metrics.json`` (domain, router, model...).
        run_config: the resolved config of the whole run, kept in every checkpoint so that a resumed
            run can be checked against it (``core.rundir``).
    """

    def __init__(self, config: TrainerConfig, out_dir: str | os.PathLike, seed: int = 0, info: Mapping | None = None,
                 run_config: Mapping | None = None):
        self.cfg = config
        self.out_dir = Path(out_dir)
        self.seed = int(seed)
        self.info = dict(info or {})
        self.run_config = run_config
        self.device = resolve_device(config.device)
        # under torchrun (WORLD_SIZE > 1): join the process group (gloo on CPU, NCCL on CUDA)
        dist_utils.init_distributed(self.device.type)
        self.device = dist_utils.local_device(self.device)
        self.rank, self.world_size = dist_utils.get_rank(), dist_utils.get_world_size()
        self.is_main = self.rank == 0
        if not self.is_main:  # one log: the other ranks report warnings only
            logging.getLogger().setLevel(logging.WARNING)
        bf16 = config.precision == "bf16" or (config.precision == "auto" and self.device.type == "cuda")
        if bf16 and self.device.type != "cuda":
            log.warning("trainer.precision=bf16 on %s: using fp32 (bf16 autocast is for CUDA)", self.device)
            bf16 = False
        self.bf16 = bf16
        self.ckpt_path = self.out_dir / "checkpoints" / "last.ckpt"
        self.history_path = self.out_dir / "history.jsonl"

    def autocast(self):
        """The run's precision context: bf16 autocast on CUDA when enabled, else nothing."""
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # -- public API --------------------------------------------------------------------------------

    def fit(self, model: nn.Module, train_loader, loss_fn: LossFn, evaluate: EvalFn,
            eval_loaders: Mapping[str, Any] | None = None,
            count_examples: Callable[[Any], int] = batch_size_of,
            callbacks: Sequence[Callback] = ()) -> dict:
        """Train, evaluate every epoch and at the end, and return (and write) the final metrics.

        Args:
            model: the model (moved to the trainer's device).
            train_loader: a ``TensorLoader``-like object or any re-iterable of batches with ``len``.
            loss_fn: ``(model, batch) -> (task_loss, logs)``; aux losses are added by the engine.
            evaluate: ``(model, batches) -> {metric: value}``, run under no_grad in eval mode.
            eval_loaders: ``{name: loader}``; metrics appear as ``<name>_<metric>``.
            count_examples: examples in a batch (throughput).
            callbacks: ``Callback``s, called in this order at each hook.
        """
        run = self._prepare(model, train_loader, loss_fn, evaluate, dict(eval_loaders or {}), count_examples,
                            tuple(callbacks))
        state = self._initial_state(run)
        self._notify(run, "on_fit_start", state)
        run.t_start, run.wall_before = time.perf_counter(), state.wall_time_s
        run.bar = self._progress(run.total_steps, state.step)
        try:
            while state.step < run.total_steps and state.epoch < self.cfg.max_epochs:
                self._train_epoch(run, state)
                self._end_epoch_if_due(run, state)
        finally:
            if run.bar is not None:
                run.bar.close()
        return self._finish(run, state)

    # -- the loop's pieces, in the order they run ----------------------------------------------------

    def _prepare(self, model: nn.Module, train_loader, loss_fn: LossFn, evaluate: EvalFn, eval_loaders: dict,
                 count_examples: Callable[[Any], int], callbacks: tuple) -> _Run:
        """The run directory, the model on the device (spread over the ranks under torchrun), the
        optimizer and the schedule."""
        from core.parallel import Parallel

        cfg = self.cfg
        self.out_dir.mkdir(parents=True, exist_ok=True)
        model.to(self.device)
        # under torchrun: rank 0's weights everywhere, the experts over the ranks, DDP or FSDP around the loss
        parallel = Parallel(model, loss_fn, cfg.data_parallel, cfg.expert_parallel, self.device, self.bf16,
                            cfg.expert_parallel_size)
        model = parallel.model  # under FSDP a copy that trains sharded; the caller's is refilled at the end
        if self.world_size > 1:  # a random stream per rank (router noise, dropout) derived from the seed
            torch.manual_seed(derive_seed(self.seed, self.rank, self.world_size))
        if cfg.compile:  # in place: state_dict keys stay those of the uncompiled model
            model.compile()
        steps_per_epoch = len(train_loader)
        if steps_per_epoch == 0:
            raise ValueError("the training loader yields no batch: more data or a smaller batch_size is needed.")
        total_steps = cfg.max_epochs * steps_per_epoch
        if cfg.max_steps is not None:
            total_steps = min(total_steps, cfg.max_steps)
        self._check_warmup(total_steps, steps_per_epoch)
        optimizer = build_optimizer(model, cfg)
        parallel.adapt_optimizer(optimizer)
        return _Run(
            model=model, train_loader=train_loader, loss_fn=loss_fn, evaluate=evaluate, eval_loaders=eval_loaders,
            count_examples=count_examples, callbacks=callbacks, optimizer=optimizer,
            scheduler=build_scheduler(optimizer, cfg, total_steps), parallel=parallel,
            params=[p for p in model.parameters() if p.requires_grad],
            steps_per_epoch=steps_per_epoch, total_steps=total_steps,
            # records for steps that are not logged cost a device sync each: only for a callback that reads them
            step_records=any(_overrides(cb, "on_step_end") for cb in callbacks),
        )

    def _check_warmup(self, total_steps: int, steps_per_epoch: int) -> None:
        """``warmup_steps`` must be shorter than the run (known only now, from the loader's length): a
        longer warmup would never reach the peak learning rate nor decay. A ``ConfigError``, which the
        command line prints as one line (exit 2)."""
        cfg = self.cfg
        if cfg.warmup_steps is None or cfg.warmup_steps < total_steps:
            return
        limit = (f"trainer.max_steps={cfg.max_steps}" if cfg.max_steps is not None and cfg.max_steps <= total_steps
                 else f"trainer.max_epochs={cfg.max_epochs} of {steps_per_epoch} batches")
        raise ConfigError("trainer.warmup_steps", cfg.warmup_steps,
                          f"the run has only {total_steps} steps ({limit}); give fewer warmup steps than that, or "
                          f"trainer.warmup_steps=null for warmup_fraction={cfg.warmup_fraction} of the run")

    def _initial_state(self, run: _Run) -> TrainState:
        """The checkpoint's state with ``trainer.resume`` (when one is found), else a fresh one and no history."""
        if self.cfg.resume:
            return self._resume(run)
        if self.is_main:
            self.history_path.unlink(missing_ok=True)
        return TrainState()

    def _train_epoch(self, run: _Run, state: TrainState) -> None:
        """The steps of epoch ``state.epoch`` from batch ``state.batch`` on, up to the run's last step,
        with the in-epoch checkpoints."""
        run.model.train()
        run.t_step = time.perf_counter()
        for batch in iter_batches(run.train_loader, state.epoch, state.batch, self.seed, self.rank, self.world_size):
            run.t_step += self._notify(run, "on_step_start", state)
            record = self._train_step(run, state, batch)
            run.t_step += self._notify(run, "on_step_end", state, record)
            if state.step >= run.total_steps:
                break
            self._checkpoint_if_due(run, state)

    def _train_step(self, run: _Run, state: TrainState, batch) -> dict | None:
        """One optimizer step on ``batch`` (or, with ``skip_nonfinite``, a skipped one); returns the
        step's record (also the ``history.jsonl`` line on a logged step), None when skipped or when
        nothing reads it."""
        model = run.model
        batch = move_to(batch, self.device)
        n = run.count_examples(batch)
        with self.autocast():  # the loss through DDP/FSDP's module when several ranks train
            task_loss, logs, aux_terms = run.parallel.module(batch)
        loss = task_loss.float() + stats.collect_aux_loss(model)
        bad = None if torch.isfinite(loss) else self._offending_term(task_loss, aux_terms)
        share, n, bad, loss_value = self._across_ranks(loss, n, bad)
        grad_norm = None
        if bad is None:
            grad_norm, bad = self._backward(run, loss, share)
        self._apply_step(run, state, bad)
        self._count_step(run, state, n, loss_value, bad)
        logged = state.step % self.cfg.log_every_steps == 0
        if bad is not None or not (logged or run.step_records):
            return None
        record = {
            "step": state.step, "epoch": state.epoch, "loss": loss_value,
            "task_loss": float(task_loss.detach()), "lr": run.scheduler.get_last_lr()[0],
            **({"grad_norm": grad_norm} if grad_norm is not None else {}),
            **{f"aux_{k}": float(v.detach()) for k, v in aux_terms.items()},
            **{k: json_value(v) for k, v in logs.items()},
        }
        if logged:
            self._append_history(record)
        return record

    def _backward(self, run: _Run, loss: torch.Tensor, share: float) -> tuple[float | None, str | None]:
        """Gradients of the global mean loss, summed over the ranks and clipped; returns ``(gradient
        norm or None without clipping, why the step must be skipped or None)``."""
        (loss if share == 1.0 else loss * share).backward()
        run.parallel.after_backward()
        grad_norm = self._clip(run)
        if grad_norm is not None and not math.isfinite(grad_norm):
            return grad_norm, f"gradient norm={grad_norm}"
        return grad_norm, None

    def _apply_step(self, run: _Run, state: TrainState, bad: str | None) -> None:
        """The optimizer step and the routers' updates, or the skip of a non-finite step (an error
        unless ``skip_nonfinite``); the schedule advances either way."""
        if bad is not None:
            if not self.cfg.skip_nonfinite:
                raise NonFiniteLossError(
                    f"non-finite loss at step {state.step} (epoch {state.epoch}, batch {state.batch}): "
                    f"{bad}. Set trainer.skip_nonfinite=true to skip such steps.")
            log.warning("step %d skipped: non-finite %s", state.step, bad)
            state.skipped += 1
            self._check_skipped(state, run.total_steps, final=False)
        else:
            run.optimizer.step()
            dist_utils.sum_router_loads(run.model)
            stats.after_optimizer_step(run.model)
        run.optimizer.zero_grad(set_to_none=True)
        run.scheduler.step()
        dist_utils.follow_schedule(run.model, run.scheduler.get_last_lr()[0])

    def _count_step(self, run: _Run, state: TrainState, n: int, loss_value: float, bad: str | None) -> None:
        """Advance the position, the epoch's loss (finite steps), the training time and examples, and
        the progress bar."""
        state.step += 1
        state.batch += 1
        if bad is None:
            state.epoch_loss_sum += loss_value * n
            state.epoch_examples += n
        now = time.perf_counter()
        state.train_time_s += now - run.t_step
        state.train_examples += n
        run.t_step = now
        if run.bar is not None:
            run.bar.update(1)
            if bad is None:
                run.bar.set_postfix(loss=f"{loss_value:.4f}", refresh=False)

    def _check_skipped(self, state: TrainState, total_steps: int, final: bool) -> None:
        """A run that skipped more than ``max_skipped_fraction`` of its steps as non-finite did not
        really train: ``NonFiniteLossError`` naming the count and the share, at the end (``final``),
        or as soon as the run's share is certain to exceed the limit."""
        limit = self.cfg.max_skipped_fraction
        steps = state.step if final else total_steps
        if not state.skipped or steps <= 0 or state.skipped <= limit * steps:
            return
        n = state.skipped
        where = f"of the run's {steps}" if final else f"of the run's {steps} (by step {state.step})"
        were = "were" if n != 1 else "was"
        raise NonFiniteLossError(
            f"{n} step{'s' if n != 1 else ''} {where} ({n / steps:.0%}) {were} skipped for a non-finite loss or "
            f"gradient, more than trainer.max_skipped_fraction={limit} allows: the run did not really train. Lower "
            f"trainer.lr or find the non-finite term (trainer.skip_nonfinite=false stops at the first one), or raise "
            f"trainer.max_skipped_fraction.")

    def _checkpoint_if_due(self, run: _Run, state: TrainState) -> None:
        """The in-epoch checkpoint every ``checkpoint_every_steps`` (its time is not training time)."""
        cfg = self.cfg
        if cfg.checkpoint and cfg.checkpoint_every_steps and state.step % cfg.checkpoint_every_steps == 0:
            self._save(run, state)
            run.t_step = time.perf_counter()

    def _end_epoch_if_due(self, run: _Run, state: TrainState) -> None:
        """When the epoch's batches are done or the run's last step taken: the epoch's history line
        and evaluation (when due), ``on_epoch_end``, the move to the next epoch, the checkpoint."""
        cfg = self.cfg
        epoch_done = state.batch >= run.steps_per_epoch
        last = state.step >= run.total_steps
        if not (epoch_done or last):
            return
        self._end_epoch(run, state, last or epoch_done and (state.epoch + 1) % cfg.eval_every_epochs == 0 or
                        state.epoch + 1 == cfg.max_epochs)
        self._notify(run, "on_epoch_end", state)
        if epoch_done:
            state.epoch += 1
            state.batch = 0
            state.epoch_loss_sum, state.epoch_examples = 0.0, 0
        if cfg.checkpoint:
            self._save(run, state)

    def _end_epoch(self, run: _Run, state: TrainState, do_eval: bool) -> None:
        """The epoch's ``end_of_epoch`` history line: training loss, throughput and routing, and the
        evaluation's metrics when ``do_eval``."""
        dist_utils.sum_routing_stats(run.model)  # every rank's training tokens (evaluation is replicated)
        train_stats = stats.routing_stats(run.model, reset=True)
        record = {
            "epoch": state.epoch, "step": state.step, "end_of_epoch": True,
            "train_loss": state.epoch_loss_sum / max(1, state.epoch_examples),
            "train_examples_per_s": state.train_examples / state.train_time_s if state.train_time_s else 0.0,
            "train_routing": {k: v for k, v in train_stats.items() if k != "layers"},
        }
        if do_eval and run.eval_loaders:
            self._evaluate(run, state)
            record.update({k: v for k, v in state.last_eval.items() if not k.endswith("_routing_layers")})
            summary = ", ".join(f"{k}={v:.4f}" for k, v in state.last_eval.items() if isinstance(v, float))
            log.info("epoch %d step %d: train_loss=%.4f %s", state.epoch, state.step, record["train_loss"], summary)
        self._append_history(record)

    def _evaluate(self, run: _Run, state: TrainState) -> None:
        """Evaluate the current model into ``state.last_eval``, then ``on_evaluate``."""
        with run.parallel.full_root():
            state.last_eval = self._evaluate_all(run.model, run.evaluate, run.eval_loaders)
        state.last_eval_step = state.step
        if run.eval_loaders:
            self._notify(run, "on_evaluate", state, state.last_eval)

    def _finish(self, run: _Run, state: TrainState) -> dict:
        """The final evaluation (unless the last epoch's is current), ``model.pt``, the final metrics,
        ``on_fit_end`` and then ``metrics.json``, written once; none of it when the run skipped more
        than ``max_skipped_fraction`` of its steps (``NonFiniteLossError``)."""
        self._check_skipped(state, run.total_steps, final=True)
        if state.last_eval_step != state.step:  # e.g. resumed from a run that had already finished
            self._evaluate(run, state)
        state.wall_time_s = run.wall_before + time.perf_counter() - run.t_start
        # the caller's model, whole on every rank (experts gathered, FSDP's shards put together)
        run.model = run.parallel.finish()
        metrics = final_metrics(self, run.model, state, run.evaluate, run.eval_loaders, run.total_steps)
        if self.world_size > 1:
            metrics = dist_utils.broadcast_object({**metrics, "world_size": self.world_size,
                                                   "expert_parallel": self.cfg.expert_parallel})
        self._save_model(run.model)
        self._notify(run, "on_fit_end", metrics)
        if self.is_main:
            write_json_atomic(self.out_dir / "metrics.json", metrics)
        if self.world_size > 1:
            dist.barrier()
        return metrics

    # -- helpers -------------------------------------------------------------------------------------

    def _notify(self, run: _Run, hook: str, *args) -> float:
        """Call ``hook`` of every callback with ``(trainer, model, *args)``; returns the seconds they
        took, which the caller leaves out of the training time."""
        if not run.callbacks:
            return 0.0
        t0 = time.perf_counter()
        gather = hook != "on_fit_end" and any(cb.calls_model and _overrides(cb, hook) for cb in run.callbacks)
        with run.parallel.full_root() if gather else contextlib.nullcontext():
            for callback in run.callbacks:
                getattr(callback, hook)(self, run.model, *args)
        return time.perf_counter() - t0

    def _across_ranks(self, loss: torch.Tensor, n: int, bad: str | None) -> tuple[float, int, str | None, float]:
        """``(share, global examples, agreed non-finite reason, global mean loss)``. Every rank takes or
        skips the step together; each rank's loss is weighted by its share of the global batch, so
        the summed gradients are those of the global mean (one process: ``(1, n, bad, loss)``)."""
        if self.world_size <= 1:
            return 1.0, n, bad, float(loss.detach())
        ok = bad is None
        vec = torch.tensor([n, float(loss.detach()) * n if ok else 0.0, 0.0 if ok else 1.0],
                           dtype=torch.float64, device=self.device)
        dist.all_reduce(vec)
        total, loss_sum, ranks_bad = vec.tolist()
        if ok and ranks_bad:
            bad = f"loss on {int(ranks_bad)} other rank(s)"
        return n / total, int(total), bad, loss_sum / total

    def _clip(self, run: _Run) -> float | None:
        """Clip the global gradient norm to ``grad_clip`` (one norm over every rank's shards); returns
        the norm before clipping (None: no clipping)."""
        if self.cfg.grad_clip:
            return run.parallel.clip_grad_norm_(run.params, self.cfg.grad_clip)
        return None

    @staticmethod
    def _offending_term(task_loss: torch.Tensor, aux_terms: dict) -> str:
        """Which loss term is not finite: the task loss, an auxiliary loss, or only their sum."""
        if not torch.isfinite(task_loss):
            return f"task loss={float(task_loss.detach())}"
        for k, v in aux_terms.items():
            if not torch.isfinite(v):
                return f"auxiliary loss '{k}'={float(v.detach())}"
        return "sum of the loss terms"

    def _progress(self, total: int, initial: int):
        """The tqdm bar on rank 0 (``progress=auto``: on a terminal, not under pytest), else None."""
        show = self.cfg.progress if self.is_main else False
        if show == "auto":
            show = sys.stderr.isatty() and "PYTEST_CURRENT_TEST" not in os.environ
        if not show:
            return None
        from tqdm.auto import tqdm
        return tqdm(total=total, initial=initial, desc=self.info.get("router", "train"), dynamic_ncols=True)

    def _evaluate_all(self, model: nn.Module, evaluate: EvalFn, eval_loaders: dict) -> dict:
        """Every eval loader once; routing statistics of the evaluation are kept with the metrics."""
        was_training = model.training
        model.eval()
        out: dict = {}
        try:
            for name, loader in eval_loaders.items():
                stats.reset_routing_stats(model)
                n_examples = 0
                t0 = time.perf_counter()

                def batches(loader=loader):
                    nonlocal n_examples
                    for b in iter_batches(loader, 0, 0, self.seed):
                        b = move_to(b, self.device)
                        n_examples += batch_size_of(b)
                        yield b

                with torch.no_grad(), self.autocast():
                    res = evaluate(model, batches())
                dt = time.perf_counter() - t0
                out.update({f"{name}_{k}": json_value(v) for k, v in res.items()})
                out[f"{name}_examples_per_s"] = n_examples / dt if dt > 0 else 0.0
                routing = stats.routing_stats(model, reset=True)
                out[f"{name}_routing"] = {k: v for k, v in routing.items() if k != "layers"}
                out[f"{name}_routing_layers"] = routing["layers"]
        finally:
            model.train(was_training)
        return out

    def _append_history(self, record: dict) -> None:
        """One ``history.jsonl`` line (rank 0 only)."""
        if self.is_main:
            append_history(self.history_path, record)

    def _save_model(self, model: nn.Module) -> None:
        """``model.pt``: the final weights as a plain CPU state dict, with ``save_model`` (every rank
        takes part in gathering them, rank 0 writes)."""
        if not self.cfg.save_model:
            return
        full = dist_utils.full_state_dict(model)
        if self.is_main:
            weights = {k: v.detach().cpu() for k, v in full.items()}
            write_atomic(self.out_dir / "model.pt", lambda f: torch.save(weights, f))

    def _save(self, run: _Run, state: TrainState) -> None:
        """Write the checkpoint: one file in one process (rank 0 alone writes it), a
        ``torch.distributed.checkpoint`` directory of every rank's shards under torchrun (models with
        torchrec-sharded tables: one file in the whole layout). A non-finite parameter stops the run
        instead: a checkpoint is always one to resume from."""
        model = run.model
        bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(_local(p)).all())]
        if self.world_size > 1:
            bad = [name for names in dist_utils.all_gather_object(bad[:1]) for name in names]
        for name in bad[:1]:
            raise NonFiniteLossError(f"parameter {name} is not finite at step {state.step}: checkpoint not written.")
        state.wall_time_s = run.wall_before + time.perf_counter() - run.t_start
        common = {
            "scheduler": run.scheduler.state_dict(),
            "rng": rng_state(),
            "state": dataclasses.asdict(state),
            "trainer": dataclasses.asdict(self.cfg),
            "info": self.info,
            "config": self.run_config,
            "world_size": self.world_size,
        }
        if self.world_size > 1:
            common["rng_ranks"] = dist_utils.all_gather_object(common["rng"])
        if self._distributed_checkpoint(run):
            model_sd, optim_sd = run.parallel.state_dicts(run.optimizer)
            extra = {**common, "buffers": dist_utils.checkpoint_buffers(model, exclude=model_sd)}
            save_distributed_checkpoint(self.ckpt_path.with_suffix(".dcp"), {"model": model_sd, "optimizer": optim_sd},
                                        extra, self.is_main)
            return
        sd = dist_utils.full_state_dict(model)
        payload = {
            "model": sd,
            "buffers": dist_utils.checkpoint_buffers(model, exclude=sd),
            "optimizer": dist_utils.full_optimizer_state_dict(run.optimizer),
            "optimizer_params": dist_utils.optimizer_param_names(model, run.optimizer),
            **common,
        }
        if self.is_main:
            save_checkpoint(self.ckpt_path, payload)

    def _distributed_checkpoint(self, run: _Run) -> bool:
        """Several ranks write a ``torch.distributed.checkpoint`` directory, unless the model is
        torchrec's ``DistributedModelParallel`` (its sharded tables and fused optimizer state have no
        such form here: one whole-layout file)."""
        return run.parallel.mode is not None and not run.parallel.torchrec

    def _resume(self, run: _Run) -> TrainState:
        """Model, optimizer, schedule, generators and position from the newest readable checkpoint
        (a fresh state and no history when there is none); history lines after it are dropped.
        Whatever wrote it (one process or W ranks, DDP or FSDP, experts spread or not), the weights
        and optimizer state are resharded to this run's layout."""
        found = find_checkpoint(self.cfg.resume, self.out_dir)
        if found is None:  # starting over would overwrite the run that was asked for
            raise ValueError(f"trainer.resume={self.cfg.resume!r}: there is no readable checkpoint in "
                             f"{self.out_dir / 'checkpoints'}; start a new run without trainer.resume.")
        path, ck = found
        if ck.get("format") == "dcp":
            model_sd, optim_sd = run.parallel.state_dicts(run.optimizer)
            tensors = {"model": model_sd, "optimizer": optim_sd}
            load_distributed_tensors(path, tensors)
            run.parallel.load_state_dicts(run.optimizer, tensors["model"], tensors["optimizer"])
        elif self._distributed_checkpoint(run):  # a one-process file: every rank takes its shards
            named = dist_utils.named_optimizer_state(ck["optimizer"], ck.get("optimizer_params"))
            run.parallel.load_state_dicts(run.optimizer, ck["model"], named, full=True)
        else:
            dist_utils.load_full_state_dict(run.model, ck["model"])
            dist_utils.load_full_optimizer_state_dict(run.model, run.optimizer, ck["optimizer"],
                                                      ck.get("optimizer_params"))
        dist_utils.load_checkpoint_buffers(run.model, ck.get("buffers", {}))
        run.scheduler.load_state_dict(ck["scheduler"])
        state = TrainState(**ck["state"])
        rng_ranks = ck.get("rng_ranks") or [ck["rng"]]
        if len(rng_ranks) == self.world_size:
            set_rng_state(rng_ranks[self.rank])
        else:  # another number of ranks wrote it: a fresh per-rank stream from the position
            set_rng_state(ck["rng"])
            torch.manual_seed(derive_seed(self.seed, self.rank, self.world_size, state.step))
        log.info("resumed from %s at epoch %d, batch %d, step %d", path, state.epoch, state.batch, state.step)
        if self.is_main:  # the interrupted process's lines after the checkpoint
            truncate_history(self.history_path, state.step)
        return state
