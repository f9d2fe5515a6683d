"""CACTUs (Hsu et al. 2019): cluster an embedding of the unlabeled training images `partitions` times with
k-means, and treat clusters as classes. An N-way meta-training task picks a partition, N of its clusters
that hold at least K + Q images, and K + Q images of each."""

from __future__ import annotations

from pathlib import Path

import torch

from metalearn_cli import options
from metalearn_cli.data.images import distinct_indices
from metalearn_cli.errors import MetalearnError
from metalearn_cli.unsupervised.augment import PRESETS, Augmentation
from metalearn_cli.unsupervised.embeddings import checkpoint_features, parse_embedding, pixels_pca
from metalearn_cli.unsupervised.partitions import kmeans_partitions, require_scikit_learn
from metalearn_cli.unsupervised.sampler import UnlabeledSampler


class CactusSampler(UnlabeledSampler):
    """sampler=cactus. A pseudo-class's index (`classes`) is partition * clusters + cluster."""

    kind = "cactus"

    def __init__(self, source, shots, queries, meta_batch_size, ways=None, train_shots=None, train_ways=None,
                 train_queries=None, embedding="pixels_pca", clusters: int = 500, partitions: int = 100,
                 embedding_dim: int = 64, partition_seed: int = 0, simclr_steps: int = 2000, simclr_batch_size: int = 256,
                 simclr_lr: float = 1e-3, simclr_temperature: float = 0.5, simclr_projection_dim: int = 64,
                 augment="auto", cache_dir: str | None = None) -> None:
        super().__init__(source, shots, queries, meta_batch_size, ways, train_shots, train_ways,
                         queries if train_queries is None else train_queries)
        require_scikit_learn()
        self.embedding, self.checkpoint = parse_embedding(embedding)
        self.clusters = options.integer("clusters", clusters, "k-means clusters per partition", minimum=2)
        self.partitions = options.integer("partitions", partitions, "k-means partitions of the embedding")
        self.embedding_dim = options.integer("embedding_dim", embedding_dim, "principal components of sampler.embedding=pixels_pca")
        self.partition_seed = options.integer("partition_seed", partition_seed, "the seed of the k-means partitions", minimum=0)
        self.simclr = {
            "steps": options.integer("simclr_steps", simclr_steps, "training steps of the SimCLR encoder"),
            "batch_size": options.integer("simclr_batch_size", simclr_batch_size, "images per SimCLR batch", minimum=2),
            "lr": options.number("simclr_lr", simclr_lr, "the SimCLR encoder's Adam step size", minimum=0.0),
            "temperature": options.number("simclr_temperature", simclr_temperature, "NT-Xent's temperature", minimum=0.0),
            "projection_dim": options.integer("simclr_projection_dim", simclr_projection_dim, "the SimCLR projection's size"),
        }
        if isinstance(augment, str):
            options.choice("augment", augment, PRESETS)
        self.augment = augment
        self.cache_dir = cache_dir
        self._index: dict[str, torch.Tensor] | None = None

    def check_source(self, source) -> None:
        super().check_source(source)
        images = source.unlabeled_images("train").shape[0]
        if self.clusters > images:
            raise MetalearnError(
                f"`sampler.clusters` = {self.clusters} is more than the {images} unlabeled training images of {source.name}: "
                f"k-means cannot make more clusters than points. Allowed: at most {images} (CACTUs uses 500 on Omniglot "
                "and miniImageNet)."
            )
        if self.checkpoint is not None and not Path(self.checkpoint).expanduser().is_file():
            raise MetalearnError(
                f"`sampler.embedding` = 'ckpt:{self.checkpoint}': no such checkpoint file. Pass a checkpoint written by "
                "`metalearn train`, e.g. sampler.embedding=ckpt:outputs/<date>/<time>/checkpoints/best.ckpt."
            )

    def train_classes(self) -> int:
        return self.partitions * self.clusters

    # -- the partitions --------------------------------------------------------------------------
    def embed(self) -> torch.Tensor:
        """[M, D]: the embedding of the unlabeled training images that k-means clusters."""
        images = self.source.inputs(self.pool())
        if self.embedding == "pixels_pca":
            return pixels_pca(images, self.embedding_dim, self.partition_seed)
        if self.embedding == "ckpt":
            return checkpoint_features(images, self.checkpoint)
        from metalearn_cli.unsupervised.simclr import simclr_embeddings

        augmentation = Augmentation(self.augment, images.shape[1], images.shape[-1])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return simclr_embeddings(images, augmentation, seed=self.partition_seed, cache_dir=self.cache_dir, device=device,
                                 **self.simclr)

    def prepare_training(self) -> None:
        if self._index is not None:
            return
        labels = kmeans_partitions(self.embed(), self.clusters, self.partitions, self.partition_seed, self.cache_dir)
        self._index = self.index(labels)

    def index(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """What sampling needs from [P, M] cluster labels: each partition's images grouped by cluster (`members`,
        cluster c at `offsets` .. + `sizes`), and the clusters big enough for a pseudo-class of K + Q images
        (`eligible`, the first `eligible_count` of each row) in partitions with at least N of them (`usable`)."""
        needed = self.train_shots + self.train_queries
        members = labels.argsort(dim=1, stable=True)
        sizes = torch.stack([torch.bincount(row, minlength=self.clusters) for row in labels])  # [P, k]
        offsets = sizes.cumsum(1) - sizes
        big = sizes >= needed
        eligible = torch.argsort((~big).to(torch.int8), dim=1, stable=True)  # the big clusters first, in order
        count = big.sum(1)
        usable = (count >= self.train_ways).nonzero().flatten()
        if usable.numel() == 0:
            raise MetalearnError(
                f"`sampler.clusters` = {self.clusters}: no partition has {self.train_ways} clusters (sampler.train_ways) of at "
                f"least {needed} images (sampler.train_shots + sampler.train_queries), the most is {int(count.max())}. "
                "Allowed: fewer clusters, or fewer shots and queries per meta-training class."
            )
        return {"members": members, "sizes": sizes, "offsets": offsets, "eligible": eligible, "count": count, "usable": usable}

    def pseudo_tasks(self, generator, num_tasks):
        if self._index is None:
            self.prepare_training()
        index = self._index
        usable = index["usable"]
        part = usable[torch.randint(0, usable.numel(), (num_tasks,), generator=generator)]  # [T]
        chosen = distinct_indices(generator, index["count"][part], self.train_ways)  # [T, N] among the big clusters
        cluster = index["eligible"][part[:, None], chosen]
        picks = distinct_indices(generator, index["sizes"][part[:, None], cluster], self.train_shots + self.train_queries)
        positions = index["offsets"][part[:, None], cluster][..., None] + picks  # [T, N, K+Q]
        rows = index["members"][part[:, None, None], positions]
        return rows, part[:, None] * self.clusters + cluster
