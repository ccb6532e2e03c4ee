"""Evaluation that does not depend on the batch (issue 24), for CLIP-MoE: each image and each caption
is its own routing group in either tower, so for every router the domain accepts an image's or a
caption's embedding is the same in a batch of 8 as in batches of 2. (LIMoE routes a whole batch, both
modalities, in one group: see its ``group_size``.)"""

from __future__ import annotations

import open_clip
import pytest
import torch

from multimodal import models as M
from tests.multimodal.test_models import CAPTIONS, MICRO

pytestmark = pytest.mark.usefixtures("one_thread")


def test_clip_moe_embeddings_do_not_depend_on_the_evaluation_batch(make_router, router_name):
    torch.manual_seed(0)
    partial = make_router(router_name)
    try:
        model = M.create_clip_moe(MICRO, num_experts=4, router=partial, vision_layers=[1], text_layers=[1]).eval()
    except ValueError:  # refused, so never batch-dependent: routers by token id or by segment
        assert partial.func.needs_token_ids or partial.func.routes_segments, router_name
        return
    images = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    text = open_clip.SimpleTokenizer(context_length=16)(CAPTIONS)
    for encode, x in ((model.encode_image, images), (model.encode_text, text)):
        with torch.no_grad():
            whole = encode(x)
            in_pairs = torch.cat([encode(x[i:i + 2]) for i in range(0, 8, 2)])
        torch.testing.assert_close(in_pairs, whole, atol=1e-5, rtol=1e-5)
