"""Past one process on PyTorch's own engines: DDP or FSDP2 for the data, a device mesh for the experts.

Under ``torchrun`` the engine (``core.engine.Trainer``) trains through a ``Parallel``:

- **Data parallelism** (``trainer.data_parallel``):

  - ``ddp``: ``DistributedDataParallel`` (bucketed all-reduce overlapped with the backward);
    every rank holds every replicated parameter and AdamW's moments of it.
  - ``fsdp``: FSDP2's ``fully_shard`` on every transformer block (``fsdp_units``) and on the root:
    parameters, gradients and optimizer state live as ``DTensor`` shards (``Shard(0)``), gathered
    one block at a time for its forward and backward, so each rank holds about 1/W of them. On CUDA
    with bf16 the blocks compute in bf16 and reduce gradients in fp32 (``MixedPrecisionPolicy``).

  Both wrap one module, ``LossModule``: the domain's loss function on the model plus the routers'
  auxiliary losses, so whatever methods a domain's loss calls (``encode_image``, a torchrec
  forward, ...) run inside the one ``forward`` that DDP and FSDP synchronise. Evaluation and the
  callbacks call the model directly (under FSDP inside ``full_root()``, which gathers the root's
  own parameters while the blocks gather theirs in their forward).

- **Expert parallelism** (``trainer.expert_parallel``): every MoE layer's routed experts are spread
  over a 1-D device mesh of all ranks (``init_device_mesh``): their per-expert weights become
  DTensors sharded on the expert dimension, and the layer's dispatcher becomes the all-to-all
  exchange (``core.dispatch.AllToAllDispatcher``). DDP and FSDP leave those weights alone (each
  expert lives on one rank: its gradient needs no reduction). With ``trainer.expert_parallel_size``
  smaller than W the mesh is 2-D, ``dp_rep`` × ``ep`` (torchtitan's layout): each row of ``ep``
  ranks holds every expert once, and FSDP shards each expert's weights over ``dp_rep`` (2-D
  DTensors, gathered over ``dp_rep`` when the experts run: ``run_local`` is registered with FSDP as a
  forward method) and reduces their gradients over the rows.

What stays exact: each rank's loss is weighted by its share of the global batch and the reduced
gradients are sums (DDP and FSDP average, so ``after_backward`` multiplies by W, exact for powers of
two), hence the gradients of the global mean; the gradient norm for clipping is one norm over every
rank's shards (``clip_grad_norm_``); routers' loads and routing statistics are summed over the ranks
(``core.distributed``). Auxiliary losses and router noise are per rank, as in Switch and GShard.

At the end (``finish``) the caller's model is whole again on every rank, as after one process:
under FSDP the engine trains a copy and the caller's parameters are emptied meanwhile (``release``),
then refilled with the gathered weights; under DDP the experts are gathered back in place.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from core import distributed as dist_utils
from core import stats
from core.dispatch import AllToAllDispatcher, LocalDispatcher, run_local_experts
from core.moe import MoE

log = logging.getLogger(__name__)

MODES = ("ddp", "fsdp")


class LossModule(nn.Module):
    """``forward(batch) -> (task loss, logs, auxiliary loss terms)``: the unit DDP and FSDP wrap."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        task_loss, logs = self.loss_fn(self.model, batch)
        return task_loss, logs, stats.aux_loss_terms(self.model)


# ------------------------------------------------------------------------------------ the experts


def _per_expert_params(experts: nn.Module, num_experts: int) -> list[str]:
    """Names of the experts module's own parameters stacked over its E experts (first dim E);
    sub-modules (e.g. a LoRA bank's shared base FFN) stay replicated."""
    return [n for n, p in experts.named_parameters(recurse=False) if p.ndim >= 1 and p.shape[0] == num_experts]


def expert_parallel_layers(model: nn.Module) -> dict[str, MoE]:
    """``{name: layer}`` of the MoE layers whose experts are spread over ranks."""
    return {n: m for n, m in model.named_modules() if isinstance(m, MoE) and not m.dispatcher.is_local}


def expert_parallel_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` of the expert weights sharded on the expert dimension."""
    out = {}
    for name, layer in expert_parallel_layers(model).items():
        prefix = f"{name}.experts." if name else "experts."
        for pname in layer.dispatcher.names:
            out[prefix + pname] = getattr(layer.experts, pname)
    return out


@torch.no_grad()
def shard_experts(model: nn.Module, mesh) -> int:
    """Spread every MoE layer's routed experts over ``mesh`` (1-D), in place: rank r keeps experts
    ``[r·E/W, (r+1)·E/W)`` as the local shard of DTensor parameters, and the layer dispatches with
    an all-to-all. Every rank must hold the same full weights before the call. Returns the number of
    layers. ``ValueError`` when a router mixes every token with every expert or W does not divide E."""
    from torch.distributed.tensor import DTensor, Shard

    W, rank = mesh.size(), mesh.get_local_rank()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, MoE) and m.dispatcher.is_local]
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
            local = old.detach()[rank * L:(rank + 1) * L].clone()
            dt = DTensor.from_local(local, mesh, [Shard(0)], run_check=False)
            setattr(experts, pname, nn.Parameter(dt, requires_grad=old.requires_grad))
        experts.num_experts = L  # the local compute sees L experts
        layer.dispatcher = AllToAllDispatcher(mesh, E, tuple(names))
    return len(layers)


@torch.no_grad()
def gather_experts(model: nn.Module) -> int:
    """Every expert back on every rank (the inverse of ``shard_experts``; a collective). Returns
    the number of layers gathered."""
    layers = expert_parallel_layers(model)
    for layer in layers.values():
        experts, d = layer.experts, layer.dispatcher
        for pname in d.names:
            old = getattr(experts, pname)
            setattr(experts, pname, nn.Parameter(old.full_tensor(), requires_grad=old.requires_grad))
        experts.num_experts = d.num_experts
        layer.dispatcher = LocalDispatcher()
    return len(layers)


# ----------------------------------------------------------------------------------- FSDP's units


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: the members of every ``ModuleList``/``Sequential`` of two
    or more modules of one class with trainable parameters (timm's and open_clip's blocks, a Hugging
    Face model's layers, the suite's blocks), outermost first; the rest belongs to the root."""
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            members = list(child) if isinstance(child, (nn.ModuleList, nn.Sequential)) else []
            if (len(members) >= 2 and len({type(m) for m in members}) == 1
                    and any(p.requires_grad for p in child.parameters())):
                units.extend(members)
            else:
                visit(child)

    visit(model)
    return units


# ------------------------------------------------------------------------------------- the handle


def _no_buffer_sync() -> dict:
    """DDP's option for no buffer broadcast before each forward (its name changed in torch 2.14)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP

    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _scalars_as_vectors(model: nn.Module) -> set[str]:
    """FSDP2 cannot shard 0-d parameters (open_clip's ``logit_scale``): make each a 1-element vector,
    which broadcasts wherever the scalar did. Returns their names (checkpoints keep them 0-d)."""
    names = set()
    for mod_name, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.ndim == 0:
                setattr(module, pname, nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))
                names.add(f"{mod_name}.{pname}" if mod_name else pname)
    return names


def _scalar(value) -> torch.Tensor:
    """A 1-element (D)Tensor as a whole 0-d tensor (a collective for a DTensor)."""
    return dist_utils.whole(value).reshape(())


def device_mesh(device_type: str):
    """A 1-D mesh of every rank (the data and the expert dimension are the same ranks), on a group of
    its own: its collectives (the experts' all-to-alls, FSDP's) never queue behind the default
    group's (DDP's bucketed all-reduce)."""
    from torch.distributed.device_mesh import DeviceMesh

    group = dist.new_group(list(range(dist_utils.get_world_size())))
    return DeviceMesh.from_group(group, device_type, mesh_dim_names=("dp",))


def release(model: nn.Module) -> None:
    """Free the storage of ``model``'s parameters, keeping the objects (and any weight tying):
    the model is refilled by ``refill``."""
    for p in model.parameters():
        p.data = p.data.new_empty(0)


@torch.no_grad()
def refill(model: nn.Module, state: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> None:
    """Put whole weights ``state`` (parameter name -> tensor) and ``buffers`` into ``model``."""
    for name, p in model.named_parameters():
        p.data = state[name].to(p.device)
    own = dict(model.named_buffers())
    for name, b in buffers.items():
        if name in own:
            own[name].copy_(b)


class Parallel:
    """How one ``fit`` trains: the model it trains, the module it calls for the loss, and the hooks
    around the backward, the evaluation and the end.

    Args:
        model: the caller's model (on its device).
        loss_fn: ``(model, batch) -> (task loss, logs)``.
        data_parallel: ``ddp`` | ``fsdp`` (used when more than one rank takes part).
        expert_parallel: spread the MoE layers' experts over the ranks.
        expert_parallel_size: the ranks one set of experts spans (None: all). Fewer builds a 2-D
            mesh (``dp_rep`` × ``ep``): the experts are spread over each ``ep`` row and FSDP shards
            them over ``dp_rep``, as torchtitan's MoE does; FSDP only.
        device: the rank's device.
        bf16: FSDP's blocks compute in bf16 (CUDA), gradients reduced in fp32.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, data_parallel: str = "ddp",
                 expert_parallel: bool = False, device: torch.device | None = None, bf16: bool = False,
                 expert_parallel_size: int | None = None):
        if data_parallel not in MODES:
            raise ValueError(f"trainer.data_parallel={data_parallel!r} is not allowed: use one of {list(MODES)}.")
        self.owner = model
        self.world = dist_utils.get_world_size()
        self.mode = data_parallel if self.world > 1 else None
        self.mesh = None
        self.model = model
        self.scalars: set[str] = set()  # 0-d parameters FSDP trains as 1-element vectors (saved 0-d)
        self.rep_mesh = None  # the 2-D expert mesh's group dimension (expert_parallel_size < W)
        self.torchrec = False  # a torchrec DistributedModelParallel: its own DDP, whole-layout checkpoints
        self.reduced: list[torch.Tensor] = []
        self.reduced_over_groups: list[torch.Tensor] = []
        if self.world <= 1:
            self.module = LossModule(model, loss_fn)
            return
        device = device or next(model.parameters()).device
        dist_utils.broadcast_parameters(model)  # rank 0's starting weights everywhere
        self.mesh = device_mesh(device.type)
        ep_mesh = self.mesh
        if expert_parallel and expert_parallel_size not in (None, self.world):
            ep_mesh, self.rep_mesh = self._expert_mesh(device.type, expert_parallel_size)
        if self.mode == "fsdp":
            if callable(getattr(model, "init_data_parallel", None)):
                raise ValueError("trainer.data_parallel=fsdp is not allowed with tables sharded by torchrec "
                                 "(sharding=...): use trainer.data_parallel=ddp, or sharding=null.")
            self.model = copy.deepcopy(model)
            release(model)
        if expert_parallel:
            n = shard_experts(self.model, ep_mesh)
            if n:
                log.info("expert parallelism: %d MoE layers spread over %d ranks", n, self.world)
            else:
                log.info("trainer.expert_parallel=true: the model has no core MoE layer; data parallelism only")
        ep = expert_parallel_params(self.model)
        loss_module = LossModule(self.model, loss_fn)
        own_ddp = getattr(self.model, "init_data_parallel", None)  # torchrec's DistributedModelParallel
        self.torchrec = callable(own_ddp)
        if self.mode == "ddp" and self.torchrec:
            # torchrec wraps its dense part in DDP itself, its sharded tables left out; spread experts too
            wrapper = getattr(self.model, "_data_parallel_wrapper", None)
            if ep and wrapper is not None and hasattr(wrapper, "_additional_params_to_ignore"):
                wrapper._additional_params_to_ignore = set(wrapper._additional_params_to_ignore) | set(ep)
            own_ddp()
            self.module = loss_module
        elif self.mode == "ddp":
            self.module = self._ddp(loss_module, ep, device)
        else:
            self.module = self._fsdp(loss_module, ep, device, bf16)
        self.reduced = [p for n, p in self.model.named_parameters()
                        if p.requires_grad and n not in ep and not dist_utils.is_sharded(p)]
        # a 2-D mesh: the experts' gradients are averaged over the W/size groups only
        self.reduced_over_groups = ([p for n, p in self.model.named_parameters() if n in ep]
                                    if self.rep_mesh is not None else [])

    def _ddp(self, loss_module: LossModule, ep: dict, device: torch.device) -> nn.Module:
        """``DistributedDataParallel`` around the loss, the spread experts (and torchrec shards) left out."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        ignored = [f"model.{n}" for n, p in self.model.named_parameters() if n in ep or dist_utils.is_sharded(p)]
        if ignored:
            DDP._set_params_and_buffers_to_ignore_for_model(loss_module, ignored)
        ids = [device.index] if device.type == "cuda" else None
        # buffers (routing statistics) are per rank and summed where needed, never overwritten by
        # rank 0's before a forward (they start equal: broadcast above); a router may leave some
        # parameters without a gradient in a step (an expert no token chose, a gate a task skips)
        return DDP(loss_module, device_ids=ids, find_unused_parameters=True, **_no_buffer_sync())

    def _fsdp(self, loss_module: LossModule, ep: dict, device: torch.device, bf16: bool) -> nn.Module:
        """FSDP2 on every block and on the root (the loss): spread experts left out, or, on a 2-D
        mesh, sharded over the groups by their own ``fully_shard``."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if bf16 and device.type == "cuda" else MixedPrecisionPolicy())
        ignored = set(ep.values()) or None
        if self.rep_mesh is not None:  # each expert's shard is FSDP-sharded over the groups
            for layer in expert_parallel_layers(self.model).values():
                experts = layer.experts
                fully_shard(experts, mesh=self.rep_mesh, mp_policy=mp)
                experts.run_local = functools.partial(run_local_experts, experts, layer.dispatcher.names)
                register_fsdp_forward_method(experts, "run_local")
            ignored = None
        self.scalars = _scalars_as_vectors(self.model)
        for unit in fsdp_units(self.model):
            fully_shard(unit, mesh=self.mesh, mp_policy=mp, ignored_params=ignored)
        fully_shard(loss_module, mesh=self.mesh, mp_policy=mp, ignored_params=ignored)
        # the root's set-up now, not at its first forward: a callback or an evaluation may call the
        # model (and so a block's forward) first, and that block must not take itself for the root
        loss_module._get_fsdp_state()._lazy_init()
        return loss_module

    def _expert_mesh(self, device_type: str, size: int):
        """``(ep row, dp_rep column)`` of a 2-D mesh of W/size groups of ``size`` ranks; the 1-D
        mesh of every rank becomes its flattening, so that every DTensor shares one root mesh."""
        from torch.distributed.device_mesh import init_device_mesh

        if self.mode != "fsdp":
            raise ValueError(f"trainer.expert_parallel_size={size} is not allowed with trainer.data_parallel="
                             f"{self.mode}: DDP cannot reduce the experts' gradients over the groups; use fsdp.")
        if size < 1 or self.world % size:
            raise ValueError(f"trainer.expert_parallel_size={size} is not allowed: it must divide the {self.world} ranks.")
        mesh2 = init_device_mesh(device_type, (self.world // size, size), mesh_dim_names=("dp_rep", "ep"))
        self.mesh = mesh2._flatten("dp")
        return mesh2["ep"], mesh2["dp_rep"]

    def adapt_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Parameters on two meshes (a 2-D expert mesh beside the dense one) cannot share one
        ``foreach`` kernel: step them one by one."""
        if self.rep_mesh is not None:
            for group in optimizer.param_groups:
                group["foreach"] = False

    # -- around the steps --------------------------------------------------------------------------

    def after_backward(self) -> None:
        """DDP and FSDP average the gradients over the ranks; the engine's per-rank losses are
        already weighted by the ranks' shares, so the reduced gradients are multiplied back by W."""
        if self.mode is None:
            return
        for p in self.reduced:
            if p.grad is not None:
                p.grad.mul_(self.world)
        for p in self.reduced_over_groups:
            if p.grad is not None:
                p.grad.mul_(self.rep_mesh.size())

    def clip_grad_norm_(self, params: list[torch.Tensor], max_norm: float) -> float:
        """Clip to one gradient norm over every rank: replicated gradients (DDP's, identical on
        every rank) count once, sharded ones (FSDP's and the experts' DTensor shards, torchrec's
        tables) are summed over the ranks. Returns the norm before clipping."""
        if self.mode is None:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        from torch.distributed.tensor import DTensor, Replicate

        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return 0.0
        dev = (grads[0].to_local() if isinstance(grads[0], DTensor) else grads[0]).device
        sq = torch.zeros(2, dtype=torch.float64, device=dev)  # [counted once, summed over ranks]
        for p in params:
            g = p.grad
            if g is None:
                continue
            if isinstance(g, DTensor):
                local = g.to_local()
                once = all(isinstance(pl, Replicate) for pl in g.placements)
            else:
                local, once = g, not dist_utils.is_sharded(p)
            sq[0 if once else 1] += local.detach().double().square().sum()
        dist.all_reduce(sq[1:])
        total = float(sq.sum().sqrt())
        coef = max_norm / (total + 1e-6)
        if coef < 1 and total == total:
            for g in grads:
                g.mul_(coef)
        return total

    @contextlib.contextmanager
    def full_root(self):
        """Within the block the model can be called directly, by any method (evaluation, callbacks):
        under FSDP the root's own parameters are gathered (the blocks gather theirs in their forward)."""
        if self.mode != "fsdp":
            yield
            return
        self.module.unshard()
        try:
            yield
        finally:
            self.module.reshard()

    # -- the end -----------------------------------------------------------------------------------

    def whole_state(self) -> dict[str, torch.Tensor]:
        """The trained model's parameters and persistent buffers, whole, on every rank (a collective)."""
        if self.mode is None:
            return self.model.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))
        sd = {k: dist_utils.whole(v) for k, v in sd.items()}
        return {k: (v.reshape(()) if k in self.scalars else v) for k, v in sd.items()}

    def finish(self) -> nn.Module:
        """The caller's model, whole on every rank with the trained weights (a collective)."""
        if self.mode == "fsdp":
            buffers = {k: b.detach().clone() for k, b in self.model.named_buffers()}  # never sharded by FSDP
            state = self.whole_state()
            refill(self.owner, state, buffers)
            self.model = self.owner
        elif self.mode == "ddp":
            gather_experts(self.model)
        return self.owner

    def state_dicts(self, optimizer) -> tuple[dict, dict]:
        """``(model, optimizer)`` state dicts as ``torch.distributed.checkpoint`` saves them: DTensor
        shards for FSDP's and the experts' parameters, keyed by parameter name."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, optimizer)
        for name in self.scalars:  # saved in the model's own shape, whole (one element)
            model_sd[name] = _scalar(model_sd[name])
            if name in optim_sd["state"]:
                optim_sd["state"][name] = {k: (_scalar(v) if hasattr(v, "full_tensor") else v)
                                           for k, v in optim_sd["state"][name].items()}
        return model_sd, optim_sd

    def load_state_dicts(self, optimizer, model_sd: dict, optim_sd: dict, full: bool = False) -> None:
        """Load ``state_dicts``'s pair (``full``: whole tensors, as a one-process checkpoint holds)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        for name in self.scalars:
            model_sd[name] = self._vector(model_sd[name], full)
            if name in optim_sd["state"]:
                optim_sd["state"][name] = {k: (self._vector(v, full) if torch.is_tensor(v) and v.ndim == 0 and k != "step"
                                               else v) for k, v in optim_sd["state"][name].items()}
        set_state_dict(self.model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=full, strict=True))

    def _vector(self, value: torch.Tensor, full: bool):
        """A saved 0-d value as the 1-element vector FSDP trains (sharded like it unless ``full``)."""
        from torch.distributed.tensor import Shard, distribute_tensor

        v = value.reshape(1)
        return v if full else distribute_tensor(v, self.mesh, [Shard(0)])

    def __repr__(self) -> str:
        return f"Parallel(world={self.world}, mode={self.mode}, expert_parallel={bool(expert_parallel_layers(self.model))})"

