"""timm's optimizer and scheduler factories behind ``trainer.optimizer``/``trainer.scheduler``; the
defaults (the suite's AdamW, warmup-cosine) stay what every documented result used."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from core.checks import ConfigError
from core.engine import TensorLoader, Trainer, TrainerConfig, build_optimizer, build_scheduler, seed_everything
from core.engine.optim import TimmSchedule
from core.run import check_config, task_class
from tests.conftest import compose
from tests.core.test_engine import TinyMoENet, _data, evaluate, loss_fn

pytestmark = pytest.mark.usefixtures("one_thread")


def _lrs(cfg: TrainerConfig, steps: int, total: int) -> list[float]:
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total)
    out = []
    for _ in range(steps):
        out.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    return out


def test_the_defaults_are_the_suites_adamw_and_warmup_cosine():
    cfg = TrainerConfig(lr=0.1, min_lr=0.001, warmup_steps=2)
    assert (cfg.optimizer, cfg.scheduler) == ("adamw", "warmup_cosine")
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = build_optimizer(model, cfg)
    assert type(opt) is torch.optim.AdamW
    assert isinstance(build_scheduler(opt, cfg, 10), torch.optim.lr_scheduler.LambdaLR)


@pytest.mark.parametrize("name, cls", [("sgd", "SGD"), ("lamb", "Lamb"), ("lion", "Lion")])
def test_a_timm_optimizer_keeps_the_decay_groups(name, cls):
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    opt = build_optimizer(model, TrainerConfig(optimizer=name, weight_decay=0.1))
    assert type(opt).__name__ == cls
    decays = sorted((g["weight_decay"], sum(p.numel() for p in g["params"])) for g in opt.param_groups)
    assert decays == [(0.0, 4 + 4 + 4), (0.1, 16)]  # bias and both norm vectors undecayed; the matrix decayed


def test_a_timm_cosine_warms_up_then_decays_to_min_lr():
    lrs = _lrs(TrainerConfig(lr=0.1, min_lr=0.001, warmup_steps=3, scheduler="cosine"), 21, 20)
    assert lrs[0] < lrs[1] < lrs[2] < lrs[3] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:20]))
    assert lrs[20] == pytest.approx(0.001, rel=1e-3)


def test_a_timm_schedule_resumes_where_it_stopped():
    cfg = TrainerConfig(lr=0.1, min_lr=0.001, warmup_steps=2, scheduler="cosine", optimizer="sgd")
    whole = _lrs(cfg, 12, 12)
    model = nn.Linear(4, 4)
    opt = build_optimizer(model, cfg)
    first = build_scheduler(opt, cfg, 12)
    for _ in range(5):
        opt.step()
        first.step()
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint keeps
    opt2 = build_optimizer(model, cfg)
    second = build_scheduler(opt2, cfg, 12)
    assert isinstance(second, TimmSchedule)
    second.load_state_dict(state)
    rest = []
    for _ in range(7):
        rest.append(second.get_last_lr()[0])
        opt2.step()
        second.step()
    assert rest == pytest.approx(whole[5:])


def test_the_engine_trains_with_a_timm_optimizer_and_schedule(tmp_path):
    seed_everything(0)
    train = TensorLoader(_data(96), batch_size=16, shuffle=True, drop_last=True)
    test = TensorLoader(_data(48, seed=1), batch_size=32)
    cfg = TrainerConfig(max_epochs=2, lr=1e-2, log_every_steps=2, progress=False, optimizer="lamb", scheduler="cosine")
    metrics = Trainer(cfg, tmp_path, seed=0, info={"domain": "test", "router": "topk"}).fit(
        TinyMoENet(), train, loss_fn, evaluate, {"test": test})
    assert metrics["steps"] == 12 and math.isfinite(metrics["test_loss"])


@pytest.mark.parametrize("override, message", [
    ("trainer.optimizer=nope", "trainer.optimizer='nope' is not allowed: use adamw (the default) or one of timm's"),
    ("trainer.scheduler=plateau", "trainer.scheduler='plateau' is not allowed: use warmup_cosine"),
])
def test_unknown_names_are_refused_before_any_work(override, message):
    with pytest.raises(ConfigError) as exc:
        check_config(compose("vision", "debug=default", override), task_class("vision")())
    assert str(exc.value).startswith(message), str(exc.value)
