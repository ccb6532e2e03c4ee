"""Token dispatchers: how a MoE layer's kept assignments reach its experts and come back.

A ``core.MoE`` layer routes, then hands its sparse ``Routing`` (token ids, expert ids, combine gates
of the N kept assignments) to ``layer.dispatcher``:

- ``LocalDispatcher`` (every layer's default): every expert lives in this process. The experts'
  fused path (``Experts.forward_routed``: sort by expert, gather, run, scale, scatter-add) or, for an
  experts module without one, ``dispatch_combine``.
- ``AllToAllDispatcher``: the experts are spread over the ranks of a device mesh's expert dimension
  (expert parallelism: GShard, Lepikhin et al., ICLR 2021; Switch Transformer, Fedus et al., JMLR
  2022). Each rank holds E/W experts as DTensor slices (``Shard(0)`` on the mesh) and routes its own
  tokens; the dispatcher

  1. exchanges the per-expert counts (``all_to_all_single``), so every rank knows how many rows it
     sends to and receives from every other rank;
  2. sends the token copies, sorted by expert and hence by owning rank, with variable split sizes
     (MegaBlocks' ``parallel_forward_once`` does the same, Gale et al., MLSys 2023);
  3. runs its local experts on the rows it received (the experts' own fused path, on the local
     slices of their weights);
  4. sends the outputs back the same way; the source rank applies the gates and sums,
     ``out[t] = Σ_n w_n · y_n``.

  Both exchanges are differentiable (the backward is the reverse exchange), so gradients reach the
  inputs, the router (through the gates) and every expert; an expert's gradient lands on the rank
  that holds it, as a DTensor shard, and needs no further reduction.

Soft and merged routings (Soft MoE, SMEAR, Lory) mix every token with every expert and have no
all-to-all form: the layer refuses them under expert parallelism (``ValueError``).

``core.parallel`` builds the mesh and installs the dispatcher (``trainer.expert_parallel``); nothing
here rewrites a module's class.

Legend: T tokens, D input width, O output width, E experts, L local experts (E/W), W ranks,
N assignments sent from this rank, M rows received by this rank.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn

from core.experts import dispatch_combine

__all__ = ["AllToAllDispatcher", "LocalDispatcher", "all_to_all", "local_weights", "run_local_experts"]


def _run_experts(experts: nn.Module, x_TD, token_idx_N, expert_idx_N, weight_N) -> torch.Tensor:
    if hasattr(experts, "forward_routed"):  # fused gather/experts/combine (core.experts)
        return experts.forward_routed(x_TD, token_idx_N, expert_idx_N, weight_N)
    return dispatch_combine(experts, x_TD, token_idx_N, expert_idx_N, weight_N)


class LocalDispatcher:
    """Every expert in this process: the experts' own fused path."""

    is_local = True

    def __call__(self, experts: nn.Module, x_TD: torch.Tensor, token_idx_N: torch.Tensor,
                 expert_idx_N: torch.Tensor, weight_N: torch.Tensor) -> torch.Tensor:
        return _run_experts(experts, x_TD, token_idx_N, expert_idx_N, weight_N)

    def __repr__(self) -> str:
        return "LocalDispatcher()"


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of rows with variable split sizes; backward sends the gradients back."""

    @staticmethod
    def forward(ctx, x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int], group):
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x_ND.new_empty((sum(recv_splits), *x_ND.shape[1:]))
        dist.all_to_all_single(out, x_ND.contiguous(), recv_splits, send_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_MD: torch.Tensor):
        grad = grad_MD.new_empty((sum(ctx.send_splits), *grad_MD.shape[1:]))
        dist.all_to_all_single(grad, grad_MD.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return grad, None, None, None


def all_to_all(x_ND: torch.Tensor, send_splits: list[int], recv_splits: list[int], group=None) -> torch.Tensor:
    """Rows ``x_ND`` cut into ``send_splits`` go one block per rank; returns the ``recv_splits`` rows
    received, ordered by source rank. Differentiable (the backward is the reverse exchange)."""
    return _AllToAll.apply(x_ND, list(send_splits), list(recv_splits), group)


@contextlib.contextmanager
def local_weights(module: nn.Module, names):
    """Within the block, ``module.<name>`` is the local slice (``to_local()``, differentiable) of each
    DTensor parameter in ``names``, so the module's own code runs unchanged on its shard; the
    DTensor parameters are back in place afterwards."""
    saved = {n: module._parameters[n] for n in names}
    mine = {n: p.to_local() for n, p in saved.items()}
    try:
        module._parameters.update(mine)
        yield
    finally:  # unless something re-registered a parameter meanwhile (FSDP's hooks do): then keep that
        for n, p in saved.items():
            if module._parameters.get(n) is mine[n]:
                module._parameters[n] = p


def run_local_experts(experts: nn.Module, names, x_MD: torch.Tensor, local_M: torch.Tensor) -> torch.Tensor:
    """Received rows ``x_MD`` through this rank's experts ``local_M`` (gate 1: the source rank
    applies the gates), on the local slices of their DTensor weights ``names``. An experts module
    that FSDP also shards (a 2-D mesh) carries this as its ``run_local`` method, registered with
    FSDP, so that its weights are gathered over the groups first."""
    M = x_MD.shape[0]
    rows_M = torch.arange(M, device=x_MD.device)
    with local_weights(experts, names):
        return _run_experts(experts, x_MD, rows_M, local_M, x_MD.new_ones(M))


class AllToAllDispatcher:
    """Experts spread over the ranks of ``mesh`` (1-D, the expert dimension): this rank holds experts
    ``[first, first + L)``; their per-expert parameters ``names`` are DTensors sharded on dim 0.
    Every rank of the mesh must call it (a collective)."""

    is_local = False

    def __init__(self, mesh, num_experts: int, names: tuple[str, ...]):
        self.mesh = mesh  # the group is looked up when used: no process-group object outlives its teardown
        self.world = mesh.size()
        self.num_experts = num_experts
        self.local_experts = num_experts // self.world
        self.first = mesh.get_local_rank() * self.local_experts
        self.names = tuple(names)

    def __repr__(self) -> str:
        return (f"AllToAllDispatcher(ranks={self.world}, experts={self.num_experts}, "
                f"local=[{self.first}, {self.first + self.local_experts}))")

    @property
    def group(self):
        return self.mesh.get_group()

    def __call__(self, experts: nn.Module, x_TD: torch.Tensor, token_idx_N: torch.Tensor,
                 expert_idx_N: torch.Tensor, weight_N: torch.Tensor) -> torch.Tensor:
        group, W, L = self.group, self.world, self.local_experts
        order_N = torch.argsort(expert_idx_N, stable=True)  # by expert, hence by owning rank
        token_N = token_idx_N.index_select(0, order_N)
        weight_sorted_N = weight_N.index_select(0, order_N)
        counts_E = torch.bincount(expert_idx_N, minlength=W * L)
        recv_counts_E = torch.empty_like(counts_E)  # [j·L + l]: rows rank j sends to my expert l
        dist.all_to_all_single(recv_counts_E, counts_E, group=group)
        recv_WL = recv_counts_E.view(W, L)
        send_splits = counts_E.view(W, L).sum(1).tolist()  # one host sync, as MegaBlocks
        recv_splits = recv_WL.sum(1).tolist()
        x_recv_MD = all_to_all(x_TD.index_select(0, token_N), send_splits, recv_splits, group)
        local_M = torch.repeat_interleave(torch.arange(L, device=x_TD.device).repeat(W), recv_WL.reshape(-1))
        run_local = getattr(experts, "run_local", None)
        if run_local is not None:
            y_recv_MO = run_local(x_recv_MD, local_M)
        else:
            y_recv_MO = run_local_experts(experts, self.names, x_recv_MD, local_M)
        y_NO = all_to_all(y_recv_MO, recv_splits, send_splits, group)
        y_NO = y_NO * weight_sorted_N.to(y_NO.dtype)[:, None]
        return y_NO.new_zeros(x_TD.shape[0], y_NO.shape[1]).index_add_(0, token_N, y_NO)
