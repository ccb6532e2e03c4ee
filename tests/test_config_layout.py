"""The config layout: one root per domain (``conf/<domain>/train.yaml`` and its groups ``model/``,
``data/``, ``debug/``, ``experiment/``), the shared groups at the top of ``conf/`` (``router/``,
``trainer/``, ``logger/``, ``hydra/``, ``shared/``) found through ``hydra.searchpath``.

Every primary and every experiment composes in its domain; a model of another domain is refused by
Hydra with the domain's own options; no file is an alias or an empty placeholder; what the domains
share (the debug overlay, the router study's sweep) is written once, in ``conf/shared/``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, DOMAINS, compose

REPO = CONF_DIR.parent
SHARED_GROUPS = ("router", "trainer", "logger", "hydra", "shared")
ROUTERS = "topk,mixtral,expert_choice,soft"
# conf/router/ files are public router names (+router=<name>); this one is the router study's name for
# topk and reads topk's values through its defaults list.
ROUTER_ALIASES = {"router/softmax_token_choice.yaml"}


def _yaml_files(root: Path = CONF_DIR) -> list[Path]:
    return sorted(root.rglob("*.yaml"))


def _experiments() -> list[tuple[str, str]]:
    return [(d, p.stem) for d in DOMAINS for p in sorted((CONF_DIR / d / "experiment").glob("*.yaml"))]


def _leaf_keys(node, prefix: str = "") -> set[str]:
    if not isinstance(node, dict):
        return {prefix}
    return set().union(*(_leaf_keys(v, f"{prefix}{k}.") for k, v in node.items() if k != "defaults")) if node else set()


def _plain(cfg) -> dict:
    """The composed config without the hydra node, every interpolation resolved."""
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True)


# ------------------------------------------------------------------------------------------- layout


def test_top_level_holds_only_shared_groups_and_domain_roots():
    dirs = {p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert dirs == set(SHARED_GROUPS) | set(DOMAINS)
    assert not list(CONF_DIR.glob("*.yaml")), "primary configs live in conf/<domain>/train.yaml"
    for domain in DOMAINS:
        root = CONF_DIR / domain
        assert (root / "train.yaml").is_file() and (root / "__init__.py").is_file()   # pkg://conf/<domain>
        assert {"model", "data", "debug", "experiment"} <= {p.name for p in root.iterdir() if p.is_dir()}
        assert not {p.name for p in root.iterdir() if p.is_dir()} & set(SHARED_GROUPS), domain


@pytest.mark.parametrize("domain", DOMAINS)
def test_entry_point_loads_the_domain_root(domain):
    source = (REPO / domain / "train.py").read_text()
    mains = re.findall(r"@hydra\.main\((.*)\)", source)
    assert len(mains) == 1, mains
    assert f'config_path="pkg://conf/{domain}"' in mains[0] and 'config_name="train"' in mains[0], mains[0]


@pytest.mark.parametrize("domain", DOMAINS)
def test_primary_searches_the_shared_groups_and_writes_under_its_domain(domain):
    cfg = compose(domain, return_hydra_config=True)
    primary = OmegaConf.load(CONF_DIR / domain / "train.yaml")
    assert list(primary.hydra.searchpath) == ["pkg://conf"]
    assert cfg.domain == domain
    assert cfg.hydra.run.dir.startswith(f"outputs/{domain}/") and cfg.hydra.sweep.dir.startswith(f"multirun/{domain}/")
    choices = cfg.hydra.runtime.choices
    assert choices.debug is None and choices.experiment is None and choices.trainer == "default"
    assert set(cfg.logger) == {"csv"}       # a list default (logger=[csv,tensorboard]): not in choices
    assert "router" not in choices and cfg.get("router") is None     # +router=<name> adds it


# ------------------------------------------------------------------------------------------ compose


@pytest.mark.parametrize("domain", DOMAINS)
def test_primary_composes_with_and_without_debug(domain):
    shared = OmegaConf.load(CONF_DIR / "shared" / "debug.yaml")
    plain = _plain(compose(domain))
    debug = _plain(compose(domain, "debug=default"))   # a null default: no "+" needed
    assert plain["domain"] == debug["domain"] == domain and "output_dir" in plain
    for group in ("trainer", "data"):
        for key, value in shared[group].items():
            assert debug[group][key] == value, (domain, group, key)
    assert plain["trainer"]["max_steps"] != debug["trainer"]["max_steps"]


@pytest.mark.parametrize("domain,name", _experiments(), ids=[f"{d}-{n}" for d, n in _experiments()])
def test_every_experiment_composes_in_its_domain(domain, name):
    cfg = compose(domain, f"experiment={name}", return_hydra_config=True)
    assert cfg.hydra.runtime.choices.experiment == name
    assert _plain(cfg)["domain"] == domain
    if cfg.hydra.mode is not None and cfg.hydra.mode.name == "MULTIRUN":
        assert cfg.hydra.sweep.dir.startswith("multirun/"), cfg.hydra.sweep.dir
        assert cfg.hydra.sweeper.params, "a sweep with nothing to sweep"


@pytest.mark.parametrize("domain", DOMAINS)
def test_router_study_is_the_shared_sweep_at_the_domains_budget(domain):
    study = compose(domain, "experiment=router_study", return_hydra_config=True)
    dense = compose(domain, "experiment=router_study_dense", return_hydra_config=True)
    for cfg in (study, dense):
        sweep = OmegaConf.to_container(cfg.hydra.sweep)   # unresolved
        assert cfg.hydra.mode.name == "MULTIRUN" and sweep["subdir"] == "${hydra.job.override_dirname}"
        assert list(cfg.hydra.job.config.override_dirname.exclude_keys) == ["experiment"]
        assert cfg.hydra.sweeper.params.seed == "0,1,2"
    assert study.hydra.sweep.dir == f"multirun/router_study/{domain}"
    assert dense.hydra.sweep.dir == f"multirun/router_study/{domain}/dense"
    assert study.hydra.sweeper.params["+router"] == ROUTERS
    assert "+router" not in dense.hydra.sweeper.params
    # the same budget in both rows: only the model differs
    a, b = _plain(study), _plain(dense)
    assert a["trainer"] == b["trainer"] and a["data"] == b["data"]
    assert a["model"] != b["model"] or a.get("model_name") != b.get("model_name")
    # the domain's files add a budget, never sweep settings of their own
    for name in ("router_study", "router_study_dense"):
        assert "hydra" not in OmegaConf.load(CONF_DIR / domain / "experiment" / f"{name}.yaml")


def test_a_model_of_another_domain_is_refused_with_the_domains_options():
    cfg = compose("recsys", "model=mmoe", "data=adult")
    assert cfg.model._target_ == "recsys.models.MMoE" and cfg.data.dataset._target_ == "recsys.data.load_adult"
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as exc:
        compose("vision", "model=mmoe")
    message = str(exc.value)
    assert "Could not find 'model/mmoe'" in message and "Available options" in message
    options = message.split("Available options", 1)[1]
    for model in (CONF_DIR / "vision" / "model").glob("*.yaml"):
        assert model.stem in options
    assert "ple" not in options.split() and "clip_moe" not in options.split()


# ------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(CONF_DIR)))
def test_no_alias_no_placeholder(path):
    rel = str(path.relative_to(CONF_DIR))
    content = OmegaConf.to_container(OmegaConf.load(path)) if path.read_text().strip() else None
    assert content, f"{rel} is an empty placeholder: use a null default (`- debug: null`) instead"
    defaults = content.get("defaults", [])
    for entry in defaults:
        text = entry if isinstance(entry, str) else " ".join(f"{k}: {v}" for k, v in entry.items())
        assert "${" not in text and not text.startswith("optional "), f"{rel}: an interpolated default ({text})"
    targets = [e for e in defaults if e != "_self_"]
    if set(content) == {"defaults"} and len(targets) == 1 and rel not in ROUTER_ALIASES:
        pytest.fail(f"{rel} is an alias of {targets[0]}: select the file itself")


def test_shared_debug_values_are_written_once():
    """Every key of conf/shared/debug.yaml is set there and in no domain's debug overlay, and every
    domain's overlay includes the shared one."""
    overlays = sorted(CONF_DIR.glob("*/debug/*.yaml"))
    assert {p.parent.parent.name for p in overlays} == set(DOMAINS)
    shared = _leaf_keys(OmegaConf.to_container(OmegaConf.load(CONF_DIR / "shared" / "debug.yaml")))
    assert {"trainer.max_steps.", "trainer.max_epochs.", "data.limit_train."} <= shared
    for key in shared:
        holders = [p for p in [CONF_DIR / "shared" / "debug.yaml", *overlays]
                   if key in _leaf_keys(OmegaConf.to_container(OmegaConf.load(p)))]
        assert holders == [CONF_DIR / "shared" / "debug.yaml"], (key, holders)
    for p in overlays:
        assert "/shared/debug" in OmegaConf.load(p).defaults, p


def test_shared_sweep_settings_are_written_once():
    """The router study's sweep (mode, seeds, routers, directories) is only in conf/shared/."""
    owners = [p for p in _yaml_files() if f"+router: {ROUTERS}" in p.read_text()]
    assert owners == [CONF_DIR / "shared" / "router_study.yaml"]
    study_files = [p for p in _yaml_files() if "router_study" in p.read_text()]   # in name or in defaults
    seeds = [p for p in study_files if re.search(r"^\s+seed: \d+(,\d+)+$", p.read_text(), re.M)]   # a seed sweep
    assert seeds == [CONF_DIR / "shared" / "router_study_dense.yaml"]
