"""What a callback sees: the loop's position (``TrainState``, also the checkpoint's ``state``) and the
hooks of ``Callback`` that ``Trainer.fit(..., callbacks=...)`` calls.

Order of the hooks in one ``fit``, on every rank under torchrun::

    on_fit_start
    per step:   on_step_start, on_step_end
    per epoch:  on_evaluate (when the epoch is evaluated), on_epoch_end
    at the end: on_evaluate (when the final state was not evaluated yet), on_fit_end

``on_fit_end`` runs before ``metrics.json`` is written, so what a callback adds to the metrics is in
the file and in what ``fit`` returns.
"""

from __future__ import annotations

import dataclasses

from torch import nn


@dataclasses.dataclass
class TrainState:
    """Where the training loop stands; saved in every checkpoint (``dataclasses.asdict``), so a resumed
    run continues from it. Adding a field changes the checkpoint format.

    Args:
        epoch: the current epoch (0-based).
        batch: batches of ``epoch`` already consumed (the resume position inside the epoch).
        step: optimizer steps taken, skipped non-finite steps included; before a step, the step about
            to run.
        skipped: steps skipped for a non-finite loss or gradient (``trainer.skip_nonfinite``).
        epoch_loss_sum: the epoch's loss summed over its examples (finite steps only).
        epoch_examples: the examples behind ``epoch_loss_sum``.
        train_examples: training examples seen by the whole run (every rank's, skipped steps included).
        train_time_s: seconds spent in training steps (no evaluation, checkpoint or callback).
        wall_time_s: the run's seconds so far, as of the last checkpoint or the end of ``fit``.
        last_eval: the latest evaluation's metrics (``<loader>_<metric>``, routing statistics).
        last_eval_step: the step at which ``last_eval`` was taken (-1: none yet).
    """

    epoch: int = 0
    batch: int = 0
    step: int = 0
    skipped: int = 0
    epoch_loss_sum: float = 0.0
    epoch_examples: int = 0
    train_examples: int = 0
    train_time_s: float = 0.0
    wall_time_s: float = 0.0
    last_eval: dict = dataclasses.field(default_factory=dict)
    last_eval_step: int = -1


class Callback:
    """Hooks into ``Trainer.fit``; every method is a no-op, override the ones needed.

    Every hook gets the ``Trainer`` (``out_dir``, ``cfg``, ``device``, ``rank``, ``world_size``,
    ``is_main``) and the model being trained, and is called on every rank under torchrun (write files
    on ``trainer.is_main`` only). The ``state`` passed is the live ``TrainState``: read it, do not
    change it. The time spent in ``on_step_start`` and ``on_step_end`` is left out of the training
    throughput.

    A callback that runs the model itself (a forward on some batches) sets ``calls_model = True``:
    under FSDP its hooks then run with the root's parameters gathered (``core.parallel``).
    """

    calls_model: bool = False

    def on_fit_start(self, trainer, model: nn.Module, state: TrainState) -> None:
        """The model is on the device and any resume happened: ``state.step`` is the first step to
        run (past 0 in a resumed run; equal to the total when a finished run is resumed)."""

    def on_step_start(self, trainer, model: nn.Module, state: TrainState) -> None:
        """Before the forward of step ``state.step`` (model in training mode)."""

    def on_step_end(self, trainer, model: nn.Module, state: TrainState, record: dict | None) -> None:
        """After the optimizer step (``state.step`` already counts it).

        Args:
            record: the step's ``history.jsonl`` line (``step``, ``epoch``, ``loss``, ``task_loss``,
                ``lr``, ``grad_norm``, ``aux_<term>``, the loss function's logs), built for every
                step, logged or not; None when the step was skipped (non-finite loss or gradient).
        """

    def on_evaluate(self, trainer, model: nn.Module, state: TrainState, metrics: dict) -> None:
        """After an evaluation (end of an evaluated epoch, or the final one).

        Args:
            metrics: ``state.last_eval``: ``<loader>_<metric>`` values with the evaluation's routing
                statistics (``<loader>_routing``, ``<loader>_routing_layers``); the epoch's history
                line and the final metrics are taken from it after this hook.
        """

    def on_epoch_end(self, trainer, model: nn.Module, state: TrainState) -> None:
        """After the epoch's ``end_of_epoch`` history line, before its checkpoint: ``state.epoch`` is
        the epoch that ended (also called when ``max_steps`` ends the run mid-epoch)."""

    def on_fit_end(self, trainer, model: nn.Module, metrics: dict) -> None:
        """The final metrics, before ``metrics.json`` is written: keys added to ``metrics`` in place
        are written and returned by ``fit``. Under torchrun every rank gets rank 0's metrics and rank
        0's are written."""
