"""Lightning data plumbing around the episodic sampler: an endless meta-training stream that
resumes at the trainer's step, and fixed validation / test task sets served in chunks (the sampler's,
or tasks given from outside: the episodes of a file, the tasks of another data set)."""

from __future__ import annotations

from typing import Callable

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from metalearn_cli.samplers import EpisodicSampler, TrainStream
from metalearn_cli.tasks import TaskBatch, Tasks


class TaskDataModule(pl.LightningDataModule):
    def __init__(
        self,
        sampler: EpisodicSampler,
        seed: int,
        task_seed: int,
        val_tasks: int,
        test_tasks: int,
        eval_batch_tasks: int,
        iterations_per_batch: int = 1,
        train_batch: Callable[[int, int, int, int], Tasks] | None = None,
    ) -> None:
        super().__init__()
        self.sampler = sampler
        self.seed = seed
        self.task_seed = task_seed
        self.num_tasks = {"val": val_tasks, "test": test_tasks}
        self.eval_batch_tasks = eval_batch_tasks
        self.iterations_per_batch = iterations_per_batch
        #: (seed, step, rank, world_size) -> training batch; None: the sampler's meta-batches (see TrainStream)
        self.train_batch = train_batch
        #: per split, groups of fixed tasks (each group's tasks share one shape; the sampler's are one group)
        self._fixed: dict[str, list[TaskBatch]] = {}

    def _start_step(self) -> int:
        return self.trainer.global_step if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        stream = TrainStream(self.sampler, self.seed, self._start_step, rank, world, self.iterations_per_batch, self.train_batch)
        return DataLoader(stream, batch_size=None, num_workers=0)

    def set_fixed_tasks(self, split: str, groups: list) -> None:
        """Score `split` on these tasks instead of the sampler's: groups of tasks, each of one shape (tasks
        batched together must share their number of classes, support and query examples), anything with
        `num_tasks` and `slice(start, stop)`; scored group after group."""
        self._fixed[split] = list(groups)

    def fixed_groups(self, split: str) -> list:
        if split not in self._fixed:
            self._fixed[split] = [self.sampler.fixed_tasks(split, self.num_tasks[split], self.task_seed)]
        return self._fixed[split]

    def _chunks(self, split: str, world: int) -> list[tuple[int, int, int]]:
        """(group, start, stop) of every chunk of `split`'s tasks; chunks never mix groups."""
        groups = self.fixed_groups(split)
        # every rank gets at least one chunk; each scores every R-th chunk, each task exactly once
        size = min(self.eval_batch_tasks, -(-sum(g.num_tasks for g in groups) // world))
        return [(g, start, min(start + size, group.num_tasks))
                for g, group in enumerate(groups) for start in range(0, group.num_tasks, size)]

    def _rank_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _fixed_loader(self, split: str) -> DataLoader:
        rank, world = self._rank_world()
        chunks = FixedChunks(self.fixed_groups(split), self._chunks(split, world)[rank::world])
        return DataLoader(chunks, batch_size=None, shuffle=False, num_workers=0)

    def scored_order(self, split: str, world: int = 1) -> list[int]:
        """The position of each task (the groups laid end to end) in the order the ranks' scores are
        gathered: rank 0's chunks, then rank 1's, ... (`MetaLearner.task_scores`)."""
        groups = self.fixed_groups(split)
        offsets = [0]
        for group in groups:
            offsets.append(offsets[-1] + group.num_tasks)
        chunks = self._chunks(split, world)
        return [offsets[g] + i for rank in range(world) for g, start, stop in chunks[rank::world] for i in range(start, stop)]

    def val_dataloader(self) -> DataLoader:
        return self._fixed_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._fixed_loader("test")


class FixedChunks(Dataset):
    """Fixed tasks served one chunk per evaluation batch: chunk i is groups[g].slice(start, stop)."""

    def __init__(self, groups: list, chunks: list[tuple[int, int, int]]) -> None:
        self.groups = groups
        self.chunks = chunks

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> Tasks:
        if not 0 <= index < len(self):
            raise IndexError(index)
        g, start, stop = self.chunks[index]
        return self.groups[g].slice(start, stop)
