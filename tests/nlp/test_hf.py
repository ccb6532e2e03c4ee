"""The Hugging Face bridge (nlp/hf.py): tiny random checkpoints built offline by transformers and
saved with ``save_pretrained`` load with core MoE FFNs and give transformers' logits; dense
checkpoints upcycle exactly; routers swap; models write back. Nothing is downloaded."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch

import core
from core.checks import ConfigError
from core.run import check_config, task_class
from core.routers.adamoe import AdaMoERouter
from core.routers.deepseek import DeepSeekRouter
from core.routers.topk import TopKRouter
from nlp.generate import generate_text, load_model
from nlp.hf import HFCausalLM, HFTokenizer, load_hf_lm, save_hf
from nlp.models import MoETransformerLM
from nlp.training import build_model
from tests.conftest import CONF_DIR
from tests.nlp.conftest import compose_nlp

transformers = pytest.importorskip("transformers")

VOCAB = 300  # >= the byte tokenizer's 259
COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64)


def _configs():
    T = transformers
    return {
        "mixtral": lambda: T.MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": lambda: T.Qwen2MoeConfig(**COMMON, intermediate_size=64, moe_intermediate_size=24, num_experts=4,
                                              num_experts_per_tok=2, shared_expert_intermediate_size=40,
                                              norm_topk_prob=False),
        "qwen3_moe": lambda: T.Qwen3MoeConfig(**COMMON, head_dim=8, intermediate_size=64, moe_intermediate_size=24,
                                              num_experts=4, num_experts_per_tok=2, norm_topk_prob=True),
        "olmoe": lambda: T.OlmoeConfig(**COMMON, intermediate_size=24, num_experts=4, num_experts_per_tok=2),
        "deepseek_v3": lambda: T.DeepseekV3Config(
            **COMMON, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
            n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True,
            first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
            v_head_dim=8),
        "llama": lambda: T.LlamaConfig(**COMMON, intermediate_size=48),
        "qwen2": lambda: T.Qwen2Config(**COMMON, intermediate_size=48),
    }


REPO = CONF_DIR.parent
MOE_ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3"]


def save_tiny(arch: str, directory, seed: int = 0):
    """A tiny random ``arch`` model saved into ``directory``; returns the transformers model (eval)."""
    torch.manual_seed(seed)
    config = _configs()[arch]()
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if arch == "deepseek_v3":  # a nonzero selection bias, so that its mapping is tested too
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.copy_(torch.randn(8) * 0.1)
    for name, p in model.named_parameters():  # spread the random router weights so top-k ties cannot happen
        if name.endswith("mlp.gate.weight"):
            torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(str(directory))
    return model.eval()


def _ids(seed: int = 1, shape=(2, 24)) -> torch.Tensor:
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@functools.lru_cache(maxsize=None)
def _reference(arch: str, directory: str) -> torch.Tensor:
    ref = transformers.AutoModelForCausalLM.from_pretrained(directory, local_files_only=True).eval()
    with torch.no_grad():
        return ref(input_ids=_ids()).logits


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_moe_checkpoint_matches_transformers(arch, tmp_path):
    save_tiny(arch, tmp_path)
    want = _reference(arch, str(tmp_path))
    model = load_hf_lm(tmp_path)
    assert isinstance(model, HFCausalLM) and model.moe_layers
    with torch.no_grad():
        got = model(_ids())
    diff = (got - want).abs().max().item()
    print(f"{arch}: max abs logit diff {diff:.3e}")
    assert diff < 1e-5
    stats = core.routing_stats(model)
    assert len(stats["layers"]) == len(model.moe_layers)
    k = transformers.AutoConfig.from_pretrained(str(tmp_path)).num_experts_per_tok
    assert stats["experts_per_token"] == pytest.approx(k)
    expected_router = DeepSeekRouter if arch == "deepseek_v3" else TopKRouter
    assert all(type(r) is expected_router for r in model.routers())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_dense_checkpoint_loads_unchanged_and_upcycles_exactly(arch, tmp_path):
    save_tiny(arch, tmp_path)
    want = _reference(arch, str(tmp_path))
    dense = load_hf_lm(tmp_path)
    assert dense.moe_layers == []
    up = load_hf_lm(tmp_path, upcycle=True, num_experts=4)
    assert up.moe_layers == [0, 1]
    with torch.no_grad():
        d_dense = (dense(_ids()) - want).abs().max().item()
        d_up = (up(_ids()) - want).abs().max().item()
    print(f"{arch}: dense {d_dense:.3e}, upcycled E=4 top-2 {d_up:.3e}")
    assert d_dense < 1e-5 and d_up < 1e-5
    assert core.routing_stats(up)["experts_per_token"] == pytest.approx(2.0)


def test_router_swap_starts_from_the_trained_gate(tmp_path):
    save_tiny("mixtral", tmp_path)
    original = load_hf_lm(tmp_path)
    ada = functools.partial(AdaMoERouter, num_null_experts=4, top_k=4)
    model = load_hf_lm(tmp_path, router=ada)
    for old, new in zip(original.routers(), model.routers()):
        assert isinstance(new, AdaMoERouter) and new.weight.shape == (8, 32)
        torch.testing.assert_close(new.weight[:4], old.weight)
        torch.testing.assert_close(new.weight[4:], old.weight)  # null rows copy the gate (AdaMoE authors' code)
    with torch.no_grad():
        model(_ids())
    assert 0 < core.routing_stats(model)["experts_per_token"] < 4


def _train_steps(model: HFCausalLM, steps: int = 2) -> None:
    """A few AdamW steps on random ids, so that the written weights differ from the loaded ones."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(steps):
        ids = _ids(seed=10 + step, shape=(2, 16))
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        (loss + core.collect_aux_loss(model)).backward()
        opt.step()
        opt.zero_grad()
        core.after_optimizer_step(model)
    model.eval()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_write_back_gives_the_same_logits(arch, tmp_path):
    save_tiny(arch, tmp_path / "in")
    model = load_hf_lm(tmp_path / "in")
    _train_steps(model)
    save_hf(model, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), local_files_only=True).eval()
    with torch.no_grad():
        got, want = back(input_ids=_ids()).logits, model(_ids())
        before = _reference(arch, str(tmp_path / "in"))
    diff = (got - want).abs().max().item()
    print(f"{arch}: written back after 2 steps, max abs logit diff {diff:.3e}")
    assert diff < 1e-5
    assert (want - before).abs().max().item() > 1e-3  # the steps changed the model, so the test means something
    assert isinstance(model.hf.model.layers[-1].mlp, type(model.layer_blocks()[0][1]))  # adapters back in place


def test_write_back_refuses_routers_transformers_lacks(tmp_path):
    save_tiny("mixtral", tmp_path / "in")
    model = load_hf_lm(tmp_path / "in", router=functools.partial(AdaMoERouter, num_null_experts=4, top_k=4))
    with pytest.raises(ValueError, match=r"AdaMoERouter is not mixtral's router .*suite's format \(model.pt\)"):
        save_hf(model, tmp_path / "out")
    save_tiny("qwen2", tmp_path / "dense")
    up = load_hf_lm(tmp_path / "dense", upcycle=True, num_experts=4)
    with pytest.raises(ValueError, match="upcycled from a dense qwen2 FFN and transformers has no MoE form of qwen2"):
        save_hf(up, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_upcycled_llama_writes_back_as_mixtral(tmp_path):
    save_tiny("llama", tmp_path / "dense")
    up = load_hf_lm(tmp_path / "dense", upcycle=True, num_experts=4)
    _train_steps(up)
    save_hf(up, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), local_files_only=True).eval()
    assert type(back).__name__ == "MixtralForCausalLM" and back.config.num_local_experts == 4
    with torch.no_grad():
        diff = (back(input_ids=_ids()).logits - up(_ids())).abs().max().item()
    print(f"upcycled llama -> transformers Mixtral after 2 steps: max abs logit diff {diff:.3e}")
    assert diff < 1e-5


# --------------------------------------------------------------------------------- model=hf in nlp.train


def _cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, "-m", "nlp.train", *args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


def test_cli_trains_a_saved_mixtral_with_adamoe(tmp_path):
    save_tiny("mixtral", tmp_path / "ckpt")
    res = _cli(tmp_path, "model=hf", f"model.path={tmp_path / 'ckpt'}", "debug=default", "+router=adamoe",
               "trainer.max_steps=8")
    assert res.returncode == 0, res.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    print(f"adamoe on the loaded Mixtral: {metrics['experts_per_token']:.3f} experts per token (K=4), "
          f"val ppl {metrics['val_ppl']:.2f}")
    assert metrics["router"] == "adamoe" and metrics["num_experts"] == 4 and metrics["causal"]
    assert 0 < metrics["experts_per_token"] < 4
    # transformers has no AdaMoE: no <run>/hf, and the log says why
    assert not (tmp_path / "run" / "hf").exists() and (tmp_path / "run" / "model.pt").is_file()
    assert "no Hugging Face directory written: cannot save in Hugging Face format: layer 0's router AdaMoERouter " \
           "is not mixtral's router" in res.stdout + res.stderr
    model, tokenizer = load_model(tmp_path / "run")  # nlp.generate rebuilds it from config.yaml and model.pt
    assert isinstance(model.routers()[0], AdaMoERouter)
    text = generate_text(model, tokenizer, prompt="dog: ", max_new_tokens=5, seed=0)
    assert text.startswith("dog: ")


def _checked(*overrides: str):
    """The composed debug config with ``model=hf``, after the run's checks (before any data)."""
    cfg = compose_nlp("model=hf", *overrides)
    check_config(cfg, task_class("nlp")())
    return cfg


def test_config_uses_the_checkpoint_router_and_experts(tmp_path):
    save_tiny("deepseek_v3", tmp_path)
    cfg = _checked(f"model.path={tmp_path}")
    assert cfg.get("router") is None and cfg.model.num_experts == 8  # debug's num_experts=4 gives way to the checkpoint's
    assert cfg.router_name == "checkpoint (deepseek_v3)"
    model = build_model(cfg, 259)
    assert [type(r) for r in model.routers()] == [DeepSeekRouter] and model.moe_layers == [1]
    cfg = _checked(f"model.path={tmp_path}", "+router=switch")
    assert type(build_model(cfg, 259).routers()[0]).__name__ == "SwitchRouter"


def test_config_upcycles_a_dense_checkpoint(tmp_path):
    save_tiny("llama", tmp_path)
    cfg = _checked(f"model.path={tmp_path}")
    assert cfg.model.num_experts is None and not build_model(cfg, 259).moe_layers
    cfg = _checked(f"model.path={tmp_path}", "model.upcycle=true", "model.num_experts=6")
    model = build_model(cfg, 259)
    assert cfg.model.num_experts == 6 and cfg.router_name == "mixtral" and model.moe_layers == [0, 1]
    assert [m.num_experts for m in model.moe_modules()] == [6, 6]


def test_config_refusals_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^model.path='\?\?\?' is not allowed: give a local Hugging Face"):
        _checked()
    with pytest.raises(ConfigError, match=r"model.path=.* is not allowed: give a local Hugging Face directory"):
        _checked(f"model.path={tmp_path / 'nowhere'}")
    torch.manual_seed(0)
    small = transformers.MixtralConfig(**{**COMMON, "vocab_size": 128}, intermediate_size=48, num_local_experts=4,
                                       num_experts_per_tok=2)
    transformers.AutoModelForCausalLM.from_config(small).save_pretrained(str(tmp_path / "v128"))
    with pytest.raises(ConfigError, match=r"vocabulary has 128 tokens, fewer than the byte tokenizer's 259") as exc:
        _checked(f"model.path={tmp_path / 'v128'}")
    assert "\n" not in str(exc.value)


def _suite_mixtral(**kwargs) -> MoETransformerLM:
    args = dict(vocab_size=VOCAB, dim=32, depth=2, num_heads=4, max_seq_len=64, mlp_ratio=1.5, act_layer="silu",
                glu=True, moe_layers="all", num_experts=4, rope_base=5000.0)
    args.update(kwargs)
    torch.manual_seed(0)
    return MoETransformerLM(**args)


def test_suite_trained_mixtral_saves_as_transformers_mixtral(tmp_path):
    model = _suite_mixtral()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(2):
        ids = _ids(seed=20 + step, shape=(2, 16))
        loss = torch.nn.functional.cross_entropy(model(ids)[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        (loss + core.collect_aux_loss(model)).backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    save_hf(model, tmp_path)
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), local_files_only=True).eval()
    assert type(back).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        want = model(_ids())
        diff = (back(input_ids=_ids()).logits - want).abs().max().item()
        diff_bridge = (load_hf_lm(tmp_path)(_ids()) - want).abs().max().item()
    print(f"suite Mixtral -> transformers Mixtral: max abs logit diff {diff:.3e} (back through nlp.hf {diff_bridge:.3e})")
    assert diff < 1e-5 and diff_bridge < 1e-5


def test_suite_models_of_another_form_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"not of Mixtral's form: block 0's experts are not bias-free SwiGLU"):
        save_hf(_suite_mixtral(glu=False, act_layer="gelu"), tmp_path)
    with pytest.raises(ValueError, match=r"router AdaMoERouter is not Mixtral's .*suite's format \(model.pt\)"):
        save_hf(_suite_mixtral(router=functools.partial(AdaMoERouter, num_null_experts=2, top_k=2)), tmp_path)


def save_tiny_tokenizer(directory, vocab_size: int = 300):
    """A byte-level BPE trained offline on a few sentences (<unk>=0, <s>=1, </s>=2), saved with
    ``save_pretrained`` into ``directory``; returns the ``tokenizers.Tokenizer``."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the dog runs", "a cat sleeps on the mat"] * 20, trainer)
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(str(directory))
    return tok


def test_checkpoint_tokenizer_reads_local_files(tmp_path):
    tok = save_tiny_tokenizer(tmp_path)
    t = HFTokenizer(tmp_path)
    assert t.vocab_size == len(tok.get_vocab()) and t.eos_token_id == 2 and t.pad_token_id == 2
    ids = t.encode_corpus("the dog sleeps\n\na cat\n")
    assert ids.count(2) == 2 and t.decode(ids) == "the dog sleepsa cat"
    with pytest.raises(ConfigError, match="data.tokenizer=.* is not allowed: use byte, bpe or a local"):
        HFTokenizer(tmp_path / "nowhere")
