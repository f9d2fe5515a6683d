"""Supervised few-shot tasks: a labelled support set to adapt on and a query set to score."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from metalearn_cli.tasks.base import Params, Tasks
from metalearn_cli.tasks.objectives import CLASSIFICATION, REGRESSION, Objective

if TYPE_CHECKING:
    from metalearn_cli.functional import TaskModel


@dataclass
class TaskBatch(Tasks):
    """A batch of T supervised tasks. Every tensor has the task dimension first.

    support_x: [T, S, *input_shape]   support_y: [T, S] (class index) or [T, S, out]
    query_x:   [T, Q, *input_shape]   query_y:   [T, Q] or [T, Q, out]
    classes: [T, N] for classification: the split's class index behind each task label
             (what supervised pre-training, the Baseline of Chen et al., learns from).
    objective: the loss and metric; by default classification for integer labels, else regression.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    seed: int = 0
    classes: Tensor | None = None
    task_seeds: Tensor | None = None
    objective: Objective | None = None

    def __post_init__(self) -> None:
        if self.objective is None:
            self.objective = REGRESSION if self.support_y.is_floating_point() else CLASSIFICATION

    # -- the batch ----------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    @property
    def device(self) -> torch.device:
        return self.support_x.device

    @property
    def support_size(self) -> int:
        return self.support_x.shape[1]

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.support_x, self.support_y, self.query_x, self.query_y

    def _with(self, tensors, classes, task_seeds) -> "TaskBatch":
        return TaskBatch(*tensors, seed=self.seed, classes=classes, task_seeds=task_seeds, objective=self.objective)

    def to(self, device: torch.device | str) -> "TaskBatch":
        moved = [t.to(device, non_blocking=True) for t in self.tensors()]
        classes = None if self.classes is None else self.classes.to(device, non_blocking=True)
        return self._with(moved, classes, self.task_seeds)  # seeds stay on the CPU

    def slice(self, start: int, stop: int) -> "TaskBatch":
        classes = None if self.classes is None else self.classes[start:stop]
        task_seeds = None if self.task_seeds is None else self.task_seeds[start:stop]
        return self._with([t[start:stop] for t in self.tensors()], classes, task_seeds)

    @classmethod
    def cat(cls, parts: list["TaskBatch"]) -> "TaskBatch":
        tensors = [torch.cat([b.tensors()[i] for b in parts]) for i in range(4)]
        classes = None if parts[0].classes is None else torch.cat([b.classes for b in parts])
        task_seeds = None if any(b.task_seeds is None for b in parts) else torch.cat([b.task_seeds for b in parts])
        return parts[0]._with(tensors, classes, task_seeds)

    # -- what algorithms ask ------------------------------------------------------------------
    def support(self, batch: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The support inputs and targets, or only the examples `batch` ([T, b]) names."""
        if batch is None:
            return self.support_x, self.support_y
        rows = torch.arange(self.num_tasks, device=batch.device).unsqueeze(1)
        return self.support_x[rows, batch], self.support_y[rows, batch]

    def support_loss(self, model: "TaskModel", params: Params, step: int, batch: Tensor | None = None) -> Tensor:
        x, y = self.support(batch)
        return self.objective.task_loss(model(params, x, step), y)

    def query_loss(self, model: "TaskModel", params: Params, step: int) -> Tensor:
        return self.objective.task_loss(model(params, self.query_x, step), self.query_y)

    def query_metric(self, model: "TaskModel", params: Params, step: int) -> Tensor:
        with torch.no_grad():
            return self.objective.task_metric(model(params, self.query_x, step), self.query_y)

    def query_scores(self, model: "TaskModel", params: Params, step: int) -> tuple[Tensor, Tensor]:
        prediction = model(params, self.query_x, step)
        return self.objective.task_loss(prediction, self.query_y), self.objective.task_metric(prediction.detach(), self.query_y)

    def query_report(self, model: "TaskModel", params: Params, step: int) -> dict[str, Tensor]:
        return self.query_metric_and_report(model, params, step)[1]

    def query_metric_and_report(self, model: "TaskModel", params: Params, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        with torch.no_grad():
            prediction = model(params, self.query_x, step)
            return self.objective.task_metric(prediction, self.query_y), self.objective.task_report(prediction, self.query_y)

    def query_kl(self, model: "TaskModel", params_old: Params, params_new: Params, step: int) -> Tensor:
        """Classification: KL of the softmax distributions; regression: of unit-variance Gaussians around
        the predictions, 0.5 * squared distance of the means; mean over each task's query points."""
        with torch.no_grad():
            old = model(params_old, self.query_x, step)
        return predictive_kl(self.objective, old, model(params_new, self.query_x, step))

    # -- for algorithms that need labelled examples (metric learning, pre-training) -------------
    def features(self, model: "TaskModel", params: Params, part: str, step: int = 0) -> Tensor:
        """[T, n, F]: the network's features (without its head) of the support or query inputs."""
        return model(params, self.support_x if part == "support" else self.query_x, step, features_only=True)


def predictive_kl(objective: Objective, old: Tensor, new: Tensor) -> Tensor:
    """[T]: the mean over query points of KL(p_old || p_new) from the model's outputs [T, Q, ...] under
    two parameter sets, with the predictive distribution the objective's loss implies."""
    if objective.name == CLASSIFICATION.name:
        log_old, log_new = old.log_softmax(-1), new.log_softmax(-1)
        return (log_old.exp() * (log_old - log_new)).sum(-1).mean(1)
    if objective.name == REGRESSION.name:
        return 0.5 * (old - new).pow(2).reshape(*old.shape[:2], -1).sum(-1).mean(1)
    raise NotImplementedError(f"no predictive distribution is defined for {objective.name} tasks (Tasks.query_kl)")
