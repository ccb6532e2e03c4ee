"""Train a causal MoE language model: ``python -m nlp.train [overrides]``.

The domain's part of a run (``core.run``): a text corpus cut into blocks (``nlp.data``), the
decoder-only LM (``nlp.models``), next-token cross-entropy, and validation loss, perplexity and bits
per token; after training, the routing analyses of ``nlp.analysis`` go to ``analysis.json`` and
their scalars to ``metrics.json``. ``python -m nlp.train`` trains the tiny default (Mixtral-style
top-2 in every block) on the WordNet glosses; ``+router=adamoe`` swaps the router,
``model.moe_layers=none`` gives the dense baseline, ``data.path=book.txt`` any UTF-8 text.
"""

from __future__ import annotations

import json
import math

import hydra
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from core.checks import ConfigError, check_choice, check_int, check_number, check_readable_file, check_target
from core.distributed import is_main_process
from core.engine import TensorLoader
from core.lora_experts import LoRAExperts
from core.run import Task, TaskRun, run
from core.validate import check_router
from nlp.analysis import RoutingSnapshots, analyse_routing, analysis_summary, plain
from nlp.data import build_datasets
from nlp.models import MoETransformerLM, NonCausalRoutingError

__all__ = ["LanguageModelTask", "build_model", "lm_evaluate", "lm_loss", "main", "validate_config"]


def build_model(cfg: DictConfig, vocab_size: int) -> MoETransformerLM:
    """The model of ``cfg.model`` (its ``router`` key reads the top-level ``router`` group). A
    configuration error surfaces as the model's own ``ValueError`` rather than Hydra's wrapper."""
    try:
        return hydra.utils.instantiate(cfg.model, vocab_size=vocab_size)
    except InstantiationException as err:
        if isinstance(err.__cause__, ValueError):
            raise err.__cause__ from None
        raise


def lm_loss(model: MoETransformerLM, batch) -> tuple[torch.Tensor, dict]:
    """Next-token cross-entropy (the engine adds the routers' auxiliary losses)."""
    x_BT, y_BT = batch
    logits_BTV = model(x_BT)
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), y_BT.flatten()), {}


@torch.no_grad()
def lm_evaluate(model: MoETransformerLM, batches) -> dict:
    """Token-level loss, perplexity and bits per token over the batches."""
    total, n = 0.0, 0
    for x_BT, y_BT in batches:
        logits_BTV = model(x_BT)
        total += float(F.cross_entropy(logits_BTV.float().flatten(0, 1), y_BT.flatten(), reduction="sum"))
        n += y_BT.numel()
    loss = total / max(1, n)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bits_per_token": loss / math.log(2)}


class LanguageModelTask(Task):
    """Causal language modelling: validation perplexity (lower is better)."""

    name, metric, higher_is_better, unit, active_per = "nlp", "val_ppl", False, "sequence", "token"
    token_ids, causal = True, True
    not_applicable = (NonCausalRoutingError,)

    def validate(self, cfg: DictConfig) -> int | None:
        return validate_config(cfg)

    def load_data(self, cfg: DictConfig):
        d = cfg.data
        return build_datasets(path=d.path, tokenizer=d.tokenizer, seq_len=d.seq_len, val_fraction=d.val_fraction,
                              with_lemmas=d.with_lemmas, limit_train=d.limit_train, limit_eval=d.limit_eval)

    def build(self, cfg: DictConfig, data) -> TaskRun:
        tokenizer, train_set, val_set = data
        d, a = cfg.data, cfg.analysis
        train_loader = TensorLoader(train_set.tensors(), d.batch_size, shuffle=True,
                                    drop_last=len(train_set) >= d.batch_size)
        val_loader = TensorLoader(val_set.tensors(), d.eval_batch_size or d.batch_size)
        model = build_model(cfg, tokenizer.vocab_size)
        info = {"causal": model.is_causal, "model": cfg.get("model_name") or _model_choice() or "custom",
                "moe_layers": model.moe_layers, "num_experts": cfg.model.num_experts if model.moe_layers else 0,
                "dataset": d.path or "wordnet_glosses", "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
                "seq_len": d.seq_len, "train_tokens": len(train_set) * d.seq_len, "val_tokens": len(val_set) * d.seq_len}
        callbacks = []
        total = _total_steps(cfg.trainer, len(train_loader))
        snap_steps = sorted({int(f * total) for f in (a.snapshot_fractions or []) if 0 <= f < 1})
        if a.enabled and model.moe_layers and snap_steps:
            callbacks.append(RoutingSnapshots(snap_steps, val_loader, a.max_batches, _output_dir(cfg)))
        return TaskRun(model, train_loader, {"val": val_loader}, lm_loss, lm_evaluate, info, callbacks)

    def router_label(self, name: str, model: MoETransformerLM) -> str:
        """`` (lora experts)`` for LoRA expert banks; `` (non-causal)`` when the routing sees later tokens."""
        if any(isinstance(m.experts, LoRAExperts) for m in model.moe_modules()):
            name = f"{name} (lora experts)"
        return name if model.is_causal else f"{name} (non-causal)"

    def finish(self, cfg: DictConfig, task_run: TaskRun, metrics: dict) -> None:
        model, seq_len = task_run.model, cfg.data.seq_len
        layers = metrics.get("routing_layers") or {}
        names = [n for n, m in model.named_modules() if m in model.moe_modules()]
        if model.moe_layers and all(n in layers for n in names):
            # measured experts per token; a LoRA bank's shared base FFN counts as always active
            metrics["params_active"] = model.active_parameters([layers[n]["experts_per_token"] for n in names])
        metrics["tokens_per_s"] = metrics["examples_per_s"] * seq_len
        metrics["val_tokens_per_s"] = metrics.get("val_examples_per_s", 0.0) * seq_len
        if metrics.get("flops_per_example") is not None:
            metrics["flops_per_token"] = metrics["flops_per_example"] / seq_len
        if cfg.analysis.enabled and model.moe_layers:
            snaps = next((c.snapshots for c in task_run.callbacks if isinstance(c, RoutingSnapshots)), None)
            analysis = analyse_routing(model, task_run.eval_loaders["val"], cfg.analysis, snaps)
            if is_main_process():
                out = _output_dir(cfg) / "analysis.json"
                out.write_text(json.dumps(analysis, indent=2, default=plain) + "\n")
            metrics["analysis"] = analysis_summary(analysis)

    def summary(self, metrics) -> list[str]:
        lines = [f"  validation      loss {metrics['val_loss']:.4f}, perplexity {metrics['val_ppl']:.3f}, "
                 f"{metrics['val_bits_per_token']:.3f} bits/token",
                 f"  tokens/s        {metrics['tokens_per_s']:.0f} training, {metrics['val_tokens_per_s']:.0f} evaluation"]
        a = metrics.get("analysis") or {}
        if a.get("explained_by_token_id") is not None:
            lines.append(f"  specialisation  {a['explained_by_token_id']:.3f} of routing explained by token id")
        return lines

    def objective(self, metrics) -> float:
        return metrics["val_loss"]


def _total_steps(trainer, steps_per_epoch: int) -> int:
    total = trainer.max_epochs * steps_per_epoch
    return total if trainer.max_steps is None else min(total, trainer.max_steps)


def _model_choice() -> str | None:
    from core.runs import hydra_choice

    return hydra_choice("model")


def _output_dir(cfg: DictConfig):
    from core.runs import run_dir

    return run_dir(cfg.get("output_dir"))


# ------------------------------------------------------------------------------------- validation


def _check_text_file(path) -> None:
    """``data.path``: an existing regular file whose start decodes as UTF-8 (the whole file is read,
    and fully decoded, when the data is loaded)."""
    p = check_readable_file("data.path", path, ": give a UTF-8 text file, e.g. data.path=book.txt")
    try:
        with open(p, "rb") as f:
            head = f.read(1 << 16)
    except OSError as err:
        raise ConfigError("data.path", str(path), f"the file cannot be read ({err.strerror})") from None
    if not head.strip():
        raise ConfigError("data.path", str(path), "the file is empty: give a UTF-8 text file")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4:  # not just a character cut by the 64 KiB window
            raise ConfigError("data.path", str(path), f"the file is not UTF-8 text (byte {err.start}: "
                              f"{err.reason}); convert it with iconv -t utf-8") from None


def validate_config(cfg: DictConfig) -> int | None:
    """Check ``cfg`` (``conf/nlp/train.yaml``) before the corpus is read: the model target and sizes, the
    router (with the MoE group size it will see), the text file and data sizes, the trainer; raises
    ``ConfigError`` naming the key; returns the experts of a MoE layer (None for the dense model)."""
    m, d = cfg.model, cfg.data
    check_target("model._target_", m.get("_target_"), MoETransformerLM, ": use model=<name> with a conf/nlp/model config")
    if OmegaConf.is_missing(d, "path"):
        raise ConfigError("data.path", "???", "give a UTF-8 text file, e.g. data.path=book.txt")
    if d.path is not None:
        _check_text_file(d.path)
    check_choice("data.tokenizer", d.tokenizer, ("byte", "bpe"))
    check_int("data.seq_len", d.seq_len)
    check_int("data.batch_size", d.batch_size)
    for key in ("eval_batch_size", "limit_train", "limit_eval"):
        check_int(f"data.{key}", d.get(key), optional=True)
    check_number("data.val_fraction", d.val_fraction, gt=0)
    if d.val_fraction >= 1:
        raise ConfigError("data.val_fraction", d.val_fraction, "it must lie in (0, 1)")
    moe = m.get("moe_layers", "all") not in ("none", None) and m.get("moe_layers") != []
    if not moe:
        return None
    check_int("model.num_experts", m.num_experts)
    check_int("model.moe_group_size", m.get("moe_group_size"), optional=True)
    check_router(m.get("router"), m.num_experts, key="router", domain="nlp", token_ids=LanguageModelTask.token_ids,
                 group_size=m.get("moe_group_size") or d.seq_len,
                 group_key="model.moe_group_size" if m.get("moe_group_size") else "data.seq_len", seq_len=d.seq_len,
                 expert_parallel=cfg.trainer.get("expert_parallel") is True)
    return m.num_experts


@hydra.main(config_path="pkg://conf/nlp", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return run(cfg, LanguageModelTask())


if __name__ == "__main__":
    main()
