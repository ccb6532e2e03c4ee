"""Evaluation that does not depend on the batch (issue 24), in nlp: each sequence is its own routing
group (or, for Lory, its own run of segments), so for every router a sequence's logits are the same in a
batch of 8 as in batches of 2, non-causal routers included (built with allow_noncausal_routing)."""

from __future__ import annotations

import pytest
import torch

from tests.nlp.conftest import SEQ, VOCAB, tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_sequences_logits_do_not_depend_on_its_evaluation_batch(router_name, make_router):
    model = tiny_lm(make_router(router_name), allow_noncausal_routing=True).eval()
    ids = torch.randint(0, VOCAB, (8, SEQ), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        whole = model(ids)
        in_pairs = torch.cat([model(ids[i:i + 2]) for i in range(0, 8, 2)])
    torch.testing.assert_close(in_pairs, whole, atol=1e-5, rtol=1e-5)
