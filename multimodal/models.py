"""CLIP-MoE and LIMoE built on open_clip.

CLIP-MoE: an open_clip ``CLIP`` (two towers, built by ``open_clip.create_model`` from the model JSON in
``multimodal/model_configs``) whose tower MLPs ``visual.transformer.resblocks[i].mlp`` and
``transformer.resblocks[i].mlp`` are replaced by core MoE layers after construction; sparse upcycling
copies each dense MLP into every expert (Komatsuzaki et al., ICLR 2023; CLIP-MoE, Zhang et al.,
EMNLP 2025, upcycles OpenAI CLIP this way before its multistage training). Text padding (token id 0)
is kept out of routing and out of the load statistics. Both are also open_clip architectures: the
``*-MoE`` model JSON carry the MoE settings, and ``open_clip.create_model("mm-clip-tiny-p4-32-MoE")``
builds the model they describe (``multimodal.factory``).

LIMoE (Mustafa et al., "Multimodal Contrastive Learning with LIMoE: the Language-Image Mixture of
Experts", NeurIPS 2022): one shared transformer for image patches and text tokens, with
modality-specific embeddings, final norms and projections. Attention runs per modality (full for
images, causal for text, as in CLIP); each MoE layer routes the image and text tokens of a group of
image-caption pairs together, so both modalities compete for the same experts. Training adds the
per-modality local entropy ``mean_x H(p(x))`` and thresholded global entropy
``max(0, log S_min − H(mean_x p(x)))`` losses (docs/routers.md §3), per routing group, to the routers'
auxiliary losses.

LIMoE's routing groups. Expert choice, capacity limits, Soft MoE slots, BASE or SMEAR decide over a
group of tokens; if the group were the batch, a pair's embeddings would depend on which pairs share
its batch, and evaluation metrics on ``data.eval_batch_size``. So a batch is cut into consecutive
groups of ``routing_group_size`` pairs (the run's config: ``data.batch_size``, so a training batch is
one group), each group holding its pairs' image tokens, then their text tokens; a
last partial group is padded with masked tokens up to the full size, so it routes alike whatever
the batch it comes in. ``encode_image`` / ``encode_text`` form their groups the same way from one
modality. An example's routing then depends only on its group: the consecutive block of
``routing_group_size`` pairs of the split it falls in, as long as evaluation batches hold whole
groups (``multimodal.training`` refuses an ``eval_batch_size`` that is not a multiple). Per-example
routers (dense softmax, dropless top-k) are unaffected by the grouping.

Legend: B batch (pairs), G routing groups of a batch, S tokens per group, L text length, P image
tokens per image (patches + class token), T tokens, D width, E experts, M modalities (0 image, 1 text).
"""

from __future__ import annotations

import copy
import math
import types
from pathlib import Path
from typing import Any, Mapping, Sequence

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import Transformer
from torch import nn

from core import losses
from core.moe import MoE
from core.router_config import RouterSpec, router_factory
from core.routers.base import check_applicable, check_positive_int
from core.surgery import load_dense_state_dict, replace_mlps_with_moe
from multimodal.factory import MODEL_CONFIG_DIR, register_model_configs  # noqa: F401  (re-exported)

MODALITIES = ("image", "text")


def _moe_block_weight_dtype(block: nn.Module) -> torch.dtype:
    # open_clip reads the cast dtype from ``resblocks[0].mlp.c_fc``, which an MoE layer does not have.
    return block.mlp.experts.w1_EDF.dtype


def convert_blocks(
    transformer: nn.Module,
    placement="every_other",
    *,
    num_last: int | None = None,
    num_experts: int,
    router: RouterSpec = None,
    upcycle: bool = False,
    group_size: int | None = None,
    num_shared_experts: int = 0,
    expert_impl: str = "auto",
) -> list[MoE]:
    """Replace ``transformer.resblocks[i].mlp`` (open_clip ``c_fc``/``gelu``/``c_proj``) by MoE layers.

    Args:
        transformer: an open_clip ``Transformer``.
        placement: ``core.surgery`` placement (``every_other``, ``last_n``, ``last_half``, ``all``, a
            list of block indices) or ``"none"``.
        num_last: n for ``last_n``.
        num_experts, router, upcycle, group_size, num_shared_experts, expert_impl: see ``MoE`` and
            ``core.surgery.replace_mlps_with_moe`` (``router`` may also be a ``conf/router`` name).
    """
    if placement is None or placement == "none":
        return []
    if not isinstance(placement, str):
        placement = [int(i) for i in placement]
    blocks = transformer.resblocks
    if any(isinstance(block.mlp, MoE) for block in blocks):
        raise ValueError(f"transformer={type(transformer).__name__} is not allowed: its blocks already hold MoE "
                         "layers (a *-MoE model config builds them); convert a dense model")
    router = router_factory(router)
    indices = replace_mlps_with_moe(
        blocks, placement, num_experts=num_experts, router=router, num_last=num_last, upcycle=upcycle,
        group_size=group_size, num_shared_experts=num_shared_experts, expert_impl=expert_impl)
    for i in indices:
        if hasattr(blocks[i], "get_weight_dtype"):
            blocks[i].get_weight_dtype = types.MethodType(_moe_block_weight_dtype, blocks[i])
    return [blocks[i].mlp for i in indices]


class TextPaddingMask(nn.Module):
    """Passes ``mask = (text != pad_id)`` to the MoE layers of a CLIP text tower.

    open_clip's text blocks call ``mlp(x)`` with no mask. Hooks set here read the token ids when
    ``token_embedding`` runs, hand the mask to every text MoE layer as ``mask=`` and drop it when the
    text transformer is done, so padding takes no expert capacity and never enters the statistics.

    Args:
        pad_id: the padding token id (open_clip's tokenizer pads with 0).
    """

    def __init__(self, pad_id: int = 0):
        super().__init__()
        self.pad_id = pad_id
        self.current: torch.Tensor | None = None

    def attach(self, clip: nn.Module, moe_layers: Sequence[MoE]) -> None:
        clip.token_embedding.register_forward_pre_hook(self._capture)
        for layer in moe_layers:
            layer.register_forward_pre_hook(self._inject, with_kwargs=True)
        clip.transformer.register_forward_hook(self._release)

    def _capture(self, module, args):
        self.current = args[0] != self.pad_id

    def _inject(self, module, args, kwargs):
        if self.current is None or kwargs.get("mask") is not None:
            return None
        x = args[0] if args else kwargs["x"]
        if tuple(self.current.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"text padding mask of shape {tuple(self.current.shape)} does not match the "
                             f"text tokens {tuple(x.shape[:-1])}; call the model through encode_text.")
        return args, {**kwargs, "mask": self.current}

    def _release(self, module, args, output):
        self.current = None


def create_clip(model_name: str = "mm-clip-tiny-p4-32", checkpoint: str | None = None, **kwargs) -> nn.Module:
    """A dense open_clip CLIP from a registered JSON architecture (no download).

    Args:
        model_name: JSON stem in ``multimodal/model_configs`` or any open_clip architecture.
        checkpoint: optional path of a state dict (``torch.save(model.state_dict())``) to load.
        kwargs: passed to ``open_clip.create_model`` (e.g. ``force_context_length``).
    """
    register_model_configs()
    if model_name not in open_clip.list_models():
        raise ValueError(f"model_name={model_name!r} is not an open_clip architecture; registered here: "
                         f"{register_model_configs()}.")
    model = open_clip.create_model(model_name, pretrained=None, **kwargs)
    if checkpoint is not None:
        model.load_state_dict(load_state_dict(checkpoint))
    return model


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Model weights from a run directory or checkpoint of ``core.engine`` or a plain ``torch.save``d
    state dict."""
    from core.engine import find_checkpoint, is_training_checkpoint

    path = Path(path)
    if path.is_dir() or is_training_checkpoint(path):
        _, payload = find_checkpoint(str(path), path)
        return payload["model"]
    return torch.load(path, map_location="cpu", weights_only=True)


def convert_clip_to_moe(
    model: nn.Module,
    *,
    num_experts: int = 4,
    router: RouterSpec = None,
    router_kwargs: Mapping[str, Any] | None = None,
    router_search_path: Sequence[str | Path] = (),
    vision_layers="every_other",
    text_layers="every_other",
    vision_num_last: int | None = None,
    text_num_last: int | None = None,
    upcycle: bool = False,
    group_size: int | None = None,
    num_shared_experts: int = 0,
    expert_impl: str = "auto",
) -> nn.Module:
    """Turn the tower MLPs of an open_clip ``CLIP`` into MoE layers, in place; returns the model.

    Args:
        model: an open_clip ``CLIP`` with ViT image tower and the built-in text tower.
        num_experts: E per MoE layer.
        router: a ``conf/router`` config name (``core.router_config``), a partial
            ``router(dim=D, num_experts=E)`` (one router per layer) or a shared ``Router``.
        router_kwargs: arguments over the named config's values (or the partial's).
        router_search_path: further config folders holding ``router/<name>.yaml`` (``hydra.searchpath``).
        vision_layers, text_layers: which blocks of each tower (``convert_blocks`` placements).
        vision_num_last, text_num_last: n for the ``last_n`` placement.
        upcycle: copy each dense MLP into all its experts (sparse upcycling).
        group_size: tokens per routing group; None routes each image / caption as one group.
        num_shared_experts: always-on experts per layer.
        expert_impl: ``Experts`` implementation.
    """
    if not (hasattr(model, "visual") and hasattr(getattr(model.visual, "transformer", None), "resblocks")):
        raise ValueError(f"model={type(model).__name__} has no ViT image tower (visual.transformer.resblocks).")
    if not hasattr(model, "token_embedding"):
        raise ValueError(f"model={type(model).__name__} is not a CLIP with the built-in text tower "
                         "(CustomTextCLIP / HF text towers are not supported).")
    router = router_factory(router, router_kwargs, search_path=router_search_path)
    kw = dict(num_experts=num_experts, router=router, upcycle=upcycle, group_size=group_size,
              num_shared_experts=num_shared_experts, expert_impl=expert_impl)
    for layer in convert_blocks(model.visual.transformer, vision_layers, num_last=vision_num_last, **kw):
        layer.modality = "image"
    text_moes = convert_blocks(model.transformer, text_layers, num_last=text_num_last, **kw)
    for layer in text_moes:
        layer.modality = "text"
    if text_moes:
        check_applicable(text_moes[0].router, token_ids=False, where="CLIP's text blocks (they call their MLP "
                         "without the token ids)")
        model.text_padding_mask = TextPaddingMask(pad_id=0)
        model.text_padding_mask.attach(model, text_moes)
    return model


def create_clip_moe(
    model_name: str = "mm-clip-tiny-p4-32",
    *,
    num_experts: int = 4,
    router: RouterSpec = None,
    default_router: RouterSpec = None,
    router_kwargs: Mapping[str, Any] | None = None,
    router_search_path: Sequence[str | Path] = (),
    vision_layers="every_other",
    text_layers="every_other",
    vision_num_last: int | None = None,
    text_num_last: int | None = None,
    upcycle: bool = False,
    dense_checkpoint: str | None = None,
    group_size: int | None = None,
    num_shared_experts: int = 0,
    expert_impl: str = "auto",
) -> nn.Module:
    """An open_clip CLIP built from its JSON, then converted to CLIP-MoE.

    Args:
        model_name: a dense open_clip architecture (a ``*-MoE`` JSON carries its own MoE settings:
            ``open_clip.create_model`` builds it, ``multimodal.factory``).
        num_experts: E per MoE layer.
        router: the router (``+router=...``; a ``conf/router`` name, a partial or a ``Router``); None
            falls back to ``default_router``.
        default_router: the model's own router when none is given (CLIP-MoE: top-2, renormalised).
        router_kwargs: arguments over the router config's values (or the partial's).
        router_search_path: further config folders holding ``router/<name>.yaml`` (``hydra.searchpath``).
        vision_layers, text_layers: placement (``convert_blocks``); ``none`` keeps a tower dense.
        vision_num_last, text_num_last: n for the ``last_n`` placement.
        upcycle: copy the (freshly initialised) dense MLPs into every expert.
        dense_checkpoint: run directory / checkpoint of the dense parent (``model=clip``): sparse
            upcycling, every expert starts as its block's trained MLP (``core.surgery``).
        group_size: tokens per routing group.
        num_shared_experts: always-on experts per layer.
        expert_impl: ``Experts`` implementation.
    """
    model = convert_clip_to_moe(
        create_clip(model_name), num_experts=num_experts, router=router if router is not None else default_router,
        router_kwargs=router_kwargs, router_search_path=router_search_path,
        vision_layers=vision_layers, text_layers=text_layers, vision_num_last=vision_num_last,
        text_num_last=text_num_last, upcycle=upcycle, group_size=group_size,
        num_shared_experts=num_shared_experts, expert_impl=expert_impl,
    )
    if dense_checkpoint is not None:
        load_dense_state_dict(model, load_state_dict(dense_checkpoint))
    return model


def upcycle_clip(dense: nn.Module, **kwargs) -> nn.Module:
    """A CLIP-MoE whose experts are copies of ``dense``'s MLPs; ``dense`` itself is left untouched.

    ``kwargs`` are those of ``convert_clip_to_moe`` (``upcycle`` is forced on).
    """
    kwargs["upcycle"] = True
    return convert_clip_to_moe(copy.deepcopy(dense), **kwargs)


class LIMoE(nn.Module):
    """One transformer for image patches and text tokens, MoE layers routing both in shared groups.

    ``forward(image, text)`` returns open_clip's ``(image_features, text_features, logit_scale.exp())``
    with L2-normalised features, so open_clip's ``ClipLoss`` applies unchanged.

    Args:
        embed_dim: width of the shared contrastive space.
        image_size: input images are ``image_size × image_size`` RGB.
        patch_size: ViT patch size.
        context_length: L, text tokens per caption.
        vocab_size: token vocabulary (open_clip's tokenizer: 49408).
        width: D, the shared transformer's width.
        layers: shared transformer depth.
        heads: attention heads.
        mlp_ratio: MLP hidden width / D.
        pad_id: padding token id (kept out of attention keys of real tokens by the causal mask and out
            of routing by the MoE mask).
        num_experts: E per MoE layer.
        router: a ``conf/router`` config name, a partial ``router(dim=D, num_experts=E)`` or a ``Router``;
            None: ``default_router``.
        default_router: LIMoE's own router when none is given (top-1, batch priority).
        router_kwargs: arguments over the router config's values (or the partial's).
        router_search_path: further config folders holding ``router/<name>.yaml`` (``hydra.searchpath``).
        moe_layers: which blocks get an MoE MLP (``convert_blocks`` placements).
        moe_num_last: n for the ``last_n`` placement.
        routing_group_size: image-caption pairs per routing group (module docstring: the image and
            text tokens of ``routing_group_size`` consecutive pairs, a last partial group padded); None:
            the whole batch is one group (its routing then depends on the batch).
        num_shared_experts: always-on experts per MoE layer.
        local_entropy_weight: λ_local for (image, text); 0 turns the loss off.
        global_entropy_weight: λ_global for (image, text); 0 turns the loss off.
        global_min_experts: S_min per modality (τ = log S_min); null: E (no threshold).
        init_logit_scale: initial log temperature (CLIP: log(1/0.07)).
        expert_impl: ``Experts`` implementation.
    """

    def __init__(
        self,
        embed_dim: int = 64,
        image_size: int = 32,
        patch_size: int = 4,
        context_length: int = 32,
        vocab_size: int = 49408,
        width: int = 96,
        layers: int = 4,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        pad_id: int = 0,
        num_experts: int = 4,
        router: RouterSpec = None,
        default_router: RouterSpec = None,
        router_kwargs: Mapping[str, Any] | None = None,
        router_search_path: Sequence[str | Path] = (),
        moe_layers="every_other",
        moe_num_last: int | None = None,
        routing_group_size: int | None = None,
        num_shared_experts: int = 0,
        local_entropy_weight: Sequence[float] = (0.0, 0.0),
        global_entropy_weight: Sequence[float] = (0.0, 0.0),
        global_min_experts: Sequence[float | None] = (None, None),
        init_logit_scale: float = math.log(1 / 0.07),
        expert_impl: str = "auto",
    ):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"patch_size={patch_size} does not divide image_size={image_size}.")
        for name, value in (("local_entropy_weight", local_entropy_weight),
                            ("global_entropy_weight", global_entropy_weight),
                            ("global_min_experts", global_min_experts)):
            if len(value) != 2:
                raise ValueError(f"{name}={list(value)!r} is not allowed: give one value per modality (image, text).")
        for s in global_min_experts:
            if s is not None and not 1 <= s <= num_experts:
                raise ValueError(f"global_min_experts={list(global_min_experts)!r} is not allowed: "
                                 f"each must be null or in [1, num_experts={num_experts}].")
        if routing_group_size is not None:
            check_positive_int("routing_group_size", routing_group_size)
        self.context_length, self.pad_id, self.routing_group_size = context_length, pad_id, routing_group_size
        grid = image_size // patch_size
        scale = width ** -0.5
        # modality-specific input embeddings
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.image_positional_embedding = nn.Parameter(scale * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.text_positional_embedding = nn.Parameter(0.01 * torch.randn(context_length, width))
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        self.register_buffer("attn_mask", torch.full((context_length, context_length), float("-inf")).triu_(1),
                             persistent=False)
        # the shared (modality-agnostic) transformer: open_clip blocks, driven block part by block part
        self.transformer = Transformer(width, layers, heads, mlp_ratio)
        # modality-specific heads
        self.ln_post = nn.LayerNorm(width)
        self.image_projection = nn.Parameter(scale * torch.randn(width, embed_dim))
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(scale * torch.randn(width, embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))

        converted = convert_blocks(
            self.transformer, moe_layers, num_last=moe_num_last, num_experts=num_experts,
            router=router_factory(router if router is not None else default_router, router_kwargs,
                                  search_path=router_search_path),
            num_shared_experts=num_shared_experts, expert_impl=expert_impl)
        for layer in converted:
            layer.keep_last_routing = True
            check_applicable(layer.router, token_ids=False, where="image patches")
            if routing_group_size is not None:
                check_routing_groups(layer.router, routing_group_size, grid * grid + 1, context_length)
        self.num_experts = num_experts
        self.local_entropy_weight = tuple(float(w) for w in local_entropy_weight)
        self.global_entropy_weight = tuple(float(w) for w in global_entropy_weight)
        self.global_thresholds = tuple(math.log(num_experts if s is None else s) for s in global_min_experts)
        # assignments (or soft combine mass) per MoE layer, modality and expert
        self.register_buffer("modality_tokens_LME", torch.zeros(len(converted), 2, num_experts,
                                                                dtype=torch.float64), persistent=False)
        # tokens whose highest router score is expert e (the router's first choice, before capacity)
        self.register_buffer("modality_choices_LME", torch.zeros(len(converted), 2, num_experts,
                                                                 dtype=torch.float64), persistent=False)

    def moe_layers(self) -> list[tuple[str, MoE]]:
        """(name, layer) of every MoE layer of the shared transformer, in depth order."""
        return [(f"transformer.resblocks.{i}.mlp", b.mlp) for i, b in enumerate(self.transformer.resblocks)
                if isinstance(b.mlp, MoE)]

    # -- embeddings ---------------------------------------------------------------------------
    def _image_tokens(self, image: torch.Tensor) -> torch.Tensor:
        x = self.conv1(image).flatten(2).transpose(1, 2)  # B×(grid²)×D
        cls = self.class_embedding.expand(x.shape[0], 1, -1).to(x.dtype)
        x = torch.cat([cls, x], dim=1) + self.image_positional_embedding.to(x.dtype)
        return self.ln_pre(x)

    def _text_tokens(self, text: torch.Tensor) -> torch.Tensor:
        if text.shape[1] > self.context_length:
            raise ValueError(f"text length {text.shape[1]} exceeds context_length={self.context_length}.")
        L = text.shape[1]
        return self.token_embedding(text) + self.text_positional_embedding[:L]

    # -- shared transformer ------------------------------------------------------------------
    def routing_layout(self, batch_size: int, image_tokens: int, text_tokens: int,
                       device: torch.device | str | None = None) -> tuple[int, int, torch.Tensor]:
        """Where the MoE layers route each token: ``(G, S, index_T)``, G groups of S tokens, and for
        every token of the B×P image tokens followed by the B×L text tokens (P or L may be 0) its
        index in the flattened G×S groups. Group g holds pairs ``g·R .. g·R + R − 1`` (R the
        ``routing_group_size``, the batch when None): their image tokens, pair by pair, then their
        text tokens; slots of pairs past the batch are padding."""
        B, P, L = batch_size, image_tokens, text_tokens
        R = self.routing_group_size or max(B, 1)
        G, S = -(-B // R), R * (P + L)
        b_B = torch.arange(B, device=device)
        start_B = (b_B // R) * S
        slot_B = b_B % R
        img_BP = (start_B + slot_B * P)[:, None] + torch.arange(P, device=device)
        txt_BL = (start_B + R * P + slot_B * L)[:, None] + torch.arange(L, device=device)
        return G, S, torch.cat([img_BP.reshape(-1), txt_BL.reshape(-1)])

    def routing_labels(self, batch_size: int, text: torch.Tensor | None = None,
                       image: bool = True) -> dict[str, torch.Tensor]:
        """G×S labels of the tokens ``forward`` routes (``routing_layout``): ``modality`` (0 image, 1
        text) and ``position`` (patch position p, or P + text position); −1 on padding slots."""
        P = self.image_positional_embedding.shape[0] if image else 0
        L = 0 if text is None else text.shape[1]
        G, S, index_T = self.routing_layout(batch_size, P, L)
        n_img = batch_size * P
        modality_T = torch.cat([torch.zeros(n_img, dtype=torch.long), torch.ones(batch_size * L, dtype=torch.long)])
        position_T = torch.cat([torch.arange(n_img) % max(P, 1), P + torch.arange(batch_size * L) % max(L, 1)])
        out = {}
        for name, label_T in (("modality", modality_T), ("position", position_T)):
            out[name] = torch.full((G * S,), -1, dtype=torch.long).index_copy(0, index_T, label_T).view(G, S)
        return out

    def _run(self, x_img: torch.Tensor | None, x_txt: torch.Tensor | None, text: torch.Tensor | None):
        if x_img is not None and x_txt is not None and x_img.shape[0] != x_txt.shape[0]:
            raise ValueError(f"image has {x_img.shape[0]} examples and text {x_txt.shape[0]}: forward takes "
                             "image-caption pairs (use encode_image / encode_text for one modality).")
        x_any = x_img if x_img is not None else x_txt
        B, D, device = x_any.shape[0], x_any.shape[-1], x_any.device
        P = 0 if x_img is None else x_img.shape[1]
        L = 0 if x_txt is None else x_txt.shape[1]
        n_img = B * P
        # the tokens in their routing groups (routing_layout): padding slots are masked, modality −1
        G, S, index_T = self.routing_layout(B, P, L, device)
        valid_T = self._valid_tokens(x_img, text)
        modality_T = torch.ones_like(index_T)
        modality_T[:n_img] = 0
        valid_GS = valid_T.new_zeros(G * S).index_copy(0, index_T, valid_T).view(G, S)
        modality_GS = modality_T.new_full((G * S,), -1).index_copy(0, index_T, modality_T).view(G, S)
        moe_idx = 0
        for block in self.transformer.resblocks:
            if x_img is not None:
                x_img = x_img + block.ls_1(block.attention(block.ln_1(x_img)))
            if x_txt is not None:
                x_txt = x_txt + block.ls_1(block.attention(block.ln_1(x_txt), attn_mask=self.attn_mask[:L, :L]))
            parts = [x.reshape(-1, D) for x in (x_img, x_txt) if x is not None]
            h_TD = block.ln_2(torch.cat(parts) if len(parts) > 1 else parts[0])
            if isinstance(block.mlp, MoE):
                h_GSD = h_TD.new_zeros(G * S, D).index_copy(0, index_T, h_TD).view(G, S, D)
                y_TD = block.mlp(h_GSD, mask=valid_GS).flatten(0, 1)[index_T]
                self._after_moe(block.mlp, moe_idx, modality_GS, valid_GS)
                moe_idx += 1
            else:
                y_TD = block.mlp(h_TD)
            y_TD = block.ls_2(y_TD)
            if x_img is not None:
                x_img = x_img + y_TD[:n_img].view_as(x_img)
            if x_txt is not None:
                x_txt = x_txt + y_TD[n_img:].view_as(x_txt)
        return x_img, x_txt

    def _valid_tokens(self, x_img, text) -> torch.Tensor:
        parts = []
        if x_img is not None:
            parts.append(torch.ones(x_img.shape[0] * x_img.shape[1], dtype=torch.bool, device=x_img.device))
        if text is not None:
            parts.append((text != self.pad_id).reshape(-1))
        return torch.cat(parts)

    def _after_moe(self, layer: MoE, idx: int, modality_GS: torch.Tensor, valid_GS: torch.Tensor) -> None:
        routing = layer.last_routing
        modality_T, valid_T = modality_GS.reshape(-1), valid_GS.reshape(-1)
        if layer.track_stats:
            self.modality_tokens_LME[idx] += modality_usage_counts(routing, modality_T, valid_T).to(torch.float64)
            self.modality_choices_LME[idx] += modality_choice_counts(routing, modality_T, valid_T).to(torch.float64)
        if not self.training or not modality_GS.numel():
            return
        raw = losses.modality_entropy_losses(routing.scores_GSE, modality_GS, len(MODALITIES), valid_GS,
                                             thresholds=list(self.global_thresholds))
        terms = {}
        for m, name in enumerate(MODALITIES):
            if self.local_entropy_weight[m] and f"local_{m}" in raw:
                terms[f"local_entropy_{name}"] = self.local_entropy_weight[m] * raw[f"local_{m}"]
            if self.global_entropy_weight[m] and f"global_{m}" in raw:
                terms[f"global_entropy_{name}"] = self.global_entropy_weight[m] * raw[f"global_{m}"]
        if terms:
            # on the router, so core.collect_aux_loss / aux_loss_terms pick the terms up with the rest
            merged = dict(layer.router.aux_losses)
            for k, v in terms.items():
                merged[k] = merged[k] + v if k in merged else v
            layer.router.aux_losses = merged

    # -- open_clip-style API -------------------------------------------------------------------
    def _image_head(self, x_img: torch.Tensor) -> torch.Tensor:
        return self.ln_post(x_img[:, 0]) @ self.image_projection

    def _text_head(self, x_txt: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        pooled = self.ln_final(x_txt)[torch.arange(text.shape[0], device=text.device), text.argmax(dim=-1)]
        return pooled @ self.text_projection

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """image: B×3×H×W -> B×embed_dim (image tokens routed alone, in groups of ``routing_group_size``
        images)."""
        x_img, _ = self._run(self._image_tokens(image), None, None)
        f = self._image_head(x_img)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, text: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """text: B×L token ids -> B×embed_dim (pooled at the end-of-text token, the largest id; text
        tokens routed alone, in groups of ``routing_group_size`` captions)."""
        _, x_txt = self._run(None, self._text_tokens(text), text)
        f = self._text_head(x_txt, text)
        return F.normalize(f, dim=-1) if normalize else f

    def forward(self, image: torch.Tensor, text: torch.Tensor):
        """Both modalities through the shared transformer at once: image: B×3×H×W, text: B×L token ids,
        the image and text tokens of each ``routing_group_size`` pairs routed in one group.

        Returns ``(image_features, text_features, logit_scale.exp())``, features L2-normalised.
        """
        x_img, x_txt = self._run(self._image_tokens(image), self._text_tokens(text), text)
        img = F.normalize(self._image_head(x_img), dim=-1)
        txt = F.normalize(self._text_head(x_txt, text), dim=-1)
        return img, txt, self.logit_scale.exp()


def check_routing_groups(router, routing_group_size: int, image_tokens: int, text_tokens: int) -> None:
    """``ValueError`` naming ``routing_group_size`` when ``router`` refuses the groups a LIMoE routes:
    ``routing_group_size`` pairs of ``image_tokens + text_tokens`` tokens (``forward``), or of one
    modality's tokens (``encode_image``, ``encode_text``); e.g. BASE needs multiples of E."""
    for tokens in (image_tokens + text_tokens, image_tokens, text_tokens):
        try:
            router.check_group_size(routing_group_size * tokens)
        except ValueError as err:
            reason = str(err).split(" is not allowed: ", 1)[-1].split(";")[0].rstrip(".")
            raise ValueError(f"routing_group_size={routing_group_size} is not allowed: a group of that many pairs "
                             f"holds {routing_group_size * tokens} tokens ({tokens} per pair), and "
                             f"{type(router).__name__} refuses it: {reason}.") from None


def create_limoe(**kwargs) -> LIMoE:
    """Hydra-friendly constructor (lists from the config become tuples)."""
    for key in ("local_entropy_weight", "global_entropy_weight", "global_min_experts"):
        if key in kwargs and kwargs[key] is not None:
            kwargs[key] = tuple(kwargs[key])
    if "moe_layers" in kwargs and not isinstance(kwargs["moe_layers"], str):
        kwargs["moe_layers"] = list(kwargs["moe_layers"])
    return LIMoE(**kwargs)


# -- routing by modality --------------------------------------------------------------------------

@torch.no_grad()
def modality_usage_counts(routing, modality_T: torch.Tensor, valid_T: torch.Tensor) -> torch.Tensor:
    """M×E assignments per modality and expert (soft / merged routings: combine mass per expert)."""
    E = routing.num_experts
    T = modality_T.shape[0]
    out = torch.zeros(2, E, device=modality_T.device)
    if routing.is_soft or routing.is_merged:
        scores_TE = routing.scores_GSE.reshape(-1, E)[:T].float() * valid_T[:, None]
        for m in range(2):
            out[m] = scores_TE[modality_T == m].sum(0)
        return out
    keep_N = routing.token_idx_N < T  # drop assignments of the zero tokens padding a last group
    mod_N = modality_T[routing.token_idx_N[keep_N]]
    experts_N = routing.expert_idx_N[keep_N]
    for m in range(2):
        out[m] = torch.bincount(experts_N[mod_N == m], minlength=E).float()
    return out


@torch.no_grad()
def modality_choice_counts(routing, modality_T: torch.Tensor, valid_T: torch.Tensor) -> torch.Tensor:
    """M×E valid tokens per modality whose highest router score is expert e: the router's first
    choice, counted before capacity, so tokens dropped from a full expert still show where they went."""
    E = routing.num_experts
    T = modality_T.shape[0]
    first_T = routing.scores_GSE.reshape(-1, E)[:T].argmax(-1)
    out = torch.zeros(2, E, device=modality_T.device)
    for m in range(2):
        out[m] = torch.bincount(first_T[valid_T & (modality_T == m)], minlength=E).float()
    return out


def modality_usage(model: nn.Module) -> dict:
    """Expert usage per modality since the last reset.

    Returns ``{"image": {layer: fractions_E}, "text": {...}, "image_top_expert_share": s,
    "text_top_expert_share": s}``: fractions of each modality's assignments per expert, and the share
    of a modality's assignments that go to its most used expert (mean over layers; 1/E is perfectly
    balanced, 1.0 is collapse onto one expert). CLIP-MoE towers count as their modality; LIMoE
    splits the shared layers' routing by token modality. Padding never counts.

    LIMoE also reports ``"<modality>_top_choice_share"``, its collapse measure: in each MoE layer, the
    share of the modality's valid tokens whose highest router score is the expert most of them
    pick (counted before capacity, so an overflowing expert cannot hide collapse by dropping
    tokens), averaged over the MoE layers with equal weight.
    """
    usage: dict = {name: {} for name in MODALITIES}
    if isinstance(model, LIMoE):
        choice_shares: dict = {mod: [] for mod in MODALITIES}
        for (name, _), counts_ME, choices_ME in zip(model.moe_layers(), model.modality_tokens_LME,
                                                    model.modality_choices_LME):
            for m, mod in enumerate(MODALITIES):
                if counts_ME[m].sum() > 0:
                    usage[mod][name] = (counts_ME[m] / counts_ME[m].sum()).tolist()
                if choices_ME[m].sum() > 0:
                    choice_shares[mod].append(float(choices_ME[m].max() / choices_ME[m].sum()))
        for mod in MODALITIES:
            shares = choice_shares[mod]
            usage[f"{mod}_top_choice_share"] = sum(shares) / len(shares) if shares else None
    else:
        for name, layer in model.named_modules():
            mod = getattr(layer, "modality", None)
            if isinstance(layer, MoE) and mod in MODALITIES and layer.stat_tokens_E.sum() > 0:
                usage[mod][name] = (layer.stat_tokens_E / layer.stat_tokens_E.sum()).tolist()
    for mod in MODALITIES:
        shares = [max(v) for v in usage[mod].values()]
        usage[f"{mod}_top_expert_share"] = sum(shares) / len(shares) if shares else None
    return usage


def reset_modality_usage(model: nn.Module) -> None:
    if isinstance(model, LIMoE):
        model.modality_tokens_LME.zero_()
        model.modality_choices_LME.zero_()
    for layer in model.modules():
        if isinstance(layer, MoE):
            layer.reset_stats()
