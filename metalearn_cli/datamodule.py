"""Lightning data plumbing around the episodic sampler: an endless meta-training stream that
resumes at the trainer's step, and fixed validation / test task sets served in chunks."""

from __future__ import annotations

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from metalearn_cli.samplers import EpisodicSampler, TaskChunks, TrainStream


class TaskDataModule(pl.LightningDataModule):
    def __init__(
        self,
        sampler: EpisodicSampler,
        seed: int,
        task_seed: int,
        val_tasks: int,
        test_tasks: int,
        eval_batch_tasks: int,
    ) -> None:
        super().__init__()
        self.sampler = sampler
        self.seed = seed
        self.task_seed = task_seed
        self.num_tasks = {"val": val_tasks, "test": test_tasks}
        self.eval_batch_tasks = eval_batch_tasks
        self._fixed: dict[str, TaskChunks] = {}

    def _start_step(self) -> int:
        return self.trainer.global_step if self.trainer is not None else 0

    def train_dataloader(self) -> DataLoader:
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        stream = TrainStream(self.sampler, self.seed, self._start_step, rank, world)
        return DataLoader(stream, batch_size=None, num_workers=0)

    def _fixed_loader(self, split: str) -> DataLoader:
        if split not in self._fixed:
            tasks = self.sampler.fixed_tasks(split, self.num_tasks[split], self.task_seed)
            self._fixed[split] = TaskChunks(tasks, self.eval_batch_tasks)
        return DataLoader(self._fixed[split], batch_size=None, shuffle=False, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return self._fixed_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._fixed_loader("test")
