"""Routers by config name, for the factories that take a router outside a Hydra run.

``timm.create_model("vmoe_tiny_patch4_28", router="expert_choice", router_kwargs={...})``, the
``*-MoE`` model JSON of ``open_clip.create_model`` and the suite's ``create_*`` functions accept a
router name where a Hydra run takes ``+router=<name>``. The name is resolved the same way: Hydra
composes ``router/<name>.yaml`` (aliases with a defaults list included) from the suite's ``conf/``,
the entries of ``search_path`` (``hydra.searchpath`` entries: folders holding a ``router/`` group,
as paths or ``file://`` / ``pkg://`` URLs) and any installed Hydra search-path plugin; a router added
in two files (its class and its YAML) is found as on the command line::

    factory = router_factory("expert_choice", {"capacity_factor": 1.0})
    router = factory(dim=96, num_experts=8)        # ExpertChoiceRouter(dim=96, num_experts=8, capacity_factor=1.0, ...)

Hydra is imported on demand only, so model code that receives a partial or a ``Router`` loads none of it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

from core.routers.base import Router

__all__ = ["CONF_DIR", "RouterSpec", "router_config", "router_factory", "router_names"]

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# what a factory's ``router=`` takes: a config name, a partial ``router(dim=D, num_experts=E)``, a shared Router, None
RouterSpec = Union[str, Callable[..., Router], Router, None]
SearchPath = Sequence[Union[str, Path]]


def _searchpath_override(search_path: SearchPath) -> list[str]:
    """``hydra.searchpath=[...]`` for the compose API (paths become ``file://`` URLs)."""
    if not search_path:
        return []
    entries = []
    for entry in search_path:
        text = str(entry)
        if not text.startswith(("file://", "pkg://")):
            text = f"file://{Path(text).expanduser().resolve()}"
        entries.append("'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'")
    return [f"hydra.searchpath=[{','.join(entries)}]"]


@contextlib.contextmanager
def _compose_from(conf_dir: Path) -> Iterator[Any]:
    """Hydra's compose API on ``conf_dir``, also inside a running ``@hydra.main`` application (whose
    global state is set aside and put back)."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    outer = GlobalHydra.instance().hydra
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
            yield GlobalHydra.instance()
    finally:
        GlobalHydra.instance().hydra = outer


def router_names(search_path: SearchPath = (), conf_dir: Path = CONF_DIR) -> list[str]:
    """The router config names Hydra finds (``conf/router/`` and the ``search_path`` entries), sorted."""
    with _compose_from(conf_dir) as gh:
        return sorted(gh.config_loader().get_group_options("router", overrides=_searchpath_override(search_path)))


def router_config(name: str, search_path: SearchPath = (), conf_dir: Path = CONF_DIR):
    """``router/<name>.yaml`` composed as ``+router=<name>`` is (a ``DictConfig`` with ``_target_``).

    Raises ``ValueError`` naming the known routers when there is no such config."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"router={name!r} is not allowed: give a router config name")
    names = router_names(search_path, conf_dir)
    if name not in names:
        raise ValueError(f"router={name!r} is not allowed: name one of the router configs {names} "
                         "(conf/router/<name>.yaml or a search_path entry), or pass a router partial "
                         "router(dim=D, num_experts=E)")
    from hydra import compose

    with _compose_from(conf_dir):
        return compose(overrides=[f"+router={name}", *_searchpath_override(search_path)]).router


def _parameters(cls: type) -> list[str] | None:
    """The keyword parameters of a router class besides ``dim``/``num_experts`` (None: it takes any)."""
    params = inspect.signature(cls).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name not in ("self", "dim", "num_experts")
            and p.kind is not inspect.Parameter.VAR_POSITIONAL]


def router_factory(router: RouterSpec, router_kwargs: Mapping[str, Any] | None = None, *,
                   search_path: SearchPath = ()) -> Callable[..., Router] | Router | None:
    """What a model factory's ``router=`` argument resolves to.

    Args:
        router: a router config name (``"expert_choice"``: ``router/expert_choice.yaml``), a partial
            ``router(dim=D, num_experts=E) -> Router``, a ``Router`` to share, or None (the model's
            default router).
        router_kwargs: keyword arguments over the config's values (or the partial's); refused for a
            built ``Router`` and for None.
        search_path: further config folders holding ``router/`` (``hydra.searchpath`` entries).

    Returns:
        A partial ``router(dim=D, num_experts=E)`` for a name or a partial, the ``Router`` itself, or None.

    Raises ``ValueError`` for an unknown name (listing the known ones) and for a key of
    ``router_kwargs`` the router class does not take (listing its parameters).
    """
    kwargs = dict(router_kwargs or {})
    if isinstance(router, str):
        import hydra

        node = router_config(router, search_path)
        cls = hydra.utils.get_class(node._target_)
        params = _parameters(cls)
        unknown = sorted(set(kwargs) - set(params)) if params is not None else []
        if unknown:
            raise ValueError(f"router_kwargs={kwargs!r} is not allowed: {cls.__name__} (router {router!r}) "
                             f"has no parameter {unknown[0]!r}; its parameters are {params}")
        factory = hydra.utils.instantiate(node, _partial_=True)
        return functools.partial(factory, **kwargs) if kwargs else factory
    if isinstance(router, Router):
        if kwargs:
            raise ValueError(f"router_kwargs={kwargs!r} is not allowed with a built {type(router).__name__}: "
                             "give the router by name or as a partial to set its arguments")
        return router
    if router is None:
        if kwargs:
            raise ValueError(f"router_kwargs={kwargs!r} is not allowed without a router: give router=<name> "
                             "(a conf/router config) as well")
        return None
    if callable(router):
        return functools.partial(router, **kwargs) if kwargs else router
    raise ValueError(f"router={router!r} is not allowed: give a router config name, a partial "
                     "router(dim=D, num_experts=E), a Router or None")
