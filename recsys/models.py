"""Multi-task recommenders whose gates are core routers.

Implemented models:

- Single-Task (one independent network per task) and Shared-Bottom (hard parameter sharing,
  ``y_k = h^k(f(x))``), the baselines of Ma et al., "Modeling Task Relationships in Multi-task Learning
  with Multi-gate Mixture-of-Experts", KDD 2018 (MMoE), Eq. 1;
- OMoE (one gate shared by all tasks) and MMoE (``y_k = h^k(Σ_i g^k(x)_i f_i(x))``, one gate per task;
  MMoE Eq. 6-8), optionally on top of a shared bottom (MMoE §6.4.1);
- CGC and multi-level PLE (Tang et al., "Progressive Layered Extraction (PLE): A Novel Multi-Task
  Learning (MTL) Model for Personalized Recommendations", RecSys 2020, Eq. 2-7): task-specific and
  shared experts; task gates over their own and the shared experts; a shared gate over all experts of a
  level, built for every level but the last; level j's gates take level j-1's fused outputs;
- ESMM (Ma et al., "Entire Space Multi-Task Model", SIGIR 2018): ``pCTCVR = pCTR · pCVR`` over the
  entire space, with two towers on shared embeddings.

Every model is split into torchrec-style stages: ``SparseArch`` (a torchrec ``EmbeddingBagCollection``
over a ``KeyedJaggedTensor``), ``DenseArch`` (MLP on the dense features), the expert/gate stage
(``MultiGateMixture``, ``PLEArch``) and one ``TowerArch`` per task. Experts are the core stacked
``Experts``; each gate is a core ``Router`` built from a ``router(dim=..., num_experts=...)`` partial
(the Hydra ``router`` config) or a ``conf/router`` name (``MMoE(..., gate="expert_choice")``,
``core.router_config``), with every example a token. The default gate is the papers' dense
softmax (``core.routers.dense.DenseRouter``).

Routing groups. Some gates decide over a group of examples: expert choice lets each expert pick its
top-C examples of the group (Zhou et al., NeurIPS 2022), top-k with a capacity drops the choices past
an expert's C slots of the group (GShard, Lepikhin et al. 2021), Soft MoE mixes the group into slots
(Puigcerver et al., ICLR 2024), BASE balances the group. If the batch were the group, an example's
prediction would depend on which other examples share its batch, and evaluation metrics on
``data.eval_batch_size``. So a batch is cut into consecutive groups of ``routing_group_size`` examples
(the config's default: the training batch size, so training batches are one group each, as before);
the last group of a batch, when partial, is padded with zero rows that ``mask_GS`` marks as padding
(routers keep them out of their choices; their outputs are dropped). An example's routing then depends
only on its own group: the consecutive block of ``routing_group_size`` examples of the split it falls
in, whatever the evaluation batch size, as long as evaluation batches hold whole groups
(``recsys.training`` refuses an ``eval_batch_size`` that is not a multiple of ``routing_group_size``
when the gate's evaluation depends on its group, ``Router.eval_group_dependent``).
This is the group-size convention of V-MoE and GShard (the group is a fixed number of tokens, not the
batch); it makes evaluation exactly batch-invariant, not per-example: examples still share capacity
with their group, as in training. Per-example gates (dense softmax, dropless top-k) are unaffected.

``forward(dense_features, sparse_features)`` returns B×K outputs: logits for binary tasks, values for
regression tasks.

Legend: B batch (examples = tokens), G routing groups of a batch, S examples per group
(``routing_group_size``; G·S >= B, the rest padding), D gate/expert input width, O expert output width,
E experts of a mixture, J experts of one gate, P slots per expert (soft gates), K tasks, N assignments.
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from core.experts import Experts
from core.router_config import router_factory
from core.routers.base import Router, check_applicable, check_positive_int
from core.routers.dense import DenseRouter
from core.routing import Routing

RouterFactory = Callable[..., Router] | str  # a partial router(dim=D, num_experts=E) or a conf/router name


def _mlp(in_size: int, layer_sizes: Sequence[int]) -> nn.Module:
    """ReLU MLP (torchrec ``MLP``); no layers gives the identity."""
    sizes = list(layer_sizes or [])
    for s in sizes:
        check_positive_int("layer size", s)
    return MLP(in_size, sizes) if sizes else nn.Identity()


def _out_size(in_size: int, layer_sizes: Sequence[int]) -> int:
    return list(layer_sizes)[-1] if layer_sizes else in_size


class GateError(ValueError):
    """A router that cannot serve as a multi-task gate (a sweep over every router records ``n/a``)."""


def mixture_weights(routing: Routing) -> torch.Tensor:
    """The weight each (example, expert) pair gets in the mixture, (G·S)×E, whatever the routing form."""
    G, S, E = routing.num_groups, routing.group_size, routing.num_experts
    if routing.is_merged:
        return routing.merge_GE.repeat_interleave(S, dim=0)
    if routing.is_soft:
        return routing.combine_GSEP.sum(-1).reshape(G * S, E)
    w = torch.zeros(G * S, E, dtype=routing.weight_N.dtype, device=routing.weight_N.device)
    return w.index_put((routing.token_idx_N, routing.expert_idx_N), routing.weight_N, accumulate=True)


def build_gate(gate: RouterFactory | None, dim: int, num_experts: int, out_features: int | None = None) -> Router:
    """Build one gate ``gate(dim=dim, num_experts=num_experts)``; None is the dense softmax gate.

    Raises ``GateError`` (a ``ValueError``) when the router cannot gate examples: it needs token ids (hash routing); its
    mixture weights do not depend on the examples (Lory routes a segment by the previous one, and a
    batch has no previous segment); or it mixes its input into the output (BASE layers'
    ``Routing.residual_T``) while the experts' output width ``out_features`` differs from ``dim``. The
    last two are found by routing two small random batches once, in eval mode and without gradients.
    """
    factory = gate if gate is not None else DenseRouter
    router = factory(dim=dim, num_experts=num_experts)
    name = type(router).__name__
    if not isinstance(router, Router):
        raise ValueError(f"gate={gate!r} built a {name}, not a core Router: a gate must be a router config "
                         "(conf/router/*.yaml).")
    check_applicable(router, token_ids=False, where="a recommender's examples")
    was_training = router.training
    router.eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        probes = [router(torch.randn(1, 8, dim, generator=g)) for _ in range(2)]
    router.train(was_training)
    router.aux_losses = {}
    if num_experts > 1 and torch.allclose(mixture_weights(probes[0]), mixture_weights(probes[1])):
        raise GateError(f"router {name} cannot serve as a multi-task gate: its mixture weights do not depend "
                         "on the examples (a router that routes a group of examples by an "
                         "earlier group, as Lory, has nothing to route by).")
    if probes[0].residual_T is not None and out_features is not None and out_features != dim:
        raise GateError(f"router {name} cannot serve as this gate: it adds its input to the mixture "
                         f"(y += r·x), which needs the experts' output width ({out_features}) to equal the "
                         f"gate's input width ({dim}); set expert_out_features={dim} or use another router.")
    return router


# --------------------------------------------------------------------------------------------------
# Input stages
# --------------------------------------------------------------------------------------------------


class SparseArch(nn.Module):
    """Pooled embeddings of the sparse features: ``KeyedJaggedTensor`` -> B × ΣD_f.

    Args:
        embedding_bag_collection: the (already built) torchrec ``EmbeddingBagCollection``.
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection):
        super().__init__()
        self.embedding_bag_collection = embedding_bag_collection
        self.out_features = sum(c.embedding_dim * len(c.feature_names)
                                for c in embedding_bag_collection.embedding_bag_configs())

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.embedding_bag_collection(features).values()


class DenseArch(nn.Module):
    """MLP over the dense features (identity when ``layer_sizes`` is empty).

    Args:
        in_features: number of dense features.
        layer_sizes: hidden sizes of the MLP (ReLU after every layer).
    """

    def __init__(self, in_features: int, layer_sizes: Sequence[int] = ()):
        super().__init__()
        self.model = _mlp(in_features, layer_sizes)
        self.out_features = _out_size(in_features, layer_sizes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.model(features)


class InputArch(nn.Module):
    """The example representation: ``concat(DenseArch(dense), SparseArch(sparse))`` -> B × D.

    Args:
        embedding_bag_collection: torchrec EBC for the sparse features, or None when there are none.
        dense_in_features: number of dense features (0 when there are none).
        dense_arch_layer_sizes: hidden sizes of the dense MLP.
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection | None, dense_in_features: int,
                 dense_arch_layer_sizes: Sequence[int] = ()):
        super().__init__()
        check_positive_int("dense_in_features", dense_in_features, minimum=0)
        self.sparse_arch = SparseArch(embedding_bag_collection) if embedding_bag_collection is not None else None
        self.dense_arch = DenseArch(dense_in_features, dense_arch_layer_sizes) if dense_in_features else None
        self.out_features = ((self.sparse_arch.out_features if self.sparse_arch else 0)
                             + (self.dense_arch.out_features if self.dense_arch else 0))
        if self.out_features == 0:
            raise ValueError("the model has no input: give dense features (dense_in_features > 0) or an "
                             "embedding_bag_collection.")

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor | None) -> torch.Tensor:
        parts = []
        if self.dense_arch is not None:
            parts.append(self.dense_arch(dense_features))
        if self.sparse_arch is not None:
            parts.append(self.sparse_arch(sparse_features))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class TowerArch(nn.Module):
    """One task's tower: ReLU MLP then a linear output unit.

    Args:
        in_features: width of the task representation.
        layer_sizes: hidden sizes (MMoE's synthetic towers: ``[8]``).
    """

    def __init__(self, in_features: int, layer_sizes: Sequence[int] = ()):
        super().__init__()
        self.hidden = _mlp(in_features, layer_sizes)
        self.out = nn.Linear(_out_size(in_features, layer_sizes), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(x)).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# Expert / gate stage
# --------------------------------------------------------------------------------------------------


class MultiGateMixture(nn.Module):
    """E stacked experts read by several gates, each a core router over a subset of the experts.

    Expert e reads input ``expert_inputs[e]`` of the list passed to ``forward`` (PLE: task-specific
    experts read their task's previous output, shared experts the shared one); gate j reads input
    ``gate_inputs[j]`` and mixes the experts ``gate_experts[j]``. Every expert runs once on the whole
    batch (the papers' dense computation; experts here are small, so a sparse gate saves no FLOPs), and
    each gate's routing picks and weights those outputs: sparse routings by their kept
    ``(example, expert, weight_N)`` assignments, soft routings through their slots, merged routings
    (SMEAR) through one merged expert.

    Args:
        in_features: D, width of every input.
        hidden_features: expert hidden width.
        out_features: O, expert output width.
        num_experts: E.
        gate_experts: for each gate, the expert indices it mixes.
        gate: router partial ``gate(dim=D, num_experts=E_j)`` or a ``conf/router`` name (None: dense softmax).
        expert_inputs: for each expert, the index of the input it reads (default all 0).
        gate_inputs: for each gate, the index of the input it reads (default all 0).
        act_layer: expert activation (ReLU, as in the papers).
        routing_group_size: S, examples per routing group (module docstring); None: the whole batch
            is one group (its routing then depends on the batch).
    """

    def __init__(self, in_features: int, hidden_features: int, out_features: int, num_experts: int,
                 gate_experts: Sequence[Sequence[int]], gate: RouterFactory | None = None,
                 expert_inputs: Sequence[int] | None = None, gate_inputs: Sequence[int] | None = None,
                 act_layer: type[nn.Module] = nn.ReLU, routing_group_size: int | None = None):
        super().__init__()
        E = check_positive_int("num_experts", num_experts)
        if routing_group_size is not None:
            check_positive_int("routing_group_size", routing_group_size)
        self.routing_group_size = routing_group_size
        self.in_features, self.out_features, self.num_experts = in_features, out_features, E
        self.experts = Experts(E, in_features, hidden_features, out_features, act_layer=act_layer)
        expert_inputs = list(expert_inputs) if expert_inputs is not None else [0] * E
        gate_inputs = list(gate_inputs) if gate_inputs is not None else [0] * len(gate_experts)
        if len(expert_inputs) != E:
            raise ValueError(f"expert_inputs has {len(expert_inputs)} entries: it must have num_experts={E}.")
        if len(gate_inputs) != len(gate_experts):
            raise ValueError(f"gate_inputs has {len(gate_inputs)} entries: it must have one per gate "
                             f"({len(gate_experts)}).")
        self.expert_inputs, self.gate_inputs = expert_inputs, gate_inputs
        gate = router_factory(gate)  # a config name, once for every gate
        self.gates = nn.ModuleList()
        for j, idx in enumerate(gate_experts):
            idx = list(idx)
            if not idx or len(set(idx)) != len(idx) or min(idx) < 0 or max(idx) >= E:
                raise ValueError(f"gate_experts[{j}]={idx} is not allowed: it must list distinct expert "
                                 f"indices in [0, {E}).")
            self.register_buffer(f"gate_experts_{j}", torch.tensor(idx, dtype=torch.long), persistent=False)
            self.gates.append(build_gate(gate, in_features, len(idx), out_features))
        # per gate: assignments per expert, router probability mass per expert (analytics, PLE §5.3),
        # and (attempted choices, examples routed)
        self.register_buffer("stat_tokens", torch.zeros(len(gate_experts), E, dtype=torch.float64),
                             persistent=False)
        self.register_buffer("stat_importance", torch.zeros(len(gate_experts), E, dtype=torch.float64),
                             persistent=False)
        self.register_buffer("stat_counters", torch.zeros(len(gate_experts), 2, dtype=torch.float64),
                             persistent=False)
        self.track_stats = True
        self.keep_last_routing = False
        self.last_routings: list[Routing] = []

    def gate_experts(self, j: int) -> torch.Tensor:
        return getattr(self, f"gate_experts_{j}")

    def forward(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``inputs``: list of B×D tensors; returns one B×O tensor per gate."""
        B = inputs[0].shape[0]
        S = (self.routing_group_size or B) if B else 0
        G = -(-B // S) if B else 1
        mask_GS = None
        if G * S != B:  # a partial last group: pad it, and tell the routers which rows are padding
            inputs = [nn.functional.pad(x, (0, 0, 0, G * S - B)) for x in inputs]
            mask_GS = (torch.arange(G * S, device=inputs[0].device) < B).view(G, S)
        T = G * S
        if len(set(self.expert_inputs)) == 1:
            x_ETD = inputs[self.expert_inputs[0]].unsqueeze(0).expand(self.num_experts, T, self.in_features)
        else:
            x_ETD = torch.stack([inputs[i] for i in self.expert_inputs])
        y_ETO = None
        outputs, routings = [], []
        for j, router in enumerate(self.gates):
            idx_J = self.gate_experts(j)
            x_TD = inputs[self.gate_inputs[j]]
            x_GSD = x_TD.view(G, S, self.in_features)
            routing = router(x_GSD, mask_GS)
            if routing.is_merged:
                merge_GE = x_TD.new_zeros(G, self.num_experts).index_copy(1, idx_J, routing.merge_GE.to(x_TD.dtype))
                out_TO = self.experts.forward_merged(x_GSD, merge_GE).reshape(T, self.out_features)
            elif routing.is_soft:
                out_TO = self._soft(x_ETD, idx_J, routing)
            else:
                if y_ETO is None:
                    y_ETO = self.experts.forward_batched(x_ETD)
                w_N = routing.weight_N.to(y_ETO.dtype)[:, None]
                picked_NO = y_ETO[idx_J[routing.expert_idx_N], routing.token_idx_N] * w_N
                out_TO = y_ETO.new_zeros(T, self.out_features).index_add_(0, routing.token_idx_N, picked_NO)
            if routing.residual_T is not None:
                if self.out_features != self.in_features:
                    raise ValueError(f"router {type(router).__name__} adds its input to the output, which "
                                     f"needs expert out_features == in_features (got {self.out_features} "
                                     f"and {self.in_features}).")
                out_TO = out_TO + routing.residual_T.to(out_TO.dtype)[:, None] * x_TD
            outputs.append(out_TO[:B])
            routings.append(routing)
        if self.track_stats:
            self._update_stats(routings, B)
        if self.keep_last_routing:
            self.last_routings = routings
        return outputs

    def _soft(self, x_ETD: torch.Tensor, idx_J: torch.Tensor, routing: Routing) -> torch.Tensor:
        """Soft MoE slots: each slot mixes the examples of its group as its expert reads them; only the
        gate's experts receive slots (the others run on zeros and are discarded)."""
        G, S = routing.num_groups, routing.group_size
        dispatch_GSJP = routing.dispatch_GSEP.to(x_ETD.dtype)
        x_JGSD = x_ETD.index_select(0, idx_J).view(len(idx_J), G, S, -1)
        slots_JGPD = torch.einsum("gsjp,jgsd->jgpd", dispatch_GSJP, x_JGSD)
        J, _, P, D = slots_JGPD.shape
        slots_ENPD = slots_JGPD.new_zeros(self.num_experts, G * P, D).index_copy(0, idx_J, slots_JGPD.reshape(J, G * P, D))
        y_JGPO = self.experts.forward_batched(slots_ENPD).index_select(0, idx_J).view(J, G, P, -1)
        return torch.einsum("gsjp,jgpo->gso", routing.combine_GSEP.to(y_JGPO.dtype), y_JGPO).reshape(G * S, -1)

    @torch.no_grad()
    def _update_stats(self, routings: list[Routing], num_examples: int) -> None:
        for j, routing in enumerate(routings):
            idx_J = self.gate_experts(j)
            self.stat_tokens[j].index_add_(0, idx_J, routing.tokens_per_expert().to(torch.float64))
            if routing.scores_GSE is not None:
                self.stat_importance[j].index_add_(0, idx_J, routing.scores_GSE.sum((0, 1)).to(torch.float64))
            sparse = not (routing.is_soft or routing.is_merged)
            choices = torch.as_tensor(routing.num_choices if sparse else 0, dtype=torch.float64,
                                      device=self.stat_counters.device)
            self.stat_counters[j] += torch.stack([choices, choices.new_tensor(float(num_examples))])

    def reset_stats(self) -> None:
        self.stat_tokens.zero_()
        self.stat_importance.zero_()
        self.stat_counters.zero_()


class PLEArch(nn.Module):
    """Progressive Layered Extraction (CGC when ``num_levels`` is 1).

    Level j has ``num_task_experts`` experts per task and ``num_shared_experts`` shared experts; task
    k's gate mixes task k's experts and the shared ones (PLE Eq. 2-4); the shared gate mixes every
    expert of the level and is built for every level but the last (Eq. 6). Level j's task experts and
    gates read the task's output of level j-1, the shared experts and shared gate read the shared
    output; level 1 reads the example representation everywhere.

    Args:
        in_features: width of the example representation.
        num_tasks: K.
        num_levels: number of extraction networks (1 = CGC).
        num_task_experts: experts per task and level.
        num_shared_experts: shared experts per level.
        expert_hidden_features: expert hidden width.
        expert_out_features: expert output width (the input width of the next level and the towers).
        gate: router partial or ``conf/router`` name for every gate (None: dense softmax).
        routing_group_size: examples per routing group (``MultiGateMixture``; None: the batch).
    """

    def __init__(self, in_features: int, num_tasks: int, num_levels: int = 1, num_task_experts: int = 1,
                 num_shared_experts: int = 1, expert_hidden_features: int = 16, expert_out_features: int = 16,
                 gate: RouterFactory | None = None, routing_group_size: int | None = None):
        super().__init__()
        K = check_positive_int("num_tasks", num_tasks)
        check_positive_int("num_levels", num_levels)
        mk = check_positive_int("num_task_experts", num_task_experts, minimum=0)
        ms = check_positive_int("num_shared_experts", num_shared_experts, minimum=0)
        if mk + ms == 0:
            raise ValueError("num_task_experts=0 and num_shared_experts=0: a task gate needs at least one expert.")
        self.num_tasks, self.num_levels = K, num_levels
        self.num_task_experts, self.num_shared_experts = mk, ms
        E = K * mk + ms
        shared = list(range(K * mk, E))
        expert_inputs = [e // mk if e < K * mk else K for e in range(E)]  # input K is the shared one
        self.levels = nn.ModuleList()
        width = in_features
        for level in range(num_levels):
            gate_experts = [list(range(k * mk, (k + 1) * mk)) + shared for k in range(K)]
            if level < num_levels - 1:
                gate_experts.append(list(range(E)))
            self.levels.append(MultiGateMixture(
                width, expert_hidden_features, expert_out_features, E, gate_experts, gate=gate,
                expert_inputs=expert_inputs, gate_inputs=list(range(len(gate_experts))),
                routing_group_size=routing_group_size))
            width = expert_out_features
        self.out_features = expert_out_features

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: B×D -> K task representations B×O."""
        inputs = [x] * (self.num_tasks + 1)
        for level in self.levels:
            inputs = level(inputs)
        return inputs[: self.num_tasks]


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


class MultiTaskModel(nn.Module):
    """Base class: ``InputArch`` -> ``body`` (K task representations) -> one ``TowerArch`` per task.

    Subclasses set ``self.body`` (a module mapping B×D to a list of K B×W tensors) and call
    ``_build_towers(W)``.

    Args:
        embedding_bag_collection: torchrec EBC over the sparse features (None: dense features only).
        dense_in_features: number of dense features.
        num_tasks: K.
        dense_arch_layer_sizes: hidden sizes of the dense-feature MLP.
        tower_layer_sizes: hidden sizes of every task tower.
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection | None, dense_in_features: int,
                 num_tasks: int, dense_arch_layer_sizes: Sequence[int] = (), tower_layer_sizes: Sequence[int] = (8,)):
        super().__init__()
        self.num_tasks = check_positive_int("num_tasks", num_tasks)
        self.input_arch = InputArch(embedding_bag_collection, dense_in_features, dense_arch_layer_sizes)
        self.tower_layer_sizes = list(tower_layer_sizes or [])

    def _build_towers(self, width: int) -> None:
        self.tower_arch = nn.ModuleList(TowerArch(width, self.tower_layer_sizes) for _ in range(self.num_tasks))

    def task_representations(self, dense_features: torch.Tensor,
                             sparse_features: KeyedJaggedTensor | None) -> list[torch.Tensor]:
        return self.body(self.input_arch(dense_features, sparse_features))

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor | None = None) -> torch.Tensor:
        """dense_features: B×F_dense; sparse_features: KJT with B rows per key -> B×K outputs."""
        reps = self.task_representations(dense_features, sparse_features)
        return torch.stack([tower(r) for tower, r in zip(self.tower_arch, reps)], dim=1)


class _SharedBody(nn.Module):
    """One module whose output every task reads (Shared-Bottom, OMoE)."""

    def __init__(self, module: nn.Module, num_tasks: int):
        super().__init__()
        self.module, self.num_tasks = module, num_tasks

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        y = self.module(x)
        y = y[0] if isinstance(y, list) else y
        return [y] * self.num_tasks


class _MixtureBody(nn.Module):
    """Optional shared bottom, then a ``MultiGateMixture`` with one input."""

    def __init__(self, bottom: nn.Module, mixture: MultiGateMixture, num_tasks: int):
        super().__init__()
        self.bottom, self.mixture, self.num_tasks = bottom, mixture, num_tasks

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = self.mixture([self.bottom(x)])
        return outs if len(outs) == self.num_tasks else outs * self.num_tasks


class SingleTask(MultiTaskModel):
    """K independent networks (own embeddings, bottom MLP and tower per task): the single-task
    baseline of MMoE §6, trained side by side.

    Args:
        embedding_bag_collection, dense_in_features, num_tasks, dense_arch_layer_sizes,
            tower_layer_sizes: see ``MultiTaskModel``.
        bottom_layer_sizes: hidden sizes of each task's bottom MLP.
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection | None, dense_in_features: int,
                 num_tasks: int, dense_arch_layer_sizes: Sequence[int] = (), tower_layer_sizes: Sequence[int] = (8,),
                 bottom_layer_sizes: Sequence[int] = (16,)):
        super().__init__(embedding_bag_collection, dense_in_features, num_tasks, dense_arch_layer_sizes,
                         tower_layer_sizes)
        # task 0 uses self.input_arch, tasks 1..K-1 fresh copies: nothing is shared.
        self.task_input_archs = nn.ModuleList(copy.deepcopy(self.input_arch) for _ in range(num_tasks - 1))
        for arch in self.task_input_archs:
            _reset_parameters(arch)
        width = self.input_arch.out_features
        self.bottoms = nn.ModuleList(_mlp(width, bottom_layer_sizes) for _ in range(num_tasks))
        self._build_towers(_out_size(width, bottom_layer_sizes))

    def task_representations(self, dense_features, sparse_features):
        archs = [self.input_arch, *self.task_input_archs]
        return [bottom(arch(dense_features, sparse_features)) for arch, bottom in zip(archs, self.bottoms)]


def _reset_parameters(module: nn.Module) -> None:
    """Fresh initialisation of a copied input stage (linear layers and embedding tables)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, EmbeddingBagCollection)):
            m.reset_parameters()


class SharedBottom(MultiTaskModel):
    """Shared-Bottom (hard parameter sharing, MMoE Eq. 1): ``y_k = h^k(f(x))``.

    Args:
        embedding_bag_collection, dense_in_features, num_tasks, dense_arch_layer_sizes,
            tower_layer_sizes: see ``MultiTaskModel``.
        bottom_layer_sizes: hidden sizes of the shared bottom f (MMoE synthetic: ``[113]``, the same
            parameter count as the MoE models).
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection | None, dense_in_features: int,
                 num_tasks: int, dense_arch_layer_sizes: Sequence[int] = (), tower_layer_sizes: Sequence[int] = (8,),
                 bottom_layer_sizes: Sequence[int] = (113,)):
        super().__init__(embedding_bag_collection, dense_in_features, num_tasks, dense_arch_layer_sizes,
                         tower_layer_sizes)
        width = self.input_arch.out_features
        self.body = _SharedBody(_mlp(width, bottom_layer_sizes), num_tasks)
        self._build_towers(_out_size(width, bottom_layer_sizes))


class MMoE(MultiTaskModel):
    """Multi-gate Mixture-of-Experts (MMoE Eq. 6-8): ``y_k = h^k(Σ_i g^k(x)_i f_i(x))``, one gate per
    task over E shared experts; ``one_gate=True`` gives OMoE (one gate for every task).

    Args:
        embedding_bag_collection, dense_in_features, num_tasks, dense_arch_layer_sizes,
            tower_layer_sizes: see ``MultiTaskModel``.
        num_experts: E (MMoE synthetic: 8).
        expert_hidden_features: expert hidden width (MMoE synthetic: 16).
        expert_out_features: expert output width, the towers' input.
        bottom_layer_sizes: optional shared MLP below the mixture (MMoE §6.4.1).
        gate: router partial ``gate(dim=..., num_experts=...)`` or ``conf/router`` name for every gate
            (None: dense softmax).
        one_gate: OMoE.
        routing_group_size: examples per routing group (``MultiGateMixture``; None: the batch).
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection | None, dense_in_features: int,
                 num_tasks: int, dense_arch_layer_sizes: Sequence[int] = (), tower_layer_sizes: Sequence[int] = (8,),
                 num_experts: int = 8, expert_hidden_features: int = 16, expert_out_features: int = 16,
                 bottom_layer_sizes: Sequence[int] = (), gate: RouterFactory | None = None, one_gate: bool = False,
                 routing_group_size: int | None = None):
        super().__init__(embedding_bag_collection, dense_in_features, num_tasks, dense_arch_layer_sizes,
                         tower_layer_sizes)
        width = self.input_arch.out_features
        num_gates = 1 if one_gate else num_tasks
        mixture = MultiGateMixture(_out_size(width, bottom_layer_sizes), expert_hidden_features, expert_out_features,
                                   num_experts, [list(range(num_experts))] * num_gates, gate=gate,
                                   routing_group_size=routing_group_size)
        self.body = _MixtureBody(_mlp(width, bottom_layer_sizes), mixture, num_tasks)
        self._build_towers(expert_out_features)


class OMoE(MMoE):
    """One-gate MoE (MMoE §4.2, Fig. 1b): one gate shared by all tasks. Arguments as ``MMoE``."""

    def __init__(self, *args, **kwargs):
        kwargs.pop("one_gate", None)
        super().__init__(*args, one_gate=True, **kwargs)


class PLE(MultiTaskModel):
    """Progressive Layered Extraction (PLE Eq. 6-7); ``num_levels=1`` is CGC (Eq. 2-5).

    Args:
        embedding_bag_collection, dense_in_features, num_tasks, dense_arch_layer_sizes,
            tower_layer_sizes: see ``MultiTaskModel``.
        num_levels: extraction networks.
        num_task_experts: task-specific experts per task and level.
        num_shared_experts: shared experts per level.
        expert_hidden_features, expert_out_features: expert widths.
        gate: router partial or ``conf/router`` name for every gate (None: dense softmax).
        routing_group_size: examples per routing group (``MultiGateMixture``; None: the batch).
    """

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection | None, dense_in_features: int,
                 num_tasks: int, dense_arch_layer_sizes: Sequence[int] = (), tower_layer_sizes: Sequence[int] = (8,),
                 num_levels: int = 2, num_task_experts: int = 1, num_shared_experts: int = 1,
                 expert_hidden_features: int = 16, expert_out_features: int = 16, gate: RouterFactory | None = None,
                 routing_group_size: int | None = None):
        super().__init__(embedding_bag_collection, dense_in_features, num_tasks, dense_arch_layer_sizes,
                         tower_layer_sizes)
        self.body = PLEArch(self.input_arch.out_features, num_tasks, num_levels, num_task_experts,
                            num_shared_experts, expert_hidden_features, expert_out_features, gate,
                            routing_group_size)
        self._build_towers(expert_out_features)


class CGC(PLE):
    """Customized Gate Control (PLE Eq. 2-5): PLE with one level. Arguments as ``PLE``."""

    def __init__(self, *args, **kwargs):
        kwargs.pop("num_levels", None)
        super().__init__(*args, num_levels=1, **kwargs)


class ESMM(MultiTaskModel):
    """Entire Space Multi-task Model (ESMM, SIGIR 2018) for a two-step funnel (task 0 = click,
    task 1 = click-and-convert): ``pCTCVR = pCTR · pCVR``, both towers on the shared input, each
    loss over all examples; pCVR gets no direct supervision.

    Output column 0 is the CTR logit, column 1 the logit of ``pCTR · pCVR`` (so every model's output
    goes through the same sigmoid/BCE); ``cvr_logits`` gives pCVR.

    Args:
        embedding_bag_collection, dense_in_features, dense_arch_layer_sizes: see ``MultiTaskModel``.
        num_tasks: must be 2.
        tower_layer_sizes: hidden sizes of the CTR and CVR towers (ESMM: 200, 80).
    """

    requires_binary_tasks = True

    def __init__(self, embedding_bag_collection: EmbeddingBagCollection | None, dense_in_features: int,
                 num_tasks: int = 2, dense_arch_layer_sizes: Sequence[int] = (),
                 tower_layer_sizes: Sequence[int] = (200, 80)):
        if num_tasks != 2:
            raise ValueError(f"num_tasks={num_tasks} is not allowed for ESMM: it models a two-step funnel "
                             "(click, then conversion), so it needs exactly 2 binary tasks.")
        super().__init__(embedding_bag_collection, dense_in_features, num_tasks, dense_arch_layer_sizes,
                         tower_layer_sizes)
        self.body = _SharedBody(nn.Identity(), 2)
        self._build_towers(self.input_arch.out_features)

    def cvr_logits(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor | None = None) -> torch.Tensor:
        x = self.input_arch(dense_features, sparse_features)
        return self.tower_arch[1](x)

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor | None = None) -> torch.Tensor:
        x = self.input_arch(dense_features, sparse_features)
        ctr_B, cvr_B = self.tower_arch[0](x), self.tower_arch[1](x)
        # logit(σ(a)σ(b)) = log p - log(1 - p) with log p = logσ(a) + logσ(b) < 0, computed stably
        log_p = nn.functional.logsigmoid(ctr_B) + nn.functional.logsigmoid(cvr_B)
        log_p = log_p.clamp(max=-1e-7)
        ctcvr_B = log_p - torch.log(-torch.expm1(log_p))
        return torch.stack([ctr_B, ctcvr_B], dim=1)


def mixtures(model: nn.Module) -> dict[str, MultiGateMixture]:
    """Every gated expert stage of a model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MultiGateMixture)}


def gate_stats(model: nn.Module, reset: bool = False) -> dict:
    """Per gate, since the last reset: assignments per expert, load CV² (assignment counts over the
    gate's experts), mean router probability per expert (PLE §5.3's expert utilisation), experts per
    example and dropped fraction of the attempted choices (sparse gates with a capacity); plus their
    means over gates (``load_cv2``, ``experts_per_example``, ``dropped_fraction``)."""
    gates = {}
    for name, m in mixtures(model).items():
        for j in range(len(m.gates)):
            idx = m.gate_experts(j)
            tokens = m.stat_tokens[j, idx]
            imp = m.stat_importance[j, idx]
            choices, examples = m.stat_counters[j].tolist()
            total, mean, kept = float(imp.sum()), tokens.mean(), float(tokens.sum())
            gates[f"{name}.gate{j}"] = {
                "experts": idx.tolist(),
                "tokens_per_expert": tokens.tolist(),
                "load_cv2": float(tokens.var(correction=0) / mean.square()) if mean > 0 else 0.0,
                "importance": (imp / total).tolist() if total > 0 else imp.tolist(),
                "experts_per_example": kept / examples if examples else 0.0,
                "dropped_fraction": max(0.0, (choices - kept) / choices) if choices else 0.0,
            }
        if reset:
            m.reset_stats()
    out: dict = {"gates": gates}
    if gates:
        for key in ("load_cv2", "experts_per_example", "dropped_fraction"):
            out[key] = sum(g[key] for g in gates.values()) / len(gates)
    return out


def reset_gate_stats(model: nn.Module) -> None:
    for m in mixtures(model).values():
        m.reset_stats()


__all__ = [
    "CGC", "DenseArch", "ESMM", "GateError", "InputArch", "MMoE", "MultiGateMixture", "MultiTaskModel", "OMoE", "PLE", "PLEArch",
    "SharedBottom", "SingleTask", "SparseArch", "TowerArch", "build_gate", "gate_stats", "mixture_weights", "mixtures",
    "reset_gate_stats",
]
