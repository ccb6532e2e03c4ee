"""Bad configs in every domain are refused before any data is read: one ``error:`` line on stderr that
names the key and the value and says what is allowed, exit status 2, no traceback.

Most cases compose the real config and run ``core.run.run`` with the domain's task, whose data
loading fails the test if it is ever reached; three run the real command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import MissingConfigException

import core.engine
import core.run
from core.engine import NonFiniteLossError
from core.run import check_config, run, task_class, task_classes
from core.checks import ConfigError, NotApplicableError, to_config_error
from tests.conftest import CONF_DIR, compose

REPO = CONF_DIR.parent


def _compose(domain: str, *overrides: str):
    return compose(domain, "debug=default", *overrides)


def _task(domain: str, load_data=None):
    """The domain's task; its data loading fails the test (a bad config must stop before it) unless
    ``load_data`` replaces it."""
    def never(self, cfg):
        pytest.fail("a bad config reached data loading")

    cls = task_class(domain)
    return type(cls.__name__, (cls,), {"load_data": load_data or never})()


def _refused(domain: str, overrides, capsys, tmp_path) -> str:
    """Run the domain's task on the composed config; returns the single stderr line."""
    cfg = _compose(domain, *overrides, f"output_dir={tmp_path}")
    with pytest.raises(SystemExit) as exc:
        run(cfg, _task(domain))
    err = capsys.readouterr().err
    assert exc.value.code == core.run.CONFIG_ERROR_EXIT, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "config.yaml").exists()
    return lines[0]


@pytest.fixture
def not_utf8(tmp_path) -> Path:
    p = tmp_path / "latin1.txt"
    p.write_bytes("café crème brûlée ".encode("latin-1") * 50)
    return p


# (domain, overrides, key, value as printed, a word of what is allowed)
CASES = [
    ("vision", ["model.name=vmoe_huge"], "model.name", "'vmoe_huge'", "vmoe_tiny_patch4_28"),
    ("vision", ["+router=topk", "router.top_k=9"], "router.top_k", "9", "num_experts=4"),
    ("vision", ["+router=topk", "router.top_k=0"], "router.top_k", "0", ">= 1"),
    ("vision", ["+router=topk", "router.capacity_factor=0"], "router.capacity_factor", "0", "> 0"),
    ("vision", ["+router=expert_choice", "router.capacity_factor=-1.5"], "router.capacity_factor", "-1.5", "> 0"),
    ("vision", ["+router=hash"], "router", "'HashRouter'", "token ids"),
    ("vision", ["+router=topk", "router._target_=core.routers.nope.NopeRouter"], "router._target_",
     "'core.routers.nope.NopeRouter'", "expert_choice"),
    ("vision", ["+router=topk", "+router.top_kk=2"], "router.top_kk", "2", "capacity_factor"),
    ("vision", ["trainer.lr=-0.1"], "trainer.lr", "-0.1", ">= 0"),
    ("vision", ["trainer.lr=0"], "trainer.lr", "0", "> 0"),
    ("vision", ["trainer.max_epochs=0"], "trainer.max_epochs", "0", ">= 1"),
    ("vision", ["model.timm_kwargs.patch_size=3"], "model.timm_kwargs.patch_size", "3", "divide the image size 8"),
    ("vision", ["data.batch_size=0"], "data.batch_size", "0", "positive integer"),
    ("vision", ["data.name=imagefolder", "data.img_size=16", "data.root=/nonexistent/images"], "data.root",
     "'/nonexistent/images'", "no such directory"),
    ("nlp", ["+router=base", "model.moe_group_size=6"], "model.moe_group_size", "6", "multiple of num_experts=4"),
    ("nlp", ["+router=lory", "router.segments_per_sequence=5"], "router.segments_per_sequence", "5",
     "divisor of 32 (the sequence length data.seq_len)"),
    ("nlp", ["data.path=/nonexistent/book.txt"], "data.path", "'/nonexistent/book.txt'", "no such file"),
    ("nlp", ["data.path={not_utf8}"], "data.path", "latin1.txt", "not UTF-8"),
    ("nlp", ["data.path={tmp_path}"], "data.path", str(Path("{tmp_path}")), "not a regular file"),
    ("nlp", ["data.path={empty}"], "data.path", "empty.txt", "the file is empty"),
    ("nlp", ["data=text_file"], "data.path", "'???'", "give a UTF-8 text file"),
    ("nlp", ["model.num_experts=0"], "model.num_experts", "0", ">= 1"),
    ("nlp", ["model._target_=nlp.models.NopeLM"], "model._target_", "'nlp.models.NopeLM'", "conf/nlp/model"),
    ("nlp", ["trainer.precision=fp16"], "trainer.precision", "'fp16'", "auto, fp32 or bf16"),
    ("nlp", ["trainer.warmup_fraction=1.5"], "trainer.warmup_fraction", "1.5", "[0, 1)"),
    ("recsys", ["model=esmm", "data=synthetic"], "model", "ESMM", "data=adult"),
    ("recsys", ["data=census_kdd"], "data.path", "None", "census-income.data"),
    ("recsys", ["data.batch_size=0"], "data.batch_size", "0", ">= 1"),
    ("recsys", ["trainer.device=cuda"], "trainer.device", "'cuda'", "no CUDA device"),
    ("recsys", ["+router=topk", "router.top_k=9"], "router.top_k", "9", "num_experts=8"),
    ("recsys", ["model=ple", "model.num_task_experts=0"], "model.num_task_experts", "0", ">= 1"),
    ("multimodal", ["model.model_name=mm-clip-nope"], "model.model_name", "'mm-clip-nope'", "mm-clip-tiny-p4-32"),
    ("multimodal", ["data.image_size=28"], "data.image_size", "28", "data.image_size=32"),
    ("multimodal", ["model=limoe", "data.image_size=30"], "data.image_size", "30", "model.patch_size=4"),
    ("multimodal", ["data.batch_size=1"], "data.batch_size", "1", ">= 2"),
    ("multimodal", ["data.sources=[openmoji,imagenet]"], "data.sources", "['openmoji', 'imagenet']", "fashion_mnist"),
    ("multimodal", ["trainer.max_steps=0"], "trainer.max_steps", "0", ">= 1"),
]


@pytest.mark.parametrize("domain,overrides,key,value,allowed", CASES,
                         ids=[f"{c[0]}-{c[2]}-{c[3][:24]}" for c in CASES])
def test_bad_config_is_one_clear_line_and_exit_2(domain, overrides, key, value, allowed, capsys, tmp_path, not_utf8):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    overrides = [o.format(tmp_path=tmp_path, not_utf8=not_utf8, empty=empty) for o in overrides]
    value = value.format(tmp_path=tmp_path)
    line = _refused(domain, overrides, capsys, tmp_path)
    assert f"error: {key}=" in line, line
    assert value in line.split(" is not allowed")[0], line
    assert allowed in line, line


def test_expert_parallel_world_size_must_divide_the_experts(monkeypatch, capsys, tmp_path):
    """``trainer.expert_parallel=true`` shares the experts among the WORLD_SIZE processes."""
    monkeypatch.setenv("WORLD_SIZE", "3")
    line = _refused("nlp", ["++trainer.expert_parallel=true"], capsys, tmp_path)
    assert "trainer.expert_parallel=True" in line and "WORLD_SIZE=3" in line and "num_experts=4" in line
    monkeypatch.setenv("WORLD_SIZE", "2")   # 2 divides 4: accepted by this check
    from core.validate import check_expert_parallel
    check_expert_parallel({"expert_parallel": True}, 4)


def test_expert_groups_smaller_than_the_world_need_fsdp_and_a_divisor(monkeypatch):
    """``trainer.expert_parallel_size``: a divisor of WORLD_SIZE that divides E, with FSDP (DDP
    cannot reduce the experts' gradients over the groups)."""
    from core.validate import check_expert_parallel

    monkeypatch.setenv("WORLD_SIZE", "4")
    ok = {"expert_parallel": True, "data_parallel": "fsdp", "expert_parallel_size": 2}
    check_expert_parallel(ok, 4)
    with pytest.raises(ConfigError, match="expert_parallel_size=2 is not allowed.*DDP cannot reduce.*fsdp"):
        check_expert_parallel({**ok, "data_parallel": "ddp"}, 4)
    with pytest.raises(ConfigError, match="expert_parallel_size=3 is not allowed: it must divide the WORLD_SIZE=4"):
        check_expert_parallel({**ok, "expert_parallel_size": 3}, 6)
    with pytest.raises(ConfigError, match="groups of trainer.expert_parallel_size=2 ranks cannot share num_experts=3"):
        check_expert_parallel(ok, 3)


def test_unknown_router_choice_names_the_option_and_lists_the_routers():
    """``+router=nope`` is refused by Hydra while composing, with the list of router configs."""
    with pytest.raises(MissingConfigException) as exc:
        _compose("vision", "+router=nope")
    message = str(exc.value)
    assert "router/nope" in message and "topk" in message and "expert_choice" in message


def test_a_good_config_passes_every_domain():
    assert sorted(task_classes()) == ["multimodal", "nlp", "recsys", "vision"]
    for domain, task in task_classes().items():
        check_config(_compose(domain), task())


def test_router_errors_are_relabelled_with_their_config_key():
    err = to_config_error(ValueError("top_k=9 is not allowed: it must be <= num_experts=4."), "router.")
    assert (err.key, err.value_repr, err.allowed) == ("router.top_k", "9", "it must be <= num_experts=4")
    assert str(err) == "router.top_k=9 is not allowed: it must be <= num_experts=4."
    other = to_config_error(ValueError("something else"), key="data.path", value="x")
    assert str(other) == "data.path='x' is not allowed: something else."


def test_nonfinite_loss_exits_1_naming_the_step(capsys, tmp_path, monkeypatch):
    def fit(prepared):
        raise NonFiniteLossError("non-finite loss at step 7 (epoch 0, batch 7): task loss=nan.")

    monkeypatch.setattr(core.run, "prepare", lambda cfg, task: None)
    monkeypatch.setattr(core.run, "fit", fit)
    with pytest.raises(SystemExit) as exc:
        run(_compose("vision", f"output_dir={tmp_path}"), _task("vision"))
    err = capsys.readouterr().err
    assert exc.value.code == core.run.NONFINITE_EXIT
    assert err.strip() == "error: non-finite loss at step 7 (epoch 0, batch 7): task loss=nan."


@pytest.mark.parametrize("domain", ["vision", "nlp", "recsys", "multimodal"])
def test_an_error_during_training_keeps_its_traceback(domain, monkeypatch, tmp_path):
    """Only preparing a run (data, model) can fail as a config error: a ValueError raised while
    training is a bug and must reach the user whole, not as a one-line exit 2."""
    def broken_fit(*args, **kwargs):
        raise ValueError("an internal shape mismatch")

    monkeypatch.setattr(core.engine.Trainer, "fit", broken_fit)
    cfg = _compose(domain, "debug=default", f"output_dir={tmp_path}")
    with pytest.raises(ValueError, match="internal shape mismatch"):
        run(cfg, task_class(domain)())


def test_in_a_sweep_an_inapplicable_router_gets_an_na_row_but_a_bad_config_stops(monkeypatch, capsys, tmp_path):
    from nlp.models import NonCausalRoutingError

    monkeypatch.setattr(core.run, "is_multirun", lambda: True)
    out = run(_compose("vision", "+router=hash", f"output_dir={tmp_path}"), _task("vision"))
    assert out is None
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["status"] == "n/a" and record["router"] == "hash" and "token ids" in record["reason"]
    assert capsys.readouterr().err.startswith("n/a: ")

    def noncausal(self, cfg):
        raise NonCausalRoutingError("router expert_choice is not causal")

    (tmp_path / "metrics.json").unlink()
    run(_compose("nlp", f"output_dir={tmp_path}"), _task("nlp", load_data=noncausal))
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "n/a"

    (tmp_path / "metrics.json").unlink()
    with pytest.raises(SystemExit) as exc:  # the sweep's shared config is wrong: every job would fail
        run(_compose("vision", "trainer.lr=-1", f"output_dir={tmp_path}"), _task("vision"))
    assert exc.value.code == core.run.CONFIG_ERROR_EXIT and not (tmp_path / "metrics.json").exists()


def test_not_applicable_is_a_config_error():
    assert issubclass(NotApplicableError, ConfigError) and issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------------------- real command lines


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.mark.parametrize("module,args,expected", [
    ("vision.train", ["trainer.lr=-1"], "error: trainer.lr=-1 is not allowed: it must be a finite number >= 0."),
    ("nlp.train", ["debug=default", "data.path=/nonexistent/book.txt"], "error: data.path='/nonexistent/book.txt' "
     "is not allowed: no such file"),
    ("recsys.train", ["model=esmm", "data=synthetic"], "error: model='esmm' is not allowed: ESMM models a click"),
], ids=["vision-lr", "nlp-path", "recsys-esmm-synthetic"])
def test_command_line_bad_config(module, args, expected, tmp_path):
    res = _cli(module, *args, f"hydra.run.dir={tmp_path}")
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected), res.stderr
    assert not (tmp_path / "metrics.json").exists() and not (tmp_path / "history.jsonl").exists()
