"""Data-parallel training across processes: torchrun detection, process groups, sharding, gathering.

The same ``emofuse train`` runs under ``torchrun --nproc_per_node N``: the environment it sets
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) is read here, the process group is set up with
gloo on CPU and nccl on CUDA, and only rank 0 writes files.

Sharding is by global batch: every rank draws the same seeded permutation, cuts it into global
batches of ``batch_size`` and takes every ``world_size``-th sample of each. The union of the ranks'
micro-batches is therefore exactly the batch a single process would see, and with losses that are
plain per-sample means (scaled by the rank's share of the batch, see `emofuse.core.engine.training`) the
averaged gradient equals the single-process gradient. That is what "same result" means here: with
the global batch size held equal, N processes and 1 follow the same trajectory up to float
summation order. A final global batch with fewer samples than ranks is dropped (every rank needs at
least one sample to join the gradient all-reduce), in every world size alike.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

from emofuse.core.errors import ConfigError


@dataclass
class DistContext:
    """This process's place in the job: rank, world size and device (world size 1 when alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            value = value.clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def torchrun_env() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) when launched by torchrun with more than one process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return None
    if world <= 1:
        return None
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> the CUDA device of this local rank when there is one, else CPU."""
    if requested == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ConfigError(f"train.device: {requested!r} is not a device ({exc})", hint="use auto, cpu or cuda") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("train.device: cuda was asked for but no CUDA device is available", hint="use --set train.device=cpu")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def setup_distributed(requested_device: str) -> DistContext:
    """Join the torchrun job if there is one (initialising the process group), else a world of one."""
    env = torchrun_env()
    if env is None:
        return DistContext(device=resolve_device(requested_device))
    rank, world, local_rank = env
    device = resolve_device(requested_device, local_rank)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        owns = True
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device, owns_group=owns)


def teardown_distributed(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


#: Global batches per length group: `global_batches` sorts each group of that many shuffled batches' samples
#: by length before cutting it (then shuffles the batches), so a batch pads to about its own samples' lengths.
LENGTH_GROUP_BATCHES = 50


def global_batches(n: int, batch_size: int, *, shuffle: bool, seed: int, epoch: int, min_last: int,
                   lengths: Sequence[int] | None = None) -> list[list[int]]:
    """The epoch's global batches of sample positions (seeded by seed and epoch; same on every rank);
    a last batch smaller than `min_last` is dropped. With `lengths` (one per sample) and `shuffle`, batches
    hold samples of similar length (length grouping, as in transformers' ``group_by_length``)."""
    grouped = shuffle and lengths is not None
    if lengths is not None and len(lengths) != n:
        raise ValueError(f"{len(lengths)} lengths for {n} samples")
    if shuffle:
        g = torch.Generator().manual_seed(_mix(seed, epoch))
        order = torch.randperm(n, generator=g).tolist()
    else:
        order = list(range(n))
    if grouped:  # a group is a whole number of batches, so cutting the sorted groups' concatenation cuts each
        step = batch_size * LENGTH_GROUP_BATCHES
        order = [i for start in range(0, n, step) for i in sorted(order[start:start + step], key=lambda i: -lengths[i])]
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if batches and len(batches[-1]) < min_last:
        batches.pop()
    if grouped:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
    return batches


def shard(batch: Sequence[int], rank: int, world_size: int) -> list[int]:
    """This rank's part of a global batch: every `world_size`-th position starting at `rank`."""
    return list(batch[rank::world_size])


class ShardedBatchSampler:
    """A batch sampler yielding this rank's share of each global batch of one epoch.

    `set_epoch` changes the shuffle, as with `torch.utils.data.DistributedSampler`.
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1,
                 drop_small_last: bool = True, lengths: Sequence[int] | None = None):
        if batch_size < world_size:
            raise ConfigError(f"train.batch_size {batch_size} is smaller than the {world_size} processes",
                              hint="the batch size is global: give each process at least one sample")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.drop_small_last = drop_small_last
        self.lengths = lengths
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_batches(self) -> list[list[int]]:
        # Training drops a last batch that would give a process fewer than 2 samples: batch norm
        # cannot train on one, and an empty share would stall the other processes.
        min_last = min(2 * self.world_size, self.batch_size) if self.drop_small_last else 1
        return global_batches(self.n, self.batch_size, shuffle=self.shuffle, seed=self.seed, epoch=self.epoch,
                              min_last=min_last, lengths=self.lengths)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.global_batches():
            part = shard(batch, self.rank, self.world_size)
            if part:
                yield part

    def __len__(self) -> int:
        return sum(1 for b in self.global_batches() if shard(b, self.rank, self.world_size))


def _mix(seed: int, epoch: int) -> int:
    """A generator seed from (seed, epoch), distinct for nearby pairs."""
    return (int(seed) * 1_000_003 + int(epoch) * 7919 + 12345) % (2**63 - 1)
