"""Argument checks and the config error every layer of the suite raises: the bottom of ``core``.

Nothing here imports torch, OmegaConf or any other part of the suite, so routers, experts and the
``MoE`` layer can check their arguments without loading the config machinery. ``core.validate``
(config-level checks of a composed run config) is built on these.

Every check raises ``ConfigError`` (a ``ValueError``) naming the key, its value and what is allowed,
e.g. ``trainer.lr=-1.0 is not allowed: it must be > 0.``
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

__all__ = [
    "ConfigError", "NotApplicableError", "check_choice", "check_int", "check_number", "check_readable_dir",
    "check_readable_file", "check_target", "check_whole_groups", "locate", "to_config_error",
]

# "name=value is not allowed: what is allowed" (core's message form), optionally "... is not allowed here: ..."
_MESSAGE = re.compile(r"^(?P<key>[A-Za-z_][\w.\[\]]*)=(?P<value>.+?) (?:is|are) not allowed(?: here)?: (?P<allowed>.+)$",
                      re.S)


class ConfigError(ValueError):
    """A config value that cannot work, named by its key.

    Args:
        key: the dotted config key (``trainer.lr``, ``router.top_k``, ``data.path``).
        value: the value given.
        allowed: what is allowed or how to fix it (one sentence).
    """

    def __init__(self, key: str, value: Any, allowed: str, *, value_repr: str | None = None):
        self.key, self.value, self.allowed = key, value, allowed.rstrip(".")
        self.value_repr = repr(value) if value_repr is None else value_repr
        super().__init__(f"{key}={self.value_repr} is not allowed: {self.allowed}.")


class NotApplicableError(ConfigError):
    """A router (or option) that cannot serve this domain or model, such as hash routing without token
    ids. A single run stops like any ``ConfigError``; a sweep records an ``n/a`` row and goes on."""


def to_config_error(err: Exception, prefix: str = "", key: str | None = None, value: Any = None,
                    cls: type[ConfigError] = ConfigError) -> ConfigError:
    """``err`` (a ``ValueError`` of core's form ``name=value is not allowed: ...``) as a ``ConfigError``
    whose key is ``prefix + name``; other messages become ``key=value is not allowed: <message>``."""
    if isinstance(err, ConfigError) and not prefix and key is None:
        return err
    m = _MESSAGE.match(str(err).strip())
    if m:
        name = m["key"] if m["key"].startswith(prefix) else prefix + m["key"]
        return cls(name, None, m["allowed"], value_repr=m["value"])
    return cls(key or prefix.rstrip("."), value, str(err))


# ----------------------------------------------------------------------------------- simple values


def check_int(key: str, value: Any, minimum: int = 1, optional: bool = False) -> None:
    """An integer >= ``minimum`` (or None when ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(key, value, f"it must be an integer >= {minimum}" + (" or null" if optional else ""))


def check_number(key: str, value: Any, *, gt: float | None = None, ge: float | None = None,
                 optional: bool = False) -> None:
    """A finite number ``> gt`` / ``>= ge`` (or None when ``optional``)."""
    if optional and value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value and abs(value) != float("inf")
    if ok and gt is not None:
        ok = value > gt
    if ok and ge is not None:
        ok = value >= ge
    if not ok:
        bound = f" > {gt}" if gt is not None else f" >= {ge}" if ge is not None else ""
        raise ConfigError(key, value, f"it must be a finite number{bound}" + (" or null" if optional else ""))


def check_choice(key: str, value: Any, choices: Iterable) -> None:
    choices = list(choices)
    if value not in choices:
        raise ConfigError(key, value, f"use one of {choices}")


def check_whole_groups(batch_key: str, batch: int, group_key: str, group: int, unit: str = "examples") -> None:
    """Evaluation batches of ``batch`` examples that hold whole routing groups of ``group`` examples (a
    model that cuts its batches into fixed groups): then the groups, and the outputs of routers that
    decide over a group, are the same consecutive examples of a split at every evaluation batch size."""
    check_int(group_key, group)
    if batch % group:
        fit = -(-batch // group) * group
        raise ConfigError(batch_key, batch, f"evaluation batches must hold whole routing groups of {group_key}={group} "
                          f"{unit}, or predictions would depend on the evaluation batch: use a multiple of "
                          f"{group} (e.g. {fit}) or change {group_key}")


def _given_path(key: str, path: Any, what: str, hint: str) -> Path:
    """The path a key names (``~`` expanded), or the error that it names none."""
    if path is None or str(path) == "":
        raise ConfigError(key, path, f"give {what}{hint}")
    return Path(str(path)).expanduser()


def check_readable_file(key: str, path: Any, hint: str = "") -> Path:
    """An existing, readable regular file."""
    p = _given_path(key, path, "the path of a file", hint)
    if not p.exists():
        raise ConfigError(key, str(path), f"no such file (looked at {p.resolve()}){hint}")
    if not p.is_file():
        raise ConfigError(key, str(path), f"it is not a regular file (looked at {p.resolve()}){hint}")
    if not os.access(p, os.R_OK):
        raise ConfigError(key, str(path), f"the file is not readable by this user (permissions){hint}")
    return p


def check_readable_dir(key: str, path: Any, hint: str = "") -> Path:
    """An existing, readable directory."""
    p = _given_path(key, path, "a directory", hint)
    if not p.is_dir():
        raise ConfigError(key, str(path), f"no such directory (looked at {p.resolve()}){hint}")
    if not os.access(p, os.R_OK | os.X_OK):
        raise ConfigError(key, str(path), f"the directory is not readable by this user{hint}")
    return p


def check_target(key: str, target: Any, base: type | None = None, hint: str = ""):
    """``_target_`` names an importable object (a subclass of ``base`` when given); returns it."""
    if not isinstance(target, str) or not target:
        raise ConfigError(key, target, f"a dotted path to a class or function{hint}")
    obj = locate(target)
    if obj is None:
        raise ConfigError(key, target, f"no such class or function can be imported{hint}")
    if base is not None and not (isinstance(obj, type) and issubclass(obj, base)):
        raise ConfigError(key, target, f"it is not a {base.__name__} class{hint}")
    return obj


def locate(path: str):
    """The object at a dotted path (the longest importable module, then attributes), or None."""
    import importlib

    parts = path.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for name in parts[i:]:
                obj = getattr(obj, name)
        except AttributeError:
            return None
        return obj
    return None
