"""Batches: the in-memory ``TensorLoader``, one epoch's batches from any loader (``iter_batches``),
a batch's slice for one rank under torchrun, moving a batch to the device and counting its examples."""

from __future__ import annotations

import itertools
import math
from typing import Callable, Iterator, Mapping, Sequence

import torch

from core.checks import check_int
from core.engine.config import derive_seed


class TensorLoader:
    """Batches of in-memory tensors, with the order and any augmentation fixed by (seed, epoch).

    Cheap for data that fits in memory (images as uint8, tabular features): one index permutation per
    epoch and one tensor gather per batch, no worker processes. ``transform(batch, generator)``
    receives a generator seeded by (seed, epoch, batch index), so a resumed epoch can start at any
    batch and still see exactly the same augmented data.

    Args:
        tensors: tensors with the same first dimension (e.g. images and labels).
        batch_size: examples per batch.
        shuffle: a fresh permutation every epoch.
        drop_last: drop the last incomplete batch.
        transform: optional ``(batch_tuple, generator) -> batch`` applied per batch.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], batch_size: int, shuffle: bool = False,
                 drop_last: bool = False, transform: Callable | None = None):
        tensors = tuple(tensors)
        if not tensors:
            raise ValueError("tensors=() is not allowed: give at least one tensor.")
        n = tensors[0].shape[0]
        if any(t.shape[0] != n for t in tensors):
            raise ValueError(f"tensors have different lengths {[t.shape[0] for t in tensors]}: they must match.")
        check_int("batch_size", batch_size, 1)
        self.tensors, self.batch_size, self.shuffle, self.drop_last = tensors, batch_size, shuffle, drop_last
        self.transform = transform
        self.num_examples = n

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_examples // self.batch_size
        return math.ceil(self.num_examples / self.batch_size)

    def batches(self, epoch: int = 0, start: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1) -> Iterator:
        """Batches ``start, start+1, ...`` of epoch ``epoch`` (order from a generator seeded by (seed, epoch)).

        With ``world_size`` > 1 each batch is cut into ``world_size`` near-equal slices and rank
        ``rank`` gets its slice (a batch smaller than ``world_size`` is first filled by repeating its
        examples), so the global batch, the steps per epoch and the resume position do not depend on
        the number of ranks; the transform's generator then also folds in the rank.
        """
        if self.shuffle:
            g = torch.Generator().manual_seed(derive_seed(seed, epoch))
            order = torch.randperm(self.num_examples, generator=g)
        else:
            order = torch.arange(self.num_examples)
        for i in range(start, len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            if world_size > 1:
                idx = shard_slice(idx, rank, world_size)
            batch = tuple(t[idx] for t in self.tensors)
            if self.transform is not None:
                parts = (seed, epoch, i) if world_size == 1 else (seed, epoch, i, rank)
                batch = self.transform(batch, torch.Generator().manual_seed(derive_seed(*parts)))
            yield batch

    def __iter__(self) -> Iterator:
        return self.batches()


def iter_batches(loader, epoch: int = 0, start: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1) -> Iterator:
    """Batches of one epoch from ``start`` on, from a ``TensorLoader``-like object (``batches()``) or
    any iterable; a ``torch.utils.data.DataLoader`` built with ``generator=`` is reseeded by
    (seed, epoch) so its order is reproducible too. With ``world_size`` > 1, rank ``rank`` gets its
    slice of every batch (``TensorLoader.batches``; other iterables: ``shard_batch``)."""
    if hasattr(loader, "batches"):
        if world_size > 1:
            return iter(loader.batches(epoch=epoch, start=start, seed=seed, rank=rank, world_size=world_size))
        return iter(loader.batches(epoch=epoch, start=start, seed=seed))
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(derive_seed(seed, epoch))
    batches = itertools.islice(iter(loader), start, None)
    if world_size > 1:
        return (shard_batch(b, rank, world_size) for b in batches)
    return batches


def shard_slice(idx: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s part of a batch's example indices: near-equal contiguous slices, a batch
    smaller than ``world_size`` filled up by repeating its examples (no rank gets an empty batch)."""
    if idx.numel() < world_size:
        idx = idx.repeat(math.ceil(world_size / max(1, idx.numel())))[:world_size]
    return idx.tensor_split(world_size)[rank]


def shard_batch(batch, rank: int, world_size: int):
    """Rank ``rank``'s slice (``shard_slice``) of every tensor in nested tuples/lists/dicts."""
    if isinstance(batch, torch.Tensor):
        return batch[shard_slice(torch.arange(batch.shape[0]), rank, world_size)]
    if isinstance(batch, Mapping):
        return type(batch)({k: shard_batch(v, rank, world_size) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(shard_batch(v, rank, world_size) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(shard_batch(v, rank, world_size) for v in batch)
    raise ValueError(f"cannot split a {type(batch).__name__} batch across ranks: use a core.engine.TensorLoader "
                     "(its batches are split by example index) or batches of tensors.")


def move_to(batch, device: torch.device):
    """Move tensors inside nested tuples/lists/dicts (and objects with ``.to``) to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: move_to(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    if hasattr(batch, "to"):
        return batch.to(device)
    return batch


def batch_size_of(batch) -> int:
    """Examples in a batch: the leading size of its first tensor."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, Mapping):
        return batch_size_of(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)):
        return batch_size_of(batch[0])
    if hasattr(batch, "stride"):  # torchrec KeyedJaggedTensor
        return int(batch.stride())
    raise ValueError(f"cannot tell the batch size of a {type(batch).__name__}: pass count_examples= to fit().")
