"""Helpers for the language-model tests: tiny models over any ``conf/router`` config, and the
composed ``conf/nlp/train.yaml`` shrunk by the ``debug`` overlay."""

from __future__ import annotations

import functools

import pytest
import torch
from nlp.models import MoETransformerLM
from tests.conftest import compose, make_router_partial, router_names

VOCAB, SEQ = 40, 16


def tiny_lm(router=None, **kwargs) -> MoETransformerLM:
    """A 2-block width-32 LM with 4 experts in both blocks, on 16-token sequences."""
    args = dict(vocab_size=VOCAB, dim=32, depth=2, num_heads=2, max_seq_len=SEQ, mlp_ratio=2.0,
                moe_layers="all", num_experts=4, router=router)
    args.update(kwargs)
    torch.manual_seed(0)
    return MoETransformerLM(**args)


@functools.lru_cache(maxsize=None)
def is_causal_router(name: str) -> bool:
    """Whether ``conf/router/<name>.yaml`` builds a causal router (with the defaults of tiny_lm)."""
    return bool(make_router_partial(name)(dim=32, num_experts=4).is_causal)


def causal_router_names() -> list[str]:
    return [n for n in router_names() if is_causal_router(n)]


def compose_nlp(*overrides: str):
    """``conf/nlp/train.yaml`` composed with the debug overlay and the given overrides."""
    return compose("nlp", "debug=default", *overrides)


@pytest.fixture
def random_ids():
    return torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(1))
