"""core.engine: schedule, optimizer groups, data order, checkpoints, resume, non-finite guard, outputs,
callbacks."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import core.engine.loop
from core.engine import (
    Callback, NonFiniteLossError, TensorLoader, Trainer, TrainerConfig, TrainState, build_optimizer,
    count_parameters, find_checkpoint, load_checkpoint, save_checkpoint, seed_everything, warmup_cosine,
    write_json_atomic,
)
from core.moe import MoE
from core.routers.topk import TopKRouter

pytestmark = pytest.mark.usefixtures("one_thread")


class TinyMoENet(nn.Module):
    """Linear -> MoE FFN (residual) -> Linear classifier: enough to exercise every engine path."""

    def __init__(self, router=None):
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.moe = MoE(16, 32, num_experts=4, router=router or functools.partial(TopKRouter, top_k=2))
        self.norm = nn.LayerNorm(16)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = self.inp(x)[:, None, :].expand(-1, 4, -1)  # 4 "tokens" per example
        h = h + self.moe(h)
        return self.out(self.norm(h.mean(1)))


def _data(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y), {"batch_mean": x.mean()}


def evaluate(model, batches):
    correct = n = 0
    loss = 0.0
    for x, y in batches:
        logits = model(x)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        n += len(y)
    return {"acc": correct / n, "loss": loss / n}


def fit(tmp_path, seed=0, model=None, loss=loss_fn, callbacks=(), n=96, **overrides):
    """Train ``TinyMoENet`` on ``n`` examples (16 a batch: 6 steps an epoch by default)."""
    seed_everything(seed)
    model = model or TinyMoENet()
    x, y = _data(n)
    cfg = dict(max_epochs=3, lr=1e-2, checkpoint_every_steps=4, log_every_steps=2, progress=False)
    cfg.update(overrides)
    trainer = Trainer(TrainerConfig(**cfg), tmp_path, seed=seed, info={"domain": "test", "router": "topk"})
    train = TensorLoader((x, y), batch_size=16, shuffle=True, drop_last=True)
    test = TensorLoader(_data(48, seed=1), batch_size=32)
    return trainer.fit(model, train, loss, evaluate, {"test": test}, callbacks=callbacks), model


FINAL = ("test_acc", "test_loss", "load_cv2", "importance_cv2", "dropped_fraction", "steps", "params_active")


def test_warmup_then_cosine():
    f = warmup_cosine(warmup_steps=4, total_steps=14, min_ratio=0.1)
    assert [f(i) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert f(4) == pytest.approx(1.0) and f(9) == pytest.approx(0.55) and f(14) == pytest.approx(0.1)
    assert all(f(i) >= f(i + 1) for i in range(4, 20))


def test_no_weight_decay_on_biases_norms_and_expert_biases():
    model = TinyMoENet()
    opt = build_optimizer(model, TrainerConfig(weight_decay=0.1))
    decayed = {id(p) for p in opt.param_groups[0]["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names == {"inp.weight", "moe.router.weight", "moe.experts.w1_EDF", "moe.experts.w2_EFO", "out.weight"}
    assert opt.param_groups[1]["weight_decay"] == 0.0


def test_tensor_loader_order_depends_on_seed_and_epoch_and_resumes_anywhere():
    x = torch.arange(40)
    loader = TensorLoader((x,), batch_size=8, shuffle=True)
    e0 = [b[0] for b in loader.batches(epoch=0, seed=3)]
    assert torch.equal(torch.cat(e0).sort().values, x)
    assert all(torch.equal(a[0], b) for a, b in zip(loader.batches(epoch=0, seed=3, start=2), e0[2:]))
    assert not torch.equal(torch.cat(e0), torch.cat([b[0] for b in loader.batches(epoch=1, seed=3)]))
    assert not torch.equal(torch.cat(e0), torch.cat([b[0] for b in loader.batches(epoch=0, seed=4)]))


def test_trainer_config_rejects_bad_values_naming_the_key():
    with pytest.raises(ValueError, match=r"trainer.lr=-1"):
        TrainerConfig(lr=-1)
    with pytest.raises(ValueError, match=r"trainer.device='tpu'.*auto, cpu, cuda"):
        TrainerConfig(device="tpu")
    with pytest.raises(ValueError, match=r"trainer.max_epochs=0"):
        TrainerConfig(max_epochs=0)
    with pytest.raises(ValueError, match=r"trainer.epochs is not a trainer key.*max_epochs"):
        TrainerConfig.from_mapping({"epochs": 3})


def test_fit_writes_metrics_and_history(tmp_path):
    metrics, model = fit(tmp_path)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["domain"] == "test" and saved["router"] == "topk"
    for key in ("test_acc", "test_loss", "examples_per_s", "params_total", "params_active", "load_cv2",
                "dropped_fraction", "wall_time_s", "flops_per_example", "steps"):
        assert saved[key] is not None, key
    assert saved["steps"] == 3 * (96 // 16) and saved["epochs"] == 3
    assert saved["params_active"] < saved["params_total"] == sum(p.numel() for p in model.parameters())
    assert saved["test_acc"] > 0.5  # the task is learnable
    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    epochs = [h for h in history if h.get("end_of_epoch")]
    assert [h["epoch"] for h in epochs] == [0, 1, 2] and all("test_acc" in h for h in epochs)
    steps = [h for h in history if not h.get("end_of_epoch")]
    assert steps and all({"loss", "lr", "aux_importance", "aux_load", "batch_mean"} <= h.keys() for h in steps)
    # the logged loss is the task loss plus the routers' auxiliary losses
    h = steps[0]
    assert h["loss"] == pytest.approx(h["task_loss"] + h["aux_importance"] + h["aux_load"], rel=1e-5)
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]


def test_active_parameters_follow_experts_per_token():
    model = TinyMoENet()
    expert = sum(p.numel() for p in model.moe.experts.parameters())
    total, active = count_parameters(model)  # before any forward: the router's top_k
    assert active == pytest.approx(total - expert * (1 - 2 / 4))
    stats = {"layers": {"moe": {"experts_per_token": 1.0}}}
    assert count_parameters(model, stats)[1] == pytest.approx(total - expert * 3 / 4)


def test_same_seed_same_metrics(tmp_path):
    a, _ = fit(tmp_path / "a", seed=7)
    b, _ = fit(tmp_path / "b", seed=7)
    c, _ = fit(tmp_path / "c", seed=8)
    assert {k: a[k] for k in FINAL} == {k: b[k] for k in FINAL}
    assert a["test_loss"] != c["test_loss"]


class _Crash(Exception):
    pass


def test_resume_mid_epoch_reproduces_the_uninterrupted_run(tmp_path):
    ref, _ = fit(tmp_path / "ref")
    calls = {"n": 0}

    def crashing_loss(model, batch):  # dies at step 10, after the step-8 checkpoint (mid epoch 1)
        calls["n"] += 1
        if calls["n"] == 11:
            raise _Crash
        return loss_fn(model, batch)

    with pytest.raises(_Crash):
        fit(tmp_path / "run", loss=crashing_loss)
    ck = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert (ck["state"]["epoch"], ck["state"]["batch"], ck["state"]["step"]) == (1, 2, 8)
    resumed, _ = fit(tmp_path / "run", resume=True)
    assert {k: resumed[k] for k in FINAL} == {k: ref[k] for k in FINAL}
    # history: the killed process's lines after the checkpoint are dropped, then the run continues
    def trace(d):
        return [(h["step"], h.get("loss"), h.get("test_acc")) for h in map(json.loads, (d / "history.jsonl").read_text().splitlines())]
    assert trace(tmp_path / "run") == trace(tmp_path / "ref")


def test_corrupt_last_checkpoint_falls_back_to_previous(tmp_path):
    path = tmp_path / "checkpoints" / "last.ckpt"
    save_checkpoint(path, {"state": 1})
    save_checkpoint(path, {"state": 2})
    assert load_checkpoint(path)["state"] == 2 and load_checkpoint(path.with_name("prev.ckpt"))["state"] == 1
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # truncated by a crash
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_checkpoint(path)
    found, ck = find_checkpoint(True, tmp_path)
    assert found.name == "prev.ckpt" and ck["state"] == 1
    flipped = bytearray(raw)
    flipped[-5] ^= 0xFF  # same length, one byte changed
    path.write_bytes(bytes(flipped))
    assert find_checkpoint(True, tmp_path)[0].name == "prev.ckpt"


def test_resume_after_a_corrupt_checkpoint_continues_from_the_previous_one(tmp_path):
    fit(tmp_path, max_epochs=2)
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:100])
    metrics, _ = fit(tmp_path, max_epochs=2, resume=True)
    assert metrics["steps"] == 12 and math.isfinite(metrics["test_loss"])


class NaNLoadRouter(TopKRouter):
    """Top-k whose 'load' auxiliary loss turns NaN from its 3rd training forward on."""

    def forward(self, x, mask=None, **kw):
        routing = super().forward(x, mask, **kw)
        self.calls = getattr(self, "calls", 0) + 1
        if self.training and self.calls >= 3:
            self.aux_losses["load"] = self.aux_losses["load"] * float("nan")
        return routing


def test_non_finite_aux_loss_stops_naming_step_and_term(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"step 2 .*auxiliary loss 'load'"):
        fit(tmp_path, model=TinyMoENet(router=NaNLoadRouter))
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt") if (tmp_path / "checkpoints").exists() else None
    assert ck is None or all(torch.isfinite(v).all() for v in ck["model"].values())


def test_non_finite_task_loss_is_named(tmp_path):
    def nan_loss(model, batch):
        loss, logs = loss_fn(model, batch)
        return loss * float("inf"), logs

    with pytest.raises(NonFiniteLossError, match=r"step 0 .*task loss=(nan|inf)"):
        fit(tmp_path, loss=nan_loss)


def test_skip_nonfinite_skips_steps_and_keeps_finite_weights(tmp_path):
    metrics, model = fit(tmp_path, model=TinyMoENet(router=NaNLoadRouter), skip_nonfinite=True,
                         max_skipped_fraction=1.0)  # all but 2 steps skipped: allowed here
    assert metrics["skipped_steps"] == metrics["steps"] - 2
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


class CountingRouter(TopKRouter):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.updates = 0

    def after_optimizer_step(self):
        self.updates += 1


def test_after_optimizer_step_runs_once_per_step(tmp_path):
    model = TinyMoENet(router=CountingRouter)
    metrics, _ = fit(tmp_path, model=model, max_epochs=1)
    assert model.moe.router.updates == metrics["steps"] == 6


def test_max_steps_stops_mid_epoch_and_evaluates(tmp_path):
    metrics, _ = fit(tmp_path, max_steps=5)
    assert metrics["steps"] == 5 and "test_acc" in metrics
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert ck["state"]["step"] == 5 and ck["state"]["batch"] == 5
    again, _ = fit(tmp_path, max_steps=5, resume=True)  # nothing left to do: same final metrics
    assert {k: again[k] for k in FINAL} == {k: metrics[k] for k in FINAL}


# ------------------------------------------------------------------------------------------- callbacks


class Recorder(Callback):
    """Every hook call as ``(hook, step)``, with the step records, evaluations and what the trainer shows."""

    def __init__(self):
        self.events, self.records, self.evaluations, self.seen = [], [], [], []

    def on_fit_start(self, trainer, model, state):
        assert isinstance(state, TrainState) and next(model.parameters()).device.type == trainer.device.type
        self.seen.append((trainer.out_dir, trainer.cfg.max_epochs, trainer.rank, trainer.world_size, trainer.is_main))
        self.events.append(("fit_start", state.step))

    def on_step_start(self, trainer, model, state):
        assert model.training
        self.events.append(("step_start", state.step))

    def on_step_end(self, trainer, model, state, record):
        self.records.append(record)
        self.events.append(("step_end", state.step))

    def on_evaluate(self, trainer, model, state, metrics):
        self.evaluations.append(dict(metrics))
        self.events.append(("evaluate", state.step))

    def on_epoch_end(self, trainer, model, state):
        self.events.append(("epoch_end", state.epoch, state.step))

    def on_fit_end(self, trainer, model, metrics):
        self.events.append(("fit_end", metrics["steps"]))


def _epoch(epoch, first, last):
    """The hook calls of one evaluated epoch whose steps are ``first..last-1``."""
    steps = [e for s in range(first, last) for e in (("step_start", s), ("step_end", s + 1))]
    return [*steps, ("evaluate", last), ("epoch_end", epoch, last)]


TINY = dict(n=48, max_epochs=2, checkpoint_every_steps=None)  # 3 steps an epoch, 6 in all


def test_callbacks_fire_in_order_with_the_step_numbers(tmp_path):
    rec = Recorder()
    metrics, _ = fit(tmp_path / "cb", callbacks=[rec], **TINY)
    assert rec.events == [("fit_start", 0), *_epoch(0, 0, 3), *_epoch(1, 3, 6), ("fit_end", 6)]
    assert rec.seen == [(tmp_path / "cb", 2, 0, 1, True)]
    # a record for every step, logged or not; the logged ones are the history's lines
    assert [r["step"] for r in rec.records] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "task_loss", "lr", "grad_norm", "aux_load", "batch_mean"} <= r.keys() for r in rec.records)
    history = [json.loads(line) for line in (tmp_path / "cb" / "history.jsonl").read_text().splitlines()]
    assert [h for h in history if not h.get("end_of_epoch")] == [r for r in rec.records if r["step"] % 2 == 0]
    assert [e["test_acc"] for e in rec.evaluations] == [h["test_acc"] for h in history if h.get("end_of_epoch")]
    # reading every step changes nothing: the same run without callbacks ends the same
    plain, _ = fit(tmp_path / "plain", **TINY)
    assert {k: plain[k] for k in FINAL} == {k: metrics[k] for k in FINAL}
    assert (tmp_path / "plain" / "history.jsonl").read_text().count("\n") == len(history)


def test_on_step_end_gets_no_record_for_a_skipped_step(tmp_path):
    rec = Recorder()
    metrics, _ = fit(tmp_path, model=TinyMoENet(router=NaNLoadRouter), skip_nonfinite=True, max_skipped_fraction=1.0,
                     callbacks=[rec], **TINY)
    assert metrics["skipped_steps"] == 4  # the 3rd training forward on is NaN
    assert [r is None for r in rec.records] == [False, False, True, True, True, True]


def _crash_at(call):
    """``loss_fn`` that dies on its ``call``-th call (step ``call - 1``)."""
    calls = {"n": 0}

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == call:
            raise _Crash
        return loss_fn(model, batch)

    return crashing


def test_a_resumed_run_calls_back_from_the_checkpoint_step(tmp_path):
    crashed, resumed = Recorder(), Recorder()
    with pytest.raises(_Crash):  # checkpoints at steps 2, 3 (end of epoch 0) and 4; dies in step 5
        fit(tmp_path, loss=_crash_at(6), callbacks=[crashed], **{**TINY, "checkpoint_every_steps": 2})
    assert crashed.events[0] == ("fit_start", 0) and crashed.events[-1] == ("step_start", 5)
    metrics, _ = fit(tmp_path, resume=True, callbacks=[resumed], **{**TINY, "checkpoint_every_steps": 2})
    assert resumed.events == [("fit_start", 4), ("step_start", 4), ("step_end", 5), ("step_start", 5), ("step_end", 6),
                              ("evaluate", 6), ("epoch_end", 1, 6), ("fit_end", 6)]
    assert metrics["steps"] == 6
    finished = Recorder()  # resuming a finished run: nothing to train, its last evaluation is current
    fit(tmp_path, resume=True, callbacks=[finished], **TINY)
    assert finished.events == [("fit_start", 6), ("fit_end", 6)]


class AddKeys(Callback):
    def on_fit_end(self, trainer, model, metrics):
        # called before metrics.json is written (this run directory is fresh)
        self.file_existed = (trainer.out_dir / "metrics.json").exists()
        metrics["note"] = {"steps_seen": metrics["steps"]}
        metrics["test_acc_pct"] = 100 * metrics["test_acc"]


def test_keys_added_at_fit_end_are_written_once_and_returned(tmp_path, monkeypatch):
    writes = []

    def counting_write(path, obj):
        writes.append(path.name)
        write_json_atomic(path, obj)

    monkeypatch.setattr(core.engine.loop, "write_json_atomic", counting_write)
    cb = AddKeys()
    metrics, _ = fit(tmp_path, callbacks=[Callback(), cb], **TINY)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert cb.file_existed is False and writes == ["metrics.json"]
    assert saved["note"] == metrics["note"] == {"steps_seen": 6}
    assert saved["test_acc_pct"] == metrics["test_acc_pct"] == pytest.approx(100 * saved["test_acc"])
    assert list(saved) == list(metrics)
    assert not list(tmp_path.rglob("*.tmp"))


def test_write_json_atomic_replaces_the_file_in_one_step(tmp_path, monkeypatch):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"a": 1})
    assert json.loads(path.read_text()) == {"a": 1} and path.read_text().endswith("}\n")

    def power_cut(fd):
        raise OSError("simulated crash before the data reached the disk")

    monkeypatch.setattr(core.engine.records.os, "fsync", power_cut)
    with pytest.raises(OSError):
        write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 1}  # the old file, whole


def test_cuda_request_without_a_gpu_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="no CUDA device"):
        Trainer(TrainerConfig(device="cuda"), tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_autocast_run(tmp_path):
    metrics, model = fit(tmp_path, device="cuda")
    assert metrics["device"].startswith("cuda") and metrics["precision"] == "bf16"
    assert next(model.parameters()).is_cuda and next(model.parameters()).dtype == torch.float32
    assert math.isfinite(metrics["test_loss"]) and metrics["test_acc"] > 0.5
    resumed, _ = fit(tmp_path, device="cuda", resume=True)  # finished run: same metrics from the checkpoint
    assert resumed["test_acc"] == metrics["test_acc"]
