"""Lightning data plumbing around the episodic sampler: an endless meta-training stream that
resumes at the trainer's step, and fixed validation / test task sets served in chunks."""

from __future__ import annotations

from typing import Callable

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Subset

from metalearn_cli.samplers import EpisodicSampler, TaskChunks, TrainStream
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
        self._fixed: dict[str, TaskBatch] = {}

    def _start_step(self) -> int:
        return self.trainer.global_step if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        stream = TrainStream(self.sampler, self.seed, self._start_step, rank, world, self.iterations_per_batch, self.train_batch)
        return DataLoader(stream, batch_size=None, num_workers=0)

    def _fixed_loader(self, split: str) -> DataLoader:
        if split not in self._fixed:
            self._fixed[split] = self.sampler.fixed_tasks(split, self.num_tasks[split], self.task_seed)
        tasks = self._fixed[split]
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        # every rank gets at least one chunk; each scores every R-th chunk, each task exactly once
        chunk_size = min(self.eval_batch_tasks, -(-tasks.num_tasks // world))
        chunks = TaskChunks(tasks, chunk_size)
        if world > 1:
            chunks = Subset(chunks, range(rank, len(chunks), world))
        return DataLoader(chunks, batch_size=None, shuffle=False, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return self._fixed_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._fixed_loader("test")
