"""Prototypical Networks (Snell, Swersky, Zemel 2017).

Each class of a task is represented by the mean of its support embeddings (its prototype); a query
is scored by the negative squared Euclidean distance to every prototype,

    logits[q, c] = -|| f(x_q) - mean_{i: y_i = c} f(x_i) ||^2,

and meta-training minimises the cross-entropy of those logits on the query set. The embedding f is
the network without its head (conv4's pooled features). There is no inner loop: a task is "adapted
to" by computing its prototypes, so evaluation reports a single step. Episodes in meta-training may
have more classes than test tasks (`sampler.train_ways`: 60 on Omniglot in the paper).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metalearn_cli import options
from metalearn_cli.errors import MetalearnError
from metalearn_cli.algorithms.base import Algorithm, Evaluation, MetaStep, one_task
from metalearn_cli.batched import expand
from metalearn_cli.functional import FunctionalModel, TaskModel
from metalearn_cli.tasks import TaskBatch, Tasks


def class_prototypes(support: Tensor, labels: Tensor, ways: int) -> Tensor:
    """support [T, S, F] with labels [T, S] in 0..ways-1 -> [T, ways, F], the mean embedding of each class."""
    one_hot = F.one_hot(labels, ways).to(support.dtype)  # [T, S, N]
    return one_hot.transpose(1, 2) @ support / one_hot.sum(1).unsqueeze(-1)


def prototype_logits(support: Tensor, labels: Tensor, query: Tensor, ways: int) -> Tensor:
    """support [T, S, F] with labels [T, S] in 0..ways-1, query [T, Q, F] -> logits [T, Q, ways]."""
    return -torch.cdist(query, class_prototypes(support, labels, ways)).pow(2)


class ProtoNet(Algorithm):
    name = "protonet"
    has_inner_loop = False
    head_fixes_ways = False  # prototypes: one per class of the task, any number of them

    def __init__(self, outer_lr: float, lr_decay_steps: int = 0, lr_decay: float = 0.5,
                 vectorize: str = "auto", task_chunk: int | str = "auto", task_threads: int | str = "auto") -> None:
        super().__init__(inner_lr=0.0, inner_steps=0, eval_inner_steps=0, outer_lr=outer_lr,
                         vectorize=vectorize, task_chunk=task_chunk, task_threads=task_threads)
        self.lr_decay_steps = options.integer("lr_decay_steps", lr_decay_steps, "meta-iterations between rate decays; 0: none", minimum=0)
        self.lr_decay = options.number("lr_decay", lr_decay, "the factor applied to the rate at each decay, at most 1")
        if self.lr_decay > 1:
            raise options.invalid("lr_decay", lr_decay, "a number in (0, 1] (the factor applied to the rate at each decay)")

    def extra_modules(self, model, source, sampler) -> dict:
        if source.objective.name != "classification":  # refused at build, before any training
            raise MetalearnError(f"`algo=protonet` classifies by class prototypes, but `data={source.name}` is a "
                                 f"{source.objective.name} data set. Allowed: a classification data set (omniglot, folder, mnist, cifar_fs, miniimagenet).")
        return {}

    def configure_optimizers(self, parameters, max_steps: int) -> dict:
        """Adam; with `lr_decay_steps`, its rate multiplied by `lr_decay` every that many meta-iterations
        (the paper halves it every 2,000 episodes)."""
        optimizer = torch.optim.Adam(parameters, lr=self.outer_lr)
        if not self.lr_decay_steps:
            return {"optimizer": optimizer}
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, self.lr_decay_steps, self.lr_decay)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def query_logits(self, model: TaskModel, theta: dict, tasks: TaskBatch) -> Tensor:
        """[T, Q, ways]: the prototype classifier's logits of each task's query set."""
        params = expand(theta, tasks.num_tasks)
        ways = int(tasks.support_y.max()) + 1
        return prototype_logits(tasks.features(model, params, "support"), tasks.support_y,
                                tasks.features(model, params, "query"), ways)

    def scores(self, model: TaskModel, theta: dict, tasks: Tasks) -> tuple[Tensor, Tensor]:
        """[T] query cross-entropies and [T] query accuracies of the prototype classifier."""
        tasks = labelled(tasks)
        logits = self.query_logits(model, theta, tasks)
        return tasks.objective.task_loss(logits, tasks.query_y), tasks.objective.task_metric(logits.detach(), tasks.query_y)

    def meta_step(self, fmodel: FunctionalModel, tasks: Tasks, iteration: int = 0) -> MetaStep:
        theta = fmodel.params()
        loss, (metrics,) = self.execution.mean_loss(lambda model, part: self.scores(model, theta, part), fmodel, tasks)
        return MetaStep(loss=loss, metrics={"loss": loss.detach(), tasks.objective.metric_name: metrics.mean()})

    def evaluation(self, fmodel: FunctionalModel, tasks: Tasks, steps: int | None = None) -> Evaluation:
        """[T, 1]: the query accuracy of the prototypes (one step: there is no inner loop), and the
        classification report of the same predictions."""
        theta = {k: v.detach() for k, v in fmodel.params().items()}

        def scores(model: TaskModel, part: Tasks) -> tuple[Tensor, dict[str, Tensor]]:
            part = labelled(part)
            logits = self.query_logits(model, theta, part)
            objective = part.objective
            return objective.task_metric(logits, part.query_y).unsqueeze(1), objective.task_report(logits, part.query_y)

        with torch.no_grad():
            return Evaluation(*self.execution.run(scores, fmodel, tasks))

    def adapted_network(self, fmodel: FunctionalModel, task: Tasks, bn_batch: str = "support") -> nn.Module:
        """The embedding with the task's class prototypes as its classifier: the logits of `query_logits`
        (negative squared distances to the same prototypes), batch norm fixed from the `bn_batch` images."""
        from metalearn_cli.compression.adapted import EmbeddingClassifier, PrototypeHead, fixed_network, statistics_images

        task = labelled(one_task(task))
        theta = {k: v.detach() for k, v in fmodel.params().items()}
        ways = int(task.support_y.max()) + 1

        def prototypes(model: TaskModel, part: TaskBatch) -> Tensor:
            return class_prototypes(part.features(model, expand(theta, part.num_tasks), "support"), part.support_y, ways)

        with torch.no_grad():
            centres = self.execution.run(prototypes, fmodel, task)[0]
        return EmbeddingClassifier(fixed_network(fmodel, theta, statistics_images(task, bn_batch), 0), PrototypeHead(centres))

    def record_statistics(self, fmodel: FunctionalModel, tasks: Tasks) -> None:
        """Running batch-norm statistics (model.bn=frozen) from the support sets' embeddings."""
        if not fmodel.stat_layers:
            return
        theta = {k: v.detach() for k, v in fmodel.params().items()}
        model = fmodel.on("loop")
        with fmodel.recording(), torch.no_grad():
            for i in range(tasks.num_tasks):
                labelled(tasks).slice(i, i + 1).features(model, expand(theta, 1), "support")

    def eval_protocol(self) -> dict:
        return {"eval_inner_lr": None, "eval_inner_optimizer": None, "eval_inner_batch_size": None,
                "classifier": "nearest prototype (squared Euclidean)"}


def labelled(tasks: Tasks) -> TaskBatch:
    if not isinstance(tasks, TaskBatch) or tasks.objective.name != "classification":
        raise TypeError(f"algo=protonet classifies by class prototypes; it needs labelled classification tasks, not {type(tasks).__name__}")
    return tasks
