"""UMTRA (Khodadadeh et al. 2019): an N-way meta-training task is N random unlabeled images, each a class of
its own. The support set is the images themselves; the queries are augmented copies with the same labels.

The copies are made when the batch reaches the run's device (`AugmentedTasks.to`), by
`sampler.augment`'s transforms, each task's with its own seed, so a resumed run and every DDP rank see the
copies one process would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metalearn_cli import options
from metalearn_cli.data.images import distinct_indices
from metalearn_cli.tasks import TaskBatch
from metalearn_cli.unsupervised.augment import PRESETS, Augmentation
from metalearn_cli.unsupervised.sampler import UnlabeledSampler


@dataclass
class AugmentedTasks(TaskBatch):
    """UMTRA tasks before augmentation: every query, and every support example but a pseudo-class's first, is
    still its original image. `to(device)` moves them and gives the augmented `TaskBatch`."""

    augmentation: Augmentation | None = None
    shots: int = 1

    def _with(self, tensors, classes, task_seeds) -> "AugmentedTasks":
        return AugmentedTasks(*tensors, seed=self.seed, classes=classes, task_seeds=task_seeds, objective=self.objective,
                              augmentation=self.augmentation, shots=self.shots)

    def to(self, device) -> TaskBatch:
        support_x, support_y, query_x, query_y = (t.to(device, non_blocking=True) for t in self.tensors())
        classes = None if self.classes is None else self.classes.to(device, non_blocking=True)
        if not self.augmentation.is_identity:
            ways = self.classes.shape[1]
            shape = support_x.shape[2:]
            support_x = support_x.reshape(self.num_tasks, ways, self.shots, *shape).clone()
            query_x = query_x.clone()
            for t, seed in enumerate(self.task_seeds.tolist()):
                copies = torch.cat([support_x[t, :, 1:].flatten(0, 1), query_x[t]])
                copies = self.augmentation(copies, seed)
                extra = ways * (self.shots - 1)
                support_x[t, :, 1:] = copies[:extra].reshape(ways, self.shots - 1, *shape)
                query_x[t] = copies[extra:]
            support_x = support_x.flatten(1, 2)
        return TaskBatch(support_x, support_y, query_x, query_y, seed=self.seed, classes=classes,
                         task_seeds=self.task_seeds, objective=self.objective)


class UMTRASampler(UnlabeledSampler):
    """sampler=umtra. Meta-training tasks: `train_ways` distinct training images, each its own class; `train_shots`
    support examples per class (the image, then augmented copies when more than 1), `train_queries` augmented
    copies as its queries. A pseudo-class's index (`classes`) is the image's position among the training images."""

    kind = "umtra"

    def __init__(self, source, shots, queries, meta_batch_size, ways=None, train_shots=None, train_ways=None,
                 train_queries: int = 1, augment="auto") -> None:
        # UMTRA's support set is the images themselves: 1-shot unless asked (a data config's null means that too)
        super().__init__(source, shots, queries, meta_batch_size, ways, train_shots or 1, train_ways, train_queries)
        if isinstance(augment, str):
            options.choice("augment", augment, PRESETS)
        self.augment = augment
        self.augmentation: Augmentation | None = None

    def check_source(self, source) -> None:
        super().check_source(source)
        channels, size = source.input_shape[0], source.input_shape[-1]
        self.augmentation = Augmentation(self.augment, channels, size)

    def train_classes(self) -> int:
        return self.source.unlabeled_images("train").shape[0]

    def pseudo_tasks(self, generator, num_tasks):
        images = self.pool().shape[0]
        chosen = distinct_indices(generator, torch.full((num_tasks,), images), self.train_ways)  # [T, N]
        copies = self.train_shots + self.train_queries
        return chosen[..., None].expand(-1, -1, copies), chosen

    def make_tasks(self, images, classes, task_seeds) -> AugmentedTasks:
        plain = super().make_tasks(images, classes, task_seeds)
        if self.augmentation is None:
            self.augmentation = Augmentation(self.augment, images.shape[-3], images.shape[-1])
        return AugmentedTasks(*plain.tensors(), classes=classes, task_seeds=task_seeds, objective=plain.objective,
                              augmentation=self.augmentation, shots=self.train_shots)
