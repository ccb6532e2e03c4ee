"""Evaluation that does not depend on the batch (issue 24).

CLIP-MoE: each image and each caption is its own routing group in either tower. LIMoE: a routing group
is ``routing_group_size`` consecutive image-caption pairs (both modalities in one group; the run's
config sets it to ``data.batch_size``), the last one padded. So for every router the domain accepts,
an example's embedding is the same whatever the evaluation batch (its size, the order of the batches),
as long as the batches hold whole groups. Compared to 1e-5 in float32, not exactly: the same example
goes through matmuls of different batch shapes, whose kernels may sum in another order."""

from __future__ import annotations

import open_clip
import pytest
import torch

from core.checks import ConfigError
from multimodal import models as M
from multimodal.training import validate_config
from tests.conftest import compose
from tests.multimodal.test_models import CAPTIONS, MICRO

pytestmark = pytest.mark.usefixtures("one_thread")

MICRO_LIMOE = dict(embed_dim=32, image_size=16, patch_size=4, context_length=16, width=32, layers=2, heads=2,
                   num_experts=4, moe_layers="all")
PAIRS, GROUP = 10, 4  # groups of 4 pairs: 4 + 4 + 2, the last one partial


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


@pytest.fixture(scope="module")
def pairs():
    captions = CAPTIONS + ["a photo of a trouser", "grinning face"]
    return (torch.randn(PAIRS, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
            open_clip.SimpleTokenizer(context_length=16)(captions))


def _embeddings(model, images, text, batch_size: int, reverse: bool = False) -> dict[str, torch.Tensor]:
    """Joint (image, text) features, image-only and text-only features of every pair, computed in batches
    of ``batch_size`` pairs (in reverse batch order when ``reverse``) and put back in pair order."""
    starts = list(range(0, PAIRS, batch_size))
    out: dict[str, dict[int, torch.Tensor]] = {"image": {}, "text": {}, "image_alone": {}, "text_alone": {}}
    with torch.no_grad():
        for s in reversed(starts) if reverse else starts:
            i, t = images[s:s + batch_size], text[s:s + batch_size]
            out["image"][s], out["text"][s], _ = model(i, t)
            out["image_alone"][s] = model.encode_image(i)
            out["text_alone"][s] = model.encode_text(t)
    return {k: torch.cat([v[s] for s in starts]) for k, v in out.items()}


def test_limoe_embeddings_do_not_depend_on_the_evaluation_batch(make_router, router_name, pairs):
    """Every conf/router/*.yaml LIMoE takes: each pair's joint, image-only and text-only embeddings
    are the same in batches of 4 and 8 pairs, all 10 at once, and batches of 4 taken in reverse order."""
    torch.manual_seed(0)
    partial = make_router(router_name)
    try:
        model = M.LIMoE(**MICRO_LIMOE, router=partial, routing_group_size=GROUP).eval()
    except ValueError:  # refused, so never batch-dependent: routers by token id or by segment
        assert partial.func.needs_token_ids or partial.func.routes_segments, router_name
        return
    ref = _embeddings(model, *pairs, GROUP)
    for batch_size, reverse in ((8, False), (PAIRS, False), (GROUP, True)):
        got = _embeddings(model, *pairs, batch_size, reverse)
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], atol=1e-5, rtol=1e-5,
                                       msg=lambda m: f"{key}, batch {batch_size}, reverse={reverse}: {m}")


def test_limoe_routes_groups_of_routing_group_size_pairs(pairs):
    """10 pairs, groups of 4: three groups of 4·(17 patches + 16 text tokens) tokens; the last holds 2 pairs
    and padding, which no expert receives and no statistic counts."""
    images, text = pairs
    model = M.LIMoE(**MICRO_LIMOE, router="expert_choice", routing_group_size=GROUP).eval()
    model(images, text)
    valid_text = int((text != 0).sum())
    for (_, layer), counts_ME in zip(model.moe_layers(), model.modality_tokens_LME):
        r = layer.last_routing
        assert (r.num_groups, r.group_size) == (3, GROUP * (17 + 16))
        assert int(r.mask_GS.sum()) == PAIRS * 17 + valid_text
        assert not r.mask_GS[2, 2 * 17:GROUP * 17].any()  # the missing pairs' image slots are padding
        assert bool(r.mask_GS.flatten()[r.token_idx_N].all())  # no assignment to a padding token
        assert float(counts_ME.sum()) == float(r.token_idx_N.numel())


def test_limoe_routing_group_comes_from_the_training_batch():
    cfg = compose("multimodal", "model=limoe")
    assert cfg.model.routing_group_size == cfg.data.batch_size
    assert cfg.data.eval_batch_size % cfg.data.batch_size == 0
    validate_config(compose("multimodal", "model=limoe", "debug=default", "data.eval_batch_size=32"))
    with pytest.raises(ConfigError, match=r"data.eval_batch_size=100 .*routing_group_size=32.*e.g. 128"):
        validate_config(compose("multimodal", "model=limoe", "debug=default", "data.eval_batch_size=100"))


def test_limoe_refuses_groups_its_router_cannot_route():
    """BASE gives every expert S/E tokens: 3 pairs of 17 + 16 tokens are 99, not a multiple of E = 4."""
    with pytest.raises(ValueError, match=r"routing_group_size=3 .*99 tokens.*multiple of num_experts=4"):
        M.LIMoE(**MICRO_LIMOE, router="base", routing_group_size=3)
    with pytest.raises(ConfigError, match=r"model.routing_group_size=30 .*2910 tokens \(97 per pair\)"):
        validate_config(compose("multimodal", "model=limoe", "+router=base", "debug=default", "data.batch_size=30",
                                "data.eval_batch_size=120"))
