"""The "pretrained" baseline of the MAML paper: ordinary training on data pooled from sampled tasks.

Meta-training ignores the task structure: every support and query example of the meta-batch is
one training example, and the loss is minimised directly. At validation and test the model is
adapted to each task exactly as MAML is (SGD with eval_inner_lr for eval_inner_steps steps).
"""

from __future__ import annotations

import torch

from metalearn_cli.algorithms.base import Algorithm, FunctionalModel, MetaStep
from metalearn_cli.tasks import TaskBatch


class Finetune(Algorithm):
    name = "finetune"

    def meta_step(self, fmodel: FunctionalModel, tasks: TaskBatch) -> MetaStep:
        objective = fmodel.objective
        inputs = torch.cat([tasks.support_x.flatten(0, 1), tasks.query_x.flatten(0, 1)])
        targets = torch.cat([tasks.support_y.flatten(0, 1), tasks.query_y.flatten(0, 1)])
        prediction = fmodel(fmodel.params(), inputs)
        loss = objective.loss(prediction, targets)
        metric = objective.metric(prediction, targets).detach()
        return MetaStep(loss=loss, metrics={"loss": loss.detach(), objective.metric_name: metric})
