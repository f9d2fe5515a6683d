"""N-way K-shot image classification over classes held in memory as uint8 tensors.

Every image data source (Omniglot, folders, MNIST, CIFAR-FS, miniImageNet) decodes its files
once into `ImageClasses` (cached on disk by `metalearn_cli.data.cache`) and hands them to
`ImageTasks`, which draws tasks with index arithmetic only: choosing classes and examples is
a few `argsort`s on random numbers, so sampling costs microseconds per meta-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from metalearn_cli import options
from metalearn_cli.data.base import SPLITS, TaskSource
from metalearn_cli.errors import MetalearnError
from metalearn_cli.tasks import CLASSIFICATION, TaskBatch


#: data.train_on: the classes meta-training draws from
TRAIN_ON_CHOICES = ("train", "trainval")


@dataclass
class ImageClasses:
    """The images of one split, grouped by class.

    pixels: uint8 [N, C, H, W]; class c owns rows offsets[c] : offsets[c] + counts[c].
    rotations: if > 1, class c is image class c // rotations turned by 90 * (c % rotations) degrees.
    """

    pixels: torch.Tensor
    counts: torch.Tensor
    names: list[str]
    rotations: int = 1

    def __post_init__(self) -> None:
        self.counts = torch.as_tensor(self.counts, dtype=torch.long)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts

    def rotated(self) -> torch.Tensor:
        """[4, N, C, H, W]: every image turned by 0, 90, 180 and 270 degrees (made once, on first use)."""
        if getattr(self, "_rotated", None) is None:
            self._rotated = torch.stack([torch.rot90(self.pixels, k, dims=(-2, -1)) for k in range(4)])
        return self._rotated

    @property
    def num_classes(self) -> int:
        return len(self.names) * self.rotations

    @property
    def class_names(self) -> list[str]:
        if self.rotations == 1:
            return list(self.names)
        return [f"{n}/rot{90 * r:03d}" for n in self.names for r in range(self.rotations)]

    def joined(self, other: "ImageClasses") -> "ImageClasses":
        """The classes of both, self's first (same rotations)."""
        if other.rotations != self.rotations:
            raise ValueError("cannot join splits with different rotations")
        return ImageClasses(torch.cat([self.pixels, other.pixels]), torch.cat([self.counts, other.counts]),
                            self.names + other.names, self.rotations)

    @staticmethod
    def from_lists(pixels_per_class: list[torch.Tensor], names: list[str], rotations: int = 1) -> "ImageClasses":
        counts = [p.shape[0] for p in pixels_per_class]
        return ImageClasses(torch.cat(pixels_per_class), torch.tensor(counts), list(names), rotations)

    def with_channels(self, channels: int) -> "ImageClasses":
        """The same images in `channels` (1: grey, 3: RGB), converted as Pillow's convert("L") / ("RGB")
        converts a file, so a converted source gives what decoding its files in that mode would."""
        have = self.pixels.shape[1]
        if have == channels:
            return self
        if (have, channels) == (1, 3):
            pixels = self.pixels.expand(-1, 3, -1, -1).contiguous()
        elif (have, channels) == (3, 1):
            rgb = self.pixels.to(torch.int32)  # ITU-R 601-2 luma in Pillow's fixed point
            pixels = ((rgb[:, 0] * 19595 + rgb[:, 1] * 38470 + rgb[:, 2] * 7471 + 0x8000) >> 16).to(torch.uint8)[:, None]
        else:
            raise ValueError(f"cannot convert {have}-channel images to {channels} channels")
        return ImageClasses(pixels, self.counts, list(self.names), self.rotations)


class ImageTasks(TaskSource):
    """Few-shot classification tasks drawn from per-split `ImageClasses`.

    Pixels become floats in [0, 1] (`invert`: 1 - x, so Omniglot strokes are 1 as in MAML's code).
    Class labels 0..N-1 are assigned in the random order the classes were drawn, so they are
    shuffled per task.

    `train_on="trainval"` meta-trains on the training and validation classes together, as the final
    models of Vinyals et al. 2016 and Prototypical Networks are trained once the schedule has been
    chosen on a train/val run. Validation tasks are then drawn from classes seen in training: they
    monitor the run but do not measure generalisation, so `metalearn train` scores the last
    checkpoint, not the best-validation one.
    """

    objective = CLASSIFICATION

    def __init__(self, splits: dict[str, ImageClasses], name: str, invert: bool = False, augment_rotations: bool = False,
                 train_on: str = "train") -> None:
        missing = [s for s in SPLITS if s not in splits]
        if missing:
            raise ValueError(f"missing splits {missing}")
        if train_on not in TRAIN_ON_CHOICES:  # named in full: folder data sets are built outside build.py too
            raise MetalearnError(str(options.invalid("data.train_on", train_on, ", ".join(TRAIN_ON_CHOICES))))
        if train_on == "trainval":
            shared = sorted(set(splits["val"].names) & set(splits["test"].names))
            if shared:
                raise MetalearnError(
                    f"invalid value for `data.train_on`: 'trainval'. The val and test splits of {name} share classes "
                    f"({', '.join(shared[:5])}{', ...' if len(shared) > 5 else ''}), so training on val would train on test "
                    "classes. Allowed here: train, or give val classes of its own."
                )
            splits = {**splits, "train": splits["train"].joined(splits["val"])}
        self.splits = splits
        self.train_on = train_on
        self.name = name
        self.invert = invert
        #: rotate every drawn class by a random multiple of 90 degrees (MAML's Omniglot augmentation)
        self.augment_rotations = augment_rotations
        c, h, w = splits["train"].pixels.shape[1:]
        self.input_shape = (int(c), int(h), int(w))

    def output_dim(self, ways: int | None) -> int:
        return int(ways)

    def num_classes(self, split: str) -> int:
        return self.splits[split].num_classes

    def check_task_shape(self, ways: int | dict[str, int], shots_per_split: dict[str, int], queries: int) -> None:
        """Fail early, naming the key, if a split cannot supply tasks of this shape (`ways`: one number,
        or one per split, where meta-training tasks have `sampler.train_ways` classes)."""
        for split, shots in shots_per_split.items():
            classes = self.splits[split]
            n = ways[split] if isinstance(ways, dict) else ways
            if n > classes.num_classes:
                key = "sampler.train_ways" if isinstance(ways, dict) and split == "train" and n != ways.get("val") else "sampler.ways"
                raise MetalearnError(
                    f"`{key}` = {n} is more than the {classes.num_classes} classes of the {split} split "
                    f"of {self.name}. Allowed: at most {classes.num_classes}."
                )
            fewest = int(classes.counts.min())
            if shots + queries > fewest:
                raise MetalearnError(
                    f"`sampler.shots` + `sampler.queries` = {shots} + {queries} images per class, but the {split} split "
                    f"of {self.name} has classes with only {fewest} images. Allowed: shots + queries <= {fewest}."
                )

    def sample(self, split, generator, num_tasks, ways, shots, queries) -> TaskBatch:
        classes = self.splits[split]
        # which classes, in random order (the order is the label assignment)
        chosen = distinct_indices(generator, torch.full((num_tasks,), classes.num_classes), ways)  # [T, N]
        source = chosen // classes.rotations
        turns = chosen % classes.rotations
        if self.augment_rotations:
            turns = torch.randint(0, 4, (num_tasks, ways), generator=generator)
        # which images of each class, without replacement
        picks = distinct_indices(generator, classes.counts[source], shots + queries)  # [T, N, K+Q]
        rows = classes.offsets[source][..., None] + picks
        if classes.rotations > 1 or self.augment_rotations:
            images = classes.rotated()[turns[..., None].expand_as(rows), rows]
        else:
            images = classes.pixels[rows]  # [T, N, K+Q, C, H, W]
        x = self.inputs(images)
        labels = torch.arange(ways).view(1, ways, 1)
        support_x = x[:, :, :shots].flatten(1, 2)
        query_x = x[:, :, shots:].flatten(1, 2)
        support_y = labels.expand(num_tasks, ways, shots).flatten(1)
        query_y = labels.expand(num_tasks, ways, queries).flatten(1)
        return TaskBatch(support_x, support_y, query_x, query_y, classes=chosen, objective=CLASSIFICATION)

    # -- supervised pre-training (Baseline of Chen et al.): single images, global labels ------------
    def num_images(self, split: str) -> int:
        """Images of `split`, each rotation of an image counted once (a rotation is a class of its own)."""
        classes = self.splits[split]
        return int(classes.counts.sum()) * classes.rotations

    def labelled_images(self, split: str, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Images `index` (into 0..num_images-1: rotation index // images, image index % images) as
        floats, as `sample` gives them, and their class in 0..num_classes-1."""
        classes = self.splits[split]
        n = int(classes.counts.sum())
        turns, rows = index // n, index % n
        image_class = torch.searchsorted(classes.offsets, rows, right=True) - 1  # the class owning each row
        labels = image_class * classes.rotations + turns
        if self.augment_rotations:  # as in `sample`: a random turn, the label unchanged
            turns = torch.randint(0, 4, rows.shape, generator=generator)
        if classes.rotations > 1 or self.augment_rotations:
            images = classes.rotated()[turns, rows]
        else:
            images = classes.pixels[rows]
        return self.inputs(images), labels

    # -- unlabeled meta-training (UMTRA, CACTUs): the images alone ---------------------------------
    def unlabeled_images(self, split: str) -> torch.Tensor:
        """uint8 [M, C, H, W]: every image of `split` once, in storage order, and nothing about its class: the
        class grouping (counts, names) is never read, so the result does not depend on the labels."""
        return self.splits[split].pixels

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> the model's inputs, as every task of this source is made: floats in [0, 1],
        1 - x where the source inverts (Omniglot's strokes)."""
        x = images.float().div_(255.0)
        return 1.0 - x if self.invert else x

    def pixels_of(self, inputs: torch.Tensor) -> torch.Tensor:
        """The uint8 images behind inputs made by `inputs` (its exact inverse: k / 255 keeps k to well
        under half a level in float32), so tasks can be written out as image files and read back."""
        x = 1.0 - inputs if self.invert else inputs
        return x.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)

    def convert_channels(self, channels: int) -> None:
        """Give every split's images `channels` (grey <-> RGB): how a checkpoint trained on images of
        another kind is scored on this source (cross-domain evaluation)."""
        self.splits = {split: classes.with_channels(channels) for split, classes in self.splits.items()}
        self.input_shape = (int(channels), *self.input_shape[1:])


def distinct_indices(generator: torch.Generator, counts: torch.Tensor, k: int) -> torch.Tensor:
    """For every entry n of `counts`, k distinct integers uniform in [0, n), in uniformly random order.

    Rejection sampling (redraw the rows that hold a repeat) where k is small next to n, random-key
    sorting where it is not; both exact, and both fast: no sort over all classes of a large data set.
    """
    shape = counts.shape
    counts = counts.reshape(-1)
    out = torch.empty(counts.numel(), k, dtype=torch.long)
    dense = counts < 4 * k
    if bool(dense.any()):
        n = int(counts[dense].max())
        keys = torch.rand(int(dense.sum()), n, generator=generator)
        keys = keys.masked_fill(torch.arange(n) >= counts[dense, None], 2.0)
        out[dense] = keys.argsort(1)[:, :k]
    sparse = (~dense).nonzero().flatten()
    while sparse.numel():
        draw = (torch.rand(sparse.numel(), k, generator=generator) * counts[sparse, None]).long()
        out[sparse] = draw
        ordered = draw.sort(1).values
        sparse = sparse[(ordered[:, 1:] == ordered[:, :-1]).any(1)]
    return out.reshape(*shape, k)
