"""The loss adapted on and the metric reported for supervised tasks, and which way the metric improves."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Objective:
    """loss and metric take one task's predictions [N, ...] and targets [N, ...]; task_loss and
    task_metric take T tasks at once ([T, N, ...]) and return one value per task, [T].
    `name`, `metric_name` and `mode` are all a run needs to log and pick checkpoints; any kind of
    task has them."""

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
