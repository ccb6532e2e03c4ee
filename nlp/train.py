"""Train a causal MoE language model on the shared engine (``core.engine``), then write the routing
analyses of ROUTERS.md §5 next to the metrics.

``python -m nlp.train`` trains the tiny default (Mixtral-style top-2 in every block) on the WordNet
glosses; ``+router=adamoe`` swaps the router, ``model.moe_layers=none`` gives the dense baseline,
``data.path=book.txt`` any UTF-8 text. Besides ``metrics.json`` (validation loss and perplexity,
tokens/s, total and active parameters, routing statistics) each run writes ``analysis.json``:

- drop rate by position in the sequence, without and with Batch Prioritized Routing (OpenMoE's
  "drop towards the end"; Xue et al. 2024), at the router's own capacity or, for dropless routers,
  at ``analysis.capacity_factor``;
- the share of routing explained by the token id, ``1 − H(expert | token id) / H(expert)``, and the
  token-id specialisation ``Σ_v n_v max_e q_v(e) / Σ_v n_v`` (OpenMoE's context-independent
  specialisation);
- routing stability: for early snapshots taken during training, the count-weighted share of token
  ids whose most frequent top-1 expert equals the final one (OpenMoE's early routing learning);
- for AdaMoE (null experts), the mean number of true experts per token and the expert-FLOP ratio to
  top-``analysis.baseline_top_k`` routing.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import hydra
import torch
from hydra.errors import InstantiationException
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from core.analytics import RoutingRecorder, stability_from_counts
from core.lora_experts import LoRAExperts
from core.cli import run_main
from core.distributed import is_main_process
from core.engine import TensorLoader, Trainer, TrainerConfig, find_checkpoint, seed_everything
from core.runs import hydra_choice, run_dir
from core.checks import ConfigError, check_choice, check_int, check_number, check_readable_file, check_target
from core.validate import check_router, check_trainer
from nlp.data import build_datasets
from nlp.models import MoETransformerLM, NonCausalRoutingError

log = logging.getLogger(__name__)

__all__ = ["analyse_routing", "build_model", "lm_evaluate", "lm_loss", "main", "router_label", "train",
           "validate_config"]


# ----------------------------------------------------------------------------------------- pieces


def build_model(cfg: DictConfig, vocab_size: int) -> MoETransformerLM:
    """The model of ``cfg.model`` (its ``router`` key reads the top-level ``router`` group). A
    configuration error surfaces as the model's own ``ValueError`` rather than Hydra's wrapper."""
    try:
        return hydra.utils.instantiate(cfg.model, vocab_size=vocab_size)
    except InstantiationException as err:
        if isinstance(err.__cause__, ValueError):
            raise err.__cause__ from None
        raise


def router_label(cfg: DictConfig, model: MoETransformerLM) -> str:
    """The run's row name: ``router_name`` if set, else the ``+router=`` choice (``mixtral`` when
    none); ``none`` for the dense model; `` (lora experts)`` for LoRA expert banks; `` (non-causal)``
    appended when the routing sees later tokens."""
    if not model.moe_layers:
        return "none"
    name = cfg.get("router_name")
    if not name:
        name = "mixtral" if cfg.get("router") is None else hydra_choice("router")
    if not name:
        name = str(cfg.router.get("_target_", "custom")).rsplit(".", 2)[-2]  # the router's module
    if any(isinstance(m.experts, LoRAExperts) for m in model.moe_modules()):
        name = f"{name} (lora experts)"
    return name if model.is_causal else f"{name} (non-causal)"


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


# ------------------------------------------------------------------------------- routing analyses


class _RoutingCapture:
    """Context: eval mode, no routing statistics, a ``core.analytics.RoutingRecorder`` on every MoE
    layer (labels = the token ids each layer receives); router attributes may be changed for the
    duration (capacity factor and BPR for the drop-rate analysis)."""

    def __init__(self, model: MoETransformerLM, min_count: int = 1, **router_attrs):
        self.model, self.min_count, self.router_attrs = model, min_count, router_attrs

    def __enter__(self) -> RoutingRecorder:
        self.was_training = self.model.training
        self.saved = []
        for m in self.model.moe_modules():
            self.saved.append((m, m.track_stats, {k: getattr(m.router, k) for k in self.router_attrs}))
            m.track_stats = False
            for k, v in self.router_attrs.items():
                setattr(m.router, k, v)
        self.model.eval()
        self.recorder = RoutingRecorder(self.model, min_count=self.min_count)
        return self.recorder

    def __exit__(self, *exc):
        self.recorder.close()
        for m, track, old in self.saved:
            m.track_stats, m.last_routing = track, None
            for k, v in old.items():
                setattr(m.router, k, v)
        self.model.train(self.was_training)
        return False


@torch.no_grad()
def record_routing(model: MoETransformerLM, loader, max_batches: int, min_count: int = 1,
                   **router_attrs) -> list[dict]:
    """Per MoE layer, ``RoutingRecorder``'s summary over the first ``max_batches`` batches:
    drop rate by position, experts per token, token-id specialisation and the (token id × top
    expert) counts ``counts_LE``."""
    device = next(model.parameters()).device
    with _RoutingCapture(model, min_count, **router_attrs) as rec:
        for i, (x_BT, _) in enumerate(loader):
            if i >= max_batches:
                break
            model(x_BT.to(device))
        summary = rec.summary()
    return list(summary.values())


def _drop_summary(layers: list[dict]) -> dict | None:
    """Drop rate by position averaged over layers: per position, and in the first and last quarter."""
    rates = [r["drop_rate_by_position"] for r in layers if "drop_rate_by_position" in r]
    if not rates:
        return None
    mean_S = torch.tensor(rates, dtype=torch.float64).nanmean(0)
    q = max(1, mean_S.numel() // 4)
    return {"per_position": mean_S.tolist(), "per_layer": rates, "mean": float(mean_S.nanmean()),
            "first_quarter": float(mean_S[:q].nanmean()), "last_quarter": float(mean_S[-q:].nanmean())}


def analyse_routing(model: MoETransformerLM, loader, analysis_cfg, snapshots: dict | None = None) -> dict:
    """The routing analyses of a trained model (see the module docstring)."""
    a = analysis_cfg
    moes = model.moe_modules()
    if not moes:
        return {}
    router = moes[0].router
    layers = record_routing(model, loader, a.max_batches, a.min_token_count)
    out: dict = {"experts_per_token_layers": [r.get("experts_per_token") for r in layers]}
    spec = [r.get("specialisation") for r in layers]
    if all(s is not None for s in spec):
        out["specialisation_layers"] = spec
        out["explained_by_token_id"] = _mean([s["share"] for s in spec])
        out["token_id_purity"] = _mean([s["purity"] for s in spec])
        out["uniform_purity"] = 1.0 / router.num_experts
    if snapshots:
        final = [r["counts_LE"] for r in layers]
        out["stability"] = {}
        for step, snap in sorted(snapshots.items()):
            agree = [stability_from_counts(s, f, a.min_token_count, weighted=True) for s, f in zip(snap, final)]
            out["stability"][str(step)] = {"agreement": _mean(agree), "agreement_layers": agree}
    if hasattr(router, "capacity_factor"):
        cf = router.capacity_factor if router.capacity_factor is not None else a.capacity_factor
        drops: dict = {"capacity_factor": cf, "router_capacity_factor": router.capacity_factor}
        variants = {"no_bpr": {"capacity_factor": cf}}
        if hasattr(router, "batch_priority"):
            variants = {"no_bpr": {"capacity_factor": cf, "batch_priority": False},
                        "bpr": {"capacity_factor": cf, "batch_priority": True}}
        for key, attrs in variants.items():
            summary = _drop_summary(record_routing(model, loader, a.max_batches, a.min_token_count, **attrs))
            if summary is not None:
                drops[key] = summary
        out["drop_rate_by_position"] = drops
    if hasattr(router, "num_null_experts"):
        true_ept = _mean(out["experts_per_token_layers"])
        out["null_experts"] = {
            "num_null_experts": router.num_null_experts, "top_k": router.top_k,
            "true_experts_per_token": true_ept, "true_experts_per_token_layers": out["experts_per_token_layers"],
            "baseline_top_k": a.baseline_top_k,
            "expert_flop_ratio_to_baseline": None if true_ept is None else true_ept / a.baseline_top_k,
        }
    return out


def _mean(values):
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return sum(values) / len(values) if values else None


class _SnapshotLoss:
    """``lm_loss`` that also records the (token id × top expert) counts at chosen training steps for
    the routing-stability analysis (the engine has no step callback; the loss function sees every
    step). Snapshots are saved in the run directory so that a resumed run keeps them."""

    def __init__(self, steps: list[int], loader, max_batches: int, out_dir: Path, start: int = 0):
        self.steps, self.loader, self.max_batches = set(steps), loader, max_batches
        self.path = out_dir / "routing_snapshots.pt"
        self.snapshots: dict = torch.load(self.path) if self.path.exists() else {}
        self.calls = start  # optimizer steps already taken (a resumed run starts past 0)

    def __call__(self, model, batch):
        if self.calls in self.steps and self.calls not in self.snapshots:
            layers = record_routing(model, self.loader, self.max_batches)
            self.snapshots[self.calls] = [r["counts_LE"] for r in layers]
            if is_main_process():  # under torchrun every rank records the same snapshot
                torch.save(self.snapshots, self.path)
        self.calls += 1
        return lm_loss(model, batch)


# ------------------------------------------------------------------------------------------- train


def output_dir(cfg: DictConfig) -> Path:
    """``cfg.output_dir``, else Hydra's run directory, else the working directory."""
    return run_dir(cfg.get("output_dir"))


def _resumed_step(trainer_cfg: TrainerConfig, out_dir: Path) -> int:
    if not trainer_cfg.resume:
        return 0
    found = find_checkpoint(trainer_cfg.resume, out_dir)
    return 0 if found is None else int(found[1]["state"]["step"])


def prepare(cfg: DictConfig):
    """Everything that can fail because of the config: data, tokenizer, model, trainer. Returns
    ``(trainer, model, train_loader, val_loader, loss_fn)``."""
    trainer_cfg = TrainerConfig.from_mapping(OmegaConf.to_container(cfg.trainer, resolve=True))
    d = cfg.data
    tokenizer, train_set, val_set = build_datasets(
        path=d.path, tokenizer=d.tokenizer, seq_len=d.seq_len, val_fraction=d.val_fraction,
        with_lemmas=d.with_lemmas, limit_train=d.limit_train, limit_eval=d.limit_eval)
    train_loader = TensorLoader(train_set.tensors(), d.batch_size, shuffle=True,
                                drop_last=len(train_set) >= d.batch_size)
    val_loader = TensorLoader(val_set.tensors(), d.eval_batch_size or d.batch_size)
    seed_everything(int(cfg.seed))
    model = build_model(cfg, tokenizer.vocab_size)
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    info = {"domain": "nlp", "router": router_label(cfg, model), "causal": model.is_causal,
            "model": cfg.get("model_name") or hydra_choice("model") or "custom",
            "moe_layers": model.moe_layers, "num_experts": cfg.model.num_experts if model.moe_layers else 0,
            "dataset": d.path or "wordnet_glosses", "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
            "seq_len": d.seq_len, "train_tokens": len(train_set) * d.seq_len, "val_tokens": len(val_set) * d.seq_len}
    trainer = Trainer(trainer_cfg, out, seed=int(cfg.seed), info=info)
    total_steps = trainer_cfg.max_epochs * len(train_loader)
    if trainer_cfg.max_steps is not None:
        total_steps = min(total_steps, trainer_cfg.max_steps)
    a = cfg.analysis
    snap_steps = sorted({int(f * total_steps) for f in (a.snapshot_fractions or []) if 0 <= f < 1})
    loss_fn = lm_loss
    if a.enabled and model.moe_layers and snap_steps:
        loss_fn = _SnapshotLoss(snap_steps, val_loader, a.max_batches, out, _resumed_step(trainer_cfg, out))
    log.info("nlp: router=%s, %.2fM parameters, %d training blocks of %d tokens, %d steps",
             info["router"], model.num_parameters() / 1e6, len(train_set), d.seq_len, total_steps)
    return trainer, model, train_loader, val_loader, loss_fn


def train(cfg: DictConfig) -> dict:
    """Train the LM described by ``cfg`` (``conf/nlp.yaml``) and return the metrics written to
    ``metrics.json``; ``analysis.json`` and the resolved ``config.yaml`` land in the same directory."""
    trainer, model, train_loader, val_loader, loss_fn = prepare(cfg)
    return _fit(cfg, trainer, model, train_loader, val_loader, loss_fn)


def _fit(cfg, trainer, model, train_loader, val_loader, loss_fn) -> dict:
    metrics = trainer.fit(model, train_loader, loss_fn, lm_evaluate, eval_loaders={"val": val_loader})
    seq_len = cfg.data.seq_len
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
        snapshots = loss_fn.snapshots if isinstance(loss_fn, _SnapshotLoss) else None
        analysis = analyse_routing(model, val_loader, cfg.analysis, snapshots)
        if is_main_process():
            (trainer.out_dir / "analysis.json").write_text(json.dumps(analysis, indent=2, default=_plain) + "\n")
        metrics["analysis"] = _analysis_summary(analysis)
    if is_main_process():
        (trainer.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _plain(v):
    return v.tolist() if torch.is_tensor(v) else str(v)


def _analysis_summary(analysis: dict) -> dict:
    """The scalar part of ``analysis.json``, for ``metrics.json``."""
    out = {k: analysis.get(k) for k in ("explained_by_token_id", "token_id_purity", "uniform_purity")}
    if "stability" in analysis:
        out["routing_agreement"] = {step: v["agreement"] for step, v in analysis["stability"].items()}
    drops = analysis.get("drop_rate_by_position")
    if drops:
        out["drop_capacity_factor"] = drops["capacity_factor"]
        for key in ("no_bpr", "bpr"):
            if key in drops:
                out[f"drop_rate_{key}"] = {k: drops[key][k] for k in ("mean", "first_quarter", "last_quarter")}
    if "null_experts" in analysis:
        out["true_experts_per_token"] = analysis["null_experts"]["true_experts_per_token"]
        out["expert_flop_ratio_to_baseline"] = analysis["null_experts"]["expert_flop_ratio_to_baseline"]
    return out


def summary(metrics: dict) -> str:
    """A short human summary of a finished run."""
    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    lines = [
        f"{metrics['model']} on {metrics['dataset']}, router {metrics['router']}: {metrics['steps']} steps, "
        f"{metrics['wall_time_s'] / 60:.1f} min on {metrics['device']}",
        f"  validation      loss {metrics['val_loss']:.4f}, perplexity {metrics['val_ppl']:.3f}, "
        f"{metrics['val_bits_per_token']:.3f} bits/token",
        f"  throughput      {metrics['tokens_per_s']:.0f} tokens/s training, {metrics['val_tokens_per_s']:.0f} evaluation",
        f"  parameters      {metrics['params_total'] / 1e6:.3f}M total, {metrics['params_active'] / 1e6:.3f}M active per token",
        f"  routing         {fmt(metrics['experts_per_token'], '.2f')} experts per token, load CV² "
        f"{fmt(metrics['load_cv2'], '.4f')}, dropped {fmt(metrics['dropped_fraction'], '.2%')} of choices",
    ]
    a = metrics.get("analysis") or {}
    if a.get("explained_by_token_id") is not None:
        lines.append(f"  specialisation  {a['explained_by_token_id']:.3f} of routing explained by token id")
    return "\n".join(lines)


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


def validate_config(cfg: DictConfig) -> None:
    """Check ``cfg`` (``conf/nlp.yaml``) before the corpus is read: the model target and sizes, the
    router (with the MoE group size it will see), the text file and data sizes, the trainer; raises
    ``ConfigError`` naming the key."""
    m, d = cfg.model, cfg.data
    check_target("model._target_", m.get("_target_"), MoETransformerLM, ": use model=<name> with a conf/model/nlp config")
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
    if moe:
        check_int("model.num_experts", m.num_experts)
        check_int("model.moe_group_size", m.get("moe_group_size"), optional=True)
        check_router(m.get("router"), m.num_experts, key="router", domain="nlp", token_ids=True,
                     group_size=m.get("moe_group_size") or d.seq_len,
                     group_key="model.moe_group_size" if m.get("moe_group_size") else "data.seq_len", seq_len=d.seq_len)
    check_trainer(cfg.trainer, m.num_experts if moe else None)


def _row(cfg: DictConfig) -> dict:
    return {"router": cfg.get("router_name") or hydra_choice("router") or "custom"}


def _report(metrics: dict) -> float:
    print(summary(metrics))
    return metrics["val_loss"]


@hydra.main(config_path="pkg://conf", config_name="nlp", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Config and data errors: one line, exit 2; a non-finite loss: exit 1. In a sweep over every
    router, a non-causal router gets an n/a row."""
    return run_main(cfg, "nlp", validate=validate_config, prepare=prepare, fit=lambda prepared: _fit(cfg, *prepared),
                    out_dir=output_dir, row=_row, not_applicable=(NonCausalRoutingError,), objective=_report)


if __name__ == "__main__":
    main()
