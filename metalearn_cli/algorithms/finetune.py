"""Fine-tuning baselines: ordinary training on pooled data, adaptation at test.

Regression: the "pretrained" baseline of the MAML paper. Meta-training ignores the task structure:
every support and query example of the meta-batch is one training example and the loss is
minimised directly. At validation and test the whole model is adapted to each task exactly as MAML
is (SGD with eval_inner_lr for eval_inner_steps steps).

Classification: Baseline and Baseline++ of Chen et al. 2019 ("A Closer Look at Few-shot
Classification"). Meta-training is supervised classification over all training classes with a
linear head (`head=linear`, Baseline) or a cosine-similarity head (`head=cosine`, Baseline++), on
batches of `pretrain_batch_size` training images drawn epoch after epoch, each labelled with its
global class, as Chen et al. train (`pretrain_batch_size=null`: the images of the sampled tasks,
labelled the same way). At test a new head with one output per way is trained on the task's
support set, on the frozen backbone's features (`finetune_backbone=false`, the paper's protocol) or
together with the whole network (`finetune_backbone=true`), by full-batch SGD with momentum and
weight decay.

Reinforcement learning: the "pretrained" baseline of the MAML paper (its reference code's `maml0`,
MAML-TRPO with an inner step of 0). One policy is trained on every training task at once, without
adaptation: each meta-iteration improves the mean over the meta-batch's tasks of their query loss at
theta itself (for episodes, the surrogate of the episodes theta collects, whose gradient is the policy
gradient), by Adam or, with `outer_optimizer=trpo` (the paper's), by the trust-region step MAML takes
(`metalearn_cli.algorithms.trpo`, with the parameters' Jacobian the identity). At validation and test
the policy is adapted with the same policy-gradient steps as MAML's (eval_inner_steps, eval_inner_lr).
The same path serves any kind of task without labelled examples to pool: it uses only the task's
losses of given parameters.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from metalearn_cli import options
from metalearn_cli.algorithms.base import Algorithm, Evaluation, MetaStep, one_task
from metalearn_cli.algorithms.inner_optim import InnerSGD
from metalearn_cli.algorithms.trpo import OUTER_OPTIMIZERS, TrustRegion
from metalearn_cli.batched import expand
from metalearn_cli.errors import MetalearnError
from metalearn_cli.functional import FunctionalModel, TaskModel
from metalearn_cli.models import CosineClassifier, cosine_logits
from metalearn_cli.tasks import Params, TaskBatch, Tasks

HEADS = ("linear", "cosine")


def cosine_scale(classes: int) -> float:
    """Chen et al.'s temperature: 2 for up to 200 classes, 10 above."""
    return 2.0 if classes <= 200 else 10.0


class Finetune(Algorithm):
    name = "finetune"

    def __init__(
        self,
        *args,
        head: str = "linear",
        finetune_backbone: bool = False,
        eval_momentum: float = 0.9,
        eval_weight_decay: float = 0.001,
        pretrain_batch_size: int | None = None,
        outer_optimizer: str = "adam",
        max_kl: float = 0.01,
        trpo_damping: float = 1e-5,
        trpo_cg_iters: int = 10,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.head = options.choice("head", head, HEADS)
        #: how episodes train the policy: Adam on the policy gradient, or TRPO (the paper's pretrained baseline)
        self.outer_optimizer = options.choice("outer_optimizer", outer_optimizer, OUTER_OPTIMIZERS)
        self.trust_region = TrustRegion(max_kl, trpo_damping, trpo_cg_iters)
        #: images per pre-training batch (classification); None: the images of the sampled tasks
        self.pretrain_batch_size = options.integer("pretrain_batch_size", pretrain_batch_size,
                                                   "images per pre-training batch, or null", optional=True)
        self.finetune_backbone = bool(finetune_backbone)
        self.eval_momentum = float(eval_momentum)
        self.eval_weight_decay = float(eval_weight_decay)
        self.classifier: nn.Module | None = None

    def extra_modules(self, model: nn.Module, source, sampler) -> dict[str, nn.Module]:
        """The head over all training classes used in pre-training (classification only). Settings that do not
        fit the data are refused here, at build, before any training."""
        pools = source.objective.name in ("classification", "regression")  # labelled examples to pool
        if pools and self.outer_optimizer == "trpo":
            raise MetalearnError(
                f"`algo.outer_optimizer=trpo` trains a policy on episodes (the MAML paper's pretrained baseline on "
                f"reinforcement-learning data), but `data={source.name}` gives {source.objective.name} tasks, whose "
                "labelled examples algo=finetune pools and trains on with Adam. Allowed here: algo.outer_optimizer=adam."
            )
        if source.objective.name != "classification":
            if self.pretrain_batch_size is not None:
                raise MetalearnError(
                    f"`algo.pretrain_batch_size` = {self.pretrain_batch_size} sets batches of labelled images for "
                    f"pre-training a classifier, but {source.name} is a {source.objective.name} data set. "
                    "Allowed here: null (train on the pooled examples of sampled tasks)."
                )
            return {}
        features = model.head.in_features
        # the training labels: the data's classes, or the pseudo-classes of an unlabeled sampler's tasks
        classes = source.num_classes("train") if sampler is None else sampler.train_classes()
        if self.head == "cosine":
            self.classifier = CosineClassifier(features, classes, cosine_scale(classes))
        else:
            self.classifier = nn.Linear(features, classes)
        return {"classifier": self.classifier}

    @property
    def head_fixes_ways(self) -> bool:
        """Classification trains a new head per task (any number of classes); regression adapts the model."""
        return self.classifier is None

    def configure_optimizers(self, parameters: Iterable[nn.Parameter], max_steps: int) -> dict:
        if self.outer_optimizer == "trpo":
            return self.trust_region.configure_optimizers(parameters)
        return {"optimizer": torch.optim.Adam(parameters, lr=self.outer_lr)}

    # -- pre-training ----------------------------------------------------------------------
    def _pretraining(self) -> bool:
        """Training batches are single images with global labels (see train_batch)."""
        return self.pretrain_batch_size is not None and self.classifier is not None

    def train_batch(self, sampler, seed: int, step: int, rank: int = 0, world_size: int = 1) -> TaskBatch:
        """What meta-iteration `step` trains on: Chen et al.'s batches of images over epochs of the training
        classes, or (pretrain_batch_size=null, and regression) the sampler's meta-batch of tasks."""
        if self._pretraining():
            return sampler.pretrain_batch(seed, step, self.pretrain_batch_size, rank, world_size)
        return sampler.train_batch(seed, step, rank, world_size)

    def record_statistics(self, fmodel: FunctionalModel, tasks: Tasks) -> None:
        """Batch-norm running statistics (model.bn=frozen, per_step) of pre-training batches: the backbone's
        forward pass only, since their global labels are not outputs of the model's own N-way head."""
        if not self._pretraining() or not fmodel.stat_layers:
            return super().record_statistics(fmodel, tasks)
        theta = {k: v.detach() for k, v in fmodel.params().items()}
        with fmodel.recording(), torch.no_grad():
            fmodel(theta, supervised(tasks, self.name).support_x.flatten(0, 1), 0, features_only=True)
        for layer in fmodel.stat_layers:  # no inner loop in pre-training: every step uses step 0's
            layer.running_mean[1:] = layer.running_mean[0]
            layer.running_var[1:] = layer.running_var[0]

    def meta_step(self, fmodel: FunctionalModel, tasks: Tasks, iteration: int = 0) -> MetaStep:
        if not isinstance(tasks, TaskBatch):
            return self.unadapted_meta_step(fmodel, tasks)
        objective = tasks.objective
        inputs = torch.cat([tasks.support_x.flatten(0, 1), tasks.query_x.flatten(0, 1)])
        if self.classifier is None:  # regression: the model itself on pooled points
            targets = torch.cat([tasks.support_y.flatten(0, 1), tasks.query_y.flatten(0, 1)])
            prediction = fmodel(fmodel.params(), inputs)
        else:  # classification: global class labels (a pre-training batch's classes are 0..C-1), the head over them
            targets = torch.cat(
                [tasks.classes.gather(1, tasks.support_y).flatten(), tasks.classes.gather(1, tasks.query_y).flatten()]
            )
            prediction = self.classifier(fmodel.module(inputs, features_only=True))
        loss = objective.loss(prediction, targets)
        metric = objective.metric(prediction, targets).detach()
        # a mean over pooled examples, not tasks: a rank's part of a pre-training batch weighs its images
        return MetaStep(loss=loss, metrics={"loss": loss.detach(), objective.metric_name: metric}, weight=len(inputs))

    def unadapted_meta_step(self, fmodel: FunctionalModel, tasks: Tasks) -> MetaStep:
        """Tasks without labelled examples to pool (episodes): theta itself on every task's query loss, no
        inner loop (reinforcement learning: the policy gradient of the mean return over the tasks)."""

        def unadapted(model: TaskModel, theta: Params, part: Tasks, differentiable: bool = True) -> Params:
            return expand(theta, part.num_tasks)

        if self.outer_optimizer == "trpo":
            return self.trust_region.meta_step(self.execution, fmodel, tasks, unadapted, 0)
        theta = fmodel.params()
        losses, metrics = self.execution.run(lambda model, part: part.query_scores(model, unadapted(model, theta, part), 0), fmodel, tasks)
        loss = losses.mean()
        return MetaStep(loss=loss, metrics={"loss": loss.detach(), tasks.objective.metric_name: metrics.detach().mean()})

    # -- test: a new head per task ---------------------------------------------------------
    def eval_protocol(self) -> dict:
        """Baseline and Baseline++ differ only here: the head trained on each task's support set. Where the model
        itself is adapted (regression, episodes) the base protocol is the whole of it (plain SGD steps)."""
        if self.classifier is None:
            return super().eval_protocol()
        return {**super().eval_protocol(), "head": self.head, "finetune_backbone": self.finetune_backbone,
                "eval_momentum": self.eval_momentum, "eval_weight_decay": self.eval_weight_decay}

    def evaluation(self, fmodel: FunctionalModel, tasks: Tasks, steps: int | None = None) -> Evaluation:
        if self.classifier is None:
            return super().evaluation(fmodel, tasks, steps)
        tasks = supervised(tasks, self.name)
        steps = self.eval_inner_steps if steps is None else steps
        theta = {k: v.detach() for k, v in fmodel.params().items()}
        objective = tasks.objective

        def scores(model: TaskModel, part: TaskBatch, weight0: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
            out: list[Tensor] = []
            last: list[Tensor] = []

            def score(step: int, predictions: Tensor) -> None:
                out.append(objective.task_metric(predictions, part.query_y))
                last[:] = [predictions]

            self.fit_head(model, part, theta, weight0, steps, after_step=score)
            return torch.stack(out, dim=1), objective.task_report(last[0], part.query_y)

        scores, report = self.execution.run(scores, fmodel, tasks, self.head_init(fmodel, tasks))
        return Evaluation(scores.detach(), {name: value.detach() for name, value in report.items()})

    def head_init(self, fmodel: FunctionalModel, tasks: TaskBatch) -> Tensor:
        """[T, ways, F]: where each task's new head starts. A linear head starts at zero (it takes only the
        shape); a cosine head at small random weights drawn from the batch's seed."""
        ways = int(tasks.support_y.max()) + 1
        generator = torch.Generator().manual_seed(tasks.seed)
        return torch.randn(tasks.num_tasks, ways, fmodel.module.head.in_features, generator=generator).to(tasks.support_x) * 0.01

    def fit_head(self, model: TaskModel, part: TaskBatch, theta: Params, weight0: Tensor, steps: int,
                 after_step: Callable[[int, Tensor], None] | None = None) -> dict:
        """Evaluation's adaptation of `part`: a new head (with `finetune_backbone`, and the backbone) trained on
        the support set by `steps` steps of SGD with momentum and weight decay, from `weight0` ([T, ways, F],
        `head_init`). Returns {"head": {"weight", "bias" (linear)}} and, with finetune_backbone, "backbone":
        the adapted parameters, each [T, ...]. after_step(k, logits) sees the query logits [T, Q, ways] before
        the first step (k = 0) and after each step k."""
        scale = cosine_scale(weight0.shape[1])
        optimizer = InnerSGD(self.eval_inner_lr, self.eval_momentum, self.eval_weight_decay)
        objective = part.objective

        def logits(head: dict, feats: Tensor) -> Tensor:  # feats [T, n, F] -> [T, n, ways]
            if self.head == "cosine":
                return cosine_logits(feats, head["weight"], scale)
            return feats @ head["weight"].transpose(-1, -2) + head["bias"].unsqueeze(1)

        if self.head == "cosine":  # scale * cos(feature, weight): no bias
            head = {"weight": weight0}
        else:
            head = {"weight": torch.zeros_like(weight0), "bias": torch.zeros_like(weight0[..., 0])}
        if self.finetune_backbone:  # adapt backbone and head together
            params = {"head": head, "backbone": expand(theta, part.num_tasks)}

            def forward(p: dict, which: str) -> Tensor:
                return logits(p["head"], part.features(model, p["backbone"], which))
        else:  # the paper's protocol: features of the frozen backbone, computed once
            with torch.no_grad():
                feats = {which: part.features(model, expand(theta, part.num_tasks), which) for which in ("support", "query")}
            params = {"head": head}

            def forward(p: dict, which: str) -> Tensor:
                return logits(p["head"], feats[which])

        def query(step: int, p: dict) -> None:  # the [T, Q, ways] logits, without a graph
            if after_step is not None:
                with torch.no_grad():
                    after_step(step, forward(p, "query"))

        state = optimizer.init(params)
        query(0, params)
        for step in range(steps):
            leaves = tree_map(lambda t: t.detach().requires_grad_(True), params)
            with torch.enable_grad():
                losses = objective.task_loss(forward(leaves, "support"), part.support_y)
                flat, spec = tree_flatten(leaves)
                # the model's own head is not used by the features: its gradient is zero
                grads = tree_unflatten(list(torch.autograd.grad(losses.sum(), flat, allow_unused=True, materialize_grads=True)), spec)
            with torch.no_grad():
                params, state = optimizer.step(tree_map(Tensor.detach, leaves), grads, state)
                if "backbone" in params:  # a pruned backbone keeps its zeros (weight decay and momentum move them)
                    params["backbone"] = model.fmodel.masked(params["backbone"])
            query(step + 1, params)
        return params

    def adapted_network(self, fmodel: FunctionalModel, task: Tasks, bn_batch: str = "support") -> nn.Module:
        """Classification: the backbone (adapted too with `finetune_backbone`) with the head `fit_head` trains on
        the support set, batch norm fixed from the `bn_batch` images; otherwise the adapted model itself."""
        if self.classifier is None:
            return super().adapted_network(fmodel, task, bn_batch)
        from metalearn_cli.compression.adapted import EmbeddingClassifier, fixed_network, statistics_images

        task = supervised(one_task(task), self.name)
        theta = {k: v.detach() for k, v in fmodel.params().items()}
        fitted = self.execution.run(lambda model, part, weight0: self.fit_head(model, part, theta, weight0, self.eval_inner_steps),
                                    fmodel, task, self.head_init(fmodel, task))
        backbone = {k: v[0] for k, v in fitted["backbone"].items()} if self.finetune_backbone else theta
        weight = fitted["head"]["weight"][0]
        ways, features = weight.shape
        head = CosineClassifier(features, ways, cosine_scale(ways)) if self.head == "cosine" else nn.Linear(features, ways)
        with torch.no_grad():
            head.weight.copy_(weight)
            if self.head != "cosine":
                head.bias.copy_(fitted["head"]["bias"][0])
        return EmbeddingClassifier(fixed_network(fmodel, backbone, statistics_images(task, bn_batch), 0), head.requires_grad_(False))


def supervised(tasks: Tasks, algorithm: str) -> TaskBatch:
    """Pre-training and a new classifier head need labelled examples."""
    if not isinstance(tasks, TaskBatch):
        raise TypeError(f"algo={algorithm} trains on labelled examples; {type(tasks).__name__} tasks have none")
    return tasks
