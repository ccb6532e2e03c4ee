"""Decoder-only causal MoE language models: pre-norm transformer blocks whose FFN, in chosen layers,
is the core MoE layer (GShard, Lepikhin et al. 2020; Switch, Fedus et al. 2022; Mixtral, Jiang et
al. 2024).

A block is ``x + attn(norm(x))`` then ``x + ffn(norm(x))``; attention is causal (PyTorch's
``scaled_dot_product_attention``), positions are rotary (RoPE, Su et al. 2021) or learned, the
output projection is tied to the token embedding (Press & Wolf 2017). The FFN is a dense timm
``Mlp``/``SwiGLU`` or a ``core.moe.MoE`` that receives the token ids (hash routing) and the padding
mask. A language model must not look at later tokens, so routers that are not causal (expert
choice, Soft MoE, Sinkhorn and sparsity-constrained plans, BPR, sentence-level gating...) are refused
at construction unless ``allow_noncausal_routing=True``.

Generation keeps the attention keys and values of the tokens decoded so far (``KVCache``), so a new
token costs one position; this routes every new token in a group of its own, which gives the routing
of the whole sequence only when each token is routed by itself alone (``incremental_routing_problem``).
Other routers generate by recomputing the context for every token.

Legend: B batch, T sequence length (P cached positions before it), D width, H heads, Hd head width,
V vocabulary.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from timm.layers import Mlp, SwiGLU, get_act_layer
from torch import nn

from core.lora_experts import LoRAExperts
from core.memory import check_allocation
from core.moe import MoE
from core.router_config import router_factory
from core.routers.base import Router, check_positive_int
from core.routers.topk import TopKRouter
from core.surgery import moe_block_indices

__all__ = [
    "CausalSelfAttention", "DecoderBlock", "KVCache", "MoETransformerLM", "NonCausalRoutingError", "RotaryEmbedding",
    "default_router", "incremental_routing_problem", "sample_next",
]

log = logging.getLogger(__name__)


class NonCausalRoutingError(ValueError):
    """The router lets a token's output depend on later tokens, and non-causal routing was not allowed."""


def default_router() -> Callable[..., Router]:
    """Mixtral's router (Jiang et al., 2024): top-2, softmax renormalised over the two selected
    experts, dropless, no noise; Switch-style load-balance loss with weight 0.001 (the same router
    as ``conf/router/mixtral.yaml``)."""
    return functools.partial(
        TopKRouter, top_k=2, capacity_factor=None, noise_std=0.0, renormalize=True,
        importance_loss_weight=0.0, load_loss_weight=0.0, switch_loss_weight=0.001,
    )


def incremental_routing_problem(routers: Sequence[Router]) -> str | None:
    """Why routing one new token at a time (in a group of its own, as a KV-cached decoder does) would
    differ from routing the whole sequence; None when every router routes a token by that token alone:
    ``token_local``, not mixing tokens, not ``routes_by_position``, and dropless (with a capacity, whether a token is dropped
    depends on the tokens before it, even in a causal router)."""
    for i, router in enumerate(routers):
        name = type(router).__name__
        if not router.token_local or router.mixes_tokens:
            return f"router {name} (MoE layer {i}) routes a token by the other tokens of its group"
        if router.routes_by_position:
            return f"router {name} (MoE layer {i}) routes a token by its position in its group"
        cf = getattr(router, "capacity_factor", None)
        if cf is not None:
            return (f"router {name} (MoE layer {i}) has capacity_factor={cf}: whether a token is dropped depends "
                    "on the tokens routed before it in its group")
    return None


class LayerKV:
    """One attention layer's keys and values, (B, H, P, Hd) each, for the P positions seen so far."""

    def __init__(self):
        self.k_BHPHd: torch.Tensor | None = None
        self.v_BHPHd: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k_BHPHd is None else self.k_BHPHd.shape[-2]

    def append(self, k_BHTHd: torch.Tensor, v_BHTHd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add T new positions; returns the keys and values of all P + T."""
        if self.k_BHPHd is not None:
            k_BHTHd = torch.cat([self.k_BHPHd, k_BHTHd], dim=-2)
            v_BHTHd = torch.cat([self.v_BHPHd, v_BHTHd], dim=-2)
        self.k_BHPHd, self.v_BHPHd = k_BHTHd, v_BHTHd
        return k_BHTHd, v_BHTHd


class KVCache:
    """The keys and values of every attention layer of a ``MoETransformerLM`` for the tokens decoded so
    far (``model(new_ids, kv_cache=cache)`` appends to it).

    Args:
        depth: number of blocks.
    """

    def __init__(self, depth: int):
        self.layers = [LayerKV() for _ in range(depth)]

    @property
    def length(self) -> int:
        """P, the positions cached."""
        return self.layers[0].length


def check_top_p(top_p: float | None) -> None:
    """Raise ``ValueError`` unless ``top_p`` is None or lies in (0, 1]."""
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} is not allowed: it must lie in (0, 1] (1: no nucleus cut).")


def sample_next(logits_BV: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator | None, top_p: float | None = None) -> torch.Tensor:
    """The next token (B, 1): greedy at ``temperature`` 0, else sampled from the softmax of
    ``logits / temperature`` restricted to the ``top_k`` largest and then to the nucleus of
    ``top_p`` (the fewest most probable tokens whose probability reaches ``top_p``; Holtzman et al.,
    "The Curious Case of Neural Text Degeneration", ICLR 2020). Sampled on the CPU, so that a
    seeded ``generator`` gives the same tokens on every device."""
    if temperature == 0:
        return logits_BV.argmax(-1, keepdim=True)
    logits_BV = logits_BV / temperature
    if top_k is not None and top_k < logits_BV.shape[-1]:
        kth = torch.topk(logits_BV, top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_BV, order_BV = torch.sort(logits_BV, dim=-1, descending=True)
        probs_BV = torch.softmax(sorted_BV, -1)
        drop_BV = probs_BV.cumsum(-1) - probs_BV >= top_p  # kept while the mass before it is short of top_p
        logits_BV = logits_BV.masked_fill(drop_BV.scatter(-1, order_BV, drop_BV), float("-inf"))
    probs = torch.softmax(logits_BV, -1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).to(logits_BV.device)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding (Su et al., "RoFormer", 2021), rotate-half form.

    Args:
        head_dim: Hd (even).
        max_seq_len: longest sequence the cached tables cover.
        base: frequency base (10000 in RoFormer).
    """

    def __init__(self, head_dim: int, max_seq_len: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim} is not allowed with rotary positions: it must be even.")
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        freqs_TF = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
        angles_THd = torch.cat([freqs_TF, freqs_TF], dim=-1)
        self.register_buffer("cos_THd", angles_THd.cos(), persistent=False)
        self.register_buffer("sin_THd", angles_THd.sin(), persistent=False)

    def forward(self, x_BHTHd: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """Rotate T positions starting at ``offset`` (the positions already cached)."""
        T = x_BHTHd.shape[-2]
        cos = self.cos_THd[offset:offset + T].to(x_BHTHd.dtype)
        sin = self.sin_THd[offset:offset + T].to(x_BHTHd.dtype)
        x1, x2 = x_BHTHd.chunk(2, dim=-1)
        return x_BHTHd * cos + torch.cat([-x2, x1], dim=-1) * sin


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention on ``scaled_dot_product_attention``.

    Args:
        dim: D.
        num_heads: H (divides D).
        rotary: a ``RotaryEmbedding`` applied to queries and keys, or None.
        bias: biases on the projections.
        dropout: attention and output dropout.
    """

    def __init__(self, dim: int, num_heads: int, rotary: RotaryEmbedding | None = None, bias: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} is not allowed: it must divide dim={dim}.")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.rotary = rotary
        self.dropout = dropout
        self.proj_drop = nn.Dropout(dropout)

    def forward(self, x_BTD: torch.Tensor, mask_BT: torch.Tensor | None = None,
                kv_cache: LayerKV | None = None) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D). With ``kv_cache`` (no ``mask_BT``) the T tokens follow the P
        cached ones: they attend to all P + T, and their keys and values are appended."""
        B, T, D = x_BTD.shape
        P = 0 if kv_cache is None else kv_cache.length
        q, k, v = self.qkv(x_BTD).view(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.rotary is not None:
            q, k = self.rotary(q, P), self.rotary(k, P)
        if kv_cache is not None:
            k, v = kv_cache.append(k, v)
        drop = self.dropout if self.training else 0.0
        if P and T == 1:  # one new token sees every cached position
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop)
        elif P:  # SDPA's is_causal aligns the mask top-left; new query i sees keys up to P + i
            allowed_TP = torch.ones(T, P + T, dtype=torch.bool, device=x_BTD.device).tril(diagonal=P)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed_TP, dropout_p=drop)
        elif mask_BT is None:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        else:
            # causal and key-padding mask; the diagonal stays open so a padded query has a valid row
            causal_TT = torch.ones(T, T, dtype=torch.bool, device=x_BTD.device).tril()
            allowed_BTT = (causal_TT & mask_BT[:, None, :]) | torch.eye(T, dtype=torch.bool, device=x_BTD.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed_BTT[:, None], dropout_p=drop)
        return self.proj_drop(self.proj(y.transpose(1, 2).reshape(B, T, D)))


class DecoderBlock(nn.Module):
    """Pre-norm decoder block; ``ffn`` is a dense MLP or a ``core.moe.MoE``.

    Args:
        dim: D.
        attn: the attention module.
        ffn: the feed-forward module (MoE layers also get ``mask`` and ``token_ids``).
        norm_layer: normalisation class (``nn.RMSNorm`` or ``nn.LayerNorm``).
    """

    def __init__(self, dim: int, attn: nn.Module, ffn: nn.Module, norm_layer: type[nn.Module]):
        super().__init__()
        self.norm1, self.attn = norm_layer(dim), attn
        self.norm2, self.ffn = norm_layer(dim), ffn

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, MoE)

    def forward(self, x_BTD: torch.Tensor, mask_BT: torch.Tensor | None = None,
                token_ids_BT: torch.Tensor | None = None, routing_mask_BT: torch.Tensor | None = None,
                kv_cache: LayerKV | None = None) -> torch.Tensor:
        """``mask_BT`` masks attention keys (True = real token); ``routing_mask_BT`` (default
        ``mask_BT``) keeps tokens out of routing; ``kv_cache`` holds the attention's earlier positions."""
        x_BTD = x_BTD + self.attn(self.norm1(x_BTD), mask_BT, kv_cache)
        h_BTD = self.norm2(x_BTD)
        if self.is_moe:
            routing_mask_BT = mask_BT if routing_mask_BT is None else routing_mask_BT
            return x_BTD + self.ffn(h_BTD, mask=routing_mask_BT, token_ids=token_ids_BT)
        return x_BTD + self.ffn(h_BTD)


class MoETransformerLM(nn.Module):
    """Decoder-only causal transformer LM with MoE FFNs in chosen blocks.

    Args:
        vocab_size: V.
        dim: D.
        depth: number of blocks.
        num_heads: attention heads.
        max_seq_len: longest context (rotary tables / learned position table).
        mlp_ratio: dense FFN hidden width / D.
        expert_mlp_ratio: each expert's hidden width / D (default ``mlp_ratio``; smaller values give
            DeepSeekMoE's fine-grained experts).
        pos_embed: ``"rope"`` or ``"learned"``.
        norm: ``"rmsnorm"`` or ``"layernorm"``.
        act_layer: activation name for timm's ``get_act_layer`` (``"gelu"``, ``"silu"``...).
        glu: gated FFNs (SwiGLU with ``act_layer="silu"``) for the dense and the expert FFNs.
        bias: biases in the attention and FFN projections.
        dropout: dropout on embeddings, attention and FFN outputs.
        moe_layers: ``"all"`` | ``"every_other"`` | ``"none"`` | list of block indices.
        num_experts: E routed experts per MoE layer.
        num_shared_experts: always-on experts per MoE layer (DeepSeekMoE).
        router: ``router(dim=D, num_experts=E) -> Router`` (a Hydra partial; one router per MoE
            layer), a ``conf/router`` name (``core.router_config``), or None for Mixtral's top-2
            (``default_router``).
        moe_group_size: tokens per routing group; None routes each sequence as one group. Lory's
            segment routers (``segments_per_sequence``) get ``max_seq_len / segments_per_sequence``.
            Sequences are padded (masked) to whole groups, so groups never span two sequences.
        expert_type: ``"mlp"`` (independent FFN experts) or ``"lora"`` (MoLoRA/MixLoRA: one base FFN
            per layer plus per-expert low-rank deltas, ``core.lora_experts.LoRAExperts``).
        lora_rank, lora_alpha: rank r and scale numerator α of the LoRA deltas (scaled by α/r).
        lora_freeze_base: freeze the base FFN (as when fine-tuning a pretrained model; from scratch
            it trains with the deltas).
        expert_impl: ``Experts`` implementation (``"auto"``, ``"grouped"``, ``"loop"``).
        allow_noncausal_routing: build even when the router lets a token's output depend on later
            tokens (the model is then not a valid autoregressive LM; label such runs non-causal).
        tie_embeddings: share the token embedding with the output projection.
        rope_base: rotary frequency base.

    Example::

        model = MoETransformerLM(vocab_size=259, dim=128, depth=4, num_heads=4, max_seq_len=128)
        logits = model(torch.randint(0, 259, (2, 128)))       # (2, 128, 259)
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int = 128,
        depth: int = 4,
        num_heads: int = 4,
        max_seq_len: int = 128,
        mlp_ratio: float = 4.0,
        expert_mlp_ratio: float | None = None,
        pos_embed: str = "rope",
        norm: str = "rmsnorm",
        act_layer: str = "gelu",
        glu: bool = False,
        bias: bool = False,
        dropout: float = 0.0,
        moe_layers: str | Sequence[int] | None = "every_other",
        num_experts: int = 8,
        num_shared_experts: int = 0,
        router: Callable[..., Router] | str | None = None,
        moe_group_size: int | None = None,
        expert_type: str = "mlp",
        lora_rank: int = 8,
        lora_alpha: float = 16.0,
        lora_freeze_base: bool = False,
        expert_impl: str = "auto",
        allow_noncausal_routing: bool = False,
        tie_embeddings: bool = True,
        rope_base: float = 10000.0,
    ):
        super().__init__()
        self.vocab_size = check_positive_int("vocab_size", vocab_size)
        self.dim = check_positive_int("dim", dim)
        self.depth = check_positive_int("depth", depth)
        self.max_seq_len = check_positive_int("max_seq_len", max_seq_len)
        check_positive_int("num_heads", num_heads)
        if pos_embed not in ("rope", "learned"):
            raise ValueError(f"pos_embed={pos_embed!r} is not allowed: use 'rope' or 'learned'.")
        norms = {"rmsnorm": nn.RMSNorm, "layernorm": nn.LayerNorm}
        if norm not in norms:
            raise ValueError(f"norm={norm!r} is not allowed: use 'rmsnorm' or 'layernorm'.")
        if not mlp_ratio > 0 or (expert_mlp_ratio is not None and not expert_mlp_ratio > 0):
            raise ValueError(f"mlp_ratio={mlp_ratio}, expert_mlp_ratio={expert_mlp_ratio} are not allowed: "
                             "they must be > 0.")
        try:
            act = get_act_layer(act_layer)
        except KeyError:
            act = None
        if act is None:
            raise ValueError(f"act_layer={act_layer!r} is not allowed: use a timm activation name "
                             "(gelu, silu, relu, ...).")
        norm_layer = norms[norm]
        if expert_type not in ("mlp", "lora"):
            raise ValueError(f"expert_type={expert_type!r} is not allowed: use 'mlp' or 'lora'.")
        self.moe_layers = moe_block_indices(depth, moe_layers, key="moe_layers")
        self.allow_noncausal_routing = bool(allow_noncausal_routing)

        head_dim = dim // num_heads
        # tables sized by the context: the learned position table, or rotary's cos/sin and angles
        per_position = dim if pos_embed == "learned" else 3 * head_dim
        check_allocation(4.0 * max_seq_len * per_position, f"position tables for {max_seq_len:,} positions",
                         "max_seq_len", max_seq_len)
        check_allocation(4.0 * vocab_size * dim, f"a {vocab_size:,}-token embedding of width {dim}", "vocab_size",
                         vocab_size)
        self.tok_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Embedding(max_seq_len, dim) if pos_embed == "learned" else None
        self.drop = nn.Dropout(dropout)
        rotary = RotaryEmbedding(head_dim, max_seq_len, rope_base) if pos_embed == "rope" else None
        self.rope_base = float(rope_base)  # read when the model is written as a Hugging Face checkpoint (nlp.hf)
        hidden = int(round(dim * mlp_ratio))
        expert_hidden = int(round(dim * (expert_mlp_ratio if expert_mlp_ratio is not None else mlp_ratio)))
        make_router = router_factory(router) if router is not None else default_router()
        if moe_group_size is not None:
            check_positive_int("moe_group_size", moe_group_size)
        self.moe_group_size, self.pad_multiple = moe_group_size, 1
        blocks = []
        for i in range(depth):
            attn = CausalSelfAttention(dim, num_heads, rotary, bias=bias, dropout=dropout)
            if i in self.moe_layers:
                layer_router = make_router if isinstance(make_router, Router) else make_router(
                    dim=dim, num_experts=num_experts)
                group_size = self._group_size(layer_router, moe_group_size)
                ffn = MoE(dim, expert_hidden, act_layer=act, bias=bias, drop=dropout, num_experts=num_experts,
                          router=layer_router, group_size=group_size, num_shared_experts=num_shared_experts,
                          glu=glu, expert_impl=expert_impl)
                if expert_type == "lora":  # same interface as Experts: swap the expert bank in place
                    ffn.experts = LoRAExperts(num_experts, dim, expert_hidden, act_layer=act, glu=glu, bias=bias,
                                              drop=dropout, impl=expert_impl, rank=lora_rank, alpha=lora_alpha,
                                              freeze_base=lora_freeze_base)
            elif glu:
                ffn = SwiGLU(dim, hidden, act_layer=act, bias=bias, drop=dropout)
            else:
                ffn = Mlp(dim, hidden, act_layer=act, bias=bias, drop=dropout)
            blocks.append(DecoderBlock(dim, attn, ffn, norm_layer))
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm_layer(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        self._init_weights()
        if tie_embeddings:
            self.head.weight = self.tok_embed.weight
        self._check_causal_routing()

    def _group_size(self, router: Router, group_size: int | None) -> int | None:
        """Routing group size for ``router``; records the multiple every sequence is padded to."""
        needed = router.routing_group_size(self.max_seq_len)
        if needed is not None:  # e.g. Lory: one group per segment of every sequence
            if group_size is not None and group_size != needed:
                raise ValueError(f"moe_group_size={group_size} is not allowed: {type(router).__name__} routes groups "
                                 f"of {needed} tokens in sequences of max_seq_len={self.max_seq_len}; leave it null.")
            group_size = needed
            self.pad_multiple = max(self.pad_multiple, self.max_seq_len)
        elif group_size is not None:
            self.pad_multiple = max(self.pad_multiple, group_size)
        return group_size

    def _init_weights(self) -> None:
        # GPT-2 initialisation for embeddings and attention; residual projections scaled by depth.
        # FFNs and experts keep nn.Linear's default, so dense and MoE FFNs start alike; routers keep theirs.
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed.weight, std=0.02)
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=0.02)
            nn.init.normal_(block.attn.proj.weight, std=0.02 / math.sqrt(2 * self.depth))
            for lin in (block.attn.qkv, block.attn.proj):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
        nn.init.normal_(self.head.weight, std=0.02)

    def moe_modules(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def routers(self) -> list[Router]:
        return [m.router for m in self.moe_modules()]

    @property
    def is_causal(self) -> bool:
        """Whether every position's output depends only on the tokens up to it."""
        return all(r.is_causal for r in self.routers())

    def _check_causal_routing(self) -> None:
        if self.allow_noncausal_routing:
            return
        for i, block in enumerate(self.blocks):
            router = block.ffn.router if block.is_moe else None
            if router is None or router.is_causal:
                continue
            name = type(router).__name__
            if router.token_local and getattr(router, "capacity_factor", None) is not None:
                why = ("its capacity buffers are filled in an order where a later token can take an earlier "
                       "token's slot (first choices before second choices, or Batch Prioritized Routing)")
                fix = ("set router.capacity_factor=null (dropless), or router.top_k=1 with "
                       "router.batch_priority=false")
            else:
                why = "a token's routing depends on the other tokens of its sequence, later ones included"
                fix = ("use a causal router (mixtral, topk with capacity_factor=null, switch, adamoe, deepseek, "
                       "xmoe, hash, dense, ...)")
            raise NonCausalRoutingError(
                f"router {name} (block {i}) is not causal: {why}, so the language model would see the future "
                f"in training and could not generate autoregressively. Fix: {fix}; or set "
                "model.allow_noncausal_routing=true to train it anyway (the run is labelled non-causal)."
            )

    def kv_cache_problem(self) -> str | None:
        """Why generation cannot use a ``KVCache`` (see ``incremental_routing_problem``), or None."""
        return incremental_routing_problem(self.routers())

    def check_kv_cache(self) -> None:
        """``ValueError`` saying why, when a KV cache would change the model's outputs."""
        why = self.kv_cache_problem()
        if why is not None:
            raise ValueError(f"a KV cache would change this model's outputs: {why}, and a cached decoder routes each "
                             "new token alone. Generate with use_cache=False (the context recomputed for every token).")

    def new_kv_cache(self) -> KVCache:
        """An empty cache for ``forward(ids, kv_cache=...)``; ``ValueError`` when the routing forbids it."""
        self.check_kv_cache()
        return KVCache(self.depth)

    def forward(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None = None,
                kv_cache: KVCache | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V). ``attention_mask`` (B, T), True = real token.
        ``kv_cache`` (from ``new_kv_cache``): the T tokens follow the cached ones and are appended."""
        B, T = input_ids_BT.shape
        if kv_cache is not None:
            return self._forward_cached(input_ids_BT, attention_mask_BT, kv_cache)
        if T > self.max_seq_len:
            raise ValueError(f"sequence length {T} exceeds max_seq_len={self.max_seq_len}.")
        mask_BT = None if attention_mask_BT is None else attention_mask_BT.to(torch.bool)
        routing_mask_BT = mask_BT
        T_in, pad = T, (-T) % self.pad_multiple
        if pad:
            # whole routing groups per sequence; the padding comes last, where causal attention
            # already hides it from the real tokens, and it is masked out of routing
            routing_mask_BT = torch.ones(B, T, dtype=torch.bool, device=input_ids_BT.device) if mask_BT is None \
                else mask_BT
            routing_mask_BT = F.pad(routing_mask_BT, (0, pad), value=False)
            if mask_BT is not None:
                mask_BT = F.pad(mask_BT, (0, pad), value=False)
            input_ids_BT = F.pad(input_ids_BT, (0, pad), value=0)
            T = T + pad
            if T > self.max_seq_len:
                raise ValueError(f"sequence length {T_in} padded to {T} exceeds max_seq_len={self.max_seq_len}.")
        x_BTD = self.tok_embed(input_ids_BT)
        if self.pos_embed is not None:
            x_BTD = x_BTD + self.pos_embed.weight[:T]
        x_BTD = self.drop(x_BTD)
        for block in self.blocks:
            x_BTD = block(x_BTD, mask_BT, input_ids_BT, routing_mask_BT)
        return self.head(self.norm(x_BTD[:, :T_in]))

    def _forward_cached(self, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor | None,
                        kv_cache: KVCache) -> torch.Tensor:
        # every router routes a token alone (new_kv_cache checked it): no padding to whole groups needed
        if attention_mask_BT is not None:
            raise ValueError("attention_mask is not supported with kv_cache: the cached decoder takes unpadded tokens.")
        T, P = input_ids_BT.shape[1], kv_cache.length
        if P + T > self.max_seq_len:
            raise ValueError(f"{P} cached + {T} new positions exceed max_seq_len={self.max_seq_len}.")
        x_BTD = self.tok_embed(input_ids_BT)
        if self.pos_embed is not None:
            x_BTD = x_BTD + self.pos_embed.weight[P:P + T]
        x_BTD = self.drop(x_BTD)
        for block, layer_kv in zip(self.blocks, kv_cache.layers):
            x_BTD = block(x_BTD, None, input_ids_BT, None, kv_cache=layer_kv)
        return self.head(self.norm(x_BTD))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @staticmethod
    def _routed_parameters(moe: MoE) -> int:
        """Parameters that belong to single experts (a LoRA bank's shared base FFN is always active)."""
        shared = getattr(moe.experts, "base", None)
        n = sum(p.numel() for p in moe.experts.parameters())
        return n - (sum(p.numel() for p in shared.parameters()) if shared is not None else 0)

    def expert_parameters(self) -> list[int]:
        """Parameters of one routed expert, per MoE layer."""
        return [self._routed_parameters(m) // m.num_experts for m in self.moe_modules()]

    def active_parameters(self, experts_per_token: Sequence[float] | None = None) -> float:
        """Parameters a token uses: everything but the routed experts, plus ``experts_per_token[l]``
        experts in MoE layer l (measured routing statistics; default each router's ``top_k``, else 1).
        Tied embeddings count once."""
        moes = self.moe_modules()
        routed = sum(self._routed_parameters(m) for m in moes)
        per_expert = self.expert_parameters()
        if experts_per_token is None:
            experts_per_token = [float(getattr(m.router, "top_k", 1)) for m in moes]
        if len(experts_per_token) != len(moes):
            raise ValueError(f"experts_per_token has {len(experts_per_token)} entries for {len(moes)} MoE layers.")
        return self.num_parameters() - routed + sum(k * n for k, n in zip(experts_per_token, per_expert))

    @torch.no_grad()
    def generate(self, input_ids_BT: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 eos_token_id: int | None = None, use_cache: bool | None = None,
                 top_p: float | None = None) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after the prompt (temperature, top-k and top-p sampling:
        ``sample_next``; greedy at temperature 0). Returns (B, T + new).

        ``use_cache``: None uses a KV cache (``new_kv_cache``: each new token costs one position) when
        the routers allow it and otherwise recomputes the whole context for every token (logged); True
        requires the cache (``ValueError`` naming the router that forbids it); False recomputes. Both
        give the same tokens. Once the text outgrows ``max_seq_len`` the context is cropped to the last
        ``max_seq_len`` tokens, whose positions then shift every step, so from there it is recomputed."""
        if temperature < 0:
            raise ValueError(f"temperature={temperature} is not allowed: it must be >= 0.")
        check_top_p(top_p)
        if use_cache not in (None, True, False):
            raise ValueError(f"use_cache={use_cache!r} is not allowed: use True, False or None (when possible).")
        why = self.kv_cache_problem()
        if use_cache:
            self.check_kv_cache()
        if use_cache is None and why is not None:
            log.info("generating without a KV cache (the context is recomputed for every token): %s", why)
        cached = why is None and use_cache is not False
        ids, cache = input_ids_BT, None
        for _ in range(max_new_tokens):
            if cached and ids.shape[1] <= self.max_seq_len:
                if cache is None:  # the prompt, then one position per step
                    cache = self.new_kv_cache()
                    logits_BV = self(ids, kv_cache=cache)[:, -1].float()
                else:
                    logits_BV = self(ids[:, -1:], kv_cache=cache)[:, -1].float()
            else:
                cached, cache = False, None
                logits_BV = self(ids[:, -self.max_seq_len:])[:, -1].float()
            nxt = sample_next(logits_BV, temperature, top_k, generator, top_p)
            ids = torch.cat([ids, nxt], dim=1)
            if eos_token_id is not None and bool((nxt == eos_token_id).all()):
                break
        return ids
