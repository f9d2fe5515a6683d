"""What an algorithm adapts on and is scored on: a batch of T tasks.

An algorithm never reads a task's data. It hands the task a model that evaluates T networks with
per-task parameters (`metalearn_cli.functional.TaskModel`: params[name] is [T, *shape]) and asks
for one number per task: the loss to adapt on (`support_loss`), the loss to meta-learn from
(`query_loss`), the score to report (`query_metric`), any further scores (`query_report`) and, for a
trust-region outer step, how far two parameter sets' predictions are apart (`query_kl`). Supervised few-shot batches
(`metalearn_cli.tasks.supervised.TaskBatch`) are one kind of task; episodes an agent collects in an
environment, or tasks built from unlabeled images, are others: each says how a loss comes out of
its own data, and every algorithm runs on it unchanged.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:
    from metalearn_cli.functional import TaskModel
    from metalearn_cli.tasks.objectives import Objective

Params = dict[str, Tensor]


class Tasks(ABC):
    """T tasks, with the task dimension first in everything they hold.

    seed: an integer drawn with the batch, for algorithms that need their own randomness
          (Reptile's inner mini-batches), so a step is a pure function of the batch.
    task_seeds: [T] integers, one drawn with each fixed validation/test task, so that randomness at
          evaluation is a function of the task alone, whatever the tasks are batched with.
    """

    seed: int = 0
    task_seeds: Tensor | None = None
    #: what the tasks' metric is called and which way it improves (`objective.metric_name`, `.mode`)
    objective: "Objective"

    @property
    @abstractmethod
    def num_tasks(self) -> int:
        """T."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the tasks' tensors live (execution picks its kernels by it)."""

    @property
    @abstractmethod
    def support_size(self) -> int:
        """Examples one adaptation step sees per task (execution's `auto` rule reads it)."""

    @abstractmethod
    def to(self, device: torch.device | str) -> "Tasks":
        """The same tasks on `device`."""

    @abstractmethod
    def slice(self, start: int, stop: int) -> "Tasks":
        """Tasks start..stop-1."""

    @classmethod
    @abstractmethod
    def cat(cls, parts: list["Tasks"]) -> "Tasks":
        """The tasks of `parts`, in order."""

    @abstractmethod
    def support_loss(self, model: "TaskModel", params: Params, step: int, batch: Tensor | None = None) -> Tensor:
        """[T]: each task's loss to adapt on, with its own parameters, at inner step `step`.
        `batch` ([T, b] indices), where the task has examples to draw from: only those examples."""

    @abstractmethod
    def query_loss(self, model: "TaskModel", params: Params, step: int) -> Tensor:
        """[T]: each task's loss after adaptation, the one meta-training differentiates."""

    @abstractmethod
    def query_metric(self, model: "TaskModel", params: Params, step: int) -> Tensor:
        """[T]: each task's reported score (objective.metric_name), without a graph."""

    def query_scores(self, model: "TaskModel", params: Params, step: int) -> tuple[Tensor, Tensor]:
        """([T] query losses, [T] detached metrics); kinds that can share one forward pass override it."""
        return self.query_loss(model, params, step), self.query_metric(model, params, step)

    def query_report(self, model: "TaskModel", params: Params, step: int) -> dict[str, Tensor]:
        """{name: [T]}: further scores of each task's query set that evaluation reports after the last
        adaptation step, without a graph, under the names `objective.report_names`; none by default.
        Supervised classification reports macro-F1 and mean per-class recall (`tasks.objectives`)."""
        return {}

    def query_metric_and_report(self, model: "TaskModel", params: Params, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """(query_metric, query_report) of the same parameters; kinds that can share one forward pass override it."""
        return self.query_metric(model, params, step), self.query_report(model, params, step)

    def query_kl(self, model: "TaskModel", params_old: Params, params_new: Params, step: int) -> Tensor:
        """[T]: each task's mean KL divergence KL(p_old || p_new) between the model's predictive
        distributions under `params_old` (constants) and `params_new` (differentiable), over its query
        inputs (episodes: the states of its query trajectories). A trust-region outer step
        (algo.outer_optimizer=trpo) constrains it."""
        raise NotImplementedError(
            f"{type(self).__name__} tasks define no KL divergence between predictive distributions "
            "(Tasks.query_kl), which algo.outer_optimizer=trpo needs; use algo.outer_optimizer=adam with them."
        )
