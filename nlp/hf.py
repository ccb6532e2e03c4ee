"""The Hugging Face bridge: a local ``transformers`` checkpoint whose FFNs are core ``MoE`` layers.

``load_hf_lm(path)`` builds the model with ``transformers.AutoModelForCausalLM.from_pretrained(path,
local_files_only=True)`` (attention, rotary embeddings and norms stay transformers' own) and replaces
the ``mlp`` of every decoder layer:

- a sparse MoE block (Mixtral, Jiang et al. 2024; Qwen2-MoE / Qwen3-MoE; OLMoE, Muennighoff et al.
  2024; DeepSeek-V3, arXiv 2412.19437) becomes a ``core.moe.MoE`` with the checkpoint's expert
  weights (``gate_up_proj`` E×2F×D, gate rows first, and ``down_proj`` E×D×F into the stacked GLU
  ``w1``/``w3``/``w2``) and the core router that applies the same rule to the same gate weight:
  ``TopKRouter`` (softmax, top-k, renormalised when Mixtral or ``norm_topk_prob``) or
  ``DeepSeekRouter`` (sigmoid scores, ``e_score_correction_bias`` for selection only, ``n_group`` /
  ``topk_group``, ``norm_topk_prob``, ``routed_scaling_factor``). DeepSeek's shared experts become the
  layer's ``num_shared_experts``; Qwen2-MoE's shared expert and its sigmoid ``shared_expert_gate``
  stay transformers' modules, held by the adapter;
- a dense gate/up/down FFN (Llama, Qwen2, DeepSeek's first dense layers) is kept as it is, or, with
  ``upcycle=True``, becomes an MoE of E copies of it (sparse upcycling, Komatsuzaki et al., "Sparse
  Upcycling", ICLR 2023): with a dropless router whose gates sum to 1 per token the model's output
  is unchanged.

``router=`` (a ``router(dim=D, num_experts=E)`` partial, as ``+router=<name>`` gives) replaces the
router of every MoE layer; a new router whose gate is a ``weight`` of E (or more) rows starts from
the trained gate (DeepSeek's bias starts at zero; Switch/GShard/top-k copy it). AdaMoE (Zeng et al.
2024) keeps the n true experts' rows and, by default (``null_router_init="copy"``), gives the m null
experts copies of them, null row j = trained row j mod n: the authors' Mixtral code
(github.com/CengZihao/AdaMoE, ``exp_2/.../model/loader.py``) builds the null gate ``gate2`` and then
sets it to ``gate.weight.repeat(m // 8, 1)``. Every true logit then appears 1 + m/n times, so a
token's top-K holds its best expert's copies and copies of the next; which copy of a tied logit is
taken is ``torch.topk``'s choice, so before fine-tuning a token uses one or two true experts.
``null_router_init="normal"`` draws the null rows from N(0, initializer_range²) instead (a freshly
initialised ``nn.Linear`` in transformers: null logits near 0).

``save_hf(model, dir)`` writes a Hugging Face directory (``save_pretrained``) that
``AutoModelForCausalLM`` loads with the same logits: a loaded model whose routers still follow the
checkpoint's rule (its blocks restored), an upcycled Llama/Mistral or a suite ``MoETransformerLM`` of
Mixtral's form (both as Mixtral). Other routers and forms have no transformers counterpart and are
refused with the reason (save ``model.pt`` in the suite's format instead).

Routing groups are whole sequences (the MoE layer's default); padding is kept out of routing when
``forward`` gets an ``attention_mask``. transformers' own ``output_router_logits`` auxiliary loss is
not used: the core routers' losses are (``core.collect_aux_loss``; a checkpoint with
``output_router_logits`` gets the Switch loss at ``router_aux_loss_coef·K``, transformers' scale).
Mixtral's ``router_jitter_noise`` (training only, 0 in released configs) is not applied.

Legend: B batch, T sequence length, D width, F expert hidden width, E experts.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from core.checks import ConfigError
from core.moe import MoE
from core.routers.base import Router
from core.routers.deepseek import DeepSeekRouter
from core.routers.topk import TopKRouter
from nlp.models import MoETransformerLM, NonCausalRoutingError, default_router

__all__ = ["HFCausalLM", "HFMoEBlock", "HFTokenizer", "SUPPORTED_MOE", "convert_hf_model", "load_hf_lm", "read_hf_config", "save_hf",
           "save_mixtral", "swap_router", "validate_hf_model"]

log = logging.getLogger(__name__)

# the MoE model_types whose router rule ``checkpoint_router`` maps (read from transformers 5.x modeling_<arch>.py)
SUPPORTED_MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3")


def read_hf_config(path, key: str = "model.path"):
    """The checkpoint's ``transformers`` config, read from ``<path>/config.json`` only (no download);
    a ``ConfigError`` naming ``key`` when the directory or its config is missing or unreadable."""
    from transformers import AutoConfig

    p = Path(str(path)).expanduser()
    if not (p / "config.json").is_file():
        raise ConfigError(key, str(path), "give a local Hugging Face directory with config.json and safetensors "
                          "weights (as save_pretrained writes it)")
    try:
        return AutoConfig.from_pretrained(str(p), local_files_only=True)
    except (ValueError, OSError, KeyError) as err:
        raise ConfigError(key, str(path), f"transformers cannot read its config.json ({err})") from None


def _num_experts(config) -> int:
    return int(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 0)


def checkpoint_router(config, dim: int, num_experts: int) -> Router:
    """The core router that applies the checkpoint's routing rule (weights still to be copied)."""
    k = int(config.num_experts_per_tok)
    if config.model_type == "deepseek_v3":
        return DeepSeekRouter(dim, num_experts, top_k=k, score_func="sigmoid",
                              route_scale=float(config.routed_scaling_factor), renormalize=bool(config.norm_topk_prob),
                              n_group=int(config.n_group or 1), topk_group=int(config.topk_group or 1),
                              bias_update_rate=1e-3)
    renormalize = True if config.model_type == "mixtral" else bool(config.norm_topk_prob)
    # transformers' load-balancing loss (when output_router_logits) is K times the suite's Switch loss
    switch = float(config.router_aux_loss_coef) * k if getattr(config, "output_router_logits", False) else 0.0
    return TopKRouter(dim, num_experts, top_k=k, capacity_factor=None, noise_std=0.0, renormalize=renormalize,
                      importance_loss_weight=0.0, load_loss_weight=0.0, switch_loss_weight=switch)


def _same_rule(router: Router, config) -> str | None:
    """None when ``router`` routes exactly as the checkpoint's block would, else why not."""
    want = checkpoint_router(config, router.dim, router.num_experts)
    if type(router) is not type(want):
        return f"{type(router).__name__} is not {config.model_type}'s router ({type(want).__name__})"
    keys = (("top_k", "score_func", "route_scale", "renormalize", "n_group", "topk_group", "capacity_factor")
            if isinstance(want, DeepSeekRouter) else ("top_k", "renormalize", "capacity_factor"))
    for k in keys:
        if getattr(router, k) != getattr(want, k):
            return f"its {k}={getattr(router, k)!r} differs from {config.model_type}'s {getattr(want, k)!r}"
    return None


class HFMoEBlock(nn.Module):
    """Adapter in place of a transformers sparse MoE block (or an upcycled dense FFN): ``forward``
    takes the decoder layer's hidden states (B, T, D) and returns (B, T, D), as transformers 5.x blocks do.

    Args:
        moe: the core MoE layer (routed experts, optional DeepSeek shared experts).
        shared_expert, shared_expert_gate: Qwen2-MoE's shared FFN and its gate, added as
            ``σ(x g) · shared(x)``; None otherwise.
        source: the transformers module class it replaced (for ``save_hf``), or None (upcycled).
    """

    def __init__(self, moe: MoE, shared_expert: nn.Module | None = None, shared_expert_gate: nn.Module | None = None,
                 source: type | None = None):
        super().__init__()
        self.moe = moe
        self.shared_expert, self.shared_expert_gate = shared_expert, shared_expert_gate
        self.source = source
        # set by HFCausalLM.forward for the current batch: padding mask and token ids (hash routing)
        self.mask_BT: torch.Tensor | None = None
        self.token_ids_BT: torch.Tensor | None = None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        mask, ids = self.mask_BT, self.token_ids_BT
        if mask is not None and mask.shape != x_BTD.shape[:-1]:
            mask = None
        if ids is not None and ids.shape != x_BTD.shape[:-1]:
            ids = None  # e.g. transformers' own generate() with a cache: one new position at a time
        y_BTD = self.moe(x_BTD, mask=mask, token_ids=ids)
        if self.shared_expert is not None:
            y_BTD = y_BTD + torch.sigmoid(self.shared_expert_gate(x_BTD)) * self.shared_expert(x_BTD)
        return y_BTD


def _glu_parts(mlp: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear] | None:
    """(gate, up, down) linears of a transformers gated FFN (LlamaMLP, Qwen2MLP...), else None."""
    parts = tuple(getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj"))
    return parts if all(isinstance(p, nn.Linear) for p in parts) else None


def _is_sparse_block(mlp: nn.Module) -> bool:
    experts, gate = getattr(mlp, "experts", None), getattr(mlp, "gate", None)
    return (experts is not None and isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter)
            and isinstance(getattr(gate, "weight", None), torch.Tensor))


def _act_layer(config) -> Callable[[], nn.Module]:
    name = getattr(config, "hidden_act", "silu")
    if name not in ("silu", "swish"):
        raise ValueError(f"hidden_act={name!r} is not supported by the bridge: core GLU experts use SiLU (SwiGLU).")
    return nn.SiLU


def _moe_from_block(block: nn.Module, config) -> HFMoEBlock:
    """A core MoE carrying a transformers sparse block's weights and its router rule."""
    gate_up_EtD, down_EDF = block.experts.gate_up_proj.detach(), block.experts.down_proj.detach()
    E, F2, D = gate_up_EtD.shape
    F = F2 // 2
    shared = getattr(block, "shared_experts", None)  # DeepSeek: always-on FFN of width n_shared·F
    n_shared = int(getattr(config, "n_shared_experts", 0) or 0) if shared is not None else 0
    moe = MoE(D, F, act_layer=_act_layer(config), bias=False, num_experts=E,
              router=checkpoint_router(config, D, E), glu=True, num_shared_experts=n_shared,
              device=gate_up_EtD.device, dtype=gate_up_EtD.dtype)
    with torch.no_grad():
        ex = moe.experts
        ex.w1_EDF.copy_(gate_up_EtD[:, :F].transpose(1, 2))
        ex.w3_EDF.copy_(gate_up_EtD[:, F:].transpose(1, 2))
        ex.w2_EFO.copy_(down_EDF.transpose(1, 2))
        moe.router.weight.copy_(block.gate.weight.detach().float())
        bias = getattr(block.gate, "e_score_correction_bias", None)
        if bias is not None:
            moe.router.expert_bias_E.copy_(bias.detach().float())
        if n_shared:
            g, u, d = _glu_parts(shared)
            moe.shared_experts.load_dense_mlp(g, d, u)
    return HFMoEBlock(moe, getattr(block, "shared_expert", None), getattr(block, "shared_expert_gate", None),
                      source=type(block))


def _upcycled(mlp: nn.Module, config, num_experts: int, router) -> HFMoEBlock:
    """A dense gate/up/down FFN as an MoE of ``num_experts`` copies (sparse upcycling)."""
    g, u, d = _glu_parts(mlp)
    if any(p.bias is not None for p in (g, u, d)):
        raise ValueError(f"{type(mlp).__name__} has biases: upcycling supports bias-free gated FFNs (mlp_bias=false).")
    router = router if router is not None else default_router()  # Mixtral's: top-2, renormalised, dropless
    moe = MoE(g.in_features, g.out_features, d.out_features, act_layer=_act_layer(config), bias=False,
              num_experts=num_experts, router=router, glu=True, device=g.weight.device, dtype=g.weight.dtype)
    moe.experts.load_dense_mlp(g, d, u)
    return HFMoEBlock(moe, source=None)


NULL_ROUTER_INITS = ("copy", "normal")  # load_hf_lm(null_router_init=...): AdaMoE's null gate rows


def swap_router(moe: MoE, make_router: Callable[..., Router], extra_rows: str | float | None = None) -> Router:
    """Give ``moe`` the router ``make_router(dim=D, num_experts=E)``; a new gate ``weight`` with at
    least E rows starts from the old one's rows. Extra rows (AdaMoE's null experts): ``"copy"`` tiles
    the old rows (row E + j = old row j mod E, the AdaMoE authors' ``gate.weight.repeat``); a number
    σ draws them from N(0, σ²); None keeps the new router's initialisation."""
    if not (extra_rows is None or extra_rows == "copy" or
            (isinstance(extra_rows, (int, float)) and not isinstance(extra_rows, bool) and extra_rows >= 0)):
        raise ValueError(f"extra_rows={extra_rows!r} is not allowed: use 'copy', a standard deviation >= 0 or None.")
    old = moe.router
    new = make_router if isinstance(make_router, Router) else make_router(dim=moe.in_features,
                                                                          num_experts=moe.num_experts)
    w_old, w_new = getattr(old, "weight", None), getattr(new, "weight", None)
    if (isinstance(w_old, torch.Tensor) and isinstance(w_new, torch.Tensor) and w_old.dim() == w_new.dim() == 2
            and w_new.shape[1] == w_old.shape[1] and w_new.shape[0] >= w_old.shape[0]):
        with torch.no_grad():
            E = w_old.shape[0]
            w_new[:E].copy_(w_old.to(w_new.dtype))
            X = w_new.shape[0]
            if extra_rows == "copy" and X > E:
                w_new[E:].copy_(w_old.to(w_new.dtype).repeat((X - 1) // E, 1)[:X - E])
            elif extra_rows is not None and X > E:
                w_new[E:].normal_(0.0, float(extra_rows))
    if isinstance(w_old, torch.Tensor):
        new = new.to(w_old.device)
    moe.router = new
    return new


class HFCausalLM(nn.Module):
    """A transformers causal LM whose FFNs are core MoE layers, with the suite's LM interface:
    ``forward(input_ids (B, T), attention_mask=None) -> logits (B, T, V)``.

    Args:
        hf_model: the ``transformers`` model, its MLPs already replaced (``load_hf_lm`` builds it).
        max_seq_len: the longest sequence the runs feed it (for the suite's checks).
        allow_noncausal_routing: keep a router that lets a token see later tokens (a non-causal LM).
    """

    def __init__(self, hf_model: nn.Module, max_seq_len: int | None = None, allow_noncausal_routing: bool = False):
        super().__init__()
        self.hf = hf_model
        self.config = hf_model.config
        self.vocab_size = int(hf_model.config.vocab_size)
        self.max_seq_len = int(max_seq_len or getattr(hf_model.config, "max_position_embeddings", 0) or 0)
        self.allow_noncausal_routing = bool(allow_noncausal_routing)
        self.upcycled_from: str | None = None
        self._check_causal_routing()

    def layer_blocks(self) -> list[tuple[int, HFMoEBlock]]:
        return [(i, layer.mlp) for i, layer in enumerate(self.hf.model.layers) if isinstance(layer.mlp, HFMoEBlock)]

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, _ in self.layer_blocks()]

    def moe_modules(self) -> list[MoE]:
        return [b.moe for _, b in self.layer_blocks()]

    # the suite LM's definitions that read only moe_modules() and num_parameters(): shared, not rewritten
    routers = MoETransformerLM.routers
    is_causal = MoETransformerLM.is_causal
    num_parameters = MoETransformerLM.num_parameters
    _routed_parameters = staticmethod(MoETransformerLM._routed_parameters)
    expert_parameters = MoETransformerLM.expert_parameters
    active_parameters = MoETransformerLM.active_parameters
    generate = MoETransformerLM.generate  # nlp.generate's sampling loop, with transformers' KV cache
    kv_cache_problem = MoETransformerLM.kv_cache_problem
    check_kv_cache = MoETransformerLM.check_kv_cache

    def new_kv_cache(self):
        """An empty ``transformers.DynamicCache`` for ``forward(ids, kv_cache=...)``; ``ValueError``
        when a router would route one new token differently from the whole sequence."""
        from transformers import DynamicCache

        self.check_kv_cache()
        return DynamicCache(config=self.config)

    def _check_causal_routing(self) -> None:
        if self.allow_noncausal_routing:
            return
        for i, block in self.layer_blocks():
            if not block.moe.router.is_causal:
                raise NonCausalRoutingError(
                    f"router {type(block.moe.router).__name__} (layer {i}) is not causal: the language model would "
                    "see the future. Fix: use a causal router (mixtral, topk with capacity_factor=null, adamoe, "
                    "deepseek, ...), or set model.allow_noncausal_routing=true.")

    def forward(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None = None,
                kv_cache=None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V); ``attention_mask`` (B, T), 1 = real token.
        ``kv_cache`` (from ``new_kv_cache``): the T tokens follow the cached ones and are appended."""
        if kv_cache is not None and attention_mask_BT is not None:
            raise ValueError("attention_mask is not supported with kv_cache: the cached decoder takes unpadded tokens.")
        mask_BT = None if attention_mask_BT is None else attention_mask_BT.to(torch.bool)
        blocks = [b for _, b in self.layer_blocks()]
        for b in blocks:
            b.mask_BT, b.token_ids_BT = mask_BT, input_ids_BT
        try:
            out = self.hf(input_ids=input_ids_BT, attention_mask=attention_mask_BT, cache=kv_cache,
                          use_cache=kv_cache is not None)
        finally:
            for b in blocks:
                b.mask_BT = b.token_ids_BT = None
        return out.logits


def load_hf_lm(path: str | os.PathLike, upcycle: bool = False, num_experts: int | None = None,
               router: Callable[..., Router] | None = None, vocab_size: int | None = None,
               max_seq_len: int | None = None, dtype: str = "float32", allow_noncausal_routing: bool = False,
               save_hf: bool = True, null_router_init: str = "copy", **ignored) -> HFCausalLM:
    """Load a local Hugging Face causal LM with core MoE FFNs (see the module docstring).

    Args:
        path: directory with ``config.json`` and safetensors weights (``save_pretrained``'s layout).
        upcycle: turn every dense gate/up/down FFN into an MoE of ``num_experts`` copies.
        num_experts: E copies when upcycling (default 8); a MoE checkpoint fixes its own E.
        router: ``router(dim=D, num_experts=E)`` for every MoE layer; None keeps the checkpoint's rule
            (upcycled layers: Mixtral's top-2).
        vocab_size: the data's vocabulary; the checkpoint's must be at least as large.
        max_seq_len: the run's sequence length.
        dtype: ``float32`` | ``bfloat16`` | ``float16`` | ``auto`` (the checkpoint's).
        allow_noncausal_routing: accept a router that sees later tokens.
        null_router_init: the gate rows ``router`` has beyond the checkpoint's E (AdaMoE's null
            experts): ``"copy"`` (the trained rows repeated, the AdaMoE authors' code) or ``"normal"``
            (N(0, initializer_range²)).
        save_hf: not read here: ``nlp.train`` writes ``<run dir>/hf/`` at the end of a run when true.
        **ignored: the suite model's shape keys (``dim``, ``depth``, ``num_heads``... set by
            ``debug=default``): the checkpoint fixes the shape, so they are logged and not used.

    Example::

        model = load_hf_lm("ckpt/mixtral-tiny")
        logits = model(torch.randint(0, 256, (2, 32)))
    """
    from transformers import AutoModelForCausalLM

    config = read_hf_config(path)
    if vocab_size is not None and int(config.vocab_size) < int(vocab_size):
        raise ConfigError("model.path", str(path), f"the checkpoint's vocabulary has {config.vocab_size} tokens and "
                          f"the data's tokenizer {vocab_size}: use data.tokenizer=<the checkpoint's tokenizer> or a "
                          f"checkpoint with vocab_size >= {vocab_size}")
    used = {k: v for k, v in ignored.items() if v is not None}
    if used:
        log.warning("model keys %s are not used: the Hugging Face checkpoint %s fixes the model's shape",
                    sorted(used), path)
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, str(dtype), None)
    if not (torch_dtype == "auto" or isinstance(torch_dtype, torch.dtype)):
        raise ConfigError("model.dtype", dtype, "use float32, bfloat16, float16 or auto")
    hf = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=torch_dtype)
    hf.eval()
    return convert_hf_model(hf, upcycle=upcycle, num_experts=num_experts, router=router, max_seq_len=max_seq_len,
                            allow_noncausal_routing=allow_noncausal_routing, null_router_init=null_router_init)


def convert_hf_model(hf: nn.Module, upcycle: bool = False, num_experts: int | None = None,
                     router: Callable[..., Router] | None = None, max_seq_len: int | None = None,
                     allow_noncausal_routing: bool = False, null_router_init: str = "copy") -> HFCausalLM:
    """``load_hf_lm`` on a transformers model already in memory (its MLPs are replaced in place)."""
    if null_router_init not in NULL_ROUTER_INITS:
        raise ConfigError("model.null_router_init", null_router_init, f"use one of {', '.join(NULL_ROUTER_INITS)}")
    config = hf.config
    layers = getattr(getattr(hf, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"{type(hf).__name__} has no model.layers: the bridge reads decoder-only transformers LMs.")
    E_up = 8 if num_experts is None else int(num_experts)
    if upcycle and E_up < 1:
        raise ConfigError("model.num_experts", num_experts, "upcycling needs at least 1 expert")
    for layer in layers:
        mlp = layer.mlp
        if _is_sparse_block(mlp):
            if config.model_type not in SUPPORTED_MOE:
                raise ValueError(f"model_type={config.model_type!r} has a sparse MoE block the bridge has no router "
                                 f"mapping for: supported MoE checkpoints are {list(SUPPORTED_MOE)}.")
            layer.mlp = _moe_from_block(mlp, config)
        elif upcycle and _glu_parts(mlp) is not None:
            layer.mlp = _upcycled(mlp, config, E_up, router)
    model = HFCausalLM(hf, max_seq_len, allow_noncausal_routing=True)
    if upcycle:
        model.upcycled_from = config.model_type
    if router is not None:  # upcycled layers were built with it; the checkpoint's routers are replaced
        for _, block in model.layer_blocks():
            if block.source is not None:
                swap_router(block.moe, router, "copy" if null_router_init == "copy"
                            else float(getattr(config, "initializer_range", None) or 0.02))
    model.allow_noncausal_routing = bool(allow_noncausal_routing)
    model._check_causal_routing()
    return model


# ------------------------------------------------------------------------------------------ tokenizer


class HFTokenizer:
    """A checkpoint's own tokenizer (``transformers.AutoTokenizer``, local files only) with the
    interface of ``nlp.data``'s tokenizers: ``encode``/``decode``/``encode_corpus``, ``vocab_size`` and
    the BOS/EOS/PAD ids. Lines of a corpus become documents separated by EOS (as ``BPETokenizer``).

    Args:
        path: a directory with the tokenizer files ``save_pretrained`` writes (``tokenizer.json``...).
    """

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer

        p = Path(str(path)).expanduser()
        if not p.is_dir():
            raise ConfigError("data.tokenizer", str(path), "use byte, bpe or a local Hugging Face tokenizer directory")
        try:
            self._tok = AutoTokenizer.from_pretrained(str(p), local_files_only=True)
        except (ValueError, OSError) as err:
            raise ConfigError("data.tokenizer", str(path), f"transformers cannot load a tokenizer from it ({err})") from None
        self.name = f"hf:{p.name}"
        self.vocab_size = len(self._tok)
        self.eos_token_id = self._tok.eos_token_id
        self.bos_token_id = self._tok.bos_token_id if self._tok.bos_token_id is not None else self.eos_token_id
        self.pad_token_id = self._tok.pad_token_id if self._tok.pad_token_id is not None else self.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """The tokenizer's files into ``directory`` (next to a model ``save_hf`` wrote)."""
        self._tok.save_pretrained(str(directory))

    def decode(self, ids) -> str:
        ids = ids.tolist() if torch.is_tensor(ids) else list(ids)
        return self._tok.decode(ids, skip_special_tokens=True)

    def encode_corpus(self, text: str) -> list[int]:
        ids: list[int] = []
        for line in text.splitlines():
            if line.strip():
                ids.extend(self.encode(line))
                if self.eos_token_id is not None:
                    ids.append(self.eos_token_id)
        return ids


# ------------------------------------------------------------------------------------------ config


BYTE_VOCAB = 259  # nlp.data's byte tokenizer: 256 bytes and 3 specials


def validate_hf_model(cfg) -> int | None:
    """The checks of ``model=hf`` before any data is read (``conf/nlp/model/hf.yaml``): the checkpoint
    directory, its vocabulary against the byte tokenizer, ``upcycle``/``num_experts``, and the router
    for the checkpoint's expert count. ``cfg.model.num_experts`` is set to the experts a MoE layer
    will have (the checkpoint's, or the upcycled copies); returns it (None: a dense model)."""
    from omegaconf import OmegaConf, open_dict

    from core.checks import check_int
    from core.validate import check_router

    m, d = cfg.model, cfg.data
    if OmegaConf.is_missing(m, "path") or m.path is None:
        raise ConfigError("model.path", "???", "give a local Hugging Face checkpoint directory, e.g. model.path=ckpt/")
    config = read_hf_config(m.path)
    if d.tokenizer == "byte" and int(config.vocab_size) < BYTE_VOCAB:
        raise ConfigError("model.path", str(m.path), f"the checkpoint's vocabulary has {config.vocab_size} tokens, fewer "
                          f"than the byte tokenizer's {BYTE_VOCAB} ids: use a checkpoint with vocab_size >= {BYTE_VOCAB} "
                          "or data.tokenizer=<the checkpoint's tokenizer directory>")
    if d.tokenizer not in ("byte", "bpe"):  # a tokenizer directory (nlp.training.check_tokenizer found its files)
        n = HFTokenizer(d.tokenizer).vocab_size
        if n > int(config.vocab_size):
            raise ConfigError("data.tokenizer", str(d.tokenizer), f"its vocabulary has {n} tokens, more than the "
                              f"embedding of {m.path} holds (vocab_size={config.vocab_size}): ids >= "
                              f"{config.vocab_size} have no embedding; use the checkpoint's own tokenizer")
    for key in ("upcycle", "save_hf"):
        if not isinstance(m.get(key, False), bool):
            raise ConfigError(f"model.{key}", m.get(key), "use true or false")
    check_int("model.num_experts", m.get("num_experts"), optional=True)
    if m.get("null_router_init", "copy") not in NULL_ROUTER_INITS:
        raise ConfigError("model.null_router_init", m.get("null_router_init"), f"use one of {', '.join(NULL_ROUTER_INITS)}")
    E = _num_experts(config) if config.model_type in SUPPORTED_MOE else 0
    if E:
        if m.get("num_experts") not in (None, E):
            log.warning("model.num_experts=%s is not used: checkpoint %s has %d experts per MoE layer",
                        m.num_experts, m.path, E)
    elif m.upcycle:
        E = m.get("num_experts") or 8
    elif _num_experts(config):
        raise ConfigError("model.path", str(m.path), f"model_type={config.model_type!r} is a MoE the bridge has no "
                          f"router mapping for: supported MoE checkpoints are {list(SUPPORTED_MOE)}")
    with open_dict(m):
        m.num_experts = E or None
    if not E:
        return None
    if m.get("router") is None and not cfg.get("router_name"):  # the row name of the checkpoint's own rule
        with open_dict(cfg):
            cfg.router_name = "mixtral" if not _num_experts(config) else f"checkpoint ({config.model_type})"
    check_router(m.get("router"), E, key="router", domain="nlp", token_ids=True, group_size=d.seq_len,
                 group_key="data.seq_len", seq_len=d.seq_len, expert_parallel=cfg.trainer.get("expert_parallel") is True)
    return E


# ------------------------------------------------------------------------------------------ write back


@torch.no_grad()
def _write_sparse_block(hf_block: nn.Module, moe: MoE) -> None:
    """The routed experts (``w1``/``w3`` -> ``gate_up_proj``, gate rows first; ``w2`` -> ``down_proj``)
    and the router weight of ``moe`` into a transformers sparse block."""
    ex, experts = moe.experts, hf_block.experts
    experts.gate_up_proj.copy_(torch.cat([ex.w1_EDF, ex.w3_EDF], dim=2).transpose(1, 2))
    experts.down_proj.copy_(ex.w2_EFO.transpose(1, 2))
    hf_block.gate.weight.copy_(moe.router.weight)


def _restore_block(block: HFMoEBlock, config) -> nn.Module:
    """A transformers sparse block of ``block.source`` with ``block``'s weights."""
    hf_block = block.source(config).to(block.moe.experts.w1_EDF.dtype)
    moe, ex = block.moe, block.moe.experts
    _write_sparse_block(hf_block, moe)
    with torch.no_grad():
        if isinstance(moe.router, DeepSeekRouter):
            hf_block.gate.e_score_correction_bias.copy_(moe.router.expert_bias_E)
        if moe.shared_experts is not None:
            s, se = hf_block.shared_experts, moe.shared_experts
            s.gate_proj.weight.copy_(se.w1_EDF[0].t())
            s.up_proj.weight.copy_(se.w3_EDF[0].t())
            s.down_proj.weight.copy_(se.w2_EFO[0].t())
        if block.shared_expert is not None:
            hf_block.shared_expert = block.shared_expert
            hf_block.shared_expert_gate = block.shared_expert_gate
    return hf_block.to(ex.w1_EDF.device)


def save_hf(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model`` as a Hugging Face directory (``save_pretrained``) that
    ``AutoModelForCausalLM.from_pretrained`` loads with the same logits: a model loaded by
    ``load_hf_lm`` whose every MoE layer still routes by the checkpoint's own rule, or a suite
    ``MoETransformerLM`` of Mixtral's form (``save_mixtral``). Others raise ``ValueError``: transformers
    has no such router or layer, so they are saved in the suite's format (``model.pt``)."""
    if isinstance(model, MoETransformerLM):
        return save_mixtral(model, directory)
    if not isinstance(model, HFCausalLM):
        raise ValueError(f"save_hf writes nlp.hf.HFCausalLM and nlp.models.MoETransformerLM models, not "
                         f"{type(model).__name__}; it is saved in the suite's format (model.pt).")
    config = model.config
    if model.upcycled_from is not None and all(b.source is None for _, b in model.layer_blocks()):
        return _save_upcycled_as_mixtral(model, directory)
    for i, block in model.layer_blocks():
        why = None
        if block.source is None:
            why = f"layer {i} was upcycled from a dense {config.model_type} FFN, which transformers' " \
                  f"{config.model_type} cannot hold"
        else:
            why = _same_rule(block.moe.router, config)
            why = None if why is None else f"layer {i}'s router {why}"
        if why is not None:
            _refuse(why)
    layers = model.hf.model.layers
    adapters = {i: block for i, block in model.layer_blocks()}
    try:
        for i, block in adapters.items():
            layers[i].mlp = _restore_block(block, config)
        out = Path(directory)
        model.hf.save_pretrained(str(out))
    finally:
        for i, block in adapters.items():
            layers[i].mlp = block
    return out


def _refuse(why: str):
    raise ValueError(f"cannot save in Hugging Face format: {why}; transformers has no such model, so it is saved "
                     "in the suite's format (model.pt) instead.")


UPCYCLE_TO_MIXTRAL = ("llama", "mistral")  # dense families whose layers Mixtral holds under the same names


def _save_upcycled_as_mixtral(model: HFCausalLM, directory) -> Path:
    """An upcycled Llama/Mistral written as a transformers Mixtral (attention, norms and embeddings
    under the same names; every FFN an MoE with Mixtral's router)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    c = model.config
    if c.model_type not in UPCYCLE_TO_MIXTRAL:
        _refuse(f"the model was upcycled from a dense {c.model_type} FFN and transformers has no MoE form of "
                f"{c.model_type} (Mixtral holds upcycled {' and '.join(UPCYCLE_TO_MIXTRAL)} models)")
    if getattr(c, "attention_bias", False):
        _refuse(f"the upcycled {c.model_type} has attention biases, which Mixtral does not")
    blocks = [b for _, b in model.layer_blocks()]
    if len(blocks) != c.num_hidden_layers:
        _refuse("only some of its layers are MoE; Mixtral's are all")
    for i, b in enumerate(blocks):
        r = b.moe.router
        if not (type(r) is TopKRouter and r.renormalize and r.capacity_factor is None and r.top_k == blocks[0].moe.router.top_k
                and b.moe.num_experts == blocks[0].moe.num_experts):
            _refuse(f"layer {i}'s router {type(r).__name__} is not Mixtral's renormalised dropless top-k, or the "
                    "layers differ in top_k or num_experts")
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
            "rms_norm_eps", "rope_parameters", "tie_word_embeddings", "attention_dropout", "sliding_window",
            "bos_token_id", "eos_token_id", "pad_token_id")
    config = MixtralConfig(**{k: getattr(c, k) for k in keep if getattr(c, k, None) is not None},
                           num_local_experts=blocks[0].moe.num_experts, num_experts_per_tok=blocks[0].moe.router.top_k)
    dtype = blocks[0].moe.experts.w1_EDF.dtype
    hf = MixtralForCausalLM(config).to(dtype)
    dense = {k: v for k, v in model.hf.state_dict().items() if ".mlp." not in k}
    missing, unexpected = hf.load_state_dict(dense, strict=False)
    if unexpected or any(".mlp." not in k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings):
        _refuse(f"its {c.model_type} weights do not map onto Mixtral's (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for layer, b in zip(hf.model.layers, blocks):
        _write_sparse_block(layer.mlp, b.moe)
    out = Path(directory)
    hf.save_pretrained(str(out))
    return out


def _mixtral_form(model) -> str | None:
    """None when a suite ``MoETransformerLM`` is a Mixtral (Jiang et al. 2024): rotary positions, RMSNorm,
    bias-free attention, every FFN a SwiGLU MoE with Mixtral's router; else what differs."""
    from core.experts import Experts

    if model.pos_embed is not None:
        return "it has learned positions (Mixtral: model.pos_embed=rope)"
    if not isinstance(model.norm, nn.RMSNorm):
        return "it uses LayerNorm (Mixtral: model.norm=rmsnorm)"
    if model.moe_layers != list(range(model.depth)):
        return f"only blocks {model.moe_layers} are MoE (Mixtral: model.moe_layers=all)"
    routers = model.routers()
    for i, moe in enumerate(model.moe_modules()):
        ex = moe.experts
        if type(ex) is not Experts or not ex.glu or type(ex.act) is not nn.SiLU or ex.b1_EF is not None:
            return f"block {i}'s experts are not bias-free SwiGLU (Mixtral: model.glu=true model.act_layer=silu " \
                   "model.bias=false model.expert_type=mlp)"
        if moe.shared_experts is not None:
            return f"block {i} has shared experts (Mixtral has none)"
        r = moe.router
        if not (type(r) is TopKRouter and r.renormalize and r.capacity_factor is None):
            return f"block {i}'s router {type(r).__name__} is not Mixtral's (renormalised dropless top-k: +router=mixtral)"
        if r.top_k != routers[0].top_k or moe.num_experts != model.moe_modules()[0].num_experts:
            return "its MoE layers differ in top_k or num_experts"
    if model.blocks[0].attn.qkv.bias is not None:
        return "its attention has biases (Mixtral: model.bias=false)"
    return None


def save_mixtral(model, directory: str | os.PathLike) -> Path:
    """Write a suite ``MoETransformerLM`` of Mixtral's form as a transformers Mixtral directory
    (``MixtralForCausalLM.save_pretrained``): the fused qkv projection split into q/k/v, the stacked
    GLU experts into ``gate_up_proj``/``down_proj``, the router weight into the gate; RMSNorm's eps
    and the rotary base carried into the config."""
    from transformers import MixtralConfig, MixtralForCausalLM

    why = _mixtral_form(model)
    if why is not None:
        _refuse(f"the model is not of Mixtral's form: {why}")
    moes = model.moe_modules()
    b0, D = model.blocks[0], model.dim
    eps = b0.norm1.eps if b0.norm1.eps is not None else torch.finfo(b0.norm1.weight.dtype).eps
    tied = model.head.weight is model.tok_embed.weight
    config = MixtralConfig(
        vocab_size=model.vocab_size, hidden_size=D, intermediate_size=moes[0].experts.hidden_features,
        num_hidden_layers=model.depth, num_attention_heads=b0.attn.num_heads, num_key_value_heads=b0.attn.num_heads,
        head_dim=b0.attn.head_dim, max_position_embeddings=model.max_seq_len, rms_norm_eps=float(eps),
        num_local_experts=moes[0].num_experts, num_experts_per_tok=moes[0].router.top_k,
        tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": model.rope_base},
        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    hf = MixtralForCausalLM(config).to(b0.norm1.weight.dtype)
    with torch.no_grad():
        hf.model.embed_tokens.weight.copy_(model.tok_embed.weight)
        hf.model.norm.weight.copy_(model.norm.weight)
        if not tied:
            hf.lm_head.weight.copy_(model.head.weight)
        for block, layer in zip(model.blocks, hf.model.layers):
            q, k, v = block.attn.qkv.weight.chunk(3, dim=0)  # qkv rows: (3, H, Hd)
            for lin, w in ((layer.self_attn.q_proj, q), (layer.self_attn.k_proj, k), (layer.self_attn.v_proj, v),
                           (layer.self_attn.o_proj, block.attn.proj.weight)):
                lin.weight.copy_(w)
            layer.input_layernorm.weight.copy_(block.norm1.weight)
            layer.post_attention_layernorm.weight.copy_(block.norm2.weight)
            _write_sparse_block(layer.mlp, block.ffn)
    out = Path(directory)
    hf.save_pretrained(str(out))
    return out
