"""Train a causal MoE language model: ``python -m nlp.train [overrides]``.

The domain's part of a run (``core.run``): a text corpus cut into blocks (``nlp.data``), the
decoder-only LM (``nlp.models``), next-token cross-entropy, and validation loss, perplexity and bits
per token; after training, the routing analyses of ``core.analytics`` go to ``analysis.json`` and
their scalars to ``metrics.json``. ``python -m nlp.train`` trains the tiny default (Mixtral-style
top-2 in every block) on the WordNet glosses; ``+router=adamoe`` swaps the router,
``model.moe_layers=none`` gives the dense baseline, ``data.path=book.txt`` any UTF-8 text.

A ``model=hf`` run (a Hugging Face checkpoint, ``nlp.hf``) also ends by writing ``<run dir>/hf/``, a
directory ``transformers.AutoModelForCausalLM.from_pretrained`` loads with the same logits (with the
checkpoint's tokenizer when ``data.tokenizer`` names one), when its routers are ones transformers has
(``model.save_hf=false`` skips it); otherwise the log says why, and the run keeps only ``model.pt``.
"""

from __future__ import annotations

import logging

import hydra
from omegaconf import DictConfig

from core.distributed import is_main_process
from core.engine import TensorLoader
from core.lora_experts import LoRAExperts
from core.run import AnalysisInputs, Task, TaskRun, command_line, run
from core.runs import hydra_choice, run_dir
from nlp.data import build_datasets
from nlp.models import MoETransformerLM, NonCausalRoutingError
from nlp.training import HF_TARGET, build_model, lm_evaluate, lm_loss, validate_config

__all__ = ["LanguageModelTask", "build_model", "main", "save_hf_dir"]

log = logging.getLogger(__name__)


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
        d = cfg.data
        train_loader = TensorLoader(train_set.views(), d.batch_size, shuffle=True,
                                    drop_last=len(train_set) >= d.batch_size)
        val_loader = TensorLoader(val_set.views(), d.eval_batch_size or d.batch_size)
        model = build_model(cfg, tokenizer.vocab_size)
        info = {"causal": model.is_causal, "model": cfg.get("model_name") or hydra_choice("model") or "custom",
                "moe_layers": model.moe_layers, "num_experts": cfg.model.num_experts if model.moe_layers else 0,
                "dataset": d.path or "wordnet_glosses", "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
                "seq_len": d.seq_len, "train_tokens": len(train_set) * d.seq_len, "val_tokens": len(val_set) * d.seq_len}
        return TaskRun(model, train_loader, {"val": val_loader}, lm_loss, lm_evaluate, info,
                       state={"tokenizer": tokenizer})

    def analysis_inputs(self, cfg: DictConfig, task_run: TaskRun) -> AnalysisInputs:
        """The routing analyses on the validation blocks; a token's label is its token id (OpenMoE's
        context-independent specialisation)."""
        return AnalysisInputs(task_run.eval_loaders["val"])

    def router_label(self, name: str, model: MoETransformerLM) -> str:
        """`` (lora experts)`` for LoRA expert banks; `` (non-causal)`` when the routing sees later tokens."""
        if any(isinstance(m.experts, LoRAExperts) for m in model.moe_modules()):
            name = f"{name} (lora experts)"
        return name if model.is_causal else f"{name} (non-causal)"

    def finish(self, cfg: DictConfig, task_run: TaskRun, metrics: dict) -> None:
        model, seq_len = task_run.model, cfg.data.seq_len
        if cfg.model.get("_target_") == HF_TARGET and cfg.model.get("save_hf", True) and is_main_process():
            save_hf_dir(model, _output_dir(cfg) / "hf", (task_run.state or {}).get("tokenizer"))
        layers = metrics.get("routing_layers") or {}
        names = [n for n, m in model.named_modules() if m in model.moe_modules()]
        if model.moe_layers and all(n in layers for n in names):
            # measured experts per token; a LoRA bank's shared base FFN counts as always active
            metrics["params_active"] = model.active_parameters([layers[n]["experts_per_token"] for n in names])
        metrics["tokens_per_s"] = metrics["examples_per_s"] * seq_len
        metrics["val_tokens_per_s"] = metrics.get("val_examples_per_s", 0.0) * seq_len
        if metrics.get("flops_per_example") is not None:
            metrics["flops_per_token"] = metrics["flops_per_example"] / seq_len

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


def save_hf_dir(model, directory, tokenizer=None):
    """Write ``model`` as a Hugging Face directory (``nlp.hf.save_hf``) with the checkpoint tokenizer
    (an ``nlp.hf.HFTokenizer``) beside it; returns the directory, or None after logging why
    transformers cannot hold the model (the run's ``model.pt`` is then its only weights)."""
    from nlp.hf import HFTokenizer, save_hf

    try:
        out = save_hf(model, directory)
    except ValueError as err:
        log.warning("no Hugging Face directory written: %s", err)
        return None
    if isinstance(tokenizer, HFTokenizer):
        tokenizer.save_pretrained(out)
    log.info("Hugging Face directory written: %s (transformers.AutoModelForCausalLM.from_pretrained loads it)", out)
    return out


def _output_dir(cfg: DictConfig):
    return run_dir(cfg.get("output_dir"))


@hydra.main(config_path="pkg://conf/nlp", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return run(cfg, LanguageModelTask())


if __name__ == "__main__":
    command_line(main)
