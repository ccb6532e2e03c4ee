"""Evaluation that does not depend on the batch (issue 24), in vision: a V-MoE routes each image's
patches as one group (``model.group_size`` null), so for every router the domain accepts an image's
logits are the same whether it is evaluated in a batch of 8 or of 2. Routers that would tie an image to
its batch neighbours (Lory's segments) are refused in vision instead. The same holds in nlp (one group
per sequence); recsys, whose groups span examples, has ``tests/recsys/test_eval_batch_invariance.py``."""

from __future__ import annotations

import pytest
import timm
import torch

import vision  # noqa: F401  (registers vmoe_* with timm)
from core.checks import NotApplicableError
from tests.conftest import make_router_partial

pytestmark = pytest.mark.usefixtures("one_thread")


def test_an_images_logits_do_not_depend_on_its_evaluation_batch(router_name):
    torch.manual_seed(0)
    partial = make_router_partial(router_name)
    try:
        model = timm.create_model("vmoe_tiny_patch4_28", router=partial, depth=2, embed_dim=32, num_heads=2)
    except NotApplicableError:  # refused, so never batch-dependent: routers by token id or by segment
        assert partial.func.needs_token_ids or partial.func.routes_segments, router_name
        return
    model.eval()
    images = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        whole = model(images)
        in_pairs = torch.cat([model(images[i:i + 2]) for i in range(0, 8, 2)])
    torch.testing.assert_close(in_pairs, whole, atol=1e-5, rtol=1e-5)
