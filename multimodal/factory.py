"""``open_clip.create_model`` builds CLIP-MoE and LIMoE from their registered model JSON.

open_clip's architectures are data: ``multimodal/model_configs/<name>.json`` (``embed_dim``,
``vision_cfg``, ``text_cfg``) registered with ``open_clip.add_model_config``. The ``*-MoE`` configs
add a ``moe_cfg`` object with the MoE settings, e.g. ``mm-clip-tiny-p4-32-MoE.json``::

    "moe_cfg": {"arch": "clip_moe", "num_experts": 4, "router": "mixtral",
                "router_kwargs": {"top_k": 2, "switch_loss_weight": 0.01},
                "vision_layers": "every_other", "text_layers": "every_other"}

- ``arch: clip_moe`` (the default): open_clip's ``CLIP`` of the JSON's sizes whose tower MLPs become
  core MoE layers; the other keys are those of ``multimodal.models.convert_clip_to_moe`` (``router``:
  a ``conf/router`` name, ``router_kwargs`` over its values, ``vision_layers``/``text_layers``:
  ``core.surgery`` placements, ``num_experts``, ``group_size``, ...).
- ``arch: limoe``: a ``multimodal.models.LIMoE`` (one shared transformer; Mustafa et al., NeurIPS
  2022) whose sizes come from the JSON (``vision_cfg`` and ``text_cfg`` must agree on width, depth
  and heads: the transformer is shared); the other keys are LIMoE's (``moe_layers``,
  ``local_entropy_weight``, ``routing_group_size``: pairs per routing group, null the whole batch, ...). Its ``visual`` holds only what open_clip's transforms read
  (``ImagePreprocessing``), so ``create_model_and_transforms`` works too.

Where the hook sits: open_clip passes the top-level keys of a model config (and the keyword
arguments of ``create_model``) to its model class, ``CLIP(**cfg, cast_dtype=...)``, while the
``vision_cfg``/``text_cfg`` dataclasses refuse keys they do not know, and it has no registry of model
classes. ``register_model_configs`` therefore makes the ``CLIP`` name that ``open_clip.factory``
instantiates ``build_open_clip_model``: a config without ``moe_cfg`` gets open_clip's own ``CLIP``,
unchanged; one with it gets the MoE model, built inside open_clip's ``create_model`` so that
everything after construction applies to it as to any CLIP: ``pretrained=<checkpoint>`` loads MoE
weights strictly, ``device``/``precision`` cover the experts, ``get_tokenizer`` reads the context
length. ``create_model(name, moe_cfg={...})`` replaces a config's ``moe_cfg`` (or makes a dense
config MoE)::

    import multimodal, open_clip
    model = open_clip.create_model("mm-clip-tiny-p4-32-MoE")        # CLIP-MoE, its JSON's router
    limoe = open_clip.create_model("mm-limoe-tiny-p4-32-MoE")       # LIMoE
    model = open_clip.create_model("mm-clip-tiny-p4-32", moe_cfg={"router": "expert_choice"})
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Callable

import open_clip
import open_clip.factory
from torch import nn

__all__ = ["MODEL_CONFIG_DIR", "ImagePreprocessing", "build_open_clip_model", "moe_model_names", "register_model_configs"]

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
ARCHES = ("clip_moe", "limoe")
_OPEN_CLIP_CLIP = open_clip.model.CLIP  # the class open_clip.factory instantiates for these configs
# LIMoE's arguments that the JSON's embed_dim, vision_cfg and text_cfg set
_LIMOE_SIZES = ("embed_dim", "image_size", "patch_size", "context_length", "vocab_size", "width", "layers", "heads",
                "mlp_ratio", "pad_id", "init_logit_scale")


def register_model_configs() -> list[str]:
    """Register the JSON architectures of ``multimodal/model_configs`` with open_clip and let
    ``open_clip.create_model`` build the ``moe_cfg`` ones (idempotent); returns their names."""
    names = sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))
    if not set(names) <= set(open_clip.list_models()):
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    open_clip.factory.CLIP = build_open_clip_model
    return names


def moe_model_names() -> list[str]:
    """The registered open_clip architectures whose config carries ``moe_cfg``."""
    return [n for n in open_clip.list_models() if "moe_cfg" in (open_clip.get_model_config(n) or {})]


def _keywords(fn: Callable, skip: tuple[str, ...] = ()) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p not in skip]


def _check_keys(moe_cfg: dict, allowed: list[str], arch: str) -> None:
    unknown = sorted(set(moe_cfg) - set(allowed) - {"arch"})
    if unknown:
        raise ValueError(f"moe_cfg.{unknown[0]}={moe_cfg[unknown[0]]!r} is not allowed: a {arch} model config "
                         f"takes the keys {['arch', *allowed]}")


def build_open_clip_model(*, moe_cfg: dict | None = None, **model_cfg: Any) -> nn.Module:
    """The model of an open_clip model config (what ``open_clip.factory`` instantiates for it).

    Args:
        moe_cfg: the config's MoE settings (module docstring); None: open_clip's ``CLIP``.
        **model_cfg: the rest of the config as open_clip passes it (``embed_dim``, ``vision_cfg``,
            ``text_cfg``, ``quick_gelu``, ``init_logit_scale``, ``cast_dtype``, ...).
    """
    if moe_cfg is None:
        return _OPEN_CLIP_CLIP(**model_cfg)
    from multimodal import models

    moe_cfg = dict(moe_cfg)
    arch = moe_cfg.pop("arch", "clip_moe")
    if arch == "clip_moe":
        _check_keys(moe_cfg, _keywords(models.convert_clip_to_moe, skip=("model",)), arch)
        return models.convert_clip_to_moe(_OPEN_CLIP_CLIP(**model_cfg), **moe_cfg)
    if arch == "limoe":
        sizes = _limoe_sizes(**model_cfg)
        _check_keys(moe_cfg, _keywords(models.LIMoE.__init__, skip=("self", *_LIMOE_SIZES)), arch)
        model = models.create_limoe(**sizes, **moe_cfg)
        model.visual = ImagePreprocessing(sizes["image_size"])
        return model
    raise ValueError(f"moe_cfg.arch={arch!r} is not allowed: use one of {list(ARCHES)}")


class ImagePreprocessing:
    """What open_clip reads off ``model.visual`` besides the tower: the input ``image_size`` (the
    transforms' size) and the ``preprocess_cfg`` it sets. A LIMoE has no image tower of its own (its
    transformer is shared), so the open_clip-built one carries this in its place; not a module, it
    holds no weights."""

    def __init__(self, image_size: int):
        self.image_size = image_size


def _limoe_sizes(embed_dim: int, vision_cfg: dict, text_cfg: dict, quick_gelu: bool = False,
                 init_logit_scale: float | None = None, init_logit_bias: float | None = None,
                 nonscalar_logit_scale: bool = False, cast_dtype=None, **rest) -> dict:
    """LIMoE's architecture arguments from an open_clip config (one transformer: the towers must agree)."""
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    v, t = CLIPVisionCfg(**vision_cfg), CLIPTextCfg(**text_cfg)
    refused = {"quick_gelu": quick_gelu, "init_logit_bias": init_logit_bias,
               "nonscalar_logit_scale": nonscalar_logit_scale, "cast_dtype": cast_dtype, **rest}
    for key, value in refused.items():
        if value:
            raise ValueError(f"{key}={value!r} is not allowed for a LIMoE model config: LIMoE has GELU MLPs, one "
                             "scalar temperature and no bias, in float32 (precision='fp32' or 'pure_bf16')")
    if not isinstance(v.layers, int) or v.timm_model_name:
        raise ValueError(f"vision_cfg.layers={v.layers!r} is not allowed for LIMoE: its image side is a ViT")
    v_heads = v.width // v.head_width
    for key, image, text in (("width", v.width, t.width), ("layers", v.layers, t.layers),
                             ("heads", v_heads, t.heads), ("mlp_ratio", v.mlp_ratio, t.mlp_ratio)):
        if image != text:
            raise ValueError(f"text_cfg.{key}={text!r} is not allowed: LIMoE shares one transformer between "
                             f"the modalities, so it must equal the image side's {key} ({image})")
    sizes = dict(embed_dim=embed_dim, image_size=v.image_size, patch_size=v.patch_size,
                 context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, layers=t.layers,
                 heads=t.heads, mlp_ratio=t.mlp_ratio, pad_id=t.pad_id)
    if init_logit_scale is not None:
        sizes["init_logit_scale"] = init_logit_scale
    return sizes
