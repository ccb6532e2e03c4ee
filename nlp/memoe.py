"""MEMoE: model editing with a bypass MoE adapter and knowledge-anchor routing (Wang and Li, "MEMoE:
Enhancing Model Editing with Mixture of Experts Adaptors", arXiv 2405.19086, 2024).

The pretrained causal LM stays frozen. Beside the FFN of one decoder layer ℓ an MoE adapter is added
in parallel (a bypass), so that layer computes

    h = FFN_ℓ(x) + λ · Σ_e G_e(a) · E_e(x)

for every token x of the input, with E_e SwiGLU experts (a ``core.moe.MoE``) and λ the adapter's
``scale``. Only the adapter is trained by the edit. Its experts' output projections start at zero
(LoRA's B = 0), so before editing the adapter adds exactly 0 and the edited model is the base model.

Knowledge-anchor routing: the paper routes by ``G = top_k(softmax(W_g · R(x) + ε))`` with
``R(x) = concat(x, embed(anchor))``, the anchor being the named entity the input is about (found by
NER there; here the fact's subject, whose tokens the data marks), so that inputs that need the same
knowledge reach the same expert. ``KnowledgeAnchorRouter`` keeps the anchor half of R only:

    a = mean of the input-embedding rows of the anchor's tokens,   G = top_k(softmax(W_g · a))

which is sentence-level gating (``core.routers.sentence.SentenceRouter``, Kudugunta et al. 2021)
keyed by the anchor instead of the mean token: every token of a prompt takes the anchor's experts,
two prompts with the same anchor take the same experts whatever their other tokens, and the routing
is causal wherever the anchor comes before the predicted tokens (as the subject does in every fact
prompt). An input without an anchor is routed by the mean embedding of all its tokens.

``attach_memoe(model, layer)`` attaches the adapter to the suite's ``MoETransformerLM`` or to an
``nlp.hf.HFCausalLM`` (``nlp.hf.load_hf_lm``) by a forward hook on the layer's FFN module (the model's
modules are not replaced, so its own MoE layers and their checks are unchanged) and freezes every
parameter of the model. ``edit`` runs the editing loop (cross-entropy of the new object after each
edit prompt, plus the router's Switch loss when ``switch_loss_weight`` > 0, and stopping once every
edit is predicted); ``finetune_ffn`` gives the baseline, the same loop on the layer's own FFN weights.

``python -m nlp.memoe`` runs the comparison on the synthetic fact set of ``nlp.facts``: it pretrains
a small Mixtral-form suite LM on the facts (or reuses the cached one), writes it with
``nlp.hf.save_mixtral``, loads it back with ``nlp.hf.load_hf_lm``, edits with MEMoE, with the same
adapter routed token by token (an ablation) and with FFN fine-tuning for each seed, and prints edit
success, paraphrase generalisation, locality and neighbourhood locality (docs/memoe.md).

Legend: B batch, T sequence length, D width, F expert hidden width, E experts, G groups (= B: a
prompt is one routing group), S tokens per group (= T), V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.checks import ConfigError, check_int, check_number
from core.moe import MoE
from core.routers.base import Router
from core.routers.sentence import SentenceRouter
from core.routers.topk import TopKRouter
from core.stats import collect_aux_loss
from nlp.facts import FactPrompt, FactSet, build_fact_set, edit_split, fact_tokenizer, pretraining_corpus
from nlp.hf import HFCausalLM, HFTokenizer, load_hf_lm, save_mixtral
from nlp.models import MoETransformerLM

__all__ = ["METHODS", "ROUTINGS", "KnowledgeAnchorRouter", "MEMoEAdapter", "MEMoEModel", "PromptBatch",
           "attach_memoe", "base_checkpoint", "edit", "encode_prompts", "evaluate", "ffn_module", "finetune_ffn",
           "input_embedding", "main", "markdown_table", "pretrain_fact_lm", "run_comparison"]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ adapter


class KnowledgeAnchorRouter(SentenceRouter):
    """Route every token of a group by the group's knowledge anchor: ``top_k(softmax(W_g · a))``.

    ``anchor_GD`` (G×D, one anchor vector per group) is set by the caller for each batch
    (``MEMoEAdapter`` sets it around its MoE call).

    Args:
        dim: D, the width of the anchor vectors (the model's embedding width).
        num_experts: E.
        top_k: K experts per group.
        renormalize: gates = the K selected probabilities renormalised (else the probabilities).
        switch_loss_weight: Switch balance loss over the groups of a batch.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, renormalize: bool = False,
                 switch_loss_weight: float = 0.0):
        super().__init__(dim, num_experts, top_k=top_k, renormalize=renormalize,
                         switch_loss_weight=switch_loss_weight)
        self.anchor_GD: torch.Tensor | None = None

    def group_key(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None) -> torch.Tensor:
        a_GD = self.anchor_GD
        if a_GD is None:
            raise ValueError("KnowledgeAnchorRouter has no anchor: set router.anchor_GD (G x dim) before routing, "
                             "or call it through MEMoEAdapter / MEMoEModel, which pass it.")
        if a_GD.shape != (x_GSD.shape[0], self.dim):
            raise ValueError(f"anchor_GD has shape {tuple(a_GD.shape)}; ({x_GSD.shape[0]}, {self.dim}) is needed: one "
                             "anchor vector per routing group (per sequence).")
        return a_GD.float()


ROUTINGS = ("anchor", "token")


class MEMoEAdapter(nn.Module):
    """The bypass MoE: ``λ · Σ_e G_e(a) E_e(x)``, zero at initialisation.

    Args:
        dim: D, the layer's width.
        hidden_features: F, each expert's hidden width (default D).
        num_experts: E.
        top_k: K experts per input.
        scale: λ.
        switch_loss_weight: the router's balance loss weight.
        routing: ``"anchor"`` (knowledge-anchor routing) or ``"token"`` (each token by its own hidden
            state, ``core.routers.topk.TopKRouter``: an ablation without anchors).

    ``forward(x_BTD, anchor_BD, mask_BT=None)`` -> (B, T, D).
    """

    def __init__(self, dim: int, hidden_features: int | None = None, num_experts: int = 4, top_k: int = 1,
                 scale: float = 1.0, switch_loss_weight: float = 0.0, routing: str = "anchor"):
        super().__init__()
        check_number("scale", scale, gt=0)
        if routing not in ROUTINGS:
            raise ConfigError("routing", routing, f"use one of {list(ROUTINGS)}")
        self.scale, self.routing = float(scale), routing
        if routing == "anchor":
            router = KnowledgeAnchorRouter(dim, num_experts, top_k=top_k, switch_loss_weight=switch_loss_weight)
        else:
            router = TopKRouter(dim, num_experts, top_k=top_k, capacity_factor=None, noise_std=0.0,
                                importance_loss_weight=0.0, load_loss_weight=0.0,
                                switch_loss_weight=switch_loss_weight)
        self.moe = MoE(dim, hidden_features or dim, dim, act_layer=nn.SiLU, bias=False, num_experts=num_experts,
                       router=router, glu=True, track_stats=False)
        with torch.no_grad():  # the experts' output projections start at 0: the adapter adds nothing yet
            self.moe.experts.w2_EFO.zero_()

    @property
    def router(self) -> Router:
        return self.moe.router

    def forward(self, x_BTD: torch.Tensor, anchor_BD: torch.Tensor, mask_BT: torch.Tensor | None = None):
        if self.routing == "token":
            return self.scale * self.moe(x_BTD, mask=mask_BT)
        self.router.anchor_GD = anchor_BD
        try:
            y_BTD = self.moe(x_BTD, mask=mask_BT)
        finally:
            self.router.anchor_GD = None
        return self.scale * y_BTD


def _decoder_layers(model: nn.Module) -> tuple[Sequence[nn.Module], str]:
    if isinstance(model, MoETransformerLM):
        return model.blocks, "ffn"
    if isinstance(model, HFCausalLM):
        return model.hf.model.layers, "mlp"
    raise ValueError(f"model is a {type(model).__name__}: MEMoE attaches to nlp.models.MoETransformerLM or "
                     "nlp.hf.HFCausalLM (nlp.hf.load_hf_lm).")


def ffn_module(model: nn.Module, layer: int) -> nn.Module:
    """The FFN module of decoder layer ``layer`` (``blocks[l].ffn`` or the HF layer's ``mlp``)."""
    layers, name = _decoder_layers(model)
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer < len(layers):
        raise ConfigError("layer", layer, f"the model has {len(layers)} decoder layers: use 0..{len(layers) - 1}")
    return getattr(layers[layer], name)


def input_embedding(model: nn.Module) -> nn.Embedding:
    return model.tok_embed if isinstance(model, MoETransformerLM) else model.hf.get_input_embeddings()


class MEMoEModel(nn.Module):
    """A frozen causal LM with a ``MEMoEAdapter`` beside the FFN of one layer (``attach_memoe``).

    ``forward(input_ids (B, T), anchor_mask (B, T) = None) -> logits (B, T, V)``: ``anchor_mask``
    marks the anchor's tokens of each sequence (None, or a row without any: all its tokens).
    """

    def __init__(self, model: nn.Module, adapter: MEMoEAdapter, layer: int):
        super().__init__()
        self.model, self.adapter, self.layer = model, adapter, layer
        self._anchor_BD: torch.Tensor | None = None
        self._hook = ffn_module(model, layer).register_forward_hook(self._bypass)

    def anchor_vectors(self, input_ids_BT: torch.Tensor, anchor_mask_BT: torch.Tensor | None) -> torch.Tensor:
        """Mean input embedding of each sequence's anchor tokens, (B, D)."""
        emb_BTD = input_embedding(self.model)(input_ids_BT).detach()
        m_BT = torch.ones_like(input_ids_BT, dtype=torch.bool) if anchor_mask_BT is None else anchor_mask_BT.bool()
        m_BT = torch.where(m_BT.any(1, keepdim=True), m_BT, torch.ones_like(m_BT))
        m_BT1 = m_BT[..., None].to(emb_BTD.dtype)
        return (emb_BTD * m_BT1).sum(1) / m_BT1.sum(1)

    def _bypass(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if self._anchor_BD is None:
            raise ValueError("the layer's MEMoE adapter needs the knowledge anchor: call the MEMoEModel, not the "
                             "model it wraps (or detach() the adapter first).")
        return output + self.adapter(args[0], self._anchor_BD).to(output.dtype)

    def forward(self, input_ids_BT: torch.Tensor, anchor_mask_BT: torch.Tensor | None = None) -> torch.Tensor:
        self._anchor_BD = self.anchor_vectors(input_ids_BT, anchor_mask_BT)
        try:
            return self.model(input_ids_BT)
        finally:
            self._anchor_BD = None

    def detach(self) -> nn.Module:
        """Remove the hook; the base model is returned unchanged."""
        self._hook.remove()
        return self.model


def attach_memoe(model: nn.Module, layer: int, num_experts: int = 4, top_k: int = 1,
                 hidden_features: int | None = None, scale: float = 1.0, switch_loss_weight: float = 0.0,
                 routing: str = "anchor") -> MEMoEModel:
    """Freeze ``model`` and add a MEMoE adapter beside the FFN of decoder layer ``layer``.

    Args:
        model: an ``nlp.models.MoETransformerLM`` or ``nlp.hf.HFCausalLM``.
        layer: the decoder layer whose FFN gets the bypass (0-based).
        num_experts, top_k, hidden_features, scale, switch_loss_weight, routing: as ``MEMoEAdapter``.

    Example::

        edited = attach_memoe(load_hf_lm("ckpt"), layer=1)
        edit(edited, edited.adapter.parameters(), batch, steps=300, lr=1e-3)
    """
    ffn_module(model, layer)  # checks the layer index
    model.requires_grad_(False)
    model.eval()
    emb = input_embedding(model)
    adapter = MEMoEAdapter(emb.embedding_dim, hidden_features, num_experts=num_experts, top_k=top_k, scale=scale,
                           switch_loss_weight=switch_loss_weight, routing=routing).to(emb.weight.device)
    return MEMoEModel(model, adapter, layer)


def finetune_ffn(model: nn.Module, layer: int) -> list[nn.Parameter]:
    """The baseline: freeze ``model`` except the FFN of ``layer``, whose parameters are returned."""
    ffn = ffn_module(model, layer)
    model.requires_grad_(False)
    model.eval()
    params = list(ffn.parameters())
    for p in params:
        p.requires_grad_(True)
    return params


# ------------------------------------------------------------------------------------------ editing


@dataclass
class PromptBatch:
    """Prompts followed by their targets, right-padded: ``input_ids`` (B, T), ``anchor_mask`` (B, T)
    (the subject's tokens), ``labels`` (B, T): the target token expected after position t, -100
    elsewhere."""
    input_ids: torch.Tensor
    anchor_mask: torch.Tensor
    labels: torch.Tensor


def _find(ids: list[int], part: list[int]) -> int:
    for i in range(len(ids) - len(part) + 1):
        if ids[i:i + len(part)] == part:
            return i
    raise ValueError(f"the anchor's tokens {part} do not occur in the prompt's {ids}.")


def encode_prompts(tokenizer, prompts: Sequence[FactPrompt]) -> PromptBatch:
    """``<bos> prompt target`` for every prompt, the subject's tokens marked as its anchor."""
    rows, anchors, labels = [], [], []
    for p in prompts:
        ids = [tokenizer.bos_token_id] + tokenizer.encode(p.text)
        target = tokenizer.encode(" " + p.target)
        subject = tokenizer.encode(p.subject)
        start = _find(ids, subject)
        full = ids + target
        rows.append(full)
        anchors.append([start <= i < start + len(subject) for i in range(len(full))])
        labels.append([-100] * (len(ids) - 1) + target + [-100])
    T = max(map(len, rows))
    pad = tokenizer.pad_token_id

    def padded(seqs, value):
        return torch.tensor([s + [value] * (T - len(s)) for s in seqs])

    return PromptBatch(padded(rows, pad), padded(anchors, False), padded(labels, -100))


def _logits(forward: Callable, batch: PromptBatch) -> torch.Tensor:
    if isinstance(forward, MEMoEModel):
        return forward(batch.input_ids, batch.anchor_mask)
    return forward(batch.input_ids)


def edit(forward: Callable, params: Iterable[nn.Parameter], batch: PromptBatch, steps: int = 100,
         lr: float = 1e-3, until_learned: bool = True) -> list[float]:
    """Train ``params`` so that ``forward`` (a ``MEMoEModel``, or a model whose FFN is fine-tuned)
    predicts every target of ``batch``: AdamW on the mean target cross-entropy plus the routers'
    auxiliary losses, at most ``steps`` full-batch steps; with ``until_learned`` it stops at the
    first step whose forward already predicts every target (an edit moves the model no further than
    the edit needs). Returns the loss of every step taken."""
    check_int("steps", steps, 1)
    check_number("lr", lr, gt=0)
    params = [p for p in params if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    module = forward.adapter if isinstance(forward, MEMoEModel) else forward
    history = []
    for _ in range(steps):
        logits_BTV = _logits(forward, batch)
        loss = F.cross_entropy(logits_BTV.float().flatten(0, 1), batch.labels.flatten(), ignore_index=-100)
        if until_learned and bool(_exact_match(logits_BTV.detach(), batch.labels).all()):
            history.append(float(loss.detach()))
            break
        loss = loss + collect_aux_loss(module)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(float(loss.detach()))
    return history


def _exact_match(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    pred_BT = logits_BTV.argmax(-1)
    return ((pred_BT == labels_BT) | (labels_BT == -100)).all(1)


@torch.no_grad()
def evaluate(forward: Callable, batch: PromptBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact match per prompt (B,) bool: every target token is the argmax; the argmax ids at the
    target positions (B, T), -100 elsewhere)."""
    logits_BTV = _logits(forward, batch)
    pred_BT = torch.where(batch.labels != -100, logits_BTV.argmax(-1), -100)
    return _exact_match(logits_BTV, batch.labels), pred_BT


# ------------------------------------------------------------------------------------------ pretraining


def pretrain_fact_lm(fact_set: FactSet, tokenizer, steps: int = 2000, batch_size: int = 64, lr: float = 3e-3,
                     dim: int = 128, depth: int = 4, num_experts: int = 4, seed: int = 0) -> MoETransformerLM:
    """A small Mixtral-form suite LM (rotary, RMSNorm, SwiGLU experts, top-2 router in every layer)
    trained on ``pretraining_corpus(fact_set)``: one ``<bos> sentence <eos>`` per sequence, next-token
    cross-entropy, AdamW with linear warmup and decay."""
    torch.manual_seed(seed)
    lines = [[tokenizer.bos_token_id] + tokenizer.encode(s) + [tokenizer.eos_token_id]
             for s in pretraining_corpus(fact_set)]
    T = max(map(len, lines))
    data_NT = torch.tensor([s + [-100] * (T - len(s)) for s in lines])
    model = MoETransformerLM(vocab_size=tokenizer.vocab_size, dim=dim, depth=depth, num_heads=4, max_seq_len=32,
                             mlp_ratio=2.0, act_layer="silu", glu=True, moe_layers="all", num_experts=num_experts)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, max(0.05, 1 - s / steps)))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        rows = data_NT[torch.randint(0, len(data_NT), (batch_size,), generator=gen)]
        x_BT = rows[:, :-1].clamp_min(0)  # padding positions are read as token 0 (<pad>) and never scored
        logits_BTV = model(x_BT)
        loss = F.cross_entropy(logits_BTV.flatten(0, 1), rows[:, 1:].flatten(), ignore_index=-100)
        loss = loss + collect_aux_loss(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log.info("pretraining step %d/%d loss %.4f", step + 1, steps, float(loss.detach()))
    model.eval()
    return model


def base_checkpoint(directory: Path, fact_seed: int, pretrain_steps: int, retrain: bool = False) -> Path:
    """The pretrained fact LM as a Hugging Face directory (``save_mixtral`` plus the word-level
    tokenizer), trained here unless ``directory`` already holds one of the same settings."""
    settings = {"fact_seed": fact_seed, "pretrain_steps": pretrain_steps}
    meta = directory / "memoe_base.json"
    if not retrain and meta.is_file() and json.loads(meta.read_text()).get("settings") == settings:
        log.info("reusing the pretrained fact LM in %s", directory)
        return directory
    fact_set = build_fact_set(seed=fact_seed)
    tokenizer = fact_tokenizer(fact_set)
    tokenizer.save_pretrained(str(directory))
    tok = HFTokenizer(directory)
    start = time.perf_counter()
    model = pretrain_fact_lm(fact_set, tok, steps=pretrain_steps, seed=fact_seed)
    seconds = time.perf_counter() - start
    save_mixtral(model, directory)
    meta.write_text(json.dumps({"settings": settings, "pretrain_seconds": round(seconds, 1)}, indent=1))
    return directory


# ------------------------------------------------------------------------------------------ comparison


METHODS = {"memoe": "MEMoE (bypass MoE, knowledge-anchor routing)",
           "memoe_token": "MEMoE adapter, token-level top-k routing (ablation)",
           "ft_ffn": "fine-tuning the layer's FFN (baseline)"}


@dataclass
class EditScores:
    edit_success: float
    paraphrase: float
    locality: float
    neighbourhood: float


def _score(forward, batches: dict[str, PromptBatch], base_preds: dict[str, torch.Tensor]) -> EditScores:
    hits = {k: evaluate(forward, b) for k, b in batches.items()}
    unchanged = {k: float((hits[k][1] == base_preds[k]).all(1).float().mean() * 100) for k in base_preds}
    return EditScores(edit_success=float(hits["edit"][0].float().mean() * 100),
                      paraphrase=float(hits["paraphrase"][0].float().mean() * 100),
                      locality=unchanged["locality"], neighbourhood=unchanged["neighbourhood"])


def run_comparison(checkpoint: Path, fact_seed: int = 0, seeds: Sequence[int] = (0, 1, 2), num_edits: int = 10,
                   layer: int = 2, steps: int = 300, lr_memoe: float = 1e-3, lr_ft: float = 1e-3,
                   num_experts: int = 4, top_k: int = 1) -> dict:
    """Edit ``num_edits`` facts per seed with each of ``METHODS`` at ``layer`` of the checkpoint
    (loaded by ``nlp.hf.load_hf_lm`` afresh for each): MEMoE, its adapter with token-level routing,
    and fine-tuning the layer's FFN. Returns the scores per method and seed, and the base model's
    accuracy on the original facts."""
    fact_set = build_fact_set(seed=fact_seed)
    tok = HFTokenizer(checkpoint)
    results: dict = {"base_fact_accuracy": None, **{name: [] for name in METHODS}}
    for seed in seeds:
        split = edit_split(fact_set, num_edits, seed=seed)
        batches = {"edit": encode_prompts(tok, split.edit_prompts),
                   "paraphrase": encode_prompts(tok, split.paraphrase_prompts),
                   "locality": encode_prompts(tok, split.locality_prompts),
                   "neighbourhood": encode_prompts(tok, split.neighbourhood_prompts)}
        base = load_hf_lm(checkpoint)
        base_preds = {k: evaluate(base, batches[k])[1] for k in ("locality", "neighbourhood")}
        if results["base_fact_accuracy"] is None:
            known = [p for k in ("locality", "neighbourhood") for p in getattr(split, f"{k}_prompts")]
            originals = [FactPrompt(f.prompt(t), f.subject, f.object) for f, _ in split.edits for t in range(4)]
            acc = evaluate(base, encode_prompts(tok, known + originals))[0]
            results["base_fact_accuracy"] = float(acc.float().mean() * 100)
        for name in METHODS:
            torch.manual_seed(seed)
            model = load_hf_lm(checkpoint)
            if name != "ft_ffn":
                forward = attach_memoe(model, layer, num_experts=num_experts, top_k=top_k,
                                       routing="token" if name == "memoe_token" else "anchor")
                params, lr = list(forward.adapter.parameters()), lr_memoe
            else:
                forward, params, lr = model, finetune_ffn(model, layer), lr_ft
            start = time.perf_counter()
            losses = edit(forward, params, batches["edit"], steps=steps, lr=lr)
            scores = _score(forward, batches, base_preds)
            results[name].append({"seed": seed, **asdict(scores), "steps": len(losses), "final_loss": losses[-1],
                                  "seconds": round(time.perf_counter() - start, 1)})
            log.info("seed %d %s: %s", seed, name, scores)
    return results


def _cell(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def markdown_table(results: dict) -> str:
    cols = ("edit_success", "paraphrase", "locality", "neighbourhood")
    lines = ["| method | edit success % | paraphrase % | locality % unchanged | neighbourhood % unchanged |",
             "|---|---|---|---|---|"]
    for key, label in METHODS.items():
        runs = results[key]
        lines.append(f"| {label} | " + " | ".join(_cell([r[c] for r in runs]) for c in cols) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m nlp.memoe", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="outputs/memoe/base", help="the pretrained fact LM's directory (reused when it "
                   "holds one of the same settings)")
    p.add_argument("--retrain", action="store_true", help="pretrain again even when --dir holds a model")
    p.add_argument("--fact-seed", type=int, default=0, help="seed of the generated fact set and of pretraining")
    p.add_argument("--pretrain-steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="edit seeds (edited facts, new objects, "
                   "adapter initialisation)")
    p.add_argument("--num-edits", type=int, default=10, help="facts edited together (batch editing)")
    p.add_argument("--layer", type=int, default=2, help="decoder layer whose FFN is edited (0-based)")
    p.add_argument("--steps", type=int, default=300, help="most editing steps per method (each stops once its "
                   "edits are learned)")
    p.add_argument("--lr-memoe", type=float, default=1e-3, help="learning rate of the MEMoE adapters (both routings)")
    p.add_argument("--lr-ft", type=float, default=1e-3, help="learning rate of the FFN fine-tuning baseline")
    p.add_argument("--num-experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=1)
    p.add_argument("--json", default=None, help="also write the per-seed scores to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    directory = Path(args.dir)
    directory.mkdir(parents=True, exist_ok=True)
    checkpoint = base_checkpoint(directory, args.fact_seed, args.pretrain_steps, retrain=args.retrain)
    results = run_comparison(checkpoint, fact_seed=args.fact_seed, seeds=args.seeds, num_edits=args.num_edits,
                             layer=args.layer, steps=args.steps, lr_memoe=args.lr_memoe, lr_ft=args.lr_ft,
                             num_experts=args.num_experts, top_k=args.top_k)
    print(f"base model on the original facts: {results['base_fact_accuracy']:.1f}% exact match")
    print(markdown_table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
