"""Reference implementations of the other MoE layer styles, for ``core.bench`` only.

Each is a small, honest rendering of how a well-known code base computes a dropless (or capacity)
top-K MoE FFN, sharing the same router arithmetic (fp32 softmax over E logits, top-K,
renormalised over the K picks, as in Mixtral) so that only dispatch, expert compute and combine
differ:

- ``LoopMoE``: per-expert Python loop over ``nn.Linear`` experts, ``x[idx]`` gathers and
  ``index_add_`` (HF transformers' eager Mixtral/Qwen2-MoE block).
- ``CapacityBmmMoE``: positions by a cumulative sum, tokens copied into an E×C×D buffer (C =
  ⌈cf·T·K/E⌉, overflow dropped), two batched matmuls, a weighted gather back (Tutel's
  ``fast_encode``/``fast_decode`` + bmm; Hwang et al., 2023).
- ``EinsumMoE``: GShard's dense T×E×C dispatch/combine tensors and two einsums (Lepikhin et al.,
  2021; fairseq and DeepSpeed ``sharded_moe``).
- ``DenseFFN``: the dense FFN with hidden width K·F, i.e. the same activated FLOPs.

Legend: T tokens, D width, F expert hidden width, E experts, K experts per token, C capacity.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def topk_renormalized(x_TD: torch.Tensor, gate_ED: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixtral routing: fp32 softmax over the E logits, top-K, gates renormalised over the K picks."""
    probs_TE = torch.softmax(nn.functional.linear(x_TD.float(), gate_ED.float()), dim=-1)
    w_TK, idx_TK = torch.topk(probs_TE, k, dim=-1)
    return idx_TK, (w_TK / w_TK.sum(-1, keepdim=True)).to(x_TD.dtype)


def capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    return math.ceil(capacity_factor * num_tokens * k / num_experts)


def slot_positions(idx_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Position of every (token, k) pick in its expert's buffer, K-major priority (every first
    choice before any second choice), by a cumulative sum over one-hot masks (GShard/Tutel)."""
    T, K = idx_TK.shape
    mask_KTE = nn.functional.one_hot(idx_TK.t(), num_experts)
    pos_KTE = torch.cumsum(mask_KTE.reshape(K * T, num_experts), 0).view(K, T, num_experts) - 1
    return (pos_KTE * mask_KTE).sum(-1).t()


class _Router(nn.Module):
    def __init__(self, dim: int, num_experts: int, k: int):
        super().__init__()
        self.k = k
        self.gate_ED = nn.Parameter(torch.randn(num_experts, dim) / math.sqrt(dim))


class DenseFFN(nn.Module):
    """``fc2(act(fc1(x)))`` with hidden width K·F and no bias: the same activated FLOPs."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=False)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x_TD)))


class LoopMoE(_Router):
    """HF eager style: a Python loop over the experts that received tokens."""

    def __init__(self, dim: int, hidden: int, num_experts: int, k: int):
        super().__init__(dim, num_experts, k)
        self.experts = nn.ModuleList(DenseFFN(dim, hidden) for _ in range(num_experts))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        idx_TK, w_TK = topk_renormalized(x_TD, self.gate_ED, self.k)
        out_TD = torch.zeros_like(x_TD)
        mask_EKT = nn.functional.one_hot(idx_TK, len(self.experts)).permute(2, 1, 0)
        hit_E = torch.nonzero(mask_EKT.sum((1, 2)) > 0).flatten().tolist()
        for e in hit_E:
            k_M, tok_M = torch.where(mask_EKT[e])
            y_MD = self.experts[e](x_TD[tok_M]) * w_TK[tok_M, k_M, None]
            out_TD.index_add_(0, tok_M, y_MD)
        return out_TD


class _StackedExperts(_Router):
    def __init__(self, dim: int, hidden: int, num_experts: int, k: int, capacity_factor: float):
        super().__init__(dim, num_experts, k)
        self.capacity_factor = capacity_factor
        bound1, bound2 = 1 / math.sqrt(dim), 1 / math.sqrt(hidden)
        self.w1_EDF = nn.Parameter(torch.empty(num_experts, dim, hidden).uniform_(-bound1, bound1))
        self.w2_EFD = nn.Parameter(torch.empty(num_experts, hidden, dim).uniform_(-bound2, bound2))
        self.act = nn.GELU()

    def experts(self, x_ECD: torch.Tensor) -> torch.Tensor:
        return torch.bmm(self.act(torch.bmm(x_ECD, self.w1_EDF)), self.w2_EFD)

    def slots(self, x_TD: torch.Tensor):
        """Top-k routing with capacity: ``(idx_TK, w_TK, C, pos_TK, keep_TK)``, slots claimed in token order."""
        E = self.w1_EDF.shape[0]
        idx_TK, w_TK = topk_renormalized(x_TD, self.gate_ED, self.k)
        C = capacity(x_TD.shape[0], E, self.k, self.capacity_factor)
        pos_TK = slot_positions(idx_TK, E)
        return idx_TK, w_TK, C, pos_TK, pos_TK < C


class CapacityBmmMoE(_StackedExperts):
    """Tutel style: index-copy into a padded E×C×D buffer, batched matmuls, weighted gather back."""

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        T, D = x_TD.shape
        E = self.w1_EDF.shape[0]
        idx_TK, w_TK, C, pos_TK, keep_TK = self.slots(x_TD)
        slot_N = (idx_TK * C + pos_TK)[keep_TK]
        tok_N = torch.arange(T, device=x_TD.device)[:, None].expand_as(idx_TK)[keep_TK]
        buf_ECD = x_TD.new_zeros(E * C, D).index_add(0, slot_N, x_TD.index_select(0, tok_N)).view(E, C, D)
        y_ND = self.experts(buf_ECD).reshape(E * C, D).index_select(0, slot_N) * w_TK[keep_TK][:, None]
        return x_TD.new_zeros(T, D).index_add(0, tok_N, y_ND)


class EinsumMoE(_StackedExperts):
    """GShard style: dense T×E×C dispatch and combine tensors contracted with einsums."""

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        T, D = x_TD.shape
        E = self.w1_EDF.shape[0]
        idx_TK, w_TK, C, pos_TK, keep_TK = self.slots(x_TD)
        tok_TK = torch.arange(T, device=x_TD.device)[:, None].expand_as(idx_TK)
        combine_TEC = x_TD.new_zeros(T, E, C).index_put(
            (tok_TK[keep_TK], idx_TK[keep_TK], pos_TK[keep_TK]), w_TK[keep_TK])
        dispatch_TEC = (combine_TEC > 0).to(x_TD.dtype)
        x_ECD = torch.einsum("tec,td->ecd", dispatch_TEC, x_TD)
        return torch.einsum("tec,ecd->td", combine_TEC, self.experts(x_ECD))


class ExpertsCeiling(nn.Module):
    """Not a layer but a bound: E separate FFNs of width F, expert e on its own contiguous input of
    ``counts[e]`` rows (the counts of a real routing, so the same uneven GEMM shapes), with no
    router, gather, gating or scatter. Its time is the per-expert GEMMs and activations alone, what
    a layer that runs one GEMM per expert and projection would take if routing and data movement
    were free; a layer's time over it is what those cost. (At tiny widths, where per-call overhead
    dominates, a batched style can beat it.)

    ``forward()`` takes no input and returns the E outputs; ``grads`` are matching upstream
    gradients for a forward+backward pass (the inputs require grad, so the backward computes the
    input gradients as a layer's does)."""

    def __init__(self, dim: int, hidden: int, counts: list[int], device: torch.device | str = "cpu"):
        super().__init__()
        counts = [int(m) for m in counts if m > 0]
        self.experts = nn.ModuleList(DenseFFN(dim, hidden) for _ in counts)
        self.inputs = [torch.randn(m, dim, device=device, requires_grad=True) for m in counts]
        self.grads = [torch.randn(m, dim, device=device) for m in counts]

    def forward(self) -> list[torch.Tensor]:
        return [ffn(x_MD) for ffn, x_MD in zip(self.experts, self.inputs)]
