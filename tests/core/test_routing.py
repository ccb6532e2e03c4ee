"""The Routing value and the two selection rules: the vmoe test vectors of docs/routers.md §2, slot
positions, dense dispatch/combine, masks and eligibility."""

from __future__ import annotations

import pytest
import torch

from core.routers.base import compute_capacity, select_expert_choice, select_token_choice
from core.routing import Routing, positions_in_segment


pytestmark = pytest.mark.usefixtures("one_thread")

TC_GATES = torch.tensor([[0.4, 0.0, 0.2], [0.5, 0.1, 0.4], [0.3, 0.2, 0.6]])
TC_VANILLA = torch.tensor([
    [[0.4, 0.0], [0.0, 0.0], [0.0, 0.2]],
    [[0.0, 0.5], [0.0, 0.0], [0.0, 0.0]],
    [[0.0, 0.0], [0.0, 0.0], [0.6, 0.0]],
])
TC_BPR = torch.tensor([
    [[0.0, 0.4], [0.0, 0.0], [0.0, 0.0]],
    [[0.5, 0.0], [0.0, 0.0], [0.0, 0.4]],
    [[0.0, 0.0], [0.0, 0.0], [0.6, 0.0]],
])
EC_DISPATCH = torch.tensor([
    [[0.0, 1.0], [0.0, 0.0], [0.0, 0.0]],
    [[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]],
    [[0.0, 0.0], [1.0, 0.0], [1.0, 0.0]],
])


@pytest.mark.parametrize("batch_priority, expected", [(False, TC_VANILLA), (True, TC_BPR)], ids=["vanilla", "bpr"])
def test_token_choice_vector(batch_priority, expected):
    g = TC_GATES[None]
    routing = select_token_choice(g, g, k=2, capacity=2, batch_priority=batch_priority)
    dispatch, combine = routing.dense_dispatch_combine()
    torch.testing.assert_close(combine[0], expected)
    torch.testing.assert_close(dispatch[0], (expected > 0).float())
    assert routing.num_choices == 6 and int(routing.num_dropped) == 2


def test_expert_choice_vector():
    g = TC_GATES[None]
    routing = select_expert_choice(g, g, capacity=2)
    dispatch, combine = routing.dense_dispatch_combine()
    torch.testing.assert_close(dispatch[0], EC_DISPATCH)
    torch.testing.assert_close(combine[0], EC_DISPATCH * TC_GATES[..., None])


def test_positions_in_segment():
    key = torch.tensor([2, 0, 2, 1, 0, 2])
    assert positions_in_segment(key, 3).tolist() == [0, 0, 1, 0, 1, 2]
    assert positions_in_segment(torch.zeros(0, dtype=torch.long), 3).numel() == 0


def test_compute_capacity():
    assert compute_capacity(16, 4, 1.0) == 4
    assert compute_capacity(10, 4, 1.05) == 3  # ceil(2.625)
    assert compute_capacity(10, 4, 1.05, multiple_of=4) == 4
    assert compute_capacity(1, 8, 0.5, multiple_of=1) == 1


def test_token_choice_groups_are_independent():
    """Each group fills its own buffers: routing two groups at once equals routing them apart."""
    torch.manual_seed(0)
    g = torch.rand(3, 7, 4).softmax(-1)
    both = select_token_choice(g, g, 2, capacity=3)
    d_all, c_all = both.dense_dispatch_combine()
    for i in range(3):
        one = select_token_choice(g[i:i + 1], g[i:i + 1], 2, capacity=3)
        d, c = one.dense_dispatch_combine()
        torch.testing.assert_close(d_all[i:i + 1], d)
        torch.testing.assert_close(c_all[i:i + 1], c)
    counts = torch.zeros(3, 4, dtype=torch.long)
    counts.index_put_((both.token_idx_N // 7, both.expert_idx_N), torch.ones_like(both.token_idx_N), accumulate=True)
    assert counts.max() <= 3


def test_token_choice_dropless_keeps_everything():
    torch.manual_seed(0)
    g = torch.rand(2, 9, 3).softmax(-1)
    routing = select_token_choice(g, g, 2, capacity=None)
    assert routing.num_kept == 2 * 9 * 2 and int(routing.num_dropped) == 0
    dispatch, combine = routing.dense_dispatch_combine()
    # dropless: C is the largest buffer any (group, expert) needed
    per_group_expert = torch.bincount(routing.token_idx_N // 9 * 3 + routing.expert_idx_N, minlength=6)
    assert dispatch.shape[-1] == int(per_group_expert.max())
    # every token sends exactly K=2 choices, each slot holds at most one token
    assert torch.equal(dispatch.sum((2, 3)), torch.full((2, 9), 2.0))
    assert dispatch.sum(1).max() <= 1
    # combine = dispatch ⊙ gate
    torch.testing.assert_close(combine, dispatch * g[..., None])
    assert routing.tokens_per_expert().sum() == 2 * 9 * 2


def test_token_choice_masked_tokens_take_no_slot():
    """A padded token ahead of real ones must not consume their capacity."""
    g = torch.tensor([[[0.9, 0.1], [0.8, 0.2], [0.7, 0.3]]])
    mask = torch.tensor([[False, True, True]])
    routing = select_token_choice(g, g, 1, capacity=2, mask_GS=mask)
    assert sorted(routing.token_idx_N.tolist()) == [1, 2]
    assert int(routing.num_choices) == 2 and int(routing.num_dropped) == 0


def test_token_choice_ineligible_choices_take_no_slot():
    g = torch.tensor([[[0.6, 0.4], [0.7, 0.3], [0.8, 0.2]]])
    eligible = torch.tensor([[[False, True], [True, True], [True, True]]])
    routing = select_token_choice(g, g, 1, capacity=2, eligible_GSE=eligible)
    # token 0's only choice (expert 0) is ineligible: dropped, and tokens 1, 2 still fit in expert 0
    assert routing.token_idx_N.tolist() == [1, 2]
    assert routing.expert_idx_N.tolist() == [0, 0]


def test_expert_choice_respects_mask_and_eligibility():
    torch.manual_seed(0)
    g = torch.rand(2, 6, 3).softmax(-1)
    mask = torch.tensor([[True, False, True, False, True, True], [False, True, False, False, False, False]])
    routing = select_expert_choice(g, g, capacity=3, mask_GS=mask)
    assert mask.reshape(-1)[routing.token_idx_N].all()
    counts = torch.zeros(2, 3, dtype=torch.long)
    ones = torch.ones_like(routing.token_idx_N)
    counts.index_put_((routing.token_idx_N // 6, routing.expert_idx_N), ones, accumulate=True)
    assert counts.tolist() == [[3, 3, 3], [1, 1, 1]]  # min(C, valid tokens)
    assert int(routing.num_choices) == 12 and int(routing.num_dropped) == 0  # padding is not a drop
    eligible = g > 0.3
    routing = select_expert_choice(g, g, capacity=3, eligible_GSE=eligible)
    assert eligible.reshape(-1, 3)[routing.token_idx_N, routing.expert_idx_N].all()


def test_expert_choice_capacity_is_clipped_to_group_size():
    g = torch.rand(1, 2, 4).softmax(-1)
    routing = select_expert_choice(g, g, capacity=5)
    assert routing.capacity == 2 and routing.num_kept == 2 * 4


def test_dense_dispatch_combine_rebuilds_slot_inputs():
    """x̃[g,e,c] = Σ_s D[g,s,e,c] x[g,s] is the token in that slot (docs/routers.md §1)."""
    torch.manual_seed(0)
    G, S, E, D = 2, 5, 3, 4
    g = torch.rand(G, S, E).softmax(-1)
    x = torch.randn(G, S, D)
    routing = select_token_choice(g, g, 2, capacity=2)
    dispatch, _ = routing.dense_dispatch_combine()
    slots = torch.einsum("gsec,gsd->gecd", dispatch, x)
    slot_N = routing.slot_idx_N()
    group_N = routing.token_idx_N // S
    torch.testing.assert_close(slots[group_N, routing.expert_idx_N, slot_N], x.reshape(G * S, D)[routing.token_idx_N])


def test_soft_and_merged_routings():
    d = torch.rand(1, 3, 2, 1)
    soft = Routing(1, 3, 2, dispatch_GSEP=d, combine_GSEP=d, capacity=1)
    assert soft.is_soft and soft.num_kept == 0
    assert soft.dense_dispatch_combine()[0] is d
    torch.testing.assert_close(soft.tokens_per_expert(), d.sum((0, 1, 3)))
    merged = Routing(2, 3, 2, merge_GE=torch.tensor([[0.5, 0.5], [1.0, 0.0]]))
    assert merged.is_merged and int(merged.num_dropped) == 0
    with pytest.raises(ValueError, match="merge"):
        merged.dense_dispatch_combine()
