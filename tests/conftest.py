"""Shared test helpers: a domain's composed config, and the router configs of ``conf/router/`` by name.

``compose(domain, *overrides)`` composes ``conf/<domain>/train.yaml`` as ``python -m <domain>.train``
does (every test that needs a real config goes through it). Any test that takes a ``router_name``
argument is run once per ``conf/router/*.yaml`` (a new router file is picked up without editing the
tests); ``make_router(name)`` instantiates that config into the partial ``router(dim=D, num_experts=E)``
the MoE layer calls.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import hydra
import pytest
import torch
from hydra import initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
ROUTER_CONF_DIR = CONF_DIR / "router"
DOMAINS = ("vision", "recsys", "multimodal", "nlp")


def compose(domain: str, *overrides: str, return_hydra_config: bool = False) -> DictConfig:
    """The primary config of ``python -m <domain>.train`` (``conf/<domain>/train.yaml``, loaded as
    ``pkg://conf/<domain>`` like the entry point; its ``hydra.searchpath`` finds the shared groups of
    ``conf/``) with the command-line ``overrides``. ``return_hydra_config=True`` keeps the ``hydra``
    node (run and sweep directories, sweeper params, runtime choices)."""
    if domain not in DOMAINS:
        raise ValueError(f"domain={domain!r}: use one of {DOMAINS}")
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module=f"conf.{domain}", version_base="1.3"):
        return hydra.compose(config_name="train", overrides=list(overrides), return_hydra_config=return_hydra_config)


def router_names() -> list[str]:
    return sorted(p.stem for p in ROUTER_CONF_DIR.glob("*.yaml"))


@functools.lru_cache(maxsize=None)
def router_config(name: str) -> DictConfig:
    """The router config as Hydra composes it (files with a ``defaults`` list, e.g. aliases, included)."""
    cfg = OmegaConf.load(ROUTER_CONF_DIR / f"{name}.yaml")
    if "defaults" not in cfg:
        return cfg
    return compose("vision", f"+router={name}").router   # the router group is shared: any domain


def make_router_partial(name: str):
    return hydra.utils.instantiate(router_config(name))


def pytest_generate_tests(metafunc):
    if "router_name" in metafunc.fixturenames:
        metafunc.parametrize("router_name", router_names())


@pytest.fixture
def make_router():
    """``make_router(name)`` -> the instantiated (partial) router config ``conf/router/<name>.yaml``."""
    return make_router_partial


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules of tiny tensors: on a busy machine, OpenMP threads spin-wait
    for each other longer than the work takes. Use: ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def kill_at_first_checkpoint(cmd: list[str], run_dir: Path, env: dict, timeout_s: float = 240) -> Path:
    """Start the training command ``cmd`` (writing to ``run_dir``) as a real process and SIGKILL it as
    soon as its first checkpoint exists; returns that checkpoint's path. Fails when the run ended by
    itself first or got as far as writing its metrics."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, cwd=CONF_DIR.parent, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + timeout_s
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(60) == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (run_dir / "metrics.json").exists()
    return ckpt


@pytest.fixture(autouse=True, scope="session")
def _token_cache(tmp_path_factory):
    """Tokenised text files go to a temporary cache, not the user's ``~/.cache/moe-suite`` (runs
    started by tests inherit it)."""
    old = os.environ.get("MOE_SUITE_CACHE")
    os.environ["MOE_SUITE_CACHE"] = str(tmp_path_factory.mktemp("moe_suite_cache"))
    yield
    if old is None:
        os.environ.pop("MOE_SUITE_CACHE", None)
    else:
        os.environ["MOE_SUITE_CACHE"] = old
