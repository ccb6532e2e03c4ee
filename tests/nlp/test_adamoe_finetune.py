"""AdaMoE on a pretrained Mixtral (docs/adamoe_finetune.md): the null experts' gate rows start as
copies of the trained gate (the AdaMoE authors' Mixtral code), ``model.null_router_init=normal``
gives N(0, initializer_range²) rows, and a suite-trained run is written as a Hugging Face directory
by ``python -m nlp.export``. Tiny checkpoints are built offline; nothing is downloaded."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import pytest
import torch

import core
from core.checks import ConfigError
from core.routers.adamoe import AdaMoERouter
from core.routers.topk import TopKRouter
from nlp.generate import load_model
from nlp.hf import load_hf_lm, swap_router
from tests.nlp.test_hf import REPO, _checked, _ids, save_tiny

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("num_null", [8, 6])
def test_adamoe_null_rows_copy_the_trained_gate(num_null, tmp_path):
    """Null row j is trained row j mod n (the authors' ``gate.weight.repeat(m // n, 1)``), for m a
    multiple of n and not."""
    save_tiny("mixtral", tmp_path)  # 4 experts
    original = load_hf_lm(tmp_path)
    model = load_hf_lm(tmp_path, router=functools.partial(AdaMoERouter, num_null_experts=num_null, top_k=4))
    for old, new in zip(original.routers(), model.routers()):
        assert new.weight.shape == (4 + num_null, 32)
        for j in range(num_null):
            torch.testing.assert_close(new.weight[4 + j], old.weight[j % 4], rtol=0, atol=0)
    with torch.no_grad():  # every true logit appears 2 or 3 times: the top-4 holds the best expert and maybe the next
        model(_ids())
    assert 1 <= core.routing_stats(model)["experts_per_token"] <= 2


def test_adamoe_normal_null_rows_on_request(tmp_path):
    save_tiny("mixtral", tmp_path)
    original = load_hf_lm(tmp_path)
    model = load_hf_lm(tmp_path, router=functools.partial(AdaMoERouter, num_null_experts=4, top_k=4),
                       null_router_init="normal")
    for old, new in zip(original.routers(), model.routers()):
        torch.testing.assert_close(new.weight[:4], old.weight)
        assert new.weight[4:].abs().max() < 0.15 and new.weight[4:].std() > 0  # N(0, 0.02²)


def test_swap_router_extra_rows_choices():
    from core.moe import MoE

    moe = MoE(8, 16, num_experts=2, router=functools.partial(TopKRouter, top_k=1))
    with pytest.raises(ValueError, match=r"extra_rows='tile' is not allowed: use 'copy'"):
        swap_router(moe, functools.partial(AdaMoERouter, num_null_experts=3, top_k=2), extra_rows="tile")
    old = moe.router.weight.detach().clone()
    new = swap_router(moe, functools.partial(AdaMoERouter, num_null_experts=3, top_k=2), extra_rows="copy")
    torch.testing.assert_close(new.weight[2:5], old[[0, 1, 0]])


def test_null_router_init_is_checked_by_the_config(tmp_path):
    save_tiny("mixtral", tmp_path)
    cfg = _checked(f"model.path={tmp_path}", "+router=adamoe", "model.null_router_init=normal")
    assert cfg.model.null_router_init == "normal"
    with pytest.raises(ConfigError, match=r"^model.null_router_init='zeros' is not allowed: use one of copy, normal"):
        _checked(f"model.path={tmp_path}", "+router=adamoe", "model.null_router_init=zeros")


def _run(tmp_path, module: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_export_writes_a_suite_mixtral_run_as_transformers_mixtral(tmp_path):
    res = _run(tmp_path, "nlp.train", "model=mixtral_tiny", "debug=default", f"hydra.run.dir={tmp_path / 'run'}")
    assert res.returncode == 0, res.stderr[-3000:]
    res = _run(tmp_path, "nlp.export", f"checkpoint={tmp_path / 'run'}", f"out={tmp_path / 'hf'}")
    assert res.returncode == 0, res.stderr[-3000:]
    model, _ = load_model(tmp_path / "run")
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), local_files_only=True).eval()
    assert type(back).__name__ == "MixtralForCausalLM" and back.config.num_experts_per_tok == 2
    ids = _ids(shape=(2, 32)) % 259
    with torch.no_grad():
        diff = (back(input_ids=ids).logits - model(ids)).abs().max().item()
        diff_bridge = (load_hf_lm(tmp_path / "hf")(ids) - model(ids)).abs().max().item()
    print(f"nlp.export: suite run -> transformers Mixtral, max abs logit diff {diff:.3e} (nlp.hf {diff_bridge:.3e})")
    assert diff < 1e-5 and diff_bridge < 1e-5
    # a model transformers cannot hold is refused with the reason and exit status 1
    res = _run(tmp_path, "nlp.train", "debug=default", f"hydra.run.dir={tmp_path / 'gelu'}")  # tiny: GELU experts
    assert res.returncode == 0, res.stderr[-3000:]
    res = _run(tmp_path, "nlp.export", f"checkpoint={tmp_path / 'gelu'}", f"out={tmp_path / 'hf2'}")
    assert res.returncode == 1 and "not bias-free SwiGLU" in res.stdout + res.stderr
    assert not (tmp_path / "hf2").exists()
    res = _run(tmp_path, "nlp.export", f"checkpoint={tmp_path / 'run'}")
    assert res.returncode == 2 and "out=... required" in res.stderr
