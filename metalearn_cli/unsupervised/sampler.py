"""What the unlabeled samplers share: meta-training tasks made from the training images alone, and the
ordinary labelled validation and test tasks that score the result (`EpisodicSampler.fixed_tasks`)."""

from __future__ import annotations

import torch

from metalearn_cli import options
from metalearn_cli.data.base import TaskSource
from metalearn_cli.errors import MetalearnError
from metalearn_cli.samplers import EpisodicSampler, generator_for, rank_share
from metalearn_cli.tasks import TaskBatch


class UnlabeledSampler(EpisodicSampler):
    """An `EpisodicSampler` whose meta-training tasks come from `source.unlabeled_images("train")`: the images,
    never their classes. Subclasses say how N pseudo-classes are made (`pseudo_tasks`).

    `train_queries` is the query examples per pseudo-class in meta-training tasks (`queries` stays the
    labelled validation and test tasks' own)."""

    #: the sampler's name in messages
    kind = "unlabeled"

    def __init__(self, source, shots, queries, meta_batch_size, ways=None, train_shots=None, train_ways=None,
                 train_queries: int = 1) -> None:
        super().__init__(source, shots, queries, meta_batch_size, ways, train_shots, train_ways)
        self.train_queries = options.integer("train_queries", train_queries, "query examples per pseudo-class in meta-training tasks")
        self._pool: torch.Tensor | None = None

    # -- the data ----------------------------------------------------------------------------
    def check_source(self, source: TaskSource) -> None:
        if not hasattr(source, "unlabeled_images"):
            raise MetalearnError(
                f"`sampler={self.kind}` builds meta-training tasks from unlabeled images, but `data` ({source.name}) "
                f"gives {source.objective.name} tasks, not images. Use an image data set (data=omniglot, folder, mnist, "
                "cifar_fs, miniimagenet), or sampler=episodic."
            )
        if self.ways is None:
            raise MetalearnError(f"`sampler.ways` = None: sampler={self.kind} makes N-way classification tasks. "
                                 "Allowed: an integer >= 2, e.g. sampler.ways=5.")
        if hasattr(source, "check_task_shape"):  # validation and test tasks are labelled, as always
            source.check_task_shape(self.ways, {"val": self.shots, "test": self.shots}, self.queries)
        images = source.unlabeled_images("train").shape[0]
        if images < self.train_ways:
            raise MetalearnError(
                f"`sampler.train_ways` = {self.train_ways}: a meta-training task of sampler={self.kind} needs that many "
                f"distinct images, but the training images of {source.name} are only {images}. Allowed: at most "
                f"{images}, or more unlabeled images."
            )

    def pool(self) -> torch.Tensor:
        """uint8 [M, C, H, W]: the unlabeled training images."""
        if self._pool is None:
            self._pool = self.source.unlabeled_images("train")
        return self._pool

    def pretrain_batch(self, seed, step, batch_size, rank=0, world_size=1):
        raise MetalearnError(
            f"`algo.pretrain_batch_size` = {batch_size} pre-trains on labelled training images, and sampler={self.kind} "
            "never reads the training labels. Allowed here: algo.pretrain_batch_size=null (algo=finetune then learns "
            "the pseudo-classes of the sampler's tasks)."
        )

    # -- meta-training tasks -------------------------------------------------------------------
    def pseudo_tasks(self, generator: torch.Generator, num_tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [T, N, K+Q] into the pool, classes [T, N] in 0..train_classes()-1) of `num_tasks` tasks: task t's
        pseudo-class n is made of images rows[t, n] (the first K for support)."""
        raise NotImplementedError

    def train_batch(self, seed: int, step: int, rank: int = 0, world_size: int = 1) -> TaskBatch:
        generator = generator_for(seed, "train", step)
        rows, classes = self.pseudo_tasks(generator, self.meta_batch_size)
        task_seeds = torch.randint(0, 2**62, (self.meta_batch_size,), generator=generator)
        batch_seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        if world_size > 1:  # only this rank's tasks are made; each is the same as in one process
            share = rank_share(self.meta_batch_size, rank, world_size, "sampler.meta_batch_size")
            rows, classes, task_seeds = rows[share], classes[share], task_seeds[share]
        batch = self.make_tasks(self.source.inputs(self.pool()[rows]), classes, task_seeds)
        batch.seed = batch_seed
        return batch

    def make_tasks(self, images: torch.Tensor, classes: torch.Tensor, task_seeds: torch.Tensor) -> TaskBatch:
        """images [T, N, K+Q, C, H, W] -> tasks laid out as labelled ones are (`ImageTasks.sample`)."""
        num_tasks, ways, shots = images.shape[0], images.shape[1], self.train_shots
        queries = images.shape[2] - shots
        labels = torch.arange(ways).view(1, ways, 1)
        return TaskBatch(
            images[:, :, :shots].flatten(1, 2), labels.expand(num_tasks, ways, shots).flatten(1),
            images[:, :, shots:].flatten(1, 2), labels.expand(num_tasks, ways, queries).flatten(1),
            classes=classes, task_seeds=task_seeds,
        )
