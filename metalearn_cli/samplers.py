"""Episodic task sampling: which tasks a meta-iteration, a validation or a test sees.

Every task is a pure function of seeds, never of hidden global state:

* meta-training batch number `step` is drawn with a generator seeded by (seed, "train", step),
  so a resumed run sees exactly the batches the uninterrupted run would have seen, and a
  run split over R processes sees the same meta-batch as one process (each rank takes its slice);
* validation and test task `i` is drawn with a generator seeded by (task_seed, split, i), so
  every algorithm and every run with the same `task_seed` is scored on the same tasks,
  whatever the chunking or the number of tasks asked for.
"""

from __future__ import annotations

from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset

from metalearn_cli.data.base import TaskSource
from metalearn_cli.tasks import TaskBatch

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def derive_seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from non-negative integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def generator_for(seed: int, split: str, index: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, _SPLIT_CODES[split], index))


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
        self.source = source
        self.shots = shots
        self.queries = queries
        self.meta_batch_size = meta_batch_size
        self.ways = ways
        self.train_shots = train_shots or shots
        #: classes per meta-training task (Prototypical Networks train with more than they test with)
        self.train_ways = train_ways or ways

    def train_batch(self, seed: int, step: int, rank: int = 0, world_size: int = 1) -> TaskBatch:
        """The meta-batch of meta-iteration `step`; with world_size > 1, this rank's share of it."""
        generator = generator_for(seed, "train", step)
        batch = self.source.sample(
            "train", generator, self.meta_batch_size, self.train_ways, self.train_shots, self.queries
        )
        batch.seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        if world_size > 1:
            per_rank = self.meta_batch_size // world_size
            batch = batch.slice(rank * per_rank, (rank + 1) * per_rank)
        return batch

    def fixed_tasks(self, split: str, num_tasks: int, task_seed: int) -> TaskBatch:
        """Tasks 0..num_tasks-1 of `split`; task i is the same for any num_tasks, and so is its seed."""
        tasks = []
        for i in range(num_tasks):
            generator = generator_for(task_seed, split, i)
            task = self.source.sample(split, generator, 1, self.ways, self.shots, self.queries)
            task.task_seeds = torch.randint(0, 2**62, (1,), generator=generator)  # drawn after the task: it stays the same
            tasks.append(task)
        return TaskBatch.cat(tasks)


class TrainStream(IterableDataset):
    """An endless stream of meta-batches, starting at the trainer's current step (for resume),
    served `per_batch` consecutive meta-iterations at a time (one list per Lightning training step)."""

    def __init__(
        self,
        sampler: EpisodicSampler,
        seed: int,
        start_step: Callable[[], int] = lambda: 0,
        rank: int = 0,
        world_size: int = 1,
        per_batch: int = 1,
    ) -> None:
        self.sampler = sampler
        self.per_batch = per_batch
        self.seed = seed
        self.start_step = start_step
        self.rank = rank
        self.world_size = world_size

    def __iter__(self) -> Iterator[list[TaskBatch]]:
        step = self.start_step()
        while True:
            yield [self.sampler.train_batch(self.seed, s, self.rank, self.world_size) for s in range(step, step + self.per_batch)]
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
