"""MEMoE (nlp/memoe.py) and its fact set (nlp/facts.py): the adapter adds exactly 0 before editing,
the base model is untouched by an edit, knowledge-anchor routing follows the anchor alone, a tiny
edit is learned, and bad input is refused by name. Tiny random models only (no pretraining)."""

from __future__ import annotations

import pytest
import torch

from nlp.facts import RELATIONS, FactPrompt, build_fact_set, edit_split, fact_tokenizer
from nlp.hf import HFTokenizer, load_hf_lm, save_mixtral
from nlp.memoe import (KnowledgeAnchorRouter, MEMoEAdapter, attach_memoe, edit, encode_prompts, evaluate,
                       finetune_ffn)
from nlp.models import MoETransformerLM

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def facts():
    return build_fact_set(num_subjects=6, objects_per_relation=4, seed=0)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, facts):
    """A tiny random Mixtral-form suite LM over the fact vocabulary, written by the bridge."""
    directory = tmp_path_factory.mktemp("fact_lm")
    fact_tokenizer(facts).save_pretrained(str(directory))
    save_mixtral(_suite_lm(HFTokenizer(directory).vocab_size), directory)
    return directory


def _suite_lm(vocab_size: int) -> MoETransformerLM:
    torch.manual_seed(0)
    return MoETransformerLM(vocab_size=vocab_size, dim=32, depth=2, num_heads=2, max_seq_len=16, mlp_ratio=2.0,
                            act_layer="silu", glu=True, moe_layers="all", num_experts=4)


def _batch(checkpoint, facts, n: int = 3):
    split = edit_split(facts, n, seed=0)
    return encode_prompts(HFTokenizer(checkpoint), split.edit_prompts)


@pytest.mark.parametrize("kind", ["suite", "hf"])
def test_adapter_is_zero_at_init(kind, checkpoint, facts):
    batch = _batch(checkpoint, facts)
    model = load_hf_lm(checkpoint) if kind == "hf" else _suite_lm(HFTokenizer(checkpoint).vocab_size)
    with torch.no_grad():
        base = model(batch.input_ids)
        edited = attach_memoe(model, layer=1)(batch.input_ids, batch.anchor_mask)
    assert torch.equal(edited, base)


def test_edit_learns_the_facts_and_leaves_the_base_model_bit_identical(checkpoint, facts):
    batch = _batch(checkpoint, facts, n=3)
    model = load_hf_lm(checkpoint)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    edited = attach_memoe(model, layer=1)
    assert not evaluate(edited, batch)[0].all()  # the random model does not know the new objects
    losses = edit(edited, edited.adapter.parameters(), batch, steps=150, lr=1e-2)
    assert evaluate(edited, batch)[0].all(), f"edit not learned in {len(losses)} steps (loss {losses[-1]:.3f})"
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in model.parameters())
    with torch.no_grad():  # detached, the model is the base model again
        assert torch.equal(edited.detach()(batch.input_ids), load_hf_lm(checkpoint)(batch.input_ids))


def test_finetune_ffn_trains_only_that_layer(checkpoint, facts):
    batch = _batch(checkpoint, facts, n=2)
    model = load_hf_lm(checkpoint)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    edit(model, finetune_ffn(model, 1), batch, steps=3, lr=1e-3, until_learned=False)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("hf.model.layers.1.mlp.") for k in changed)


def test_anchor_routing_follows_the_anchor_alone():
    torch.manual_seed(0)
    D, T = 16, 7
    adapter = MEMoEAdapter(D, num_experts=8)
    adapter.moe.keep_last_routing = True
    anchors = torch.randn(8, D)
    x_BTD = torch.randn(8, T, D)  # other tokens all different
    for a in anchors:
        adapter(x_BTD, a.expand(8, D))
        r = adapter.moe.last_routing
        assert r.expert_idx_N.unique().numel() == 1  # every token of every prompt: the anchor's expert
    experts = set()
    for a in anchors:  # the expert depends on the anchor
        adapter(x_BTD[:1], a[None])
        experts.add(int(adapter.moe.last_routing.expert_idx_N[0]))
    assert len(experts) > 1


def test_same_anchor_same_expert_through_the_model(checkpoint, facts):
    tok = HFTokenizer(checkpoint)
    f = facts.facts[0]
    prompts = [FactPrompt(f.prompt(t), f.subject, f.object) for t in range(len(RELATIONS[f.relation]))]
    other = next(g for g in facts.facts if g.subject != f.subject)  # another anchor in the same batch
    prompts.append(FactPrompt(other.prompt(0), other.subject, other.object))
    batch = encode_prompts(tok, prompts)
    edited = attach_memoe(load_hf_lm(checkpoint), layer=0, num_experts=16)
    edited.adapter.moe.keep_last_routing = True
    with torch.no_grad():
        edited(batch.input_ids, batch.anchor_mask)
    r = edited.adapter.moe.last_routing
    expert_GS = torch.full((r.num_groups * r.group_size,), -1)
    expert_GS[r.token_idx_N] = r.expert_idx_N
    expert_GS = expert_GS.view(r.num_groups, r.group_size)
    # four templates, the subject at different positions, other words around it: one expert for every token
    assert (expert_GS[:-1] == expert_GS[0, 0]).all()
    router = edited.adapter.router
    assert isinstance(router, KnowledgeAnchorRouter)
    a = edited.anchor_vectors(batch.input_ids, batch.anchor_mask)  # the mean embedding of the subject's tokens
    subject_ids = torch.tensor(tok.encode(f.subject))
    assert torch.allclose(a[0], edited.model.hf.get_input_embeddings()(subject_ids).mean(0))


@pytest.mark.parametrize("layer", [2, -1, 1.0])
def test_bad_layer_is_refused_by_name(layer, checkpoint):
    model = load_hf_lm(checkpoint)
    with pytest.raises(ValueError, match=r"layer=.* the model has 2 decoder layers: use 0\.\.1"):
        attach_memoe(model, layer=layer)
    with pytest.raises(ValueError, match=r"layer=.*use 0\.\.1"):
        finetune_ffn(model, layer)


def test_bad_arguments_are_refused_by_name(facts):
    with pytest.raises(ValueError, match="num_edits=6"):
        edit_split(facts, 6)
    with pytest.raises(ValueError, match="scale"):
        MEMoEAdapter(8, scale=0.0)
    with pytest.raises(ValueError, match="routing='hash' is not allowed"):
        MEMoEAdapter(8, routing="hash")
    with pytest.raises(ValueError, match="attaches to"):
        attach_memoe(torch.nn.Linear(2, 2), layer=0)
    router = KnowledgeAnchorRouter(8, 4)
    with pytest.raises(ValueError, match="no anchor"):
        router(torch.randn(2, 3, 8))


def test_fact_split_is_disjoint_and_paraphrases_are_held_out(facts):
    split = edit_split(facts, 3, seed=1)
    edited = {f.subject for f, _ in split.edits}
    assert len(edited) == 3 and all(new != f.object for f, new in split.edits)
    assert not edited & {p.subject for p in split.locality_prompts}
    assert {p.subject for p in split.neighbourhood_prompts} == edited
    assert not {p.text for p in split.edit_prompts} & {p.text for p in split.paraphrase_prompts}
    assert len(split.paraphrase_prompts) == 3 * (len(next(iter(RELATIONS.values()))) - 1)


def test_command_pretrains_saves_reloads_and_prints_the_table(tmp_path, capsys):
    from nlp.memoe import base_checkpoint, main

    argv = ["--dir", str(tmp_path / "base"), "--pretrain-steps", "2", "--seeds", "0", "--num-edits", "2",
            "--steps", "2", "--json", str(tmp_path / "scores.json")]
    results = main(argv)
    out = capsys.readouterr().out
    assert "| method | edit success % |" in out and "MEMoE (bypass MoE, knowledge-anchor routing)" in out
    assert (tmp_path / "base" / "config.json").is_file() and (tmp_path / "base" / "tokenizer.json").is_file()
    assert set(results) >= {"memoe", "memoe_token", "ft_ffn"} and (tmp_path / "scores.json").is_file()
    stamp = (tmp_path / "base" / "model.safetensors").stat().st_mtime_ns
    base_checkpoint(tmp_path / "base", fact_seed=0, pretrain_steps=2)  # the same settings: reused
    assert (tmp_path / "base" / "model.safetensors").stat().st_mtime_ns == stamp
