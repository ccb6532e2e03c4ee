"""Placement and upcycling: turn the dense MLPs of chosen transformer blocks into MoE layers.

Works on any sequence of blocks whose items carry the FFN as ``.mlp``: timm ``VisionTransformer``
(``model.blocks[i].mlp``, a ``Mlp`` with ``fc1``/``act``/``fc2``) and open_clip transformers
(``transformer.resblocks[i].mlp``, a ``Sequential`` with ``c_fc``/``gelu``/``c_proj``).

Placements (Riquelme et al., "Scaling Vision with Sparse Mixture of Experts", NeurIPS 2021;
Puigcerver et al., "From Sparse to Soft Mixtures of Experts", ICLR 2024):

- ``every_other``: blocks 1, 3, 5, ... (0-indexed; V-MoE "Every-2");
- ``last_n``: the last ``n`` blocks of the every-other set (V-MoE "Last-n": 8 blocks, n=2 -> 5, 7);
- ``last_half``: the last ``depth // 2`` blocks, contiguous (Soft MoE);
- ``all``: every block;
- an explicit list of block indices (negative indices count from the end).

Sparse upcycling (Komatsuzaki et al., "Sparse Upcycling", ICLR 2023): every expert starts as a copy
of the dense MLP it replaces; the router starts fresh.
"""

from __future__ import annotations

import copy
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from core.moe import MoE
from core.routers.base import Router

PLACEMENTS = ("every_other", "last_n", "last_half", "all", "none")

# (first projection, second projection) names of the dense FFNs we know how to read
_MLP_NAMES = (("fc1", "fc2"), ("c_fc", "c_proj"))


def moe_block_indices(depth: int, placement: str | Sequence[int] | None = "every_other", num_last: int | None = None,
                      key: str = "placement") -> list[int]:
    """Indices of the blocks that get an MoE layer, the one placement rule of every domain.

    Args:
        depth: number of blocks.
        placement: one of ``PLACEMENTS`` (``every_other``: blocks 1, 3, 5, ... as V-MoE, GShard and
            Switch; ``last_n``: the last n odd blocks; ``last_half``: Soft MoE; ``all``; ``none`` or
            None: a dense model) or an explicit list of block indices (negative ones count from the end).
        num_last: n for ``last_n``.
        key: the argument's name in error messages.
    """
    if placement is None or placement == "none":
        return []
    if isinstance(placement, str):
        if placement == "every_other":
            return list(range(1, depth, 2))
        if placement == "last_n":
            odd = list(range(1, depth, 2))
            if isinstance(num_last, bool) or not isinstance(num_last, int) or not 1 <= num_last <= len(odd):
                raise ValueError(f"num_last={num_last!r} is not allowed for {key}='last_n': it must be an "
                                 f"integer in [1, {len(odd)}] (the odd blocks of a depth-{depth} model).")
            return odd[-num_last:]
        if placement == "last_half":
            return list(range(depth - depth // 2, depth))
        if placement == "all":
            return list(range(depth))
        raise ValueError(f"{key}={placement!r} is not allowed: use one of {list(PLACEMENTS)} or a list of block indices.")
    if not isinstance(placement, Sequence):
        raise ValueError(f"{key}={placement!r} is not allowed: use one of {list(PLACEMENTS)} or a list of block indices.")
    indices = []
    for i in placement:
        if isinstance(i, bool) or not isinstance(i, int) or not -depth <= i < depth:
            raise ValueError(f"{key}={list(placement)!r} is not allowed: block index {i!r} is outside [-{depth}, {depth}).")
        indices.append(i % depth)
    if len(set(indices)) != len(indices):
        raise ValueError(f"{key}={list(placement)!r} is not allowed: a block index appears twice.")
    return sorted(indices)


def dense_mlp_parts(mlp: nn.Module) -> tuple[nn.Linear, nn.Module, nn.Linear]:
    """(first linear, activation, second linear) of a timm ``Mlp`` or an open_clip MLP."""
    for first, second in _MLP_NAMES:
        fc1, fc2 = getattr(mlp, first, None), getattr(mlp, second, None)
        if isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear):
            act = getattr(mlp, "act", None) or getattr(mlp, "gelu", None)
            if act is None:
                raise ValueError(f"{type(mlp).__name__} has {first}/{second} but no activation (act or gelu).")
            return fc1, act, fc2
    raise ValueError(f"cannot read a dense FFN from {type(mlp).__name__}: expected Linear layers named "
                     f"{' or '.join('/'.join(n) for n in _MLP_NAMES)}.")


def _check_plain_mlp(mlp: nn.Module, fc1: nn.Linear, fc2: nn.Linear) -> None:
    """Refuse MLPs whose extra parts (gating, hidden norm) the MoE experts would silently drop."""
    norm = getattr(mlp, "norm", None) or getattr(mlp, "ln", None)
    if norm is not None and not isinstance(norm, nn.Identity):
        raise ValueError(f"{type(mlp).__name__} has a hidden-layer norm: upcycling it is not supported.")
    if fc1.out_features != fc2.in_features:
        raise ValueError(f"{type(mlp).__name__} is gated (fc1 width {fc1.out_features} != fc2 input "
                         f"{fc2.in_features}): use a GLU MoE built by hand.")


def build_moe_like(mlp: nn.Module, *, num_experts: int, router=None, upcycle: bool = False, **moe_kwargs) -> MoE:
    """An MoE layer with the dense MLP's widths and activation, on its device and dtype.

    Args:
        mlp: the dense FFN to imitate (timm ``Mlp`` or open_clip MLP).
        num_experts: E.
        router: router partial (``router(dim=D, num_experts=E)``), a ``Router`` to share, or None
            for the MoE layer's default (V-MoE top-2).
        upcycle: copy the dense weights into every expert.
        **moe_kwargs: other ``MoE`` keyword arguments (group_size, num_shared_experts, ...).
    """
    fc1, act, fc2 = dense_mlp_parts(mlp)
    _check_plain_mlp(mlp, fc1, fc2)
    drop = getattr(getattr(mlp, "drop1", None), "p", 0.0)
    moe = MoE(fc1.in_features, fc1.out_features, fc2.out_features, act_layer=lambda: copy.deepcopy(act),
              bias=fc1.bias is not None and fc2.bias is not None, drop=drop,
              device=fc1.weight.device, dtype=fc1.weight.dtype,
              num_experts=num_experts, router=router, **moe_kwargs)
    if upcycle:
        moe.experts.load_dense_mlp(fc1, fc2)
    return moe


def replace_mlps_with_moe(
    blocks: Sequence[nn.Module],
    placement: str | Sequence[int] = "every_other",
    *,
    num_experts: int,
    router: Callable[..., Router] | Router | None = None,
    num_last: int | None = None,
    upcycle: bool = False,
    **moe_kwargs,
) -> list[int]:
    """Replace ``blocks[i].mlp`` by an MoE layer for every chosen block; returns the indices.

    Each layer gets its own router from the partial (a ``Router`` instance is shared on purpose).

    Args:
        blocks: the model's blocks (``vit.blocks``, ``clip.transformer.resblocks``).
        placement: see ``moe_block_indices``.
        num_experts: E per layer.
        router: router partial, shared ``Router``, or None (V-MoE top-2).
        num_last: n for ``placement='last_n'``.
        upcycle: start every expert as a copy of the dense MLP (sparse upcycling).
        **moe_kwargs: forwarded to ``MoE``.

    Example::

        vit = timm.create_model("vit_small_patch16_224")
        replace_mlps_with_moe(vit.blocks, "every_other", num_experts=8,
                              router=functools.partial(TopKRouter, top_k=2))
    """
    indices = moe_block_indices(len(blocks), placement, num_last)
    for i in indices:
        block = blocks[i]
        if not hasattr(block, "mlp"):
            raise ValueError(f"block {i} ({type(block).__name__}) has no .mlp to replace.")
        block.mlp = build_moe_like(block.mlp, num_experts=num_experts, router=router, upcycle=upcycle, **moe_kwargs)
    return indices


@torch.no_grad()
def load_dense_state_dict(model: nn.Module, dense: Mapping[str, torch.Tensor] | nn.Module) -> list[str]:
    """Sparse upcycling from a dense checkpoint: copy every matching weight of ``dense`` (a state
    dict or a module with the same architecture but dense MLPs) into ``model``; the dense MLP of a
    block that is now an MoE layer is copied into every one of its experts. Routers keep their
    fresh initialisation. Returns the names of the model's parameters left as initialised.

    Raises ``ValueError`` when a dense weight has no place in the model or shapes disagree.
    """
    sd = dict(dense.state_dict() if isinstance(dense, nn.Module) else dense)
    moe_layers = {name: m for name, m in model.named_modules() if isinstance(m, MoE)}
    consumed: set[str] = set()
    for name, moe in moe_layers.items():
        for first, second in _MLP_NAMES:
            w1, w2 = f"{name}.{first}.weight", f"{name}.{second}.weight"
            if w1 in sd and w2 in sd:
                fc1 = nn.Linear(sd[w1].shape[1], sd[w1].shape[0], bias=f"{name}.{first}.bias" in sd)
                fc2 = nn.Linear(sd[w2].shape[1], sd[w2].shape[0], bias=f"{name}.{second}.bias" in sd)
                for fc, prefix in ((fc1, first), (fc2, second)):
                    fc.weight.copy_(sd[f"{name}.{prefix}.weight"])
                    if fc.bias is not None:
                        fc.bias.copy_(sd[f"{name}.{prefix}.bias"])
                    consumed.update(k for k in (f"{name}.{prefix}.weight", f"{name}.{prefix}.bias") if k in sd)
                ex = moe.experts
                if (fc1.in_features, fc1.out_features, fc2.out_features) != (ex.in_features, ex.hidden_features, ex.out_features):
                    raise ValueError(f"dense MLP {name} has widths {(fc1.in_features, fc1.out_features, fc2.out_features)} "
                                     f"but the MoE experts have {(ex.in_features, ex.hidden_features, ex.out_features)}.")
                ex.load_dense_mlp(fc1.to(ex.w1_EDF.dtype), fc2.to(ex.w1_EDF.dtype))
                break
    rest = {k: v for k, v in sd.items() if k not in consumed}
    own = model.state_dict()
    unexpected = [k for k in rest if k not in own]
    if unexpected:
        raise ValueError(f"dense weights {unexpected[:5]} have no place in the model: architectures differ.")
    bad = [k for k, v in rest.items() if own[k].shape != v.shape]
    if bad:
        raise ValueError(f"dense weight {bad[0]} has shape {tuple(rest[bad[0]].shape)}, the model expects "
                         f"{tuple(own[bad[0]].shape)}.")
    missing = model.load_state_dict(rest, strict=False).missing_keys
    upcycled = {f"{name}.experts." for name, m in moe_layers.items() if any(k.startswith(f"{name}.") for k in consumed)}
    return [k for k in missing if not any(k.startswith(p) for p in upcycled)]
