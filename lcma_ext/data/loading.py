"""``DataLoader`` s over integer image tensors, for one process or for every rank of a DDP run.

:func:`image_loader` serves whole batches (one fancy index per batch, no per-image collation):

- one process: a fresh permutation per epoch drawn from the run's generator
  (:class:`GeneratorPermutationSampler`), so the data order and the dequantization noise come from
  one seed and a checkpoint of that generator resumes both;
- ``torch.distributed``: ``torch.utils.data.DistributedSampler`` (seeded with the run's seed, its
  epoch set every epoch), which gives rank ``r`` the positions ``r, r + W, r + 2W, ...`` of one
  shared permutation. Step ``s`` of all ranks together then holds positions
  ``s B .. (s + 1) B - 1`` of that permutation, the global batch ``B = W b`` of a one-process run
  with the same order.

References:
    PyTorch, ``torch.utils.data`` (DataLoader, BatchSampler, DistributedSampler),
    https://pytorch.org/docs/stable/data.html
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler

__all__ = ["GeneratorPermutationSampler", "ImageBatches", "image_loader", "set_loader_epoch"]


class GeneratorPermutationSampler(Sampler[int]):
    """One ``torch.randperm(num, generator=generator)`` per epoch, nothing else drawn.

    ``torch.utils.data.RandomSampler`` draws a second (empty) permutation after the first, which
    moves the generator on; this sampler draws exactly one, so the generator it shares with the
    dequantization noise stays in step with the one-process code path of earlier versions.

    Args:
        num: Number of examples.
        generator: The CPU generator the order is drawn from.
    """

    def __init__(self, num: int, generator: torch.Generator) -> None:
        if num < 1:
            raise ValueError(f"expected at least one example; got {num}")
        self.num = num
        self.generator = generator

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.num, generator=self.generator).tolist()

    def __len__(self) -> int:
        return self.num


class ImageBatches(Dataset[Tensor]):
    """A tensor of images indexed by whole batches: ``dataset[[i, j, ...]]`` is one stacked batch.

    Args:
        images: Integer images ``(N, C, H, W)``.
    """

    def __init__(self, images: Tensor) -> None:
        if images.dim() < 2 or images.shape[0] == 0:
            raise ValueError(
                f"expected a non-empty batch of images (N, ...); got shape {tuple(images.shape)}"
            )
        self.images = images

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, indices: list[int]) -> Tensor:
        return self.images[torch.as_tensor(indices, dtype=torch.long)]


def image_loader(
    images: Tensor,
    batch_size: int,
    generator: torch.Generator,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    distributed: bool = False,
    num_workers: int = 0,
    pin_memory: bool = False,
) -> DataLoader[Tensor]:
    """A ``DataLoader`` of shuffled whole batches of ``images``.

    Args:
        images: Integer images ``(N, C, H, W)``.
        batch_size: Images per batch on this rank (the global batch divided by ``world_size``).
        generator: The run's CPU generator (one process: the order is drawn from it).
        seed: Seed of the ``DistributedSampler`` order (distributed only).
        rank, world_size: This rank and the number of ranks (distributed only).
        distributed: Use ``DistributedSampler`` (set its epoch with ``loader.sampler.sampler``'s
            ``set_epoch``, see :func:`set_loader_epoch`).
        num_workers: Worker processes of the loader.
        pin_memory: Pin host memory (for CUDA training).

    Returns:
        A ``DataLoader`` yielding ``uint8`` batches ``(b, C, H, W)``; the last may be smaller.
        Its own ``generator`` (worker seeds only) is seeded with ``seed``, so it never draws from
        torch's global random state.
    """
    dataset = ImageBatches(images)
    if distributed:
        order: Sampler[int] = DistributedSampler(
            dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed
        )
    else:
        order = GeneratorPermutationSampler(len(dataset), generator)
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=BatchSampler(order, batch_size, drop_last=False),
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=False,
    )


def set_loader_epoch(loader: object, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on the loader's sampler (or batch sampler's sampler) if it has one.

    ``DistributedSampler`` needs it for a new order every epoch; other samplers ignore it.
    """
    candidates: list[Any] = [
        getattr(loader, "sampler", None),
        getattr(loader, "batch_sampler", None),
    ]
    candidates += [getattr(c, "sampler", None) for c in list(candidates)]
    for candidate in candidates:
        if hasattr(candidate, "set_epoch"):
            candidate.set_epoch(epoch)
            return
