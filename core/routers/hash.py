"""Hash routing (Roller, Sukhbaatar, Szlam, Weston, "Hash Layers For Large Sparse Models",
NeurIPS 2021): each token goes to one expert chosen by a fixed hash of its token id, ``h ← h +
f_{hash(id)}(h)``. No parameters, no auxiliary loss, nothing dropped; the routing is a pure function
of the token ids, so it is causal, but it needs token ids (language models).

The hash is a seeded universal hash ``((a·id + b) mod p) mod E`` with p = 2³¹ − 1 and a, b drawn from
``seed``: a fixed pseudo-random, roughly balanced map from ids to experts that needs no vocabulary size.

Legend: G groups, S tokens per group, D width, E experts.
"""

from __future__ import annotations

import torch

from core.routers.base import Router, check_positive_int, select_token_choice
from core.routing import Routing

_PRIME = 2**31 - 1


class HashRouter(Router):
    """Expert = fixed hash of the token id.

    Args:
        dim: D.
        num_experts: E.
        seed: picks the hash function (same seed, same map).
    """

    family = "assignment"
    needs_token_ids = True

    def __init__(self, dim: int, num_experts: int, seed: int = 0):
        super().__init__(dim, num_experts)
        check_positive_int("seed", seed, minimum=0)
        gen = torch.Generator().manual_seed(int(seed))
        ab = torch.randint(1, _PRIME, (2,), generator=gen)
        self.seed = int(seed)
        self.hash_a, self.hash_b = int(ab[0]), int(ab[1])

    def expert_of(self, token_ids: torch.Tensor) -> torch.Tensor:
        """The expert of each token id (any shape, integer ids >= 0)."""
        ids = token_ids.long() % _PRIME  # keeps a·id below 2⁶² (no int64 overflow)
        return ((ids * self.hash_a + self.hash_b) % _PRIME) % self.num_experts

    def forward(self, x_GSD: torch.Tensor, mask_GS: torch.Tensor | None = None,
                token_ids_GS: torch.Tensor | None = None, **kwargs) -> Routing:
        if token_ids_GS is None:
            raise ValueError("hash routing needs token ids: use it in the nlp domain or pass token_ids= "
                             "to the MoE layer.")
        if token_ids_GS.shape != x_GSD.shape[:2]:
            raise ValueError(f"token_ids_GS has shape {tuple(token_ids_GS.shape)}; "
                             f"{tuple(x_GSD.shape[:2])} is needed.")
        expert_GS = self.expert_of(token_ids_GS.to(x_GSD.device))
        onehot_GSE = torch.nn.functional.one_hot(expert_GS, self.num_experts).to(torch.float32)
        self.aux_losses = {}
        return select_token_choice(onehot_GSE, onehot_GSE, 1, None, False, mask_GS)
