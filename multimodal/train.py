"""Train a dense CLIP, a CLIP-MoE or a LIMoE contrastively: ``python -m multimodal.train [overrides]``.

``python -m multimodal.train`` trains the default CLIP-MoE (its router: ``conf/router/mixtral.yaml``
with a load-balance weight of 0.01, top-2 renormalised) on OpenMoji + Fashion-MNIST pairs;
``+router=expert_choice`` swaps the router, ``model=clip`` is the dense baseline, ``model=limoe`` the
one-tower LIMoE (``experiment=multimodal_limoe_no_entropy`` turns its entropy losses off).

The domain's part of a run (``core.run``): the image–caption pairs, the open_clip / LIMoE model, the
CLIP loss and the retrieval and zero-shot evaluation (``multimodal.training``). The headline metric is
the zero-shot accuracy; a sweeper minimises the held-out contrastive loss (``val_loss``).
"""

from __future__ import annotations

import hydra
import torch
import open_clip
from omegaconf import DictConfig

from core.checks import ConfigError
from core.analytics import position_labels
from core.run import AnalysisInputs, Task, TaskRun, command_line, run
from core.runs import hydra_choice
from multimodal.data import build_data
from multimodal.models import LIMoE
from multimodal.training import build_loaders, clip_loss, context_length, is_moe, make_evaluate, validate_config

__all__ = ["MultimodalTask", "main"]


class MultimodalTask(Task):
    """Contrastive image–text training: zero-shot accuracy, image↔text retrieval, routing by modality."""

    name, metric, higher_is_better, unit = "multimodal", "zeroshot_acc", True, "pair"

    def validate(self, cfg: DictConfig) -> int | None:
        return validate_config(cfg)

    def load_data(self, cfg: DictConfig):
        """The pairs, tokenised for the model's context length, and the tokenizer (the zero-shot
        classifier's prompts are tokenised when it is built)."""
        d = cfg.data
        tokenizer = open_clip.SimpleTokenizer(context_length=context_length(cfg.model))
        data = build_data(
            tokenizer, sources=list(d.sources), image_size=d.image_size, val_fraction=d.val_fraction,
            val_sources=list(d.val_sources), limit_train=d.limit_train, limit_eval=d.limit_eval,
            fashion_mnist_train=d.fashion_mnist_train, zeroshot=d.zeroshot, root=d.root,
            openmoji_cache=d.get("openmoji_cache"), seed=int(cfg.seed))
        return data, tokenizer

    def build(self, cfg: DictConfig, data) -> TaskRun:
        data, tokenizer = data
        model = hydra.utils.instantiate(cfg.model)  # its router key reads the run's router node
        length = getattr(model, "context_length", tokenizer.context_length)
        if length != tokenizer.context_length:
            raise ConfigError("model", hydra_choice("model") or cfg.model.get("_target_"), f"its text context "
                              f"length {length} must be {tokenizer.context_length}, the one read from its config")
        train_loader, eval_loaders = build_loaders(cfg, data, routing=is_moe(model))
        info = {"model": cfg.get("model_name") or hydra_choice("model") or "custom",
                "dataset": "+".join(cfg.data.sources), "train_pairs": len(data.train), "val_pairs": len(data.val),
                "zeroshot_images": 0 if data.zeroshot is None else len(data.zeroshot)}
        return TaskRun(model, train_loader, eval_loaders, clip_loss,
                       make_evaluate(tokenizer, data.class_names, data.templates), info)

    def analysis_inputs(self, cfg: DictConfig, task_run: TaskRun) -> AnalysisInputs:
        """The routing analyses on the validation pairs: a token's label is its position (patch or text
        position) and, in LIMoE's shared layers, its modality. A CLIP-MoE layer sits in one tower and
        sees one modality, so modality is n/a there."""
        def forward(model, batch):
            device = next(model.parameters()).device
            model(batch["image"].to(device), batch["text"].to(device))

        def labels(batch):
            return {kind: _stream_labels(task_run.model, batch, kind) for kind in ("position", "modality")}

        towers = sorted({getattr(m, "modality", None) for m in task_run.model.modules() if hasattr(m, "modality")})
        na = {"modality": f"each MoE layer sits in one tower ({', '.join(towers)}) and sees one modality"} if towers else {}
        return AnalysisInputs(task_run.eval_loaders["val"], forward, labels, na)

    def summary(self, metrics) -> list[str]:
        def fmt(key, scale=100.0, spec=".1f", unit="%"):
            return "n/a" if metrics.get(key) is None else f"{scale * metrics[key]:{spec}}{unit}"

        lines = [f"  zero-shot acc   {fmt('zeroshot_acc')}  (Fashion-MNIST, {metrics.get('zeroshot_images')} images)",
                 f"  retrieval       image→text R@1 {fmt('val_i2t_r1')} R@5 {fmt('val_i2t_r5')}, text→image R@1 "
                 f"{fmt('val_t2i_r1')} R@5 {fmt('val_t2i_r5')}  ({metrics.get('val_pairs')} held-out pairs, "
                 f"loss {fmt('val_loss', 1.0, '.4f', '')})"]
        if "val_text_top_expert_share" in metrics:  # MoE models
            share = {m: fmt(f"val_{m}_top_expert_share", 1.0, ".3f", "") for m in ("text", "image")}
            lines.append(f"  by modality     top-expert share: text {share['text']}, image {share['image']}  "
                         "(held-out pairs; 1/E balanced)")
        return lines

    def objective(self, metrics) -> float:
        """The held-out contrastive loss (what a sweeper minimises)."""
        return metrics.get("val_loss", float("nan"))


def _stream_labels(model, batch: dict, kind: str):
    """Label provider of the multimodal analyses: in a tower's layer (one modality), the position along
    the sequence (``position``) or nothing (``modality``); in LIMoE's shared layers, whose routing groups
    hold the image patches then the caption tokens of ``routing_group_size`` pairs
    (``LIMoE.routing_layout``), the patch position p (0..P-1) or P + the text position, and the
    modality (0 image, 1 text); padding slots of a last group are -1 (no label)."""
    text = batch["text"]

    def provider(layer, x):
        if hasattr(layer, "modality"):
            return position_labels(layer, x) if kind == "position" else None
        if not isinstance(model, LIMoE):
            return None
        labels_GS = model.routing_labels(text.shape[0], text)[kind]
        return labels_GS if tuple(labels_GS.shape) == tuple(x.shape[:-1]) else None
    return provider


@hydra.main(config_path="pkg://conf/multimodal", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return run(cfg, MultimodalTask())


if __name__ == "__main__":
    command_line(main)
