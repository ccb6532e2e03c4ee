"""Batch Prioritized Routing (BPR; Riquelme et al., "Scaling Vision with Sparse Mixture of Experts",
NeurIPS 2021, §3.1): when expert buffers are filled, tokens claim slots in descending order of their
best routing score instead of token order, so that the choices dropped at capacity are those of the
tokens the router is least sure of. ``core.routers.base.select_token_choice(batch_priority=True)``
implements the ordering; this module holds the one check every token-choice router with the option
shares: BPR only decides which choices are dropped, so a dropless router has nothing for it to do and
refuses it instead of ignoring it.
"""

from __future__ import annotations

from core.routers.base import check_bool

__all__ = ["check_batch_priority"]


def check_batch_priority(value, capacity_factor: float | None, router: str) -> bool:
    """``value`` as a bool; refused (``ValueError`` naming ``router``) when true without a capacity."""
    value = check_bool("batch_priority", value)
    if value and capacity_factor is None:
        raise ValueError(f"batch_priority={value} is not allowed: {router} with capacity_factor=None is dropless, "
                         "so no choice is ever dropped and Batch Prioritized Routing would change nothing; set "
                         "capacity_factor (e.g. 1.0) or batch_priority=false.")
    return value
