"""Episodic task sampling: which tasks a meta-iteration, a validation or a test sees.

Every task is a pure function of seeds, never of hidden global state:

* meta-training batch number `step` is drawn with a generator seeded by (seed, "train", step),
  so a resumed run sees exactly the batches the uninterrupted run would have seen, and a
  run split over R processes sees the same meta-batch as one process (each rank takes its slice);
* validation and test task `i` is drawn with a generator seeded by (task_seed, split, i), so
  every algorithm and every run with the same `task_seed` is scored on the same tasks,
  whatever the chunking or the number of tasks asked for;
* supervised pre-training (`pretrain_batch`, the Baseline of Chen et al.) walks through epochs of
  the training images: epoch e's order is a permutation seeded by (seed, "pretrain", e), and batch
  `step` is positions step*B ... step*B + B - 1 of the epoch orders laid end to end.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from metalearn_cli import options
from metalearn_cli.data.base import TaskSource
from metalearn_cli.errors import MetalearnError
from metalearn_cli.tasks import CLASSIFICATION, TaskBatch, Tasks

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
#: derive_seed codes of pre-training: the epoch orders, and a batch's own draws (random rotations)
_PRETRAIN_ORDER, _PRETRAIN_DRAWS = 3, 4


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def generator_for(seed: int, split: str, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, _SPLIT_CODES[split], index))


def rank_share(total: int, rank: int, world_size: int, key: str) -> slice:
    """Rank `rank`'s contiguous part of `total` items split across `world_size` ranks: the first
    total % world_size ranks take total // world_size + 1 items, the others total // world_size, so
    the parts in rank order are the whole. Ranks combine their results weighted by the parts' sizes
    (`distributed.all_reduce_weighted_mean_`). A rank with nothing would have no loss to contribute,
    and training on fewer items than ranks wastes ranks, so that is refused (`key` is the setting)."""
    if total < world_size:
        raise MetalearnError(
            f"`{key}` = {total} is smaller than the {world_size} processes (trainer.devices x trainer.num_nodes) "
            f"it is split across, so some would get nothing to train on. Allowed: at least {world_size}, "
            "or fewer processes."
        )
    size, extra = divmod(total, world_size)
    start = rank * size + min(rank, extra)
    return slice(start, start + size + (rank < extra))


class EpisodicSampler:
    """N-way (classification) or plain (regression) K-shot tasks with Q queries per class/task."""

    def __init__(
        self,
        source: TaskSource,
        shots: int,
        queries: int,
        meta_batch_size: int,
        ways: int | None = None,
        train_shots: int | None = None,
        train_ways: int | None = None,
    ) -> None:
        #: the task source; None while the settings alone are checked (build.py binds it after)
        self.source = source
        self.shots = options.integer("shots", shots, "labelled support examples per class, or per task for regression")
        self.queries = options.integer("queries", queries, "query examples per class, or per task for regression", optional=True)
        self.meta_batch_size = options.integer("meta_batch_size", meta_batch_size, "tasks per meta-iteration")
        self.ways = options.integer("ways", ways, "classes per task", minimum=2, optional=True)
        options.integer("train_shots", train_shots, "support examples per class in meta-training tasks", optional=True)
        options.integer("train_ways", train_ways, "classes per meta-training task", minimum=2, optional=True)
        self.train_shots = train_shots or shots
        #: classes per meta-training task (Prototypical Networks train with more than they test with)
        self.train_ways = train_ways or ways
        self._epoch_orders: dict[tuple[int, int], torch.Tensor] = {}

    def check_source(self, source: TaskSource) -> None:
        """Fail early, naming the key, if `source` cannot give this sampler's tasks: meta-training tasks from
        its labelled training classes, validation and test tasks from its labelled val and test classes."""
        if not getattr(source, "labeled", True):
            raise MetalearnError(
                f"`data.labeled` = false: the training images of {source.name} have no labels, and `sampler=episodic` "
                "draws meta-training tasks from labelled classes. Use sampler=umtra (tasks of augmented copies) or "
                "sampler=cactus (tasks of clusters), which build them from unlabeled images."
            )
        if hasattr(source, "check_task_shape"):
            shots = {"train": self.train_shots, "val": self.shots, "test": self.shots}
            ways = {"train": self.train_ways, "val": self.ways, "test": self.ways}
            source.check_task_shape(ways, shots, self.queries)

    def train_classes(self) -> int:
        """How many classes the labels of meta-training tasks (`TaskBatch.classes`) index: what a head over every
        training class (algo=finetune's pre-training) needs."""
        return self.source.num_classes("train")

    def prepare_training(self) -> None:
        """Work meta-training needs before its first batch (none here; CACTUs clusters its images)."""

    def train_batch(self, seed: int, step: int, rank: int = 0, world_size: int = 1) -> TaskBatch:
        """The meta-batch of meta-iteration `step`; with world_size > 1, this rank's share of it."""
        generator = generator_for(seed, "train", step)
        batch = self.source.sample(
            "train", generator, self.meta_batch_size, self.train_ways, self.train_shots, self.queries
        )
        batch.seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        if world_size > 1:
            share = rank_share(self.meta_batch_size, rank, world_size, "sampler.meta_batch_size")
            batch = batch.slice(share.start, share.stop)
        return batch

    def pretrain_batch(self, seed: int, step: int, batch_size: int, rank: int = 0, world_size: int = 1) -> TaskBatch:
        """Pre-training batch `step`: `batch_size` training images with their global class, as one task
        whose support set holds them (query empty) and whose `classes` is 0..C-1, so that
        `classes.gather(1, support_y)` is the global label. With world_size > 1, this rank's share of
        the images (`rank_share`; the pre-training loss is a mean over images, so ranks weigh theirs)."""
        share = rank_share(batch_size, rank, world_size, "algo.pretrain_batch_size")
        if not hasattr(self.source, "labelled_images"):
            raise MetalearnError(
                f"`algo.pretrain_batch_size` pre-trains on single labelled images, which {self.source.name} does not "
                "give. Allowed here: null (train on the images of sampled tasks)."
            )
        count = self.source.num_images("train")
        positions = step * batch_size + torch.arange(batch_size)
        epochs, within = positions // count, positions % count
        index = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():  # a batch may straddle two epochs
            index[epochs == epoch] = self._epoch_order(seed, epoch, count)[within[epochs == epoch]]
        generator = torch.Generator().manual_seed(derive_seed(seed, _PRETRAIN_DRAWS, step))
        x, y = self.source.labelled_images("train", index, generator)  # the whole batch: every rank draws the same
        classes = torch.arange(self.source.num_classes("train")).unsqueeze(0)
        x, y = x[share].unsqueeze(0), y[share].unsqueeze(0)
        batch = TaskBatch(x, y, x[:, :0], y[:, :0], classes=classes, objective=CLASSIFICATION)
        batch.seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        return batch

    def _epoch_order(self, seed: int, epoch: int, count: int) -> torch.Tensor:
        """The order of pre-training epoch `epoch` (the two latest kept: consecutive batches share them)."""
        key = (seed, epoch)
        if key not in self._epoch_orders:
            generator = torch.Generator().manual_seed(derive_seed(seed, _PRETRAIN_ORDER, epoch))
            self._epoch_orders = {k: v for k, v in self._epoch_orders.items() if k[0] == seed and k[1] == epoch - 1}
            self._epoch_orders[key] = torch.randperm(count, generator=generator)
        return self._epoch_orders[key]

    def fixed_tasks(self, split: str, num_tasks: int, task_seed: int) -> TaskBatch:
        """Tasks 0..num_tasks-1 of `split`; task i is the same for any num_tasks, and so is its seed."""
        tasks = []
        for i in range(num_tasks):
            generator = generator_for(task_seed, split, i)
            task = self.source.sample(split, generator, 1, self.ways, self.shots, self.queries)
            task.task_seeds = torch.randint(0, 2**62, (1,), generator=generator)  # drawn after the task: it stays the same
            tasks.append(task)
        return type(tasks[0]).cat(tasks)


class TrainStream(IterableDataset):
    """An endless stream of meta-batches, starting at the trainer's current step (for resume),
    served `per_batch` consecutive meta-iterations at a time (one list per Lightning training step).
    `train_batch(seed, step, rank, world_size)` makes each one: the sampler's meta-batches, unless the
    algorithm trains on something else (Finetune.train_batch: pre-training batches of images)."""

    def __init__(
        self,
        sampler: EpisodicSampler,
        seed: int,
        start_step: Callable[[], int] = lambda: 0,
        rank: int = 0,
        world_size: int = 1,
        per_batch: int = 1,
        train_batch: Callable[[int, int, int, int], Tasks] | None = None,
    ) -> None:
        self.sampler = sampler
        self.train_batch = train_batch or sampler.train_batch
        self.per_batch = per_batch
        self.seed = seed
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[list[TaskBatch]]:
        step = self.start_step()
        while True:
            yield [self.train_batch(self.seed, s, self.rank, self.world_size) for s in range(step, step + self.per_batch)]
            step += self.per_batch


class TaskChunks(Dataset):
    """A fixed set of tasks served in chunks of `chunk_size` tasks (one chunk per evaluation batch)."""

    def __init__(self, tasks: TaskBatch, chunk_size: int) -> None:
        self.tasks = tasks
        self.chunk_size = chunk_size

    def __len__(self) -> int:
        return -(-self.tasks.num_tasks // self.chunk_size)

    def __getitem__(self, index: int) -> TaskBatch:
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.chunk_size
        return self.tasks.slice(start, min(start + self.chunk_size, self.tasks.num_tasks))
