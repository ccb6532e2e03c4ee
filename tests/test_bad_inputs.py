"""Every bad config input gets one clear line before any work starts (or, for what only training can
tell, a clear end): relations between trainer keys, runs that skip most of their steps, non-finite
router numbers, overlays that replaced the user's data, misspelled keys added with ``+``, and the
paths a config names. ``tests/bad_inputs_table.py`` runs many more inputs on the real command line.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import core.run
from core.checks import ConfigError
from core.engine import NonFiniteLossError, TensorLoader, Trainer, TrainerConfig, seed_everything
from core.overrides import UnknownKeyError, base_keys_of, check_added_keys
from core.run import check_config, run, task_class, with_default_router
from core.validate import check_router
from tests.conftest import CONF_DIR, DOMAINS, compose, router_config, router_names
from tests.core.test_engine import TinyMoENet, _data, evaluate, loss_fn

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = CONF_DIR.parent


def _cli(module: str, *args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, "-m", module, *args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def _one_line(res: subprocess.CompletedProcess, code: int) -> str:
    """The single ``error:`` line of a refused command (exit ``code``, no traceback)."""
    assert res.returncode == code, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, res.stderr[-3000:]
    return lines[0]


def _refused(domain: str, *overrides: str) -> ConfigError:
    """The ``ConfigError`` that the checks of a run (before any data is read) raise."""
    cfg = compose(domain, "debug=default", *overrides)
    with pytest.raises(ConfigError) as exc:
        check_config(cfg, task_class(domain)())
    return exc.value


def _trainer(tmp_path, **overrides) -> Trainer:
    cfg = dict(max_epochs=3, lr=1e-2, log_every_steps=2, progress=False)
    cfg.update(overrides)
    return Trainer(TrainerConfig(**cfg), tmp_path, seed=0, info={"domain": "test", "router": "topk"})


def _fit(tmp_path, loss=loss_fn, **overrides) -> dict:
    """``TinyMoENet`` on 96 examples in batches of 16: 6 steps an epoch, 18 in all."""
    seed_everything(0)
    train = TensorLoader(_data(96), batch_size=16, shuffle=True, drop_last=True)
    test = TensorLoader(_data(48, seed=1), batch_size=32)
    return _trainer(tmp_path, **overrides).fit(TinyMoENet(), train, loss, evaluate, {"test": test})


# ----------------------------------------------------------------- 1. relations in the trainer config


def test_min_lr_above_lr_is_refused():
    with pytest.raises(ValueError, match=r"^trainer\.min_lr=0\.01 is not allowed: it must be <= trainer\.lr=0\.001"):
        TrainerConfig(lr=1e-3, min_lr=1e-2)
    TrainerConfig(lr=1e-3, min_lr=1e-3)  # a constant rate after warmup is fine
    err = _refused("vision", "trainer.min_lr=0.01")  # vision's lr is 2e-3
    assert err.key == "trainer.min_lr" and "<= trainer.lr=0.002" in str(err)


def test_warmup_longer_than_the_run_stops_before_the_first_step(tmp_path):
    with pytest.raises(ConfigError, match=r"^trainer\.warmup_steps=18 is not allowed: the run has only 18 steps"):
        _fit(tmp_path, warmup_steps=18)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "history.jsonl").exists()
    with pytest.raises(ConfigError, match=r"=9 is not allowed: the run has only 5 steps \(trainer\.max_steps=5\)"):
        _fit(tmp_path, warmup_steps=9, max_steps=5)
    assert _fit(tmp_path / "ok", warmup_steps=17)["steps"] == 18


def test_warmup_longer_than_the_run_is_one_line_exit_2_on_the_command_line(tmp_path):
    res = _cli("vision.train", "debug=default", "trainer.warmup_steps=100", tmp_path=tmp_path)
    line = _one_line(res, core.run.CONFIG_ERROR_EXIT)
    assert line.startswith("error: trainer.warmup_steps=100 is not allowed: the run has only 32 steps "
                           "(trainer.max_epochs=2 of 16 batches)"), line
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize("domain", DOMAINS)
def test_debug_runs_fit_their_warmup(domain):
    """The debug overlay's few steps hold its warmup (nlp's and multimodal's own warmup_steps are longer
    than a debug run: the overlay uses warmup_fraction instead)."""
    trainer = compose(domain, "debug=default").trainer
    assert trainer.warmup_steps is None or trainer.warmup_steps < trainer.max_steps


# ------------------------------------------------------------- 2. skip_nonfinite that skips almost all


def _nan_on(steps):
    """``loss_fn`` whose loss is NaN on the training calls ``steps`` (a set of call numbers from 0)."""
    calls = {"n": 0}

    def loss(model, batch):
        value, logs = loss_fn(model, batch)
        n, calls["n"] = calls["n"], calls["n"] + 1
        return (value * float("nan") if n in steps else value), logs

    return loss, calls


def test_a_run_that_skips_most_steps_fails_naming_the_count_and_the_share(tmp_path):
    loss, calls = _nan_on(set(range(2, 18)))  # 16 of 18 steps
    with pytest.raises(NonFiniteLossError, match=r"steps of the run's 18 .* were skipped .*max_skipped_fraction=0\.1"):
        _fit(tmp_path, loss=loss, skip_nonfinite=True)
    assert calls["n"] < 18, "the outcome was certain after 2 skipped steps: the run should stop there"
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "model.pt").exists()


def test_the_run_stops_once_its_share_is_certain_to_exceed_the_limit(tmp_path):
    loss, calls = _nan_on({3, 9, 15})  # 10% of 18 steps is 1.8: the second skipped step decides
    with pytest.raises(NonFiniteLossError, match=r"^2 steps of the run's 18 \(by step 9\) \(11%\) were skipped"):
        _fit(tmp_path, loss=loss, skip_nonfinite=True)
    assert calls["n"] == 10
    loss, _ = _nan_on({3, 9, 15})
    metrics = _fit(tmp_path / "allowed", loss=loss, skip_nonfinite=True, max_skipped_fraction=0.2)
    assert metrics["skipped_steps"] == 3 and metrics["steps"] == 18


def test_a_few_skipped_steps_still_finish(tmp_path):
    loss, _ = _nan_on({5})
    metrics = _fit(tmp_path, loss=loss, skip_nonfinite=True)
    assert metrics["skipped_steps"] == 1 and math.isfinite(metrics["test_loss"])


def test_final_share_counts_the_steps_taken(tmp_path):
    """At the end the share is over the steps the run took (``_check_skipped(final=True)``)."""
    from core.engine.callbacks import TrainState

    trainer = _trainer(tmp_path, skip_nonfinite=True, max_skipped_fraction=0.25)
    trainer._check_skipped(TrainState(step=8, skipped=2), 8, final=True)  # exactly 25%: allowed
    with pytest.raises(NonFiniteLossError, match=r"^3 steps of the run's 8 \(38%\) were skipped"):
        trainer._check_skipped(TrainState(step=8, skipped=3), 8, final=True)


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan"), "half", True])
def test_max_skipped_fraction_must_be_a_share(value):
    with pytest.raises(ValueError, match=r"^trainer\.max_skipped_fraction=.* is not allowed: a number in \[0, 1\]"):
        TrainerConfig(max_skipped_fraction=value)


def test_max_skipped_fraction_is_a_trainer_key_with_its_default():
    assert OmegaConf.load(CONF_DIR / "trainer" / "default.yaml").max_skipped_fraction == 0.1
    assert TrainerConfig().max_skipped_fraction == 0.1


def test_skipping_too_much_exits_1_on_the_command_line(tmp_path, capsys):
    """``core.run.run`` (the command line's run) on a vision task whose loss is NaN on most steps."""
    cls = task_class("vision")

    class NaNTask(cls):
        def build(self, cfg, data):
            task_run = super().build(cfg, data)
            inner, calls = task_run.loss_fn, {"n": 0}

            def loss(model, batch):  # NaN from the second training step on
                value, logs = inner(model, batch)
                calls["n"] += 1
                return (value * float("nan") if calls["n"] > 1 else value), logs

            task_run.loss_fn = loss
            return task_run

    cfg = compose("vision", "debug=default", "trainer.max_steps=12", "trainer.skip_nonfinite=true",
                  f"output_dir={tmp_path}")
    with pytest.raises(SystemExit) as exc:
        run(cfg, NaNTask())
    err = capsys.readouterr().err
    assert exc.value.code == core.run.NONFINITE_EXIT, err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "were skipped for a non-finite loss" in lines[0] and "Traceback" not in err
    assert not (tmp_path / "metrics.json").exists()


# ------------------------------------------------------------------- 3. non-finite router numbers


def _float_keys(name: str) -> list[str]:
    """The router config's keys that hold a real number (and ``capacity_factor``, a number or null)."""
    cfg = OmegaConf.to_container(router_config(name))
    return sorted(k for k, v in cfg.items() if not k.startswith("_") and (
        k == "capacity_factor" or (isinstance(v, float) and not isinstance(v, bool))))


ROUTER_FLOAT_KEYS = [(name, key) for name in router_names() for key in _float_keys(name)]


def test_every_router_has_its_float_keys_listed():
    """The parametrisation below covers every float key of conf/router (a new one is picked up)."""
    assert ("topk", "capacity_factor") in ROUTER_FLOAT_KEYS and ("topk", "noise_std") in ROUTER_FLOAT_KEYS
    assert {k for _, k in ROUTER_FLOAT_KEYS} >= {"temperature", "temperature_init", "route_scale", "gamma", "lr",
                                                 "z_loss_weight", "load_loss_weight", "bias_update_rate"}


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("name,key", ROUTER_FLOAT_KEYS, ids=[f"{n}-{k}" for n, k in ROUTER_FLOAT_KEYS])
def test_a_router_refuses_non_finite_numbers(name, key, value):
    node = OmegaConf.merge(router_config(name), {key: value})
    with pytest.raises(ConfigError) as exc:
        check_router(node, 4, key="router", token_ids=True)
    assert exc.value.key == f"router.{key}", str(exc.value)
    assert "finite" in str(exc.value), str(exc.value)


@pytest.mark.parametrize("name,key,value,allowed", [
    ("topk", "batch_priority", "maybe", "true or false"),
    ("topk", "renormalize", 1, "true or false"),
    ("gshard", "random_routing", "no", "true or false"),
    ("topk", "load_loss_weight", -0.1, ">= 0"),
    ("expert_choice", "noise_std", -1.0, ">= 0"),
    ("sinkhorn_token_choice", "num_iters", 0, ">= 1"),
    ("sparse_expert_choice", "num_steps", 0, ">= 1"),
    ("sparse_token_choice", "lr", 0.0, "> 0"),
    ("deepseek", "route_scale", 0.0, "> 0"),
    ("soft", "slots_per_expert", 1.5, ">= 1"),
    ("hash", "seed", "abc", ">= 0"),
])
def test_a_router_refuses_other_bad_values(name, key, value, allowed):
    with pytest.raises(ConfigError) as exc:
        check_router(OmegaConf.merge(router_config(name), {key: value}), 4, key="router", token_ids=True)
    assert exc.value.key == f"router.{key}" and allowed in str(exc.value), str(exc.value)


def test_every_router_config_still_builds():
    for name in router_names():
        check_router(router_config(name), 4, key="router", token_ids=True, seq_len=64)


def test_capacity_factor_inf_is_one_line_exit_2_on_the_command_line(tmp_path):
    res = _cli("vision.train", "+router=topk", "router.capacity_factor=inf", tmp_path=tmp_path)
    line = _one_line(res, core.run.CONFIG_ERROR_EXIT)
    assert line == "error: router.capacity_factor=inf is not allowed: it must be a finite number > 0, or null for " \
                   "dropless routing.", line


# --------------------------------------------------------- 4. overlays never replace the user's data

# data keys a debug overlay may shrink on any data (sizes, not which data)
DEBUG_SIZES = {"limit_train", "limit_eval", "batch_size", "eval_batch_size", "fashion_mnist_train", "seq_len"}


def _data_options(domain: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / domain / "data").glob("*.yaml"))


@pytest.mark.parametrize("domain,option", [(d, o) for d in DOMAINS for o in _data_options(d)])
def test_a_data_choice_wins_over_the_debug_overlay(domain, option):
    plain = OmegaConf.to_container(compose(domain, f"data={option}").data)
    debug = OmegaConf.to_container(compose(domain, f"data={option}", "debug=default").data)
    changed = {k for k in plain.keys() | debug.keys() if plain.get(k) != debug.get(k)}
    assert changed <= DEBUG_SIZES, (domain, option, {k: (plain.get(k), debug.get(k)) for k in changed})


def test_debug_alone_still_picks_the_tiny_data():
    assert compose("vision", "debug=default").data.name == "digits"
    assert compose("vision", "debug=default").data == compose("vision", "debug=default", "data=digits").data


def test_imagefolder_under_debug_checks_the_folder_the_user_named(tmp_path):
    assert compose("vision", "data=imagefolder", "data.root=/nonexistent", "debug=default").data.name == "imagefolder"
    res = _cli("vision.train", "data=imagefolder", "data.root=/nonexistent", "debug=default", tmp_path=tmp_path)
    line = _one_line(res, core.run.CONFIG_ERROR_EXIT)
    assert line.startswith("error: data.root='/nonexistent' is not allowed: no such directory"), line


# ------------------------------------------------------------------ 5. misspelled keys added with +


def _check(domain: str, *overrides: str, base: bool = True) -> None:
    """``check_added_keys`` as the command line runs it: the composed config (default router put in
    place) and the keys of the config composed without the added keys."""
    cfg = compose(domain, "debug=default", *overrides)
    with_default_router(cfg)
    kept = [o for o in overrides if not o.startswith("+") or o.split("=", 1)[0].lstrip("+") in ("router",)]
    base_keys = base_keys_of(compose(domain, "debug=default", *kept)) if base else None
    check_added_keys(cfg, list(overrides), base_keys)


@pytest.mark.parametrize("domain,override,message", [
    ("vision", "+data.limt_train=5", "data.limt_train=5 is not allowed: there is no such key; did you mean "
                                     "data.limit_train?"),
    ("vision", "+model.num_expert=4", "model.num_expert=4 is not allowed: there is no such key; did you mean "
                                      "model.num_experts?"),
    ("vision", "+sed=1", "sed=1 is not allowed: there is no such key; did you mean seed?"),
    ("nlp", "+model.num_expert=4", "model.num_expert=4 is not allowed: there is no such key; did you mean "
                                   "model.num_experts?"),
    ("recsys", "+data.dataset.val_fracton=0.2", "did you mean data.dataset.val_fraction?"),
    ("vision", "++data.limt_train=5", "did you mean data.limit_train?"),
    ("vision", "+router.top_kk=2", "there is no router node in this run: choose a router with +router=<name>"),
    ("vision", "+model.drop_path_rate=0.1", "other arguments go under model.timm_kwargs"),
    ("nlp", "+model.foo=1", "MoETransformerLM takes the arguments"),
    ("recsys", "+data.dataset.foo=1", "load_adult takes the arguments ['val_fraction', 'test_fraction', 'split_seed']"),
])
def test_a_misspelled_added_key_is_refused_naming_the_closest(domain, override, message):
    with pytest.raises(UnknownKeyError) as exc:
        _check(domain, override)
    assert message in str(exc.value), str(exc.value)
    assert isinstance(exc.value, ConfigError) and exc.value.key == override.lstrip("+").split("=")[0]


def test_a_router_argument_added_after_the_router_names_its_parameters():
    with pytest.raises(UnknownKeyError, match=r"router\.top_kk=2 is not allowed: there is no such key; did you mean "
                                              r"router\.top_k\?$"):
        _check("vision", "+router=topk", "+router.top_kk=2")


def test_a_limoe_argument_goes_through_its_factory():
    """``create_limoe(**kwargs) -> LIMoE``: the keys are LIMoE's arguments."""
    with pytest.raises(UnknownKeyError, match="did you mean model.width"):
        _check("multimodal", "model=limoe", "+model.widht=3")


@pytest.mark.parametrize("domain,overrides", [
    ("vision", ["+model.timm_kwargs.drop_path_rate=0.1"]),      # an open dict of keyword arguments
    ("vision", ["++model.timm_kwargs.drop_path_rate=0.1"]),
    ("vision", ["+trainer.epochs=3"]),                          # TrainerConfig answers for trainer.*
    ("vision", ["++data.limit_train=5"]),                       # ++ on an existing key: a plain override
    ("vision", ["+router=topk"]),                               # a group, not a key
    ("vision", ["+router=topk", "+router._recursive_=false"]),  # Hydra's own keys
    ("nlp", ["+router=topk", "++router.top_k=1"]),
    ("multimodal", ["model=clip", "+model.force_context_length=16"]),  # **kwargs to open_clip
    ("recsys", ["model=mmoe", "+model.one_gate=true"]),         # an argument of the model's _target_
    ("vision", ["data.limit_train=5", "seed=3"]),               # no + at all
])
def test_keys_something_reads_are_allowed(domain, overrides):
    _check(domain, *overrides)
    _check(domain, *overrides, base=False)


def test_trainer_keys_are_left_to_the_trainer():
    err = _refused("vision", "+trainer.epochs=3")
    assert err.key == "trainer.epochs" and "max_epochs" in str(err)


# ---------------------------------------------------------------------- 6. every path, its key named


@pytest.fixture
def files(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text.txt").write_text("not weights\n")
    torch.save({"w": torch.zeros(1)}, tmp_path / "weights.pt")
    (tmp_path / "engine.ckpt").write_bytes(b"MOECKPT1" + bytes(40))
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    return tmp_path


@pytest.mark.parametrize("domain,overrides,key,allowed", [
    ("vision", ["model.upcycle_from=/nonexistent/model.pt"], "model.upcycle_from", "no such file"),
    ("vision", ["model.upcycle_from={p}/empty"], "model.upcycle_from", "it is a directory"),
    ("vision", ["model.upcycle_from={p}/text.txt"], "model.upcycle_from", "not a PyTorch weights file"),
    ("vision", ["model.upcycle_from={p}/engine.ckpt"], "model.upcycle_from", "training checkpoint"),
    ("vision", ["data=imagefolder", "data.root={p}/empty"], "data.train_dir", "no such directory"),
    ("vision", ["data=imagefolder", "data.root={p}/empty", "data.img_size=null"], "data.img_size", ">= 1"),
    ("vision", ["data.crop_padding=-1"], "data.crop_padding", ">= 0"),
    ("recsys", ["data=census_kdd", "data.path=/nonexistent"], "data.path", "no such directory"),
    ("recsys", ["data=census_kdd", "data.path={p}/empty"], "data.path", "census-income.data"),
    ("multimodal", ["data.root=/nonexistent"], "data.root", "no such directory"),
    ("multimodal", ["data.root={p}/empty"], "data.root", "train-images-idx3-ubyte.gz"),
    ("multimodal", ["model.dense_checkpoint=/nonexistent/run"], "model.dense_checkpoint", "no such file or directory"),
    ("multimodal", ["model.dense_checkpoint={p}/run"], "model.dense_checkpoint", "no checkpoint in it"),
    ("multimodal", ["data.openmoji_cache={p}/empty"], "data.openmoji_cache", "not a regular file"),
    ("multimodal", ["data.openmoji_cache={p}/text.txt/cache.npz"], "data.openmoji_cache", "cannot be written"),
    ("multimodal", ["data.val_fraction=1.5"], "data.val_fraction", "(0, 1)"),
    ("nlp", ["data.path=/nonexistent/book.txt"], "data.path", "no such file"),
])
def test_a_path_that_cannot_be_used_stops_in_validation_naming_its_key(domain, overrides, key, allowed, files):
    err = _refused(domain, *[o.format(p=files) for o in overrides])
    assert err.key == key and allowed in str(err), str(err)


def test_usable_paths_pass(files):
    check_config(compose("vision", "debug=default", f"model.upcycle_from={files}/weights.pt"), task_class("vision")())
    (files / "run" / "checkpoints" / "last.ckpt").write_bytes(b"x")
    check_config(compose("multimodal", "debug=default", f"model.dense_checkpoint={files}/run"),
                 task_class("multimodal")())
    check_config(compose("multimodal", "debug=default", f"data.openmoji_cache={files}/new/cache.npz"),
                 task_class("multimodal")())


# ------------------------------------------- 5, on the command line (with core.run's wiring)


def test_a_misspelled_added_key_is_one_line_exit_2_on_the_command_line(tmp_path):
    """Needs ``core.run.check_config`` to call ``core.overrides.check_hydra_overrides(cfg)``."""
    res = _cli("vision.train", "debug=default", "+data.limt_train=5", tmp_path=tmp_path)
    line = _one_line(res, core.run.CONFIG_ERROR_EXIT)
    assert line == "error: data.limt_train=5 is not allowed: there is no such key; did you mean data.limit_train?", line


# ---- what Hydra refuses while composing, and what only the data or the file system can tell ------

@pytest.mark.parametrize("override, message", [
    ("+router=nope", "error: router=nope is not allowed: config group 'router' has no option 'nope'; use one of "),
    ("model=nope", "error: model=nope is not allowed: config group 'model' has no option 'nope'; use one of "),
    ("threads=0", "error: Could not override 'threads'. To append to your config use +threads=0"),
    ("trainer.lr=[1", "error: cannot parse the override 'trainer.lr=[1': "),
])
def test_what_hydra_cannot_compose_is_one_line_exit_2(tmp_path, override, message):
    res = _cli("vision.train", "debug=default", override, tmp_path=tmp_path)
    line = _one_line(res, core.run.CONFIG_ERROR_EXIT)
    assert line.startswith(message), line
    assert len([line for line in res.stderr.splitlines() if line.strip()]) == 1, res.stderr
    if override == "+router=nope":
        assert "expert_choice" in line and "topk" in line  # the options, on the same line
    assert not (tmp_path / "run").exists()


def test_hydra_full_error_keeps_hydras_own_report(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1")
    res = subprocess.run([sys.executable, "-m", "vision.train", "debug=default", "+router=nope"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "Traceback" in res.stderr and "MissingConfigException" in res.stderr


def test_an_unwritable_output_dir_is_one_line_naming_the_key(tmp_path):
    res = _cli("vision.train", "debug=default", "output_dir=/proc/no/run", tmp_path=tmp_path)
    line = _one_line(res, core.run.CONFIG_ERROR_EXIT)
    assert line.startswith("error: output_dir='/proc/no/run' is not allowed: the run directory cannot be created"), line


def test_an_unreadable_image_names_the_file_and_data_root(tmp_path):
    from vision.data import load_imagefolder

    for split in ("train", "val"):
        (tmp_path / split / "cat").mkdir(parents=True)
        (tmp_path / split / "cat" / "a.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ConfigError, match=r"data.root=.* is not allowed: .*/train/cat/a.jpg is not an image that PIL"):
        load_imagefolder(tmp_path, 8)


@pytest.mark.parametrize("override, key", [("data.seq_len=100000000", "data.seq_len=100000000"),
                                           ("data.batch_size=10000000", "data.batch_size=10000000")])
def test_an_lm_batch_whose_activations_cannot_fit_is_refused_with_its_estimate(override, key):
    cfg = compose("nlp", "debug=default", override)
    with pytest.raises(ValueError, match=rf"{key} is not allowed: the activations of one training batch .* would "
                                         r"need [\d.]+ TiB, and this machine has"):
        check_config(cfg, task_class("nlp")())


def test_activation_estimate_counts_blocks_and_logits():
    from nlp.training import activation_bytes

    assert activation_bytes(2, 3, dim=10, depth=1, mlp_ratio=4.0, vocab_size=5) == 4 * 2 * 3 * (8 * 10 + 10)
    assert activation_bytes(2, 6, 10, 2, 4.0) == 2 * activation_bytes(2, 3, 10, 2, 4.0)


def test_torchrec_sharding_with_fsdp_is_refused_by_name():
    """torchrec's DistributedModelParallel brings its own DDP wrapper: FSDP on top is refused before
    any work, naming the key and both ways out."""
    cfg = compose("recsys", "debug=default", "sharding=table_wise", "trainer.data_parallel=fsdp")
    with pytest.raises(ConfigError, match="trainer.data_parallel='fsdp' is not allowed: sharding=table_wise.*"
                                          "trainer.data_parallel=ddp.*sharding=null"):
        check_config(cfg, task_class("recsys")())
