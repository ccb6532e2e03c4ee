"""The causal MoE language model: causality for every router config, the non-causal guard, layouts."""

from __future__ import annotations

import functools

import pytest
import torch

import core
from core.routers.expert_choice import ExpertChoiceRouter
from core.routers.topk import TopKRouter
from core.surgery import moe_block_indices
from nlp.models import MoETransformerLM
from tests.nlp.conftest import SEQ, VOCAB, is_causal_router, tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one intra-op thread

PERTURBED = (0, 6, SEQ - 2)  # change token t+1, compare positions <= t


def _forward(model, ids, seed):
    # noise, random second experts and dropout draw from the global RNG: same draws for both inputs
    torch.manual_seed(seed)
    return model(ids)


def assert_causal(model: MoETransformerLM, ids: torch.Tensor, train: bool) -> None:
    model.train(train)
    for t in PERTURBED:
        changed = ids.clone()
        changed[:, t + 1] = (ids[:, t + 1] + 1 + torch.arange(ids.shape[0])) % VOCAB
        with torch.no_grad():
            a, b = _forward(model, ids, 7), _forward(model, changed, 7)
        torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=1e-4, atol=1e-5,
                                   msg=lambda m: f"positions <= {t} changed when token {t + 1} did: {m}")
        assert not torch.allclose(a[:, t + 1], b[:, t + 1]), "the changed token did not change its own output"


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_every_router_is_causal_or_refused(router_name, make_router, random_ids, train):
    """Changing token t+1 never changes the outputs at positions <= t, for every causal router in
    conf/router/; a non-causal router is refused at construction with the fix in the message."""
    router = make_router(router_name)
    if not is_causal_router(router_name):
        with pytest.raises(ValueError, match="not causal") as err:
            tiny_lm(router)
        assert "allow_noncausal_routing=true" in str(err.value)
        return
    model = tiny_lm(router)
    assert model.is_causal
    assert_causal(model, random_ids, train)


def test_capacity_dropping_token_choice_is_causal(random_ids):
    """Top-1 token choice with a small capacity drops tokens, later ones first, so earlier positions
    never depend on later ones, with training noise too."""
    router = functools.partial(TopKRouter, top_k=1, capacity_factor=0.5, noise_std=1.0)
    model = tiny_lm(router)
    assert model.is_causal
    assert_causal(model, random_ids, train=True)
    core.reset_routing_stats(model)
    model.train()
    model(random_ids)
    assert core.routing_stats(model)["dropped_fraction"] > 0.2


def test_k_major_capacity_is_refused_and_leaks_with_opt_in():
    """Top-2 with a capacity fills buffers first-choices-first, so a later token's first choice can
    push out an earlier token's second: refused, and the leak is real once allowed."""
    router = functools.partial(TopKRouter, top_k=2, capacity_factor=0.5, noise_std=0.0)
    with pytest.raises(ValueError, match="router.capacity_factor=null"):
        tiny_lm(router)
    model = tiny_lm(router, allow_noncausal_routing=True).eval()
    assert not model.is_causal
    assert _leaks(model)


def _leaks(model: MoETransformerLM) -> bool:
    """Whether changing the last token changes any earlier output, over a few random inputs."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(10):
        ids = torch.randint(0, VOCAB, (2, SEQ), generator=gen)
        changed = ids.clone()
        changed[:, -1] = (ids[:, -1] + 7) % VOCAB
        with torch.no_grad():
            if not torch.allclose(model(ids)[:, :-1], model(changed)[:, :-1], atol=1e-5):
                return True
    return False


def test_expert_choice_without_opt_in_raises_clear_error():
    with pytest.raises(ValueError) as err:
        tiny_lm(ExpertChoiceRouter)
    msg = str(err.value)
    assert "ExpertChoiceRouter" in msg and "not causal" in msg
    assert "model.allow_noncausal_routing=true" in msg and "mixtral" in msg


def test_expert_choice_with_opt_in_sees_the_future():
    model = tiny_lm(ExpertChoiceRouter, allow_noncausal_routing=True).eval()
    assert not model.is_causal
    assert _leaks(model)


def test_dense_baseline_has_no_moe_and_counts_all_parameters_active(random_ids):
    model = tiny_lm(moe_layers="none")
    assert model.moe_modules() == [] and model.is_causal
    assert model.active_parameters([]) == model.num_parameters()
    assert model(random_ids).shape == (2, SEQ, VOCAB)
    assert_causal(model, random_ids, train=False)


def test_active_parameters_follow_experts_per_token():
    model = tiny_lm()  # Mixtral top-2 of 4 experts in 2 layers
    per_expert = model.expert_parameters()
    assert len(per_expert) == 2
    total = model.num_parameters()
    assert model.active_parameters() == pytest.approx(total - sum(2 * n for n in per_expert))
    assert model.active_parameters([4.0, 4.0]) == pytest.approx(total)


def test_tied_embeddings_and_untied():
    tied = tiny_lm()
    assert tied.head.weight is tied.tok_embed.weight
    untied = tiny_lm(tie_embeddings=False)
    assert untied.head.weight is not untied.tok_embed.weight
    assert untied.num_parameters() == tied.num_parameters() + VOCAB * 32


def test_moe_layer_placement():
    """One placement rule for every domain (core.surgery), with the language model's key in messages."""
    def place(p):
        return moe_block_indices(4, p, key="moe_layers")

    assert place("all") == [0, 1, 2, 3]
    assert place("every_other") == [1, 3]
    assert place("none") == [] and place(None) == []
    assert place([3, 0]) == [0, 3] and place([-1]) == [3]
    with pytest.raises(ValueError, match="moe_layers"):
        place([4])
    with pytest.raises(ValueError, match="moe_layers"):
        place("every_third")
    with pytest.raises(ValueError, match="moe_layers.*twice"):
        place([1, 1])
    with pytest.raises(ValueError, match="moe_layers"):
        tiny_lm(moe_layers=[2])
    model = tiny_lm(moe_layers=[1])
    assert [b.is_moe for b in model.blocks] == [False, True]


@pytest.mark.parametrize("variant", [
    dict(pos_embed="learned", norm="layernorm"),
    dict(glu=True, act_layer="silu", bias=True),
    dict(num_shared_experts=1, expert_mlp_ratio=0.5),
    dict(expert_type="lora", lora_rank=4),
    dict(moe_layers="every_other", moe_group_size=4),
], ids=["learned-layernorm", "swiglu-bias", "shared-finegrained", "lora", "groups-of-4"])
def test_model_variants_are_causal(variant, random_ids):
    model = tiny_lm(**variant)
    assert model(random_ids).shape == (2, SEQ, VOCAB)
    assert_causal(model, random_ids, train=True)


def test_invalid_settings_name_the_parameter():
    for kwargs, name in [(dict(pos_embed="alibi"), "pos_embed"), (dict(norm="batchnorm"), "norm"),
                         (dict(num_heads=3), "num_heads"), (dict(act_layer="nope"), "act_layer"),
                         (dict(moe_group_size=0), "moe_group_size"), (dict(expert_type="moe"), "expert_type")]:
        with pytest.raises(ValueError, match=name):
            tiny_lm(**kwargs)
    model = tiny_lm()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, SEQ + 1, dtype=torch.long))


def test_hash_routing_receives_token_ids(make_router, random_ids):
    """Hash routing sends every occurrence of a token id to the same expert (the model passes ids)."""
    model = tiny_lm(make_router("hash")).eval()
    layer = model.moe_modules()[0]
    layer.keep_last_routing = True
    ids = torch.tensor([[1, 2, 3, 1, 2, 3, 5, 5, 1, 9, 9, 2, 3, 1, 4, 4]])
    model(ids)
    r = layer.last_routing
    expert_of = {}
    for tok, exp in zip(r.token_idx_N.tolist(), r.expert_idx_N.tolist()):
        expert_of.setdefault(int(ids.view(-1)[tok]), set()).add(exp)
    assert all(len(v) == 1 for v in expert_of.values())


def test_segment_routing_pads_to_whole_segments(make_router):
    """Lory routes segments of max_seq_len / segments_per_sequence tokens; shorter inputs (generation)
    are padded to whole segments, and the real positions agree with the full-length forward."""
    model = tiny_lm(make_router("lory")).eval()
    assert model.moe_modules()[0].group_size == SEQ // model.routers()[0].segments_per_sequence
    ids = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full, short = model(ids), model(ids[:, :9])
    assert short.shape == (2, 9, VOCAB)
    torch.testing.assert_close(short, full[:, :9], rtol=1e-4, atol=1e-5)


def test_generate_is_deterministic_under_a_seed():
    model = tiny_lm().eval()
    prompt = torch.tensor([[1, 2, 3]])
    a = model.generate(prompt, 20, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(0))
    b = model.generate(prompt, 20, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(0))
    c = model.generate(prompt, 20, temperature=1.0, top_k=10, generator=torch.Generator().manual_seed(1))
    assert a.shape == (1, 23) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, :3], prompt)
    greedy = model.generate(prompt, 5, temperature=0.0)
    assert torch.equal(greedy, model.generate(prompt, 5, temperature=0.0))
