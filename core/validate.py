"""Checks of a composed run config, shared by the four domains; run before any data is read.

Every check raises ``ConfigError`` (a ``ValueError``) naming the config key, its value and what is
allowed, e.g. ``trainer.lr=-1.0 is not allowed: it must be > 0.``; ``core.run.run`` prints that
one line and exits with status 2. The domains add their own checks (``<domain>.train.validate_config``)
and call the shared ones: the trainer keys (``check_trainer``), the router against the model's
number of experts (``check_router``), expert parallelism (``check_expert_parallel``), input files.

Many rules live where the value is used (``TrainerConfig.__post_init__``, the routers'
constructors); the checks here call that code on the config and re-label its ``ValueError`` with
the config key, so each rule is written once and fires before training.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from core.checks import ConfigError, NotApplicableError, check_target, to_config_error

__all__ = ["check_expert_parallel", "check_router", "check_trainer", "router_choices"]

_ROUTER_CONF = Path(__file__).resolve().parents[1] / "conf" / "router"


# ------------------------------------------------------------------------------------------ trainer


def check_trainer(trainer: Mapping | DictConfig, num_experts: int | None = None):
    """The ``trainer`` group as a ``TrainerConfig`` (its own rules, relabelled), the device present,
    and expert parallelism against ``num_experts``. Returns the ``TrainerConfig``."""
    from core.engine import TrainerConfig, resolve_device

    node = OmegaConf.to_container(trainer, resolve=True) if OmegaConf.is_config(trainer) else dict(trainer)
    check_expert_parallel(node, num_experts)
    try:
        cfg = TrainerConfig.from_mapping(node)
    except ValueError as err:
        m = re.match(r"^(trainer\.\w+) is not a trainer key: (.+)$", str(err))
        if m:
            raise ConfigError(m[1], node.get(m[1].split(".", 1)[1]), f"it is not a trainer key; {m[2]}") from None
        raise to_config_error(err, "trainer.") from None
    try:
        resolve_device(cfg.device)
    except ValueError as err:
        raise to_config_error(err, "trainer.") from None
    return cfg


def check_expert_parallel(trainer: Mapping, num_experts: int | None) -> None:
    """``trainer.expert_parallel=true`` spreads every MoE layer's experts over the ``WORLD_SIZE``
    processes of a torchrun launch (or over groups of ``trainer.expert_parallel_size``), so that
    number must divide E, a group size must divide the world size, and groups smaller than the world
    need FSDP (other values are left to ``TrainerConfig``)."""
    if trainer.get("expert_parallel") is not True or num_experts is None:
        return
    world = os.environ.get("WORLD_SIZE", "1")
    world_size = int(world) if world.isdigit() else 1
    if world_size <= 1:
        return
    group = trainer.get("expert_parallel_size")
    size = group if isinstance(group, int) and not isinstance(group, bool) and group >= 1 else world_size
    if world_size % size:
        raise ConfigError("trainer.expert_parallel_size", group,
                          f"it must divide the WORLD_SIZE={world} processes; use a divisor of {world_size} or null")
    if size < world_size and trainer.get("data_parallel") != "fsdp":
        raise ConfigError("trainer.expert_parallel_size", group,
                          f"groups of {size} of the {world_size} ranks hold every expert once each, and DDP cannot "
                          "reduce the experts' gradients over the groups; use trainer.data_parallel=fsdp, or "
                          "expert_parallel_size=null")
    if num_experts % size:
        who = (f"the WORLD_SIZE={world} processes" if size == world_size
               else f"groups of trainer.expert_parallel_size={size} ranks")
        raise ConfigError("trainer.expert_parallel", True,
                          f"{who} cannot share num_experts={num_experts} experts evenly: launch a number of "
                          f"processes (or set trainer.expert_parallel_size to one) that divides {num_experts}, or "
                          f"set num_experts to a multiple of {size}")


# ------------------------------------------------------------------------------------------- router


def router_choices() -> list[str]:
    """The router configs of ``conf/router`` (``+router=<name>``)."""
    return sorted(p.stem for p in _ROUTER_CONF.glob("*.yaml"))


def check_router(node: Any, num_experts: int | Sequence[int], *, key: str = "router", domain: str = "",
                 token_ids: bool = False, group_size: int | None = None, group_key: str = "group_size",
                 seq_len: int | None = None, expert_parallel: bool = False):
    """Build the router of ``node`` (a ``conf/router`` config, or None for the model's default) once
    for each expert count the model gives it, and check what it needs against what the model gives
    (the router class's declared needs, ``core.routers.base.Router``): token ids, a routing group of
    ``group_size`` tokens (named ``group_key``), a group size of its own inside sequences of
    ``seq_len`` tokens, expert parallelism. Raises ``NotApplicableError`` naming ``<key>.<name>``
    when the router's own rules refuse the config (``top_k`` > E, ``capacity_factor`` <= 0, ...) or
    it cannot serve here, or when an option is set where it could not act (``Router.check_options``:
    ``capacity_multiple_of`` without a capacity, ...). Returns the last router built (None for None)."""
    from core.routers.base import Router, check_applicable

    if node is None:
        return None
    choices = f"; the configs of conf/router are {router_choices()} (+router=<name>)"
    if not OmegaConf.is_dict(node) or "_target_" not in node:
        raise ConfigError(key, OmegaConf.to_container(node) if OmegaConf.is_config(node) else node,
                          f"a router config with a _target_{choices}")
    cls = check_target(f"{key}._target_", node._target_, Router, choices)
    counts = [num_experts] if isinstance(num_experts, int) else list(num_experts)
    name = cls.__name__
    check_applicable(cls, token_ids=token_ids, where=f"{domain or 'this domain'}'s inputs", key=key,
                     sequences=seq_len is not None)
    if expert_parallel and not cls.supports_expert_parallel:
        raise NotApplicableError("trainer.expert_parallel", True, f"{name} lets every token meet every expert, "
                                 "so its experts cannot live on different ranks; pick a sparse router "
                                 "(topk, expert_choice, deepseek, ...) or set trainer.expert_parallel=false")
    router = None
    for E in counts:
        router = _build_router(node, cls, key, E)
        if seq_len is not None:
            try:
                needed = router.routing_group_size(seq_len)
            except ValueError as err:
                err = to_config_error(err, f"{key}.", cls=NotApplicableError)
                raise NotApplicableError(err.key, None, f"{err.allowed} (the sequence length data.seq_len)",
                                         value_repr=err.value_repr) from None
            if needed is not None:
                group_size, group_key = needed, f"{key} (its routing group in data.seq_len={seq_len})"
        if group_size is not None:
            try:
                router.check_group_size(group_size)
            except ValueError as err:
                raise NotApplicableError(group_key, group_size, str(err).split(" is not allowed: ", 1)[-1]) from None
    return router


def _build_router(node: Any, cls: type, key: str, num_experts: int):
    """``node``'s router for ``num_experts`` experts; its constructor's errors, and its options that
    could not act (``Router.check_options``), as ``ConfigError``s."""
    import hydra

    name = cls.__name__
    try:
        factory = hydra.utils.instantiate(node, _partial_=True)
        router = factory(dim=8, num_experts=num_experts)  # the width does not enter any router's rules
        router.check_options()  # an option that cannot act with the others is refused, not ignored
        return router
    except TypeError as err:  # an unknown or missing keyword
        import inspect

        params = [p for p in inspect.signature(cls).parameters if p not in ("dim", "num_experts")]
        bad = re.search(r"unexpected keyword argument '(\w+)'", str(err))
        if bad:
            raise ConfigError(f"{key}.{bad[1]}", node.get(bad[1]), f"{name} has no such parameter; its "
                              f"parameters are {params}") from None
        raise ConfigError(key, name, f"{err}") from None
    except ValueError as err:
        raise to_config_error(err, f"{key}.", cls=NotApplicableError) from None
    except Exception as err:  # hydra's InstantiationException wraps the router's own error
        cause = err.__cause__
        if isinstance(cause, ValueError):
            raise to_config_error(cause, f"{key}.", cls=NotApplicableError) from None
        raise ConfigError(key, name, str(err)) from None
