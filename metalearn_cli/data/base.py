"""The interface every task distribution implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from metalearn_cli.tasks import Objective, TaskBatch

SPLITS = ("train", "val", "test")


class TaskSource(ABC):
    """A distribution over few-shot tasks, with a train, a validation and a test part."""

    #: loss and metric of the tasks
    objective: Objective
    #: shape of one input example, e.g. (1,) for sinusoid or (1, 28, 28) for Omniglot
    input_shape: tuple[int, ...]
    #: short name used in run summaries (`eval.json`'s "data")
    name: str
    #: the classes meta-training draws from: "train", or "trainval" (`data.train_on`, image data)
    train_on: str = "train"
    #: whether the meta-training split carries labels (`data.labeled=false`: one pool of unlabeled images)
    labeled: bool = True

    @property
    def validation_held_out(self) -> bool:
        """Whether validation tasks come from classes meta-training never sees (so that the
        best-validation checkpoint is a fair pick)."""
        return self.train_on == "train"

    @abstractmethod
    def output_dim(self, ways: int | None) -> int:
        """Size of the model's output layer for tasks of `ways` classes (regression ignores ways)."""

    @abstractmethod
    def sample(
        self,
        split: str,
        generator: torch.Generator,
        num_tasks: int,
        ways: int | None,
        shots: int,
        queries: int,
    ) -> TaskBatch:
        """Draw `num_tasks` tasks of `split` using only `generator` for randomness."""

    def describe(self) -> str:
        return self.name
