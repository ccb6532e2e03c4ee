"""The shared training engine: one loop that every domain (vision, recsys, multimodal, nlp) reuses.

What it does: AdamW (no weight decay on biases, norms, scalars and the model's
``no_weight_decay()`` names), linear warmup then cosine decay, gradient clipping, the routers'
auxiliary losses (``core.collect_aux_loss``) added to the task loss, ``core.after_optimizer_step``
after every optimizer step, evaluation at the end of every epoch, a tqdm progress bar, CPU or CUDA
(bf16 autocast on CUDA only; fp32 on CPU, where bf16 is slow without native support), seeding,
atomic checksummed checkpoints (last + previous) with exact mid-epoch resume, a guard against
non-finite losses, callbacks at the steps, evaluations and epochs of the loop, and ``metrics.json``
/ ``history.jsonl`` in the run directory.

The domain supplies the model, the loaders, ``loss_fn(model, batch) -> (loss, logs)`` and
``evaluate(model, batches) -> dict``; the engine knows nothing else about it.

Example::

    from core.engine import TensorLoader, Trainer, TrainerConfig, seed_everything

    seed_everything(0)
    model = build_model()
    train = TensorLoader((x_train, y_train), batch_size=128, shuffle=True, drop_last=True)
    test = TensorLoader((x_test, y_test), batch_size=512)

    def loss_fn(model, batch):
        x, y = batch
        loss = F.cross_entropy(model(x), y)
        return loss, {}

    def evaluate(model, batches):
        correct = n = 0
        for x, y in batches:
            correct += (model(x).argmax(-1) == y).sum().item(); n += len(y)
        return {"acc": correct / n}

    trainer = Trainer(TrainerConfig(max_epochs=3, lr=1e-3), out_dir="runs/x", seed=0,
                      info={"domain": "vision", "router": "topk"})
    metrics = trainer.fit(model, train, loss_fn, evaluate, eval_loaders={"test": test})
    metrics["test_acc"], metrics["examples_per_s"], metrics["params_active"]

Callbacks: subclass ``Callback`` and override the hooks needed (``on_fit_start``, ``on_step_start``,
``on_step_end``, ``on_evaluate``, ``on_epoch_end``, ``on_fit_end``); ``fit(..., callbacks=[...])``
calls them on every rank, with the loop's position in a ``TrainState``. ``on_fit_end`` may add keys
to the final metrics before ``metrics.json`` is written (once, atomically)::

    class Note(Callback):
        def on_fit_end(self, trainer, model, metrics):
            metrics["note"] = "baseline"

Resuming: ``TrainerConfig(resume=True)`` continues from ``<out_dir>/checkpoints/last.ckpt`` (or
``prev.ckpt`` when the last one fails its ``last.ckpt.sha256`` checksum) in the same batch order, so a
killed-and-resumed CPU run ends with the uninterrupted run's metrics. Checkpoints are plain
``torch.save`` files: ``torch.load(path)`` reads them.

Active parameters are *measured*: non-expert parameters plus, per MoE layer, its expert parameters
× (experts per token / E) counted by ``core.routing_stats`` during the final evaluation (so expert
choice, capacity drops and Soft MoE slots are accounted for as they happened); before any forward
the router's ``top_k`` (else E) is used.

Modules, bottom up: ``config`` (``TrainerConfig``, seeding, device), ``loaders`` (batches),
``checkpoint`` (checkpoint files, generator states), ``optim`` (AdamW, schedule), ``callbacks``
(``TrainState``, ``Callback``), ``records`` (``history.jsonl``, ``metrics.json``, parameter and FLOP
counts), ``loop`` (``Trainer``). Import from ``core.engine``; the modules are its layout.
"""

from __future__ import annotations

from core.engine.callbacks import Callback, TrainState
from core.engine.checkpoint import (checksum_path, find_checkpoint, is_training_checkpoint, load_checkpoint, rng_state,
                                    save_checkpoint, set_rng_state)
from core.engine.config import TrainerConfig, derive_seed, resolve_device, seed_everything
from core.engine.loaders import TensorLoader, batch_size_of, iter_batches, move_to, shard_batch, shard_slice
from core.engine.loop import LossFn, NonFiniteLossError, Trainer
from core.engine.optim import build_optimizer, build_scheduler, warmup_cosine
from core.engine.records import (
    EvalFn, append_history, count_parameters, final_metrics, flops_per_example, json_value, truncate_history,
    WriteError, write_atomic, write_json_atomic, write_text_atomic,
)

# the names of the one-module engine, for code and tests written against it
__all__ = [
    "Callback", "EvalFn", "LossFn", "NonFiniteLossError", "TensorLoader", "TrainState", "Trainer", "TrainerConfig",
    "append_history", "batch_size_of", "build_optimizer", "build_scheduler", "checksum_path", "count_parameters",
    "derive_seed", "final_metrics", "find_checkpoint", "flops_per_example", "is_training_checkpoint", "iter_batches",
    "json_value", "load_checkpoint",
    "move_to", "resolve_device", "rng_state", "save_checkpoint", "seed_everything", "set_rng_state", "shard_batch",
    "shard_slice", "truncate_history", "warmup_cosine", "WriteError", "write_atomic", "write_json_atomic",
    "write_text_atomic",
]
