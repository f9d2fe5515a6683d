"""CACTUs' `simclr` embedding: a SimCLR encoder (Chen et al. 2020) trained on the unlabeled pool itself.

metalearn's Conv4 learns, by contrast between two augmented views of each image (NT-Xent), features under
which an image's views are close and other images far; CACTUs then clusters the features of the un-augmented
images. The training is a Lightning run of its own (`simclr_training.py`), kept under the cache folder by a
key of the images' bytes and every setting that changes the result, so a later run with the same pool and
settings loads the embeddings instead of training again.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from metalearn_cli import options
from metalearn_cli.data.cache import default_cache_dir
from metalearn_cli.errors import MetalearnError
from metalearn_cli.models import Conv4, MetaBatchNorm2d
from metalearn_cli.unsupervised.augment import Augmentation

#: version of the training and embedding rules below; part of the cache key, so a change retrains
SIMCLR_RULES = 1
#: features computed per forward pass when embedding, counted in pixels (the first block's activations dominate)
EMBED_PIXELS = 2**21


def check_settings(steps: int, batch_size: int, lr: float, temperature: float, projection_dim: int) -> None:
    """The settings' checks, keys relative to the sampler: its constructor may call this to fail before any
    data is read; `simclr_embeddings` checks again and names the full keys (`sampler.simclr_steps`)."""
    options.integer("simclr_steps", steps, "optimizer steps of the SimCLR encoder")
    options.integer("simclr_batch_size", batch_size, "images per SimCLR batch, each seen in two augmented views", minimum=2)
    options.number("simclr_lr", lr, "Adam's learning rate for the SimCLR encoder")
    options.number("simclr_temperature", temperature, "the NT-Xent loss's temperature")
    options.integer("simclr_projection_dim", projection_dim, "output size of the SimCLR projection head")


def encoder_settings(image_shape: tuple[int, ...]) -> dict:
    """Conv4's arguments for images of `image_shape` ([C, H, W]): the model config's defaults, and MAML's
    miniImageNet downsampling for images of 64 pixels or more. Batch norm is `frozen` so that, in eval
    mode, an image's features do not depend on the other images of its batch (see `set_pool_statistics`)."""
    large = min(image_shape[-2:]) >= 64
    return dict(input_shape=tuple(int(s) for s in image_shape), out_features=1, channels=64, blocks=4,
                downsample="maxpool" if large else "stride", pool="mean", bn="frozen", init="pytorch")


def build_networks(image_shape: tuple[int, ...], projection_dim: int) -> tuple[Conv4, nn.Sequential]:
    """The encoder (its head is unused: the embedding is `features_only`) and SimCLR's projection head."""
    encoder = Conv4(**encoder_settings(image_shape))
    width = encoder.head.in_features
    projection = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, projection_dim))
    return encoder, projection


def nt_xent(z1: Tensor, z2: Tensor, temperature: float) -> Tensor:
    """NT-Xent over 2B views ([B, P] each): for every view, cross-entropy of picking the other view of its
    image among the 2B-1 other views, by cosine similarity / temperature; the mean over the 2B views."""
    z = nn.functional.normalize(torch.cat([z1, z2]), dim=1)
    similarity = z @ z.T / temperature
    similarity.fill_diagonal_(float("-inf"))
    count = z1.shape[0]
    positives = torch.cat([torch.arange(count, 2 * count), torch.arange(count)]).to(z.device)
    return nn.functional.cross_entropy(similarity, positives)


def cache_key(images: Tensor, augment: Augmentation, settings: dict) -> str:
    """sha256 of the images' bytes, shape and dtype, the augmentation and every setting of the run."""
    digest = hashlib.sha256()
    digest.update(repr((tuple(images.shape), str(images.dtype))).encode())
    for chunk in images.detach().reshape(images.shape[0], -1).split(4096):
        digest.update(chunk.cpu().contiguous().numpy().tobytes())
    # the spec names the user's choice; the transforms' repr also changes when a preset's recipe does
    digest.update(repr((augment.spec, augment.transforms)).encode())
    digest.update(repr(sorted(settings.items())).encode())
    return digest.hexdigest()[:16]


def embed(encoder: Conv4, images: Tensor, device: torch.device) -> Tensor:
    """Every image's features, the encoder in eval mode, L2-normalised; float32 [M, D] on the CPU."""
    encoder.eval()
    chunk = max(1, EMBED_PIXELS // (images.shape[-1] * images.shape[-2]))
    with torch.no_grad():
        features = [encoder(part.to(device, torch.float32), features_only=True).cpu() for part in images.split(chunk)]
    return nn.functional.normalize(torch.cat(features).float(), dim=1)


def set_pool_statistics(encoder: Conv4, images: Tensor, device: torch.device) -> None:
    """Set each batch norm's running statistics to the exact mean and (biased) variance of its inputs over
    the un-augmented pool, layer after layer. Running statistics recorded in training would be those of the
    augmented views (pixel dropout halves an Omniglot image's ink), not of the images that are embedded;
    with these, the eval-mode features are those of a train-mode pass with the whole pool as its batch."""
    encoder.eval()
    layers = list(encoder.features)
    chunk = max(1, EMBED_PIXELS // (images.shape[-1] * images.shape[-2]))
    with torch.no_grad():
        for index, layer in enumerate(layers):
            if not isinstance(layer, MetaBatchNorm2d):
                continue
            below = nn.Sequential(*layers[:index])
            total = sum_squares = 0.0
            count = 0
            for part in images.split(chunk):
                h = below(part.to(device, torch.float32)).double()
                total = total + h.sum(dim=(0, 2, 3))
                sum_squares = sum_squares + h.pow(2).sum(dim=(0, 2, 3))
                count += h.shape[0] * h.shape[2] * h.shape[3]
            mean = total / count
            variance = (sum_squares / count - mean.pow(2)).clamp_min(0.0)
            layer.running_mean[0].copy_(mean)
            layer.running_var[0].copy_(variance)


def _cache_folder(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir else default_cache_dir()


def _unwritable(folder: Path, error: OSError) -> MetalearnError:
    return MetalearnError(
        f"the cache folder `sampler.cache_dir` = {str(folder)!r}, where the SimCLR encoder for CACTUs is kept, cannot "
        f"be written ({error.strerror or error}). Set `sampler.cache_dir` (or the METALEARN_CACHE_DIR environment "
        "variable) to a writable folder."
    )


def _load(path: Path, count: int) -> Tensor | None:
    if not path.exists():
        return None
    try:
        embeddings = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a damaged cache file is rebuilt, never trusted
        return None
    if not isinstance(embeddings, Tensor) or embeddings.ndim != 2 or embeddings.shape[0] != count:
        return None
    return embeddings


def _save_atomic(data, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        torch.save(data, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def simclr_embeddings(images: Tensor, augment: Augmentation, *, steps: int, batch_size: int, lr: float,
                      temperature: float, projection_dim: int, seed: int, cache_dir: str | None,
                      device: str = "cpu", progress: bool = True) -> Tensor:
    """images: float [M, C, H, W], the model inputs of the unlabeled pool (already in [0, 1], as tasks see them).
    Returns float32 [M, D] on the CPU: the trained encoder's features of every image (no augmentation,
    the encoder in eval mode with the pool's batch-norm statistics), L2-normalised.

    Loaded from `<cache>/simclr-<key>/embeddings.pt` when a run with the same images and settings made it;
    otherwise trained (`steps` Adam steps of NT-Xent on `batch_size` random images in two views each) in
    that run folder, which then holds metrics.csv (the loss of each step), encoder.pt and embeddings.pt."""
    try:
        check_settings(steps, batch_size, lr, temperature, projection_dim)
    except options.OptionError as error:
        raise error.under("sampler") from None
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"simclr_embeddings needs a non-negative integer seed, got {seed!r}")
    if images.ndim != 4 or not images.is_floating_point():
        raise ValueError(f"simclr_embeddings needs float images [M, C, H, W], got {images.dtype} {tuple(images.shape)}")
    count = images.shape[0]
    batch_size = min(batch_size, count)
    if batch_size < 2:
        raise MetalearnError(
            f"the SimCLR encoder for CACTUs needs at least 2 unlabeled images per batch (`sampler.simclr_batch_size`), "
            f"but the training pool holds {count} image{'s' if count != 1 else ''}. Use a pool of at least 2 images."
        )
    settings = dict(rules=SIMCLR_RULES, steps=steps, batch_size=batch_size, lr=float(lr), temperature=float(temperature),
                    projection_dim=projection_dim, seed=seed, encoder=encoder_settings(tuple(images.shape[1:])))
    cache = _cache_folder(cache_dir)
    run_folder = cache / f"simclr-{cache_key(images, augment, settings)}"
    target = run_folder / "embeddings.pt"
    embeddings = _load(target, count)
    if embeddings is not None:
        return embeddings

    try:
        run_folder.mkdir(parents=True, exist_ok=True)
        # the run writes into a folder of its own and moves finished files in, so that an interrupted run or
        # another process training the same encoder never leaves a half-written file in the run folder
        scratch = Path(tempfile.mkdtemp(prefix=f".{run_folder.name}-", dir=cache))
    except OSError as error:
        raise _unwritable(cache, error) from None
    print(f"training the SimCLR encoder for CACTUs: {steps} steps on {count} images, cached in {run_folder}",
          file=sys.stderr, flush=True)
    try:
        from metalearn_cli.unsupervised.simclr_training import train_encoder

        target_device = torch.device(device)
        encoder, projection = train_encoder(images, augment, settings, scratch, target_device, progress)
        set_pool_statistics(encoder, images, target_device)
        embeddings = embed(encoder, images, target_device)
        try:
            _save_atomic({"encoder": encoder.cpu().state_dict(), "projection": projection.cpu().state_dict(),
                          "settings": settings}, run_folder / "encoder.pt")
            for name in ("metrics.csv", "hparams.yaml"):
                if (scratch / name).exists():
                    os.replace(scratch / name, run_folder / name)
            _save_atomic(embeddings, target)  # last: its presence marks a finished run
        except OSError as error:
            raise _unwritable(cache, error) from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return embeddings
