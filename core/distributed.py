"""Past one process: the process group, data-parallel gradients and expert parallelism.

Expert parallelism (GShard, Lepikhin et al., ICLR 2021; Switch Transformer, Fedus et al., JMLR
2022): each of W ranks holds E/W of a MoE layer's routed experts. The router runs replicated on
every rank, on that rank's own tokens, and returns the usual ``Routing`` (kept assignments and
combine gates). The layer then

1. counts its assignments per expert and exchanges the counts (``all_to_all_single``, E/W per rank),
   so that every rank knows how many rows it sends to and receives from every other rank;
2. sends the token copies, sorted by expert and hence by owning rank, with ``all_to_all_single``
   and variable split sizes (MegaBlocks' ``parallel_forward_once`` does the same, Gale et al.,
   MLSys 2023);
3. runs its local experts on the rows it received (the fused ``Experts.forward_routed`` path);
4. sends the expert outputs back the same way and combines them on the source rank,
   ``out[t] = Σ_n w_n · y_n``.

Both exchanges are an autograd function whose backward is the reverse exchange, so gradients reach
the inputs, the router (through the combine gates) and every expert. Shared experts (DeepSeekMoE)
and the router are replicated like any dense parameter. Soft MoE and merged routings (Soft MoE,
SMEAR, Lory) mix every token with every expert and are refused with a ``ValueError``.

``shard_experts(model)`` converts every ``core.MoE`` layer in place: its experts module keeps only
the local experts' slices (same parameter names, first dimension E/W) and gains the exchange.
``full_state_dict`` / ``load_full_state_dict`` (and the optimizer counterparts) read and write the
unsharded layout, so checkpoints load on any number of ranks.

What is exact and what is per rank (engine, ``trainer.expert_parallel``): each rank's loss is
weighted by its share of the global batch, so summed gradients are the global mean's; routing
statistics are summed over ranks (``sum_routing_stats``), and so are the loads behind DeepSeek's
bias update (``sum_router_loads``). Auxiliary losses, though, are computed by each rank's router on
its own tokens (the importance/load CV² of half a batch is not that of the batch), and router noise
comes from a per-rank random stream; both are standard practice (Switch, GShard compute balance
losses per device) and keep runs close to, not equal to, one process.

Data parallelism is an explicit gradient all-reduce (``all_reduce_gradients``) rather than a DDP
wrapper: the engine hands the model itself to the domain's loss and evaluation functions, which
may call methods other than ``forward`` (DDP only synchronises through ``forward``). Parameters
marked as sharded (local experts, sharded embedding tables) are never all-reduced.

Legend: T tokens, D input width, O output width, E experts, L local experts (E/W), W ranks,
N assignments sent from this rank, M rows received by this rank.
"""

from __future__ import annotations

import atexit
import logging
import os
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from core.experts import dispatch_combine
from core.moe import MoE

log = logging.getLogger(__name__)

_SHARDED_ATTR = "_moe_suite_sharded"  # set on parameters that live on one rank only
_EP_PARAMS = ("w1_EDF", "w2_EFO", "w3_EDF", "b1_EF", "b2_EO")


# ----------------------------------------------------------------------------------- process group


def env_world_size() -> int:
    """WORLD_SIZE as torchrun sets it (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank(group) if is_initialized() else 0


def get_world_size(group: dist.ProcessGroup | None = None) -> int:
    """Ranks in the group (1 without a process group)."""
    return dist.get_world_size(group) if is_initialized() else 1


def is_main_process() -> bool:
    """Rank 0, or the only process: the one that writes files. Before the process group exists, the
    rank torchrun gave the process (``RANK``)."""
    return (get_rank() if is_initialized() else int(os.environ.get("RANK", "0"))) == 0


def init_distributed(device_type: str = "cpu") -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) when
    WORLD_SIZE > 1: gloo for CPU, NCCL for CUDA (each rank on GPU LOCAL_RANK). Idempotent; the group
    is destroyed at interpreter exit. Returns whether a multi-process group is active."""
    if is_initialized():
        return get_world_size() > 1
    if env_world_size() <= 1:
        return False
    if device_type not in ("cpu", "cuda"):
        raise ValueError(f"device type {device_type!r} is not allowed for distributed training: cpu or cuda.")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    atexit.register(teardown_distributed)
    log.info("joined the process group: rank %d of %d (%s)", get_rank(), get_world_size(), backend)
    return True


def teardown_distributed() -> None:
    """Leave the process group (no-op without one)."""
    if is_initialized():
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """``device`` with CUDA narrowed to this rank's GPU (LOCAL_RANK) under torchrun."""
    if device.type == "cuda" and device.index is None and env_world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


# ---------------------------------------------------------------------------------- the exchange


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


class ExpertParallel(nn.Module):
    """Mixin of an experts module whose experts are spread over the ranks of ``ep_group``.

    ``shard_experts`` turns an ``Experts`` (or any module with its interface) into a subclass of
    this mixin and of its own class, so parameter names stay those of the unsharded module and
    the local compute is the class's own ``forward_routed`` (or ``forward``). Attributes:
    ``num_experts`` is L (local), ``num_global_experts`` E, ``first_expert`` the first local id.
    """

    ep_group = None
    num_global_experts: int
    first_expert: int
    ep_sharded: tuple[str, ...]

    def _local_forward(self, x_MD: torch.Tensor, local_M: torch.Tensor) -> torch.Tensor:
        """Each received row through its local expert (gate 1: the gate is applied at the source)."""
        rows_M = torch.arange(x_MD.shape[0], device=x_MD.device)
        ones_M = x_MD.new_ones(x_MD.shape[0])
        if hasattr(super(), "forward_routed"):
            return super().forward_routed(x_MD, rows_M, local_M, ones_M)
        return dispatch_combine(self, x_MD, rows_M, local_M, ones_M)

    def forward_routed(self, x_TD: torch.Tensor, token_idx_N: torch.Tensor, expert_idx_N: torch.Tensor,
                       weight_N: torch.Tensor) -> torch.Tensor:
        """``out[t] = Σ_{n: token_n = t} w_n · expert_{e_n}(x[t])`` with the experts spread over the
        ranks (global expert ids). Every rank of the group must call it (a collective)."""
        group, L = self.ep_group, self.num_experts
        W = get_world_size(group)
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
        y_recv_MO = self._local_forward(x_recv_MD, local_M)
        y_NO = all_to_all(y_recv_MO, recv_splits, send_splits, group)
        y_NO = y_NO * weight_sorted_N.to(y_NO.dtype)[:, None]
        return y_NO.new_zeros(x_TD.shape[0], y_NO.shape[1]).index_add_(0, token_N, y_NO)

    def forward_batched(self, x_EMD: torch.Tensor) -> torch.Tensor:
        raise ValueError("soft routing (Soft MoE slots) is not supported with expert parallelism "
                         "(trainer.expert_parallel=true): every slot mixes every token; pick a sparse router "
                         "(topk, expert_choice, deepseek, ...) or set trainer.expert_parallel=false.")

    def forward_merged(self, x_GSD: torch.Tensor, merge_GE: torch.Tensor) -> torch.Tensor:
        raise ValueError("merged routing (SMEAR, Lory) is not supported with expert parallelism "
                         "(trainer.expert_parallel=true): it averages every expert's parameters; pick a sparse "
                         "router or set trainer.expert_parallel=false.")


_EP_CLASSES: dict[type, type] = {}


def _ep_class(cls: type) -> type:
    if issubclass(cls, ExpertParallel):
        return cls
    if cls not in _EP_CLASSES:
        _EP_CLASSES[cls] = type(f"ExpertParallel{cls.__name__}", (ExpertParallel, cls), {})
    return _EP_CLASSES[cls]


def _base_class(cls: type) -> type:
    return next(c for c in cls.__mro__[1:] if c is not ExpertParallel and not issubclass(c, ExpertParallel))


def mark_sharded(param: torch.Tensor) -> torch.Tensor:
    """Mark a parameter as living on one rank only: it is never all-reduced across ranks, and its
    squared gradient norm is summed over the ranks when clipping."""
    setattr(param, _SHARDED_ATTR, True)
    return param


def is_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, _SHARDED_ATTR, False))


def expert_parallel_layers(model: nn.Module) -> dict[str, MoE]:
    """``{name: layer}`` of the MoE layers whose experts are sharded."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoE) and isinstance(m.experts, ExpertParallel)}


def _per_expert_params(experts: nn.Module, num_experts: int) -> list[str]:
    """Names of the experts module's own parameters stacked over its E experts (first dim E);
    sub-modules (e.g. a LoRA bank's shared base FFN) stay replicated."""
    return [n for n, p in experts.named_parameters(recurse=False) if p.ndim >= 1 and p.shape[0] == num_experts]


@torch.no_grad()
def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None) -> int:
    """Spread every ``core.MoE`` layer's routed experts over the ranks of ``group`` (default: a new
    group of every rank, so the exchanges never queue behind gradient all-reduces), in place.

    Rank r keeps experts ``[r·E/W, (r+1)·E/W)``; every rank must hold the same full weights before
    the call (same seed, or ``broadcast_parameters`` first). Returns the number of layers sharded.
    Raises ``ValueError`` when W does not divide a layer's E.
    """
    if not is_initialized():
        raise ValueError("shard_experts needs a process group: launch with torchrun (WORLD_SIZE > 1).")
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MoE) and not isinstance(m.experts, ExpertParallel)]
    if not layers:
        return 0
    if group is None:
        group = dist.new_group(list(range(get_world_size())))
    W, rank = get_world_size(group), get_rank(group)
    for name, layer in layers:
        experts, E = layer.experts, layer.num_experts
        if not layer.router.supports_expert_parallel:
            raise ValueError(f"trainer.expert_parallel=true is not allowed with {type(layer.router).__name__} "
                             f"(layer {name or '<root>'}): every token meets every expert, so the experts cannot "
                             "live on different ranks; pick a sparse router (topk, expert_choice, deepseek, ...).")
        if E % W:
            raise ValueError(f"trainer.expert_parallel=true needs num_experts divisible by the number of ranks: "
                             f"layer {name or '<root>'} has num_experts={E} and there are {W} ranks.")
        L = E // W
        names = _per_expert_params(experts, E)
        for pname in names:
            old = getattr(experts, pname)
            new = nn.Parameter(old.detach()[rank * L:(rank + 1) * L].clone(), requires_grad=old.requires_grad)
            setattr(experts, pname, mark_sharded(new))
        experts.__class__ = _ep_class(type(experts))
        experts.ep_group, experts.num_global_experts, experts.first_expert = group, E, rank * L
        experts.ep_sharded = tuple(names)
        experts.num_experts = L
    return len(layers)


@torch.no_grad()
def unshard_experts(model: nn.Module) -> int:
    """Gather every expert-parallel layer's experts back onto every rank (the inverse of
    ``shard_experts``; a collective). Returns the number of layers gathered."""
    layers = expert_parallel_layers(model)
    for layer in layers.values():
        experts = layer.experts
        for pname in experts.ep_sharded:
            old = getattr(experts, pname)
            full = nn.Parameter(_gather_dim0(old.detach(), experts.ep_group), requires_grad=old.requires_grad)
            setattr(experts, pname, full)
        experts.num_experts = experts.num_global_experts
        experts.__class__ = _base_class(type(experts))
        for attr in ("ep_group", "num_global_experts", "first_expert", "ep_sharded"):
            experts.__dict__.pop(attr, None)
    return len(layers)


def _gather_dim0(t: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's ``t`` (same shape on every rank) along dim 0, rank order."""
    parts = [torch.empty_like(t) for _ in range(get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, 0)


def _sharded_keys(model: nn.Module) -> dict[str, MoE]:
    """State-dict keys of sharded expert parameters -> their layer."""
    out = {}
    for name, layer in expert_parallel_layers(model).items():
        prefix = f"{name}.experts." if name else "experts."
        for pname in layer.experts.ep_sharded:
            out[prefix + pname] = layer
    return out


# ------------------------------------------------------------------------------ full-layout state


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict in the unsharded layout (every expert, whole embedding tables), on
    every rank; a collective when the model has sharded parts."""
    sd = model.state_dict()
    for key, layer in _sharded_keys(model).items():
        sd[key] = _gather_dim0(sd[key], layer.experts.ep_group)
    for key in sorted(k for k, v in sd.items() if _is_sharded_tensor(v)):
        sd[key] = _gather_sharded_tensor(sd[key])
    return sd


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state_dict: dict, strict: bool = True):
    """Load an unsharded state dict into a model whose experts (or torchrec embedding tables) may
    be sharded: each rank takes its slice of every sharded tensor."""
    sd = dict(state_dict)
    for key, layer in _sharded_keys(model).items():
        if key in sd:
            sd[key] = _local_slice(sd[key], layer)
    for key, st in model.state_dict().items():
        if _is_sharded_tensor(st) and key in sd:  # torchrec tables: fill the local shards in place
            full = sd.pop(key)
            for shard in st.local_shards():
                index = tuple(slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
                shard.tensor.copy_(full[index])
            sd[key] = st
    return model.load_state_dict(sd, strict=strict)


def _is_sharded_tensor(v) -> bool:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    return isinstance(v, ShardedTensor)


def _gather_sharded_tensor(st) -> torch.Tensor:
    """A torchrec ``ShardedTensor`` as one whole tensor on every rank."""
    full = torch.zeros(st.size(), dtype=st.dtype) if get_rank() == 0 else None
    st.gather(dst=0, out=full)
    if get_rank() != 0:
        full = torch.empty(st.size(), dtype=st.dtype)
    dist.broadcast(full, 0)
    return full


def _local_slice(t: torch.Tensor, layer: MoE) -> torch.Tensor:
    ex = layer.experts
    if t.shape[0] != ex.num_global_experts:
        raise ValueError(f"a full-layout expert tensor has {t.shape[0]} experts; the layer has {ex.num_global_experts}.")
    return t[ex.first_expert:ex.first_expert + ex.num_experts]


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _sharded_param_layers(model: nn.Module) -> dict[int, MoE]:
    params = dict(model.named_parameters())
    return {id(params[k]): layer for k, layer in _sharded_keys(model).items() if k in params}


@torch.no_grad()
def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with the state of sharded expert parameters gathered to the
    unsharded layout (tensors whose first dim is L become E); a collective under expert parallelism."""
    osd = optimizer.state_dict()
    layers = _sharded_param_layers(model)
    if not layers:
        return osd
    for idx, p in enumerate(_optimizer_params(optimizer)):
        layer = layers.get(id(p))
        if layer is None or idx not in osd["state"]:
            continue
        osd["state"][idx] = {k: (_gather_dim0(v, layer.experts.ep_group) if _is_per_expert(v, p) else v)
                             for k, v in osd["state"][idx].items()}
    return osd


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str | None]:
    """The model's name of every parameter the optimizer holds, in its state-dict order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(p)) for p in _optimizer_params(optimizer)]


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, osd: dict,
                                   names: list[str | None] | None = None) -> None:
    """Load a state saved by ``full_optimizer_state_dict`` (any number of ranks) into ``optimizer``.

    ``names`` (``optimizer_param_names`` at save time) match the saved state to parameters by name
    when the two optimizers list different parameters (e.g. a torchrec model whose sharded tables
    train with their own fused optimizer); the state of such table shards is dropped."""
    osd = {"state": dict(osd["state"]), "param_groups": [dict(g) for g in osd["param_groups"]]}
    current = optimizer_param_names(model, optimizer)
    if names is not None and list(names) != current:
        osd = _remap_by_name(osd, list(names), optimizer, current)
    layers = _sharded_param_layers(model)
    for idx, p in enumerate(_optimizer_params(optimizer)):
        if idx not in osd["state"]:
            continue
        layer = layers.get(id(p))
        if layer is None:
            if is_sharded(p):  # a torchrec table shard: trained by its fused optimizer
                del osd["state"][idx]
            continue
        E = layer.experts.num_global_experts
        osd["state"][idx] = {k: (_local_slice(v, layer) if torch.is_tensor(v) and v.ndim >= 1 and v.shape[0] == E
                                 and v.shape[1:] == p.shape[1:] else v)
                             for k, v in osd["state"][idx].items()}
    optimizer.load_state_dict(osd)


def _remap_by_name(osd: dict, saved_names: list, optimizer: torch.optim.Optimizer, current: list) -> dict:
    if len(osd["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"the checkpoint's optimizer has {len(osd['param_groups'])} parameter groups, this one "
                         f"{len(optimizer.param_groups)}: it was written for another model.")
    where = {n: i for i, n in enumerate(saved_names) if n is not None}
    state, start = {}, 0
    for saved_group, group in zip(osd["param_groups"], optimizer.param_groups):
        idx = list(range(start, start + len(group["params"])))
        for j in idx:
            i = where.get(current[j])
            if i is not None and i in osd["state"]:
                state[j] = osd["state"][i]
        saved_group["params"] = idx
        start += len(idx)
    return {"state": state, "param_groups": osd["param_groups"]}


def _is_per_expert(v, p: torch.Tensor) -> bool:
    return torch.is_tensor(v) and v.shape == p.shape and v.ndim >= 1


# ------------------------------------------------------------------------------ data parallelism


@torch.no_grad()
def broadcast_parameters(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (unsharded models: before
    ``shard_experts``), as DDP does at construction."""
    if get_world_size() <= 1:
        return
    for t in [*model.parameters(), *model.buffers()]:
        if not is_sharded(t):
            dist.broadcast(t.data, src)


@torch.no_grad()
def all_reduce_gradients(params: Iterable[torch.Tensor], group=None) -> None:
    """Sum the gradients of replicated parameters over the ranks (callers scale each rank's loss by
    its share of the global batch first, so the sum is the gradient of the global mean). Sharded
    parameters are skipped. A parameter that has no gradient on every rank keeps none (the
    optimizer then skips it, as in one process); one missing on some ranks only counts as zero."""
    params = [p for p in params if p.requires_grad and not is_sharded(p)]
    if get_world_size(group) <= 1 or not params:
        return
    dev = params[0].device
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=dev)
    dist.all_reduce(has, dist.ReduceOp.MAX, group=group)
    live = [p for p, h in zip(params, has.tolist()) if h]
    for p in live:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: dict[tuple, list[torch.Tensor]] = {}
    for p in live:
        buckets.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in buckets.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


@torch.no_grad()
def clip_grad_norm_(params: Iterable[torch.Tensor], max_norm: float, group=None) -> float:
    """Clip to a global gradient norm over every rank's parameters: replicated gradients (identical
    on every rank after ``all_reduce_gradients``) count once, sharded ones are summed over ranks.
    Every rank gets the same norm and scale, so replicated parameters stay in sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    dev = grads[0].device
    dense = [g for p in params if p.grad is not None and not is_sharded(p) for g in [p.grad]]
    sharded = [g for p in params if p.grad is not None and is_sharded(p) for g in [p.grad]]
    sq = torch.zeros(2, dtype=torch.float64, device=dev)
    if dense:
        sq[0] = torch.stack([g.detach().double().square().sum() for g in dense]).sum()
    if sharded:
        sq[1] = torch.stack([g.detach().double().square().sum() for g in sharded]).sum()
    if get_world_size(group) > 1:
        dist.all_reduce(sq[1:], group=group)
    total = float(sq.sum().sqrt())
    coef = max_norm / (total + 1e-6)
    if coef < 1 and total == total:
        for g in grads:
            g.mul_(coef)
    return total


def follow_schedule(model: nn.Module, lr: float) -> None:
    """Give the learning rate of the next step to an optimizer that runs inside the backward pass
    (torchrec's fused embedding optimizer, ``model.fused_optimizer``); no-op without one."""
    fused = getattr(model, "fused_optimizer", None)
    if fused is None:
        return
    for group in fused.param_groups:
        group["lr"] = lr
    fused.step()


@torch.no_grad()
def num_parameters(model: nn.Module) -> int:
    """Parameters of the whole model: replicated ones once, sharded ones summed over the ranks."""
    local = [p for p in model.parameters()]
    total = sum(p.numel() for p in local if not is_sharded(p))
    sharded = sum(p.numel() for p in local if is_sharded(p))
    if get_world_size() > 1 and any(is_sharded(p) for p in local):
        t = torch.tensor([sharded], dtype=torch.int64, device=local[0].device)
        dist.all_reduce(t)
        sharded = int(t)
    return total + sharded


_SUMMED_ROUTER_BUFFERS = ("pending_load_E",)  # loads counted between optimizer steps (DeepSeek bias)
_MOE_STAT_BUFFERS = ("stat_tokens_E", "stat_importance_E", "stat_counters")


@torch.no_grad()
def sum_router_loads(model: nn.Module) -> None:
    """Sum the expert loads routers count between optimizer steps over the ranks (call before
    ``core.after_optimizer_step``), so DeepSeek's bias update sees the global batch's load and
    stays identical on every rank."""
    if get_world_size() <= 1:
        return
    for m in model.modules():
        for name in _SUMMED_ROUTER_BUFFERS:
            buf = getattr(m, name, None)
            if isinstance(buf, torch.Tensor) and name in m._buffers:
                dist.all_reduce(buf)


@torch.no_grad()
def sum_routing_stats(model: nn.Module) -> None:
    """Sum every MoE layer's routing-statistics buffers over the ranks, in place (every rank then
    holds the global batch's statistics; call before ``core.routing_stats`` on training stats)."""
    if get_world_size() <= 1:
        return
    for m in model.modules():
        if isinstance(m, MoE):
            for name in _MOE_STAT_BUFFERS:
                dist.all_reduce(getattr(m, name))


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (pickled), rank order; ``[obj]`` without a process group."""
    if get_world_size() <= 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank."""
    if get_world_size() <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def _stat_buffer_keys(model: nn.Module) -> set[str]:
    return {f"{n}.{b}" if n else b for n, m in model.named_modules() if isinstance(m, MoE) for b in _MOE_STAT_BUFFERS}


@torch.no_grad()
def checkpoint_buffers(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Copies of the buffers a state dict leaves out (routing statistics of the running epoch),
    the MoE statistics summed over the ranks: a checkpoint holds the global batch's counts."""
    exclude, stats = set(exclude), _stat_buffer_keys(model)
    out = {k: b.detach().clone() for k, b in model.named_buffers() if k not in exclude}
    if get_world_size() > 1:
        for k in sorted(stats & out.keys()):
            dist.all_reduce(out[k])
    return out


@torch.no_grad()
def load_checkpoint_buffers(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    """Restore ``checkpoint_buffers``: summed statistics go to rank 0 (zeros elsewhere), so summing
    over any number of ranks later gives the saved counts again."""
    buffers, stats = dict(model.named_buffers()), _stat_buffer_keys(model)
    for k, v in saved.items():
        if k in buffers:
            buffers[k].copy_(v if (k not in stats or get_rank() == 0) else torch.zeros_like(v))
