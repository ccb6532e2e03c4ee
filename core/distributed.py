"""Past one process: the process group, and what the ranks share besides gradients.

This module is the plumbing under ``core.parallel`` (DDP or FSDP2 for the data, a device mesh and
``core.dispatch``'s all-to-all for the experts):

- the process group torchrun describes (gloo on CPU, NCCL on CUDA), ranks and world size;
- rank 0's starting weights on every rank (``broadcast_parameters``: FSDP shards whatever each rank
  holds, so every rank must start from the same weights);
- the routers' loads (DeepSeek's bias update, ``sum_router_loads``) and the routing statistics
  (``sum_routing_stats``), summed over the ranks so that they are the global batch's;
- the whole-layout state of a model whose parts live on different ranks (experts as DTensor shards,
  torchrec's sharded embedding tables): ``full_state_dict`` / ``load_full_state_dict`` and the
  optimizer counterparts, for ``model.pt`` and for one-file checkpoints;
- small object collectives (``all_gather_object``, ``broadcast_object``).

Gradients are reduced by DDP or FSDP (``core.parallel``), never here.

Legend: T tokens, D input width, O output width, E experts, L local experts (E/W), W ranks,
N assignments sent from this rank, M rows received by this rank.
"""

from __future__ import annotations

import atexit
import logging
import os

import torch
import torch.distributed as dist
from torch import nn

from core.moe import MoE

log = logging.getLogger(__name__)

_SHARDED_ATTR = "_moe_suite_sharded"  # set on parameters that live on one rank only


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


def mark_sharded(param: torch.Tensor) -> torch.Tensor:
    """Mark a parameter as living on one rank only (a torchrec table shard): DDP leaves it alone,
    and its squared gradient norm is summed over the ranks when clipping."""
    setattr(param, _SHARDED_ATTR, True)
    return param


def is_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, _SHARDED_ATTR, False))


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def whole(t):
    """A DTensor gathered whole (a collective); anything else as it is."""
    return t.full_tensor() if _is_dtensor(t) else t


def _local_part(full: torch.Tensor, like) -> torch.Tensor:
    """This rank's part of the whole tensor ``full`` for a DTensor ``like`` (its own local shape and
    offset on its mesh), as a DTensor of the same placements."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"a whole-layout tensor of shape {tuple(full.shape)} does not fit a parameter of shape "
                         f"{tuple(like.shape)}: the checkpoint was written for another model.")
    shape, offset = compute_local_shape_and_global_offset(like.shape, like.device_mesh, like.placements)
    index = tuple(slice(o, o + n) for o, n in zip(offset, shape))
    local = full[index].to(like.to_local().device, like.dtype).contiguous()
    return DTensor.from_local(local, like.device_mesh, like.placements, run_check=False)


# ------------------------------------------------------------------------------ full-layout state


@torch.no_grad()
def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict in the whole layout (every expert, whole embedding tables), on every
    rank; a collective when the model has parts on different ranks."""
    sd = model.state_dict()
    for key in list(sd):
        sd[key] = whole(sd[key])
    for key in sorted(k for k, v in sd.items() if _is_sharded_tensor(v)):
        sd[key] = _gather_sharded_tensor(sd[key])
    return sd


@torch.no_grad()
def load_full_state_dict(model: nn.Module, state_dict: dict, strict: bool = True):
    """Load a whole-layout state dict into a model whose parts may live on different ranks (DTensor
    expert shards, torchrec's embedding tables): each rank takes its part of every such tensor."""
    sd = dict(state_dict)
    for key, current in model.state_dict().items():
        if key not in sd:
            continue
        if _is_dtensor(current):
            sd[key] = _local_part(sd[key], current)
        elif _is_sharded_tensor(current):  # torchrec tables: fill the local shards in place
            full = sd.pop(key)
            for shard in current.local_shards():
                index = tuple(slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
                shard.tensor.copy_(full[index])
            sd[key] = current
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


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


@torch.no_grad()
def full_optimizer_state_dict(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with the state of DTensor parameters gathered whole (a collective
    when there are any)."""
    osd = optimizer.state_dict()
    osd["state"] = {i: {k: whole(v) for k, v in st.items()} for i, st in osd["state"].items()}
    return osd


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str | None]:
    """The model's name of every parameter the optimizer holds, in its state-dict order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(p)) for p in _optimizer_params(optimizer)]


def named_optimizer_state(osd: dict, names: list[str | None] | None) -> dict:
    """A ``full_optimizer_state_dict`` keyed by parameter name (``names``: ``optimizer_param_names``
    at save time), as ``torch.distributed.checkpoint.state_dict.set_state_dict`` reads it."""
    if names is None:
        raise ValueError("the checkpoint does not name its optimizer's parameters (an earlier format): resume it "
                         "in one process, or on as many ranks as wrote it.")
    groups, start = [], 0
    for g in osd["param_groups"]:
        n = len(g["params"])
        groups.append({**g, "params": [names[i] for i in range(start, start + n)]})
        start += n
    state = {names[i]: st for i, st in osd["state"].items() if names[i] is not None}
    return {"state": state, "param_groups": groups}


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer, osd: dict,
                                   names: list[str | None] | None = None) -> None:
    """Load a state saved by ``full_optimizer_state_dict`` (any number of ranks) into ``optimizer``.

    ``names`` (``optimizer_param_names`` at save time) match the saved state to parameters by name
    when the two optimizers list different parameters (e.g. a torchrec model whose sharded tables
    train with their own fused optimizer); the state of such table shards is dropped. DTensor
    parameters take their part of every whole state tensor of their shape."""
    osd = {"state": dict(osd["state"]), "param_groups": [dict(g) for g in osd["param_groups"]]}
    current = optimizer_param_names(model, optimizer)
    if names is not None and list(names) != current:
        osd = _remap_by_name(osd, list(names), optimizer, current)
    for idx, p in enumerate(_optimizer_params(optimizer)):
        if idx not in osd["state"]:
            continue
        if is_sharded(p):  # a torchrec table shard: trained by its fused optimizer
            del osd["state"][idx]
        elif _is_dtensor(p):
            osd["state"][idx] = {k: (_local_part(v, p) if torch.is_tensor(v) and v.shape == p.shape and v.ndim else v)
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


# ---------------------------------------------------------------------------- what ranks share


@torch.no_grad()
def broadcast_parameters(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (before any sharding), as DDP does
    at construction."""
    if get_world_size() <= 1:
        return
    for t in [*model.parameters(), *model.buffers()]:
        if not is_sharded(t):
            dist.broadcast(t.data, src)


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
    total = sum(p.numel() for p in local if not is_sharded(p))  # a DTensor's numel is its whole size
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
