"""The language model's training pieces: the config checks, the model, next-token cross-entropy and
validation loss, perplexity and bits per token (used by ``nlp.train.LanguageModelTask``)."""

from __future__ import annotations

import math
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from core.checks import (ConfigError, check_choice, check_int, check_number, check_readable_file, check_target,
                         to_config_error)
from core.surgery import moe_block_indices
from core.validate import check_router
from nlp.models import MoETransformerLM

__all__ = ["build_model", "check_tokenizer", "lm_evaluate", "lm_loss", "validate_config"]

HF_TARGET = "nlp.hf.load_hf_lm"  # conf/nlp/model/hf.yaml: a Hugging Face checkpoint (nlp/hf.py)


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


# the files save_pretrained writes for a tokenizer (fast, SentencePiece, BPE and WordPiece vocabularies)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt")


def check_tokenizer(value) -> None:
    """``data.tokenizer``: ``byte``, ``bpe`` or a local Hugging Face tokenizer directory holding one of
    ``TOKENIZER_FILES`` (the files are read when the data is loaded; nothing is downloaded)."""
    if value in ("byte", "bpe"):
        return
    use = "use byte, bpe or a local Hugging Face tokenizer directory (save_pretrained's tokenizer files)"
    if not isinstance(value, str) or not value:
        raise ConfigError("data.tokenizer", value, use)
    p = Path(value).expanduser()
    if not p.is_dir():
        raise ConfigError("data.tokenizer", value, f"{use}; there is no directory at {p.resolve()}")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError("data.tokenizer", value, f"{p.resolve()} holds none of the tokenizer files "
                          f"{', '.join(TOKENIZER_FILES)}: give the directory tokenizer.save_pretrained wrote")


def validate_config(cfg: DictConfig) -> int | None:
    """Check ``cfg`` (``conf/nlp/train.yaml``) before the corpus is read: the model target and sizes, the
    router (with the MoE group size it will see), the text file and data sizes, the trainer; raises
    ``ConfigError`` naming the key; returns the experts of a MoE layer (None for the dense model)."""
    m, d = cfg.model, cfg.data
    hf = m.get("_target_") == HF_TARGET
    if not hf:
        check_target("model._target_", m.get("_target_"), MoETransformerLM,
                     ": use model=<name> with a conf/nlp/model config")
    if OmegaConf.is_missing(d, "path"):
        raise ConfigError("data.path", "???", "give a UTF-8 text file, e.g. data.path=book.txt")
    if d.path is not None:
        _check_text_file(d.path)
    check_tokenizer(d.tokenizer)
    check_int("data.seq_len", d.seq_len)
    check_int("data.batch_size", d.batch_size)
    for key in ("eval_batch_size", "limit_train", "limit_eval"):
        check_int(f"data.{key}", d.get(key), optional=True)
    check_number("data.val_fraction", d.val_fraction, gt=0)
    if d.val_fraction >= 1:
        raise ConfigError("data.val_fraction", d.val_fraction, "it must lie in (0, 1)")
    if hf:  # a Hugging Face checkpoint (conf/nlp/model/hf.yaml): its own checks
        from nlp.hf import validate_hf_model

        return validate_hf_model(cfg)
    _check_architecture(m)
    _check_activation_memory(cfg)
    moe = m.get("moe_layers", "all") not in ("none", None) and m.get("moe_layers") != []
    if not moe:
        return None
    check_int("model.num_experts", m.num_experts)
    check_int("model.moe_group_size", m.get("moe_group_size"), optional=True)
    try:
        check_router(m.get("router"), m.num_experts, key="router", domain="nlp", token_ids=True,
                     group_size=m.get("moe_group_size") or d.seq_len,
                     group_key="model.moe_group_size" if m.get("moe_group_size") else "data.seq_len",
                     seq_len=d.seq_len, expert_parallel=cfg.trainer.get("expert_parallel") is True)
    except ConfigError as err:
        if err.key == "router.num_experts":  # the router's weights would not fit: the model's key is at fault
            raise ConfigError("model.num_experts", m.num_experts, err.allowed) from None
        raise
    return m.num_experts


def activation_bytes(batch_size: int, seq_len: int, dim: int, depth: int, mlp_ratio: float,
                     vocab_size: int = 259) -> int:
    """A lower bound on the float32 activations one training step keeps for the backward pass: per
    token and block at least the residual input, two normalised inputs, the attention output and the
    FFN's hidden layer ((4 + mlp_ratio)·dim floats); per token the logits and their log-softmax
    (2·vocab). Attention scores are not counted (fused attention need not keep them), so a run this
    refuses could never fit."""
    per_token = depth * (4 + mlp_ratio) * dim + 2 * vocab_size
    return int(4 * batch_size * seq_len * per_token)


def _check_activation_memory(cfg: DictConfig) -> None:
    """A batch whose activations alone exceed the machine's memory is refused naming ``data.seq_len``
    (or ``data.batch_size``) with the estimate, before the corpus is read or the model built."""
    from core.engine import resolve_device
    from core.memory import check_allocation

    m, d = cfg.model, cfg.data
    if not all(isinstance(m.get(k), int) for k in ("dim", "depth")):
        return
    need = activation_bytes(d.batch_size, d.seq_len, m.dim, m.depth, float(m.get("mlp_ratio") or 4.0))
    key, value = ("data.seq_len", d.seq_len) if d.seq_len >= d.batch_size else ("data.batch_size", d.batch_size)
    check_allocation(need, f"the activations of one training batch ({d.batch_size} sequences of {d.seq_len} tokens, "
                     f"at least)", key, value, device=str(resolve_device(cfg.trainer.get("device", "auto"))))


def _check_architecture(m: DictConfig) -> None:
    """The model's shape keys, named as config keys (the model's own checks name its arguments)."""
    for key in ("dim", "depth", "num_heads"):
        if key in m:
            check_int(f"model.{key}", m[key])
    if "dim" in m and "num_heads" in m:
        if m.dim % m.num_heads:
            raise ConfigError("model.num_heads", m.num_heads, f"the heads must divide model.dim={m.dim}")
        if m.get("pos_embed", "rope") == "rope" and (m.dim // m.num_heads) % 2:
            raise ConfigError("model.num_heads", m.num_heads, f"with pos_embed=rope the head width model.dim/num_heads"
                              f"={m.dim // m.num_heads} must be even")
    for key, choices in (("pos_embed", ("rope", "learned")), ("norm", ("rmsnorm", "layernorm")),
                         ("expert_type", ("mlp", "lora"))):
        if key in m:
            check_choice(f"model.{key}", m[key], choices)
    if "dropout" in m:
        check_number("model.dropout", m.dropout, ge=0)
        if not m.dropout < 1:
            raise ConfigError("model.dropout", m.dropout, "it must lie in [0, 1)")
    for key in ("mlp_ratio", "expert_mlp_ratio"):
        check_number(f"model.{key}", m.get(key), gt=0, optional=True)
    layers = m.get("moe_layers", "all")
    if "depth" in m and layers is not None:
        try:
            moe_block_indices(m.depth, OmegaConf.to_container(layers) if OmegaConf.is_list(layers) else layers,
                              key="model.moe_layers")
        except ValueError as err:
            raise to_config_error(err, "model.") from None
