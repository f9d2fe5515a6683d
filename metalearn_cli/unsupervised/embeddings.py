"""The embeddings CACTUs clusters (`sampler.embedding`): a cheap baseline on pixels, a contrastive encoder
trained here on the same unlabeled images, or the features of a user's own metalearn checkpoint."""

from __future__ import annotations


import numpy as np
import torch

from metalearn_cli import options
from metalearn_cli.errors import MetalearnError

#: sampler.embedding's names; any other value must be `ckpt:<path>` (or the quoted "ckpt=<path>")
EMBEDDINGS = ("pixels_pca", "simclr")
CKPT_PREFIXES = ("ckpt:", "ckpt=")


def parse_embedding(value) -> tuple[str, str | None]:
    """`sampler.embedding` -> (kind, checkpoint path or None)."""
    if isinstance(value, str):
        if value in EMBEDDINGS:
            return value, None
        for prefix in CKPT_PREFIXES:
            if value.startswith(prefix) and value[len(prefix):].strip():
                return "ckpt", value[len(prefix):].strip()
    raise options.invalid("embedding", value, "pixels_pca, simclr, or ckpt:<path> (the features of a metalearn "
                          "checkpoint's network, e.g. ckpt:outputs/<date>/<time>/checkpoints/best.ckpt)")


def pixels_pca(images: torch.Tensor, dim: int, seed: int) -> torch.Tensor:
    """float [M, C, H, W] -> [M, dim]: the first `dim` principal components of the flattened pixels."""
    from sklearn.decomposition import PCA

    flat = images.flatten(1).numpy().astype(np.float32)
    dim = min(dim, flat.shape[0], flat.shape[1])
    return torch.from_numpy(PCA(dim, random_state=seed).fit_transform(flat).astype(np.float32))


def checkpoint_features(images: torch.Tensor, path: str, batch_size: int = 500) -> torch.Tensor:
    """float [M, C, H, W] -> [M, F]: the features (the network without its head) of the model saved in a
    metalearn checkpoint, in evaluation mode. A network built for other images is refused."""
    from hydra.utils import instantiate

    from metalearn_cli.run_folder import CHECKPOINT_KEY, read_checkpoint

    key = "sampler.embedding"
    checkpoint = read_checkpoint(path, key)
    config = checkpoint[CHECKPOINT_KEY]["config"]
    shape = tuple(images.shape[1:])
    weights = {k[len("model."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    try:
        model = instantiate(config["model"], input_shape=shape, out_features=int(config["sampler"]["ways"] or 1))
        model.load_state_dict(weights)
    except Exception as error:
        detail = " ".join(str(error).split())[:240]
        raise MetalearnError(
            f"`{key}` = 'ckpt:{path}': the checkpoint's network does not fit these images of shape {shape} ({detail}). "
            "Use a checkpoint trained on images of the same size and channels (data.image_size, data.channels), "
            "or sampler.embedding=pixels_pca / simclr."
        ) from None
    if not hasattr(model, "forward") or "features_only" not in model.forward.__code__.co_varnames:
        raise MetalearnError(f"`{key}` = 'ckpt:{path}': the checkpoint's model has no features to embed with. "
                             "Use a model=conv4 or model=mlp checkpoint.")
    model.eval()
    with torch.no_grad():
        return torch.cat([model(part, features_only=True).flatten(1) for part in images.split(batch_size)]).float()
