"""KV-cached generation (nlp.models.KVCache for the suite's LM, transformers' DynamicCache for loaded
checkpoints): the same logits and greedy tokens as recomputing the context; routers whose routing of a
token depends on the other tokens of its group are refused the cache (or, by default, generate
without it)."""

from __future__ import annotations

import functools

import pytest
import torch

from core.routers.adamoe import AdaMoERouter
from core.routers.deepseek import DeepSeekRouter
from core.routers.expert_choice import ExpertChoiceRouter
from core.routers.hash import HashRouter
from core.routers.topk import TopKRouter
from nlp.data import ByteTokenizer
from nlp.generate import bench_generation, parse_args
from nlp.models import KVCache, incremental_routing_problem
from tests.nlp.conftest import VOCAB, tiny_lm

TOL = 1e-5


def _cached_logits(model, ids_BT: torch.Tensor, splits=(7, 3)) -> torch.Tensor:
    """Logits of ``ids_BT`` fed through a fresh cache: a prompt, a chunk, then one token at a time."""
    cache, out, t = model.new_kv_cache(), [], 0
    for n in [*splits, *[1] * (ids_BT.shape[1] - sum(splits))]:
        out.append(model(ids_BT[:, t:t + n], kv_cache=cache))
        t += n
    return torch.cat(out, dim=1)


SUITE_MODELS = {
    "mixtral": {},
    "learned_positions_layernorm": dict(pos_embed="learned", norm="layernorm"),
    "groups_of_4_shared_expert": dict(moe_group_size=4, num_shared_experts=1),
    "hash": dict(router=functools.partial(HashRouter)),
    "adamoe": dict(router=functools.partial(AdaMoERouter, num_null_experts=2, top_k=3)),
    "deepseek": dict(router=functools.partial(DeepSeekRouter, top_k=2)),
}


@pytest.mark.parametrize("name", SUITE_MODELS)
def test_suite_lm_cache_gives_the_same_logits_and_tokens(name):
    model = tiny_lm(max_seq_len=32, **SUITE_MODELS[name]).eval()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        diff = (_cached_logits(model, ids) - model(ids)).abs().max().item()
    assert diff < TOL, f"{name}: cached logits differ by {diff:.3e}"
    prompt = ids[:, :5]
    greedy = model.generate(prompt, 20, temperature=0, use_cache=True)
    assert torch.equal(greedy, model.generate(prompt, 20, temperature=0, use_cache=False))
    sampled = [model.generate(prompt, 20, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(0),
                              use_cache=c) for c in (True, False)]
    assert torch.equal(*sampled)


def test_cache_past_the_context_window_recomputes_the_cropped_window():
    model = tiny_lm().eval()  # max_seq_len 16: the last 14 of 30 new tokens slide the window
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    a = model.generate(prompt, 30, temperature=0, use_cache=True)
    assert a.shape == (1, 36) and torch.equal(a, model.generate(prompt, 30, temperature=0, use_cache=False))
    cache = model.new_kv_cache()
    model(prompt, kv_cache=cache)
    with pytest.raises(ValueError, match="6 cached \\+ 11 new positions exceed max_seq_len=16"):
        model(torch.zeros(1, 11, dtype=torch.long), kv_cache=cache)


GROUP_ROUTERS = {  # a token's routing depends on its group: expert choice (not causal), top-1 with capacity (causal)
    "expert_choice": (functools.partial(ExpertChoiceRouter, capacity_factor=1.0), "routes a token by the other tokens"),
    "top1_capacity": (functools.partial(TopKRouter, top_k=1, capacity_factor=0.5),
                      "has capacity_factor=0.5: whether a token is dropped depends on the tokens routed before it"),
}


@pytest.mark.parametrize("name", GROUP_ROUTERS)
def test_group_dependent_routers_are_refused_the_cache(name):
    router, why = GROUP_ROUTERS[name]
    model = tiny_lm(router=router, allow_noncausal_routing=True).eval()
    assert model.kv_cache_problem() is not None and why in model.kv_cache_problem()
    prompt = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match=f"a KV cache would change this model's outputs: router .* {why}.*"
                                         "use_cache=False"):
        model.generate(prompt, 4, temperature=0, use_cache=True)
    # the default falls back to recomputing the context: the tokens of use_cache=False
    assert torch.equal(model.generate(prompt, 8, temperature=0), model.generate(prompt, 8, temperature=0,
                                                                                use_cache=False))
    # why: a cache forced past the check routes each new token alone, and the logits change
    cache, ids = KVCache(model.depth), torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        forced = torch.cat([model(ids[:, t:t + 1], kv_cache=cache) for t in range(16)], dim=1)
        assert (forced - model(ids)).abs().max().item() > 1e-3


def test_every_router_generates_alike_with_and_without_the_cache(router_name, make_router):
    """Every conf/router/*.yaml: where the cache is allowed, the cached logits are the whole
    sequence's; where it is not, the default generates the tokens of use_cache=False."""
    model = tiny_lm(make_router(router_name), allow_noncausal_routing=True).eval()
    ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(9))
    if model.kv_cache_problem() is None:
        with torch.no_grad():
            diff = (_cached_logits(model, ids) - model(ids)).abs().max().item()
        assert diff < TOL, (f"{router_name}: cached logits differ by {diff:.3e}; a router whose routing of a token "
                            "depends on the token's position in its group declares routes_by_position = True")
    else:
        with pytest.raises(ValueError, match="a KV cache would change this model's outputs"):
            model.new_kv_cache()
    assert torch.equal(model.generate(ids[:, :4], 8, temperature=0),
                       model.generate(ids[:, :4], 8, temperature=0, use_cache=False))


def test_incremental_routing_problem_reads_the_router_facts():
    assert incremental_routing_problem([TopKRouter(8, 4, top_k=2, capacity_factor=None)]) is None
    assert incremental_routing_problem([HashRouter(8, 4)]) is None
    assert "capacity_factor=1.05" in incremental_routing_problem([TopKRouter(8, 4)])
    assert "MoE layer 1" in incremental_routing_problem([HashRouter(8, 4), ExpertChoiceRouter(8, 4)])
    by_position = HashRouter(8, 4)
    by_position.routes_by_position = True
    assert "routes a token by its position in its group" in incremental_routing_problem([by_position])


transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_hf_checkpoint_cache_gives_the_same_logits_and_tokens(arch, tmp_path):
    from nlp.hf import load_hf_lm
    from tests.nlp.test_hf import save_tiny

    save_tiny(arch, tmp_path)
    model = load_hf_lm(tmp_path, max_seq_len=64)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        cache = model.new_kv_cache()
        got = torch.cat([model(ids[:, :10], kv_cache=cache), *(model(ids[:, t:t + 1], kv_cache=cache)
                                                                for t in range(10, 16))], dim=1)
        diff = (got - model(ids)).abs().max().item()
    assert cache.get_seq_length() == 16 and diff < TOL, f"{arch}: cached logits differ by {diff:.3e}"
    greedy = model.generate(ids[:, :4], 12, temperature=0, use_cache=True)
    assert torch.equal(greedy, model.generate(ids[:, :4], 12, temperature=0, use_cache=False))


def test_hf_checkpoint_with_expert_choice_is_refused_the_cache(tmp_path):
    from nlp.hf import load_hf_lm
    from tests.nlp.test_hf import save_tiny

    save_tiny("mixtral", tmp_path)
    model = load_hf_lm(tmp_path, router=functools.partial(ExpertChoiceRouter, capacity_factor=1.0),
                       allow_noncausal_routing=True, max_seq_len=64)
    with pytest.raises(ValueError, match="router ExpertChoiceRouter \\(MoE layer 0\\) routes a token by the other"):
        model.new_kv_cache()
    prompt = torch.randint(0, 300, (1, 4), generator=torch.Generator().manual_seed(8))
    assert torch.equal(model.generate(prompt, 6, temperature=0), model.generate(prompt, 6, temperature=0,
                                                                                use_cache=False))


def test_bench_reports_both_rates_side_by_side(capsys):
    model = tiny_lm(vocab_size=259, max_seq_len=64).eval()
    result = bench_generation(model, ByteTokenizer(), "dog: ", max_new_tokens=20, repeats=1)
    assert result["same_tokens"] and result["cache"] > 0 and result["no_cache"] > 0
    assert result["speedup"] == pytest.approx(result["cache"] / result["no_cache"])
    out = capsys.readouterr().out
    assert "without cache" in out and "KV cache" in out and "same tokens: yes" in out
    ec = tiny_lm(vocab_size=259, max_seq_len=64, router=functools.partial(ExpertChoiceRouter),
                 allow_noncausal_routing=True).eval()
    assert bench_generation(ec, ByteTokenizer(), "dog: ", max_new_tokens=4, repeats=1)["cache"] is None
    assert "not used: router ExpertChoiceRouter" in capsys.readouterr().out


def test_generate_options_are_checked():
    assert parse_args(["checkpoint=x", "cache=False", "bench=true"])["cache"] == "false"
    with pytest.raises(ValueError, match="cache='sometimes' is not allowed: use auto, true or false"):
        parse_args(["checkpoint=x", "cache=sometimes"])
    with pytest.raises(ValueError, match="max_new_tokens=-1 is not allowed"):
        parse_args(["checkpoint=x", "max_new_tokens=-1"])


def test_top_p_keeps_the_smallest_nucleus_reaching_p():
    """Nucleus sampling (Holtzman et al. 2020): with probabilities 0.5, 0.3, 0.15, 0.05, top_p=0.75
    keeps the first two tokens (0.5 < 0.75 <= 0.8) and top_p=0.85 the first three; top_p=1 keeps all."""
    from nlp.models import sample_next

    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    seen = {p: {int(sample_next(logits, 1.0, None, torch.Generator().manual_seed(s), top_p=p)) for s in range(400)}
            for p in (0.75, 0.85, 1.0)}
    assert seen[0.75] == {1, 3} and seen[0.85] == {1, 2, 3} and seen[1.0] == {0, 1, 2, 3}
    assert int(sample_next(logits, 1.0, None, torch.Generator().manual_seed(0), top_p=0.01)) == 1  # the top token
    batch = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3], [0.7, 0.1, 0.1, 0.1]]))  # rows cut independently
    rows = [sample_next(batch, 1.0, None, torch.Generator().manual_seed(s), top_p=0.6) for s in range(200)]
    assert {int(r[0]) for r in rows} == {1, 3} and {int(r[1]) for r in rows} == {0}


def test_generate_refuses_a_top_p_outside_the_unit_interval():
    from nlp.generate import parse_args

    with pytest.raises(ValueError, match=r"top_p=0.0 is not allowed: it must lie in \(0, 1\]"):
        parse_args(["checkpoint=x", "top_p=0"])
    assert parse_args(["checkpoint=x", "top_p=0.9"])["top_p"] == 0.9
