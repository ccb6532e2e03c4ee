"""The entry-point pattern shared by the four domains' ``python -m <domain>.train``.

``run_main`` wraps a domain's work so that every domain fails the same way:

- the composed config is checked first (the domain's ``validate_config``), before any data is read;
- a config or data problem (``ConfigError``, another ``ValueError``, a missing or unreadable file)
  prints one line, ``error: <key>=<value> is not allowed: <what is allowed>``, on stderr and exits
  with status 2, without a traceback (``HYDRA_FULL_ERROR=1`` re-raises it, as for Hydra's own errors);
- a non-finite loss (``NonFiniteLossError``, naming the step and the loss term) exits with status 1;
- in a Hydra multirun, a router that cannot serve the domain (``NotApplicableError``, or the domain's
  own such errors) writes ``metrics.json`` with ``status: n/a`` and the reason, and the sweep goes on;
- anything else is a bug and keeps its traceback;
- under torchrun, only rank 0 reports the finished run (its summary and the sweeper's objective).

Example (a domain's ``train.py``)::

    @hydra.main(config_path="pkg://conf", config_name="vision", version_base="1.3")
    def main(cfg):
        return run_main(cfg, "vision", prepare=prepare, fit=fit, validate=validate_config,
                        out_dir=output_dir, row=lambda cfg: {"router": router_name(cfg)},
                        objective=lambda metrics: metrics["test_acc"])
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable, Mapping

from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from core.distributed import is_main_process
from core.engine import NonFiniteLossError
from core.checks import ConfigError, NotApplicableError

log = logging.getLogger(__name__)

__all__ = ["CONFIG_ERROR_EXIT", "NONFINITE_EXIT", "is_multirun", "run_main"]

CONFIG_ERROR_EXIT = 2   # the config or the data it names cannot work
NONFINITE_EXIT = 1      # training diverged (NaN/inf loss)

# raised while preparing a run (data, model): the config or its files are at fault (a missing ``???``
# value or a broken interpolation is an OmegaConf error)
_PREPARE_ERRORS = (ValueError, OSError, OmegaConfBaseException)


def is_multirun() -> bool:
    """Whether this process runs one job of a Hydra multirun (``-m``)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _unwrap(err: BaseException) -> BaseException:
    """Hydra's ``InstantiationException`` around a constructor's own ``ValueError``/``OSError``."""
    from hydra.errors import InstantiationException

    while isinstance(err, InstantiationException) and isinstance(err.__cause__, _PREPARE_ERRORS):
        err = err.__cause__
    return err


def _fail(err: BaseException, code: int) -> None:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    message = " ".join(str(err).split("\n")) or type(err).__name__
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _not_applicable(cfg: DictConfig, domain: str, err: BaseException, out_dir: Callable[[DictConfig], Path],
                    row: Callable[[DictConfig], Mapping[str, Any]]) -> None:
    out = Path(out_dir(cfg))
    out.mkdir(parents=True, exist_ok=True)
    record = {"domain": domain, **row(cfg), "status": "n/a", "reason": str(err)}
    (out / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"n/a: {err}", file=sys.stderr, flush=True)


def run_main(cfg: DictConfig, domain: str, *, prepare: Callable[[DictConfig], Any],
             fit: Callable[[Any], dict] | None = None, validate: Callable[[DictConfig], Any] | None = None,
             out_dir: Callable[[DictConfig], Path], row: Callable[[DictConfig], Mapping[str, Any]] | None = None,
             not_applicable: tuple[type[BaseException], ...] = (),
             objective: Callable[[dict], Any] | None = None) -> Any:
    """Validate, prepare and train one run, with the domain-independent error handling above.

    Args:
        cfg: the composed config.
        domain: ``vision``, ``recsys``, ``multimodal`` or ``nlp`` (the ``n/a`` record's ``domain``).
        prepare: ``prepare(cfg)``: reads the data and builds the model (its errors are config/data errors);
            when ``fit`` is None it is the whole run and returns the metrics.
        fit: ``fit(prepared) -> metrics``: the training itself.
        validate: ``validate(cfg)``: the config checks; runs before ``prepare``.
        out_dir: ``out_dir(cfg)``: the run directory (where an ``n/a`` record goes).
        row: ``row(cfg)``: fields of the ``n/a`` record that name the run (router, model).
        not_applicable: the domain's errors that mean "this router cannot serve here"; with
            ``NotApplicableError`` they give an ``n/a`` record in a multirun. A ``ConfigError`` that is not
            a ``NotApplicableError`` always stops: the sweep's shared config is at fault.
        objective: ``objective(metrics)``: the value returned to Hydra's sweepers (default: the metrics).
    """
    row = row or (lambda cfg: {})
    na_types = (NotApplicableError, *not_applicable)
    try:
        if validate is not None:
            validate(cfg)
        prepared = prepare(cfg)
    except NonFiniteLossError as err:
        _fail(err, NONFINITE_EXIT)
    except Exception as err:
        err = _unwrap(err)
        if not isinstance(err, _PREPARE_ERRORS):
            raise
        na = isinstance(err, na_types) and (isinstance(err, NotApplicableError) or not isinstance(err, ConfigError))
        if na and is_multirun():
            _not_applicable(cfg, domain, err, out_dir, row)
            return None
        _fail(err, CONFIG_ERROR_EXIT)
    if fit is None:
        metrics = prepared
    else:
        try:
            metrics = fit(prepared)
        except NonFiniteLossError as err:
            _fail(err, NONFINITE_EXIT)
        except ConfigError as err:
            _fail(err, CONFIG_ERROR_EXIT)
    if not is_main_process():  # under torchrun, rank 0 alone reports (and returns the objective)
        return None
    return objective(metrics) if objective is not None else metrics
