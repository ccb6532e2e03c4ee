"""LocMoE under expert parallelism on 2 loopback ranks (Li et al., "LocMoE: A Low-Overhead MoE for Large
Language Model Training", IJCAI 2024): on the same tokens and experts, LocMoE keeps more assignments
on the token's own rank and sends fewer bytes to the other rank than top-k (``core.bench_distributed
--routers``)."""

from __future__ import annotations

import argparse
import math

import torch

from core import bench_distributed as bd
from core.routers.locmoe import spherical_cap_fraction


def _args(**kw):
    base = dict(world=2, tokens=256, dim=32, hidden=32, experts=4, top_k=2, steps=1, warmup=0,
                local_bias=0.1, capacity_factor=1.0)
    base.update(kw)
    return argparse.Namespace(**base)


def test_cross_rank_bytes_counts_only_other_ranks_blocks():
    x = torch.zeros(10, 3, dtype=torch.float32)
    assert bd.cross_rank_bytes(x, [4, 6], rank=0, world=2) == 6 * 3 * 4
    assert bd.cross_rank_bytes(x, [4, 6], rank=1, world=2) == 4 * 3 * 4
    counts = torch.zeros(4, dtype=torch.int64)  # equal blocks when no split sizes are given
    assert bd.cross_rank_bytes(counts, None, rank=1, world=2) == 2 * 8


def test_locmoe_sends_fewer_cross_rank_bytes_than_topk_at_two_ranks():
    args = _args()
    topk = bd.locality(args, "topk", 2)
    loc = bd.locality(args, "locmoe", 2)
    assert loc["own_rank_share"] > topk["own_rank_share"] + 0.05
    assert loc["cross_rank_bytes_per_rank"] < topk["cross_rank_bytes_per_rank"]
    # every assignment is kept (dropless): the bytes follow from the remote share of T*K rows
    for r in (topk, loc):
        assert r["cross_rank_bytes_per_rank"] > 0 and 0.0 < r["own_rank_share"] < 1.0
        assert r["capacity_lower_bound"] == math.ceil(args.tokens * spherical_cap_fraction(args.dim, r["max_angle"]) - 1e-9)
        assert r["topk_capacity"] == args.tokens * args.top_k // args.experts
