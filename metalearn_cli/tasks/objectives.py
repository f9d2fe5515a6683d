"""The loss adapted on and the metric (and further scores) reported for supervised tasks, and which way
the metric improves; reinforcement learning's objective names its metric (the return) and direction,
its losses coming from episodes (`tasks.episodes`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch.nn.functional as F
from torch import Tensor


def _no_report(prediction: Tensor, target: Tensor) -> dict[str, Tensor]:
    return {}


@dataclass(frozen=True)
class Objective:
    """loss and metric take one task's predictions [N, ...] and targets [N, ...]; task_loss and
    task_metric take T tasks at once ([T, N, ...]) and return one value per task, [T].
    `name`, `metric_name` and `mode` are all a run needs to log and pick checkpoints; any kind of
    task has them.
    task_report takes T tasks' predictions and targets like task_metric and gives further per-task
    scores ({name: [T]}) that evaluation reports after the last adaptation step; `report_names` are
    its keys, known to every process before any task is scored (ranks gather them by name)."""

    name: str  # "regression", "classification" or "reinforcement learning"
    loss: Callable[[Tensor, Tensor], Tensor]
    metric: Callable[[Tensor, Tensor], Tensor]
    metric_name: str
    mode: str  # "min" or "max": which way is better
    task_loss: Callable[[Tensor, Tensor], Tensor]
    task_metric: Callable[[Tensor, Tensor], Tensor]
    task_report: Callable[[Tensor, Tensor], dict[str, Tensor]] = _no_report
    report_names: tuple[str, ...] = ()


def _accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(dim=-1) == labels).to(logits.dtype).mean()


def _task_mse(prediction: Tensor, target: Tensor) -> Tensor:
    return (prediction - target).pow(2).flatten(1).mean(1)


def _task_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
    return losses.view(labels.shape).mean(1)


def _task_accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    return (logits.argmax(dim=-1) == labels).to(logits.dtype).mean(1)


def classification_report(logits: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Per task ([T, Q, N] logits, [T, Q] labels -> [T] each), of the predicted classes (argmax):

    macro_f1: the mean over classes of F1 = 2 TP / (predicted + true), where a class that is never
        predicted has precision 0/0, taken as 0 (so its F1 is 0), as scikit-learn's
        `f1_score(average="macro", zero_division=0)`;
    macro_recall: the mean over classes of TP / true (balanced accuracy; 0 for a class predicted but
        absent from the query set), as `recall_score(average="macro", zero_division=0)`.

    The classes averaged over are those among the task's labels or predictions, as scikit-learn's.
    On a query set with the same number of examples of every class (the episodic sampler's),
    macro_recall equals accuracy."""
    ways = logits.shape[-1]
    predicted = F.one_hot(logits.argmax(dim=-1), ways).to(logits.dtype)  # [T, Q, N]
    true = F.one_hot(labels, ways).to(logits.dtype)
    hits, n_predicted, n_true = (predicted * true).sum(1), predicted.sum(1), true.sum(1)  # [T, N] each
    present = (n_predicted + n_true) > 0
    f1 = 2 * hits / (n_predicted + n_true).clamp(min=1)
    recall = hits / n_true.clamp(min=1)  # hits are 0 where n_true is

    def class_mean(values: Tensor) -> Tensor:
        return (values * present).sum(1) / present.sum(1)

    return {"macro_f1": class_mean(f1), "macro_recall": class_mean(recall)}


REGRESSION = Objective("regression", F.mse_loss, F.mse_loss, "mse", "min", _task_mse, _task_mse)
CLASSIFICATION = Objective(
    "classification", F.cross_entropy, _accuracy, "acc", "max", _task_cross_entropy, _task_accuracy,
    classification_report, ("macro_f1", "macro_recall"),
)


def _from_episodes(*args: Tensor) -> Tensor:
    raise TypeError(
        "reinforcement learning has no loss or metric of predictions and targets: its losses and returns come "
        "from the episodes a policy collects (metalearn_cli.tasks.episodes.EpisodeTasks)"
    )


#: reinforcement learning: the tasks adapt on a policy-gradient surrogate of the episodes their policy
#: collects and report the average undiscounted return (tasks.episodes); larger is better
REINFORCEMENT = Objective(
    "reinforcement learning", _from_episodes, _from_episodes, "return", "max", _from_episodes, _from_episodes,
)
