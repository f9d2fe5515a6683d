"""CACTUs's partitions: k-means of an embedding, run `partitions` times, each on the embedding with every
dimension scaled by its own random factor, so that the clusterings differ and tasks drawn from them do too
(Hsu et al. 2019). Computed once and cached by content: the embedding's values and the settings."""

from __future__ import annotations

import hashlib
import sys

import numpy as np
import torch

from metalearn_cli.data.cache import cached
from metalearn_cli.errors import MetalearnError


INSTALL = "pip install 'metalearn[unsupervised]'"


def require_scikit_learn() -> None:
    """CACTUs's k-means and PCA are scikit-learn's, an optional extra: say how to install it, before any work."""
    import importlib.util

    if importlib.util.find_spec("sklearn") is None:
        raise MetalearnError(
            "`sampler=cactus` clusters the images with scikit-learn, which is not installed here. Install it with the "
            f"`unsupervised` extra: {INSTALL} (from a source checkout: pip install -e '.[unsupervised]')."
        )


def content_key(tensor: torch.Tensor, *settings: object) -> str:
    digest = hashlib.sha256()
    tensor = tensor.detach().cpu().contiguous()
    digest.update(repr((tuple(tensor.shape), str(tensor.dtype), settings)).encode())
    digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def kmeans_partitions(embeddings: torch.Tensor, clusters: int, partitions: int, seed: int,
                      cache_dir: str | None = None) -> torch.Tensor:
    """[M, D] embeddings -> int64 [partitions, M]: the cluster (0..clusters-1) of every image in each partition.
    Partition 0 clusters the embedding as it is; partition p > 0 scales dimension d by u_pd ~ U(0, 1)."""
    import sklearn
    from sklearn.cluster import KMeans

    key = content_key(embeddings, clusters, partitions, seed, sklearn.__version__)

    def build() -> dict:
        print(f"CACTUs: k-means with {clusters} clusters, {partitions} partitions of {embeddings.shape[0]} images "
              "(computed once, then cached)", file=sys.stderr, flush=True)
        points = embeddings.double().numpy()
        rng = np.random.default_rng(seed)
        labels = np.empty((partitions, points.shape[0]), dtype=np.int64)
        for p in range(partitions):
            scale = np.ones(points.shape[1]) if p == 0 else rng.uniform(0.0, 1.0, points.shape[1])
            km = KMeans(n_clusters=clusters, n_init=1, random_state=int(rng.integers(2**31 - 1)))
            labels[p] = km.fit_predict(points * scale)
        return {"labels": torch.from_numpy(labels)}

    return cached(cache_dir, f"cactus-partitions-k{clusters}-p{partitions}", key, build, setting="sampler.cache_dir")["labels"]
