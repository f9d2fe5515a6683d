"""What a few-shot task is: a support set to adapt on and a query set to score, plus the objective."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class TaskBatch:
    """A batch of T tasks. Every tensor has the task dimension first.

    support_x: [T, S, *input_shape]   support_y: [T, S] (class index) or [T, S, out]
    query_x:   [T, Q, *input_shape]   query_y:   [T, Q] or [T, Q, out]
    seed: an integer drawn with the batch, for algorithms that need their own randomness
          (Reptile's inner mini-batches), so a step is a pure function of the batch.
    task_seeds: [T] integers, one drawn with each fixed validation/test task, so that randomness
          at evaluation (Reptile's `eval_inner_batch_size`) is a function of the task alone, whatever
          the tasks are batched with (eval.batch_tasks, devices).
    classes: [T, N] for classification: the split's class index behind each task label
             (what supervised pre-training, the Baseline of Chen et al., learns from).
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    seed: int = 0
    classes: Tensor | None = None
    task_seeds: Tensor | None = None

    @property
    def num_tasks(self) -> int:
        return self.support_x.shape[0]

    def to(self, device: torch.device | str) -> "TaskBatch":
        moved = [t.to(device, non_blocking=True) for t in self.tensors()]
        classes = None if self.classes is None else self.classes.to(device, non_blocking=True)
        return TaskBatch(*moved, seed=self.seed, classes=classes, task_seeds=self.task_seeds)  # seeds stay on the CPU

    def tensors(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self.support_x, self.support_y, self.query_x, self.query_y

    def slice(self, start: int, stop: int) -> "TaskBatch":
        classes = None if self.classes is None else self.classes[start:stop]
        task_seeds = None if self.task_seeds is None else self.task_seeds[start:stop]
        return TaskBatch(*(t[start:stop] for t in self.tensors()), seed=self.seed, classes=classes, task_seeds=task_seeds)

    @staticmethod
    def cat(batches: list["TaskBatch"]) -> "TaskBatch":
        parts = [torch.cat([b.tensors()[i] for b in batches]) for i in range(4)]
        classes = None if batches[0].classes is None else torch.cat([b.classes for b in batches])
        task_seeds = None if any(b.task_seeds is None for b in batches) else torch.cat([b.task_seeds for b in batches])
        return TaskBatch(*parts, seed=batches[0].seed, classes=classes, task_seeds=task_seeds)


@dataclass(frozen=True)
class Objective:
    """The loss adapted on and the metric reported, with the direction in which the metric improves.

    loss and metric take one task's predictions [N, ...] and targets [N, ...]; task_loss and
    task_metric take T tasks at once ([T, N, ...]) and return one value per task, [T].
    """

    name: str  # "regression" or "classification"
    loss: Callable[[Tensor, Tensor], Tensor]
    metric: Callable[[Tensor, Tensor], Tensor]
    metric_name: str
    mode: str  # "min" or "max": which way is better
    task_loss: Callable[[Tensor, Tensor], Tensor]
    task_metric: Callable[[Tensor, Tensor], Tensor]


def _accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(dim=-1) == labels).to(logits.dtype).mean()


def _task_mse(prediction: Tensor, target: Tensor) -> Tensor:
    return (prediction - target).pow(2).flatten(1).mean(1)


def _task_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    return losses.view(labels.shape).mean(1)


def _task_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(dim=-1) == labels).to(logits.dtype).mean(1)


REGRESSION = Objective("regression", F.mse_loss, F.mse_loss, "mse", "min", _task_mse, _task_mse)
CLASSIFICATION = Objective(
    "classification", F.cross_entropy, _accuracy, "acc", "max", _task_cross_entropy, _task_accuracy
)
