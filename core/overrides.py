"""Keys added on the command line (``+key=value``, ``++key=value``) that nothing would read.

Hydra adds any key given with ``+`` (and ``++``, when the key is not already there), so a misspelled
key, ``+data.limt_train=5`` or ``+sed=1``, is silently ignored and the run trains with the default.
``check_added_keys`` refuses such a key before any data is read, naming the closest existing key::

    error: data.limt_train=5 is not allowed: there is no such key; did you mean data.limit_train?

A key the config did not have is allowed only where something consumes it:

- an argument of a node with a ``_target_`` whose signature takes that name (or ``**kwargs``): a
  model's, a router's or a data loader's constructor (Hydra passes every key of the node);
- anything under a node whose name ends in ``_kwargs`` (an open dict by design, e.g. vision's
  ``model.timm_kwargs``);
- ``trainer.*`` (``TrainerConfig`` refuses unknown trainer keys itself, with the list of its keys)
  and ``hydra.*`` (Hydra's own).

Config-group choices (``+router=topk``, ``+experiment=...``, ``+hydra/launcher=...``) and keys that
already existed (``++key=value`` on an existing key is a plain override) are not concerned.

``check_hydra_overrides(cfg)`` runs the check on the overrides of the running Hydra job
(``HydraConfig.get().overrides.task``), and is a no-op without Hydra's runtime (a config composed in
Python, tests); ``core.run.check_config`` calls it.
"""

from __future__ import annotations

import difflib
import inspect
import typing
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

from core.checks import ConfigError, locate

__all__ = ["UnknownKeyError", "added_keys", "base_keys_of", "check_added_keys", "check_hydra_overrides",
           "config_groups"]

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# prefixes whose unknown keys are someone else's to refuse (or Hydra's own namespace)
_CHECKED_ELSEWHERE = ("trainer", "hydra")


class UnknownKeyError(ConfigError):
    """A key added on the command line that no part of the run reads (``core.overrides``)."""

    def __init__(self, key: str, value_repr: str, allowed: str):
        super().__init__(key, None, allowed, value_repr=value_repr)
        if self.allowed.endswith("?"):  # "...; did you mean data.limit_train?" without a "." after it
            self.args = (f"{key}={value_repr} is not allowed: {self.allowed}",)


def config_groups(conf_dir: Path = CONF_DIR) -> set[str]:
    """The config-group names of every domain and the shared ones (``router``, ``model``, ``data``,
    ``debug``, ``experiment``, ``trainer``, ...): a ``+name=value`` with one of them picks a config."""
    groups = {p.name for p in conf_dir.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    for domain in conf_dir.iterdir():
        if (domain / "train.yaml").is_file():
            groups |= {p.name for p in domain.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))}
    return groups


def _flatten_keys(node: Any, prefix: str = "") -> set[str]:
    """Every dotted key of ``node`` (inner nodes included), without resolving interpolations."""
    keys: set[str] = set()
    if isinstance(node, DictConfig):
        if node._is_none() or node._is_missing() or node._is_interpolation():
            return keys
        for k in node.keys():
            key = f"{prefix}{k}"
            keys.add(key)
            keys |= _flatten_keys(node._get_node(k), key + ".")
    return keys


def base_keys_of(cfg: DictConfig) -> set[str]:
    """The dotted keys of a config (inner nodes included; interpolations are not followed)."""
    return _flatten_keys(cfg)


def added_keys(overrides: Iterable[str], groups: set[str] | None = None) -> list[tuple[str, str, str]]:
    """``(key, value as typed, "+" or "++")`` of every ``+key=value`` / ``++key=value`` override that adds
    a key rather than choosing a config-group option."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups = config_groups() if groups is None else groups
    out = []
    for ov in OverridesParser.create().parse_overrides([str(o) for o in overrides]):
        if not (ov.is_add() or ov.is_force_add()) or ov.package is not None:
            continue
        key = ov.key_or_group
        if "/" in key or key in groups or "[" in key:  # a group choice (or an indexed list item)
            continue
        value = ov.input_line.split("=", 1)[1] if ov.input_line and "=" in ov.input_line else str(ov.value())
        out.append((key, value, "++" if ov.is_force_add() else "+"))
    return out


def _parameters(target: Any) -> tuple[list[str] | None, bool]:
    """``(parameter names, takes **kwargs)`` of the object a ``_target_`` names; ``(None, True)`` when
    it cannot be told (not importable, no signature): the key is then not refused. A factory function
    whose ``**kwargs`` go to the class it returns (its return annotation, e.g. ``create_limoe(**kwargs)
    -> LIMoE``) takes that class's arguments."""
    obj = locate(str(target)) if isinstance(target, str) else None
    if obj is None:
        return None, True
    names, var_kw = _signature(obj)
    if names is None:
        return None, True
    if var_kw and inspect.isfunction(obj):
        try:
            returned = typing.get_type_hints(obj).get("return")
        except Exception:  # noqa: BLE001  (an annotation that cannot be evaluated)
            returned = None
        if isinstance(returned, type):
            more, more_kw = _signature(returned)
            if more is not None and not more_kw:
                return names + [n for n in more if n not in names], False
    return names, var_kw


def _signature(obj: Any) -> tuple[list[str] | None, bool]:
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return None, True
    names = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name != "self"]
    return names, any(p.kind == p.VAR_KEYWORD for p in params)


def _node(cfg: DictConfig, key: str) -> Any:
    """The node at ``key`` (interpolations resolved where possible), or None."""
    try:
        return OmegaConf.select(cfg, key, throw_on_missing=False, throw_on_resolution_failure=False)
    except Exception:  # noqa: BLE001  (an interpolation that cannot be resolved yet)
        return None


def _children(node: Any) -> list[str]:
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def _refusal(cfg: DictConfig, key: str, value: str, base_keys: set[str]) -> UnknownKeyError | None:
    """The error for the added ``key``, or None when something reads it."""
    parts = key.split(".")
    if parts[0] in _CHECKED_ELSEWHERE:
        return None
    # the deepest node that existed before the override, and the first new name under it
    depth = len(parts) - 1
    while depth > 0 and ".".join(parts[:depth]) not in base_keys:
        depth -= 1
    parent_key, name = ".".join(parts[:depth]), parts[depth]
    if any(p.endswith("_kwargs") for p in parts[:depth + 1]):
        return None  # an open dict of keyword arguments (model.timm_kwargs, ...)
    parent = _node(cfg, parent_key) if parent_key else cfg
    if not isinstance(parent, DictConfig):
        return None  # a list or a leaf: Hydra itself refuses a key under it
    where = f"{parent_key}." if parent_key else ""
    siblings = sorted(k for k in _children(parent) if f"{where}{k}" in base_keys)
    target = parent.get("_target_")
    if target is not None:
        if name.startswith("_") and name.endswith("_"):
            return None  # Hydra's own keys (_partial_, _recursive_, _convert_, _args_)
        params, var_kw = _parameters(target)
        if var_kw or params is None or name in params:
            return None
        candidates = sorted(set(params) | set(siblings))
        listing = f"{str(target).rsplit('.', 1)[-1]} takes the arguments {params}"
    else:
        if parent_key == "" and name == "router":
            return UnknownKeyError(key, value, "there is no router node in this run: choose a router with "
                                   "+router=<name> (a conf/router file) before setting its keys")
        candidates = siblings
        listing = f"the keys of {parent_key or 'the config'} are {siblings}"
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    if close:
        return UnknownKeyError(key, value, f"there is no such key; did you mean {where}{close[0]}?")
    kwargs = [k for k in siblings if k.endswith("_kwargs")]
    if kwargs and target is None:
        return UnknownKeyError(key, value, f"there is no such key; other arguments go under {where}{kwargs[0]} "
                               f"(+{where}{kwargs[0]}.{name}={value}), and {listing}")
    return UnknownKeyError(key, value, f"there is no such key: {listing}")


def check_added_keys(cfg: DictConfig, overrides: Iterable[str], base_keys: set[str] | None = None,
                     groups: set[str] | None = None) -> None:
    """Refuse (``UnknownKeyError``, a ``ConfigError``) every key added with ``+key=value`` or
    ``++key=value`` that the config did not have before and that nothing reads (module docstring).

    Args:
        cfg: the composed config (after ``core.run.with_default_router``).
        overrides: the command line's overrides (``HydraConfig.get().overrides.task``).
        base_keys: the dotted keys (inner nodes included) of the config composed without the ``+`` and
            ``++`` overrides (``base_keys_of``); None: ``cfg``'s keys less those the ``+`` overrides
            added, so a ``++key`` counts as existing (it is not checked).
        groups: config-group names (default: ``config_groups()``).
    """
    added = added_keys(overrides, groups)
    if not added:
        return
    if base_keys is None:
        base_keys = _without(base_keys_of(cfg), {key for key, _, kind in added if kind == "+"})
    for key, value, _ in added:
        if key in base_keys:
            continue  # ++key on a key that was there: a plain override
        err = _refusal(cfg, key, value, base_keys)
        if err is not None:
            raise err


def _without(keys: set[str], removed: set[str]) -> set[str]:
    """``keys`` less ``removed`` and their descendants, and less the inner nodes that only held removed
    keys (``+a.b=1`` on a config without ``a`` creates ``a`` too)."""
    kept = {k for k in keys if not any(k == r or k.startswith(r + ".") for r in removed)}
    for r in sorted(removed, key=lambda k: -k.count(".")):
        parts = r.split(".")
        for depth in range(len(parts) - 1, 0, -1):
            inner = ".".join(parts[:depth])
            if inner in kept and not any(k.startswith(inner + ".") for k in kept):
                kept.discard(inner)
    return kept


def _composed_without_additions(overrides: list[str]) -> set[str] | None:
    """The keys of the running job's config composed without its ``+``/``++`` key overrides, or None
    when it cannot be composed here."""
    try:
        from hydra import compose
        from hydra.core.global_hydra import GlobalHydra
        from hydra.core.hydra_config import HydraConfig

        if not GlobalHydra.instance().is_initialized():
            return None
        added = {key for key, _, _ in added_keys(overrides)}
        from hydra.core.override_parser.overrides_parser import OverridesParser

        kept = [ov.input_line for ov in OverridesParser.create().parse_overrides(overrides)
                if not ((ov.is_add() or ov.is_force_add()) and ov.key_or_group in added)]
        base = compose(config_name=HydraConfig.get().job.config_name, overrides=kept)
        return base_keys_of(base)
    except Exception:  # noqa: BLE001  (never stop a run because the comparison could not be made)
        return None


def check_hydra_overrides(cfg: DictConfig) -> None:
    """``check_added_keys`` on the overrides of the running Hydra job; a no-op without Hydra's runtime."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return
    overrides = [str(o) for o in HydraConfig.get().overrides.task]
    if not added_keys(overrides):
        return
    base = None
    if any(kind == "++" for _, _, kind in added_keys(overrides)):
        base = _composed_without_additions(overrides)
    check_added_keys(cfg, overrides, base)
