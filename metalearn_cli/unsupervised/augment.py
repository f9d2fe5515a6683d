"""Random augmentations of unlabeled images: UMTRA's query copies and SimCLR's views.

`sampler.augment` is a preset name or a list of torchvision transforms v2 (`{_target_: ...}` configs).
torchvision draws one set of random parameters per call, so the transforms are called once per image:
every image gets its own shift, rotation or crop. They run where the images are (the run's device), and
a seed fixes every draw, so a resumed run and a run split over ranks see the same augmented images.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchvision.transforms import v2

from metalearn_cli import options

#: sampler.augment's names; "auto" is "grey" for one-channel images and "rgb" for three
PRESETS = ("auto", "grey", "rgb", "none")


class PixelDropout(v2.Transform):
    """Sets each pixel (all its channels) to 0 with probability p: UMTRA's Omniglot augmentation, which drops
    about half of a character's stroke pixels (strokes are 1 on a background of 0)."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"PixelDropout needs 0 <= p < 1, got {p}")
        self.p = p

    def transform(self, inpt, params):
        if not isinstance(inpt, Tensor) or not inpt.is_floating_point():
            return inpt
        keep = torch.rand(inpt.shape[-2:], device=inpt.device) >= self.p
        return inpt * keep


def preset(name: str, channels: int, image_size: int) -> list:
    """The transforms of a preset. grey: UMTRA's Omniglot recipe (shifts of up to 6 of 28 pixels, here with
    small rotations) and pixel dropout; rgb: the usual contrastive recipe (crops, flips, colour jitter)."""
    if name == "auto":
        name = "grey" if channels == 1 else "rgb"
    if name == "none":
        return []
    if name == "grey":
        return [v2.RandomAffine(degrees=10.0, translate=(6 / 28, 6 / 28)), PixelDropout(0.5)]
    return [
        v2.RandomResizedCrop(image_size, scale=(0.35, 1.0), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]


class Augmentation:
    """`spec` (a preset name or a list of transform configs) for images of `channels` x `image_size`^2."""

    def __init__(self, spec, channels: int, image_size: int, key: str = "augment") -> None:
        self.spec = spec
        if isinstance(spec, str):
            transforms = preset(options.choice(key, spec, PRESETS), channels, image_size)
        elif isinstance(spec, (list, tuple)):
            transforms = [self._instantiate(key, item) for item in spec]
        else:
            raise options.invalid(key, spec, f"one of {', '.join(PRESETS)}, or a list of torchvision transforms "
                                  "(e.g. [{_target_: torchvision.transforms.v2.RandomAffine, degrees: 10}])")
        self.transforms = transforms
        self.compose = v2.Compose(transforms) if transforms else None

    @staticmethod
    def _instantiate(key: str, item):
        if callable(item):
            return item
        if isinstance(item, dict) and "_target_" in item:
            from hydra.utils import instantiate

            try:
                transform = instantiate(item, _convert_="all")
            except Exception as error:
                cause = error.__cause__ or error
                raise options.invalid(key, item, f"a transform torchvision can build ({' '.join(str(cause).split())})") from None
            if callable(transform):
                return transform
        raise options.invalid(key, item, "a transform config with a `_target_`, e.g. "
                              "{_target_: torchvision.transforms.v2.RandomAffine, degrees: 10}")

    @property
    def is_identity(self) -> bool:
        return self.compose is None

    def __call__(self, images: Tensor, seed: int) -> Tensor:
        """[B, C, H, W] float images -> their augmented copies, on the same device; the same seed gives the
        same copies."""
        if self.compose is None or images.shape[0] == 0:
            return images
        devices = [images.device] if images.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return torch.stack([self.compose(image) for image in images])
