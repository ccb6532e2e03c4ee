"""Embedding tables spread over the ranks with torchrec's ``DistributedModelParallel`` (DMP).

Under torchrun, ``shard_embedding_tables(model, "table_wise")`` asks torchrec's planner
(``EmbeddingShardingPlanner.collective_plan``, every table constrained to the chosen sharding type)
for a ``ShardingPlan`` and wraps the model in DMP. The sharding types that run on CPU (gloo) are
``table_wise`` (each table on one rank), ``column_wise`` (each table's columns cut across ranks)
and ``data_parallel`` (every table on every rank); row-wise needs CUDA.

Table- and column-wise tables use torchrec's fused kernel: their optimizer runs inside the backward
pass, so their parameters have no ``.grad``. It is Adagrad (with the trainer's eps): fbgemm's CPU
kernels offer SGD and Adagrad variants only ("Optimizer adam is not supported in CPU mode");
``core.distributed.follow_schedule`` keeps its learning rate on the trainer's schedule. Those
tables are marked as sharded (never all-reduced, gathered to the full layout in checkpoints);
data-parallel tables are ordinary replicated parameters. The dense part (and data-parallel tables)
goes into DMP's own DDP wrapper (``DefaultDataParallelWrapper``), which ``core.parallel`` starts
with ``init_data_parallel`` once any experts are spread (their weights left out of DDP too);
checkpoints of such a model are one whole-layout file.

Differences from one process: those tables are trained by Adagrad instead of the engine's AdamW,
without weight decay or gradient clipping (recsys trains with ``weight_decay: 0`` and ``grad_clip:
null``), and Adagrad's accumulators are not checkpointed (a resumed run restarts them).
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from core import distributed as dist_utils

log = logging.getLogger(__name__)

SHARDING_TYPES = ("table_wise", "column_wise", "data_parallel")


def check_sharding(sharding) -> str | None:
    """``sharding`` if allowed (None: no sharding), else ``ValueError`` naming the key."""
    if sharding is None or sharding in SHARDING_TYPES:
        return sharding
    raise ValueError(f"sharding={sharding!r} is not allowed: use one of {list(SHARDING_TYPES)} or null "
                     "(the torchrec sharding types that run on CPU; row-wise needs CUDA).")


def shard_embedding_tables(model: nn.Module, sharding: str | None, lr: float = 1e-3, eps: float = 1e-8) -> nn.Module:
    """``model`` wrapped in ``DistributedModelParallel`` with every embedding table sharded as
    ``sharding`` says, under torchrun (WORLD_SIZE > 1); the model itself otherwise.

    Args:
        model: a recsys model holding torchrec ``EmbeddingBagCollection``s.
        sharding: ``table_wise``, ``column_wise``, ``data_parallel`` or None.
        lr, eps: the fused Adagrad of table- and column-wise tables (the trainer's values).
    """
    from fbgemm_gpu.split_embedding_configs import EmbOptimType
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.model_parallel import DefaultDataParallelWrapper
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingEnv
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    if check_sharding(sharding) is None:
        return model
    if not dist_utils.init_distributed("cpu"):
        log.info("sharding=%s in one process: the embedding tables stay whole", sharding)
        return model
    collections = [m for m in model.modules() if isinstance(m, EmbeddingBagCollection)]
    if not collections:
        log.info("sharding=%s: the model has no embedding table (dense features only)", sharding)
        return model
    pg = dist.GroupMember.WORLD
    world = dist_utils.get_world_size()
    sharder = EmbeddingBagCollectionSharder(fused_params={
        "optimizer": EmbOptimType.EXACT_ADAGRAD, "learning_rate": lr, "eps": eps})
    constraints = {c.name: ParameterConstraints(sharding_types=[sharding])
                   for ebc in collections for c in ebc.embedding_bag_configs()}
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world, compute_device="cpu"),
                                       constraints=constraints)
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    plan = planner.collective_plan(model, [sharder], pg)
    # the dense part goes into torchrec's own DDP wrapper when the engine starts (core.parallel calls
    # init_data_parallel after spreading any experts); routers may leave a parameter unused in a step
    wrapper = DefaultDataParallelWrapper(static_graph=False, find_unused_parameters=True)
    dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(pg), device=torch.device("cpu"),
                                   plan=plan, sharders=[sharder], init_data_parallel=False,
                                   data_parallel_wrapper=wrapper)
    # DMP draws fresh tables: start from the model's own weights, as a one-process run does
    dist_utils.load_full_state_dict(dmp, initial)
    if sharding != "data_parallel":
        for name, m in dmp.named_modules():
            if type(m).__name__ == "ShardedEmbeddingBagCollection":
                for t in [*m.parameters(), *m.buffers()]:
                    dist_utils.mark_sharded(t)
    log.info("embedding tables sharded %s over %d ranks:\n%s", sharding, world, plan)
    return dmp
