"""Any folder of images, one sub-folder per class: `root/<class>/<image>`, as a task distribution.

Every non-hidden sub-folder of `root` is a class; its image files (png, jpg, jpeg, bmp, gif,
webp, any case; hidden files ignored) are its examples. Images are decoded once, converted to
`channels` (1: grey, 3: RGB), resized to `image_size` x `image_size` (Lanczos; the aspect ratio is
not kept, as in the usual miniImageNet preprocessing) and cached as uint8 tensors; the cache key
is a fingerprint of every image file used, the size and the channels, so an edited tree is decoded
again.

Splits:
* `splits` given: an explicit split, {"train": [...], "val": [...], "test": [...]} of class-folder
  names. Each class may be listed in one split only; classes listed nowhere are not used.
* `splits` null: the classes, sorted by name, are shuffled with `random.Random(split_seed)` and cut
  by `fractions` (train, val, test; default 0.64 / 0.16 / 0.20, the 64/16/20 of miniImageNet).

The helpers below (listing a tree, decoding classes, resizing uint8 arrays) are shared by the
MNIST, CIFAR-FS and miniImageNet sources.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metalearn_cli.data.base import SPLITS
from metalearn_cli.data.cache import cached, decode_image, fingerprint
from metalearn_cli.data.images import ImageClasses, ImageTasks
from metalearn_cli.errors import MetalearnError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
DEFAULT_FRACTIONS = (0.64, 0.16, 0.20)


# -- helpers shared by the image sources -------------------------------------------------------
def is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def class_folders(root: Path) -> list[Path]:
    """The non-hidden sub-folders of `root`, sorted by name."""
    return sorted((p for p in root.iterdir() if p.is_dir() and not is_hidden(p)), key=lambda p: p.name)


def image_files(folder: Path) -> list[Path]:
    """The non-hidden image files directly in `folder`, sorted by name (suffix case ignored)."""
    return sorted(
        (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not is_hidden(p) and p.is_file()),
        key=lambda p: p.name,
    )


def check_image_size(image_size: object, key: str = "data.image_size") -> int:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise MetalearnError(
            f"invalid value for `{key}`: {image_size!r}. Allowed: an integer >= 1 (images are resized to that "
            f"many pixels square). Set it on the command line, e.g. `{key}=84`."
        )
    return image_size


def decode_classes(files: dict[str, list[Path]], image_size: int, channels: int, root_key: str = "data.root") -> dict:
    """{class: [files]} -> {"names", "counts", "pixels" uint8 [N, C, H, W]}, classes in the given order.

    An image that cannot be decoded fails with a MetalearnError naming the file.
    """
    pixels: list[np.ndarray] = []
    for name, paths in files.items():
        for path in paths:
            try:
                pixels.append(decode_image(path, image_size, channels))
            except Exception as error:  # PIL raises UnidentifiedImageError, OSError, ValueError, ...
                raise MetalearnError(
                    f"the image file {str(path)!r} (class {name!r} under `{root_key}`) cannot be read ({error}). "
                    "Delete or replace the damaged file, or move it out of the data folder."
                ) from None
    return {
        "names": list(files),
        "counts": torch.tensor([len(p) for p in files.values()], dtype=torch.long),
        "pixels": torch.from_numpy(np.stack(pixels)) if pixels else torch.zeros(0, channels, image_size, image_size, dtype=torch.uint8),
    }


def split_decoded(decoded: dict) -> dict[str, torch.Tensor]:
    """The {"names", "counts", "pixels"} of `decode_classes` -> {class: uint8 [n, C, H, W]}."""
    chunks = torch.split(decoded["pixels"], [int(c) for c in decoded["counts"]])
    return dict(zip(decoded["names"], chunks))


def resize_uint8(pixels: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 [N, C, H, W] -> uint8 [N, C, image_size, image_size], Lanczos as `decode_image` (no-op if sized)."""
    n, c, h, w = pixels.shape
    if (h, w) == (image_size, image_size):
        return pixels
    out = np.empty((n, c, image_size, image_size), dtype=np.uint8)
    array = pixels.permute(0, 2, 3, 1).numpy()
    for i in range(n):
        image = Image.fromarray(array[i, :, :, 0] if c == 1 else array[i])
        resized = np.asarray(image.resize((image_size, image_size), Image.LANCZOS), dtype=np.uint8)
        out[i] = resized[None] if c == 1 else resized.transpose(2, 0, 1)
    return torch.from_numpy(out)


def fraction_split(classes: Sequence[str], fractions: Sequence[float], seed: int) -> dict[str, list[str]]:
    """Sort, shuffle with `random.Random(seed)`, cut at the rounded cumulative fractions."""
    shuffled = sorted(classes)
    random.Random(seed).shuffle(shuffled)
    n = len(shuffled)
    first = math.floor(fractions[0] * n + 0.5)
    second = math.floor((fractions[0] + fractions[1]) * n + 0.5)
    return {"train": shuffled[:first], "val": shuffled[first:second], "test": shuffled[second:]}


# -- the source -------------------------------------------------------------------------------
class ImageFolder(ImageTasks):
    def __init__(
        self,
        root: str,
        image_size: int = 84,
        channels: int = 3,
        splits: dict[str, list[str]] | None = None,
        fractions: Sequence[float] = DEFAULT_FRACTIONS,
        split_seed: int = 0,
        cache_dir: str | None = None,
        train_on: str = "train",
    ) -> None:
        image_size = check_image_size(image_size)
        if channels not in (1, 3) or isinstance(channels, bool):
            raise MetalearnError(
                f"invalid value for `data.channels`: {channels!r}. Allowed: 1 (grey) or 3 (RGB). "
                "Set it on the command line, e.g. `data.channels=3`."
            )
        self.root = Path(str(root)).expanduser()
        available = self._classes()
        groups = self._explicit(splits, available) if splits is not None else self._by_fractions(available, fractions, split_seed)
        used = [name for split in SPLITS for name in groups[split]]
        files = {name: self._files(name) for name in used}
        key = fingerprint([p for paths in files.values() for p in paths], image_size, channels, used)
        data = cached(cache_dir, f"folder-{image_size}px-{channels}c", key, lambda: decode_classes(files, image_size, channels))
        by_name = split_decoded(data)
        built = {s: ImageClasses.from_lists([by_name[c] for c in groups[s]], groups[s]) for s in SPLITS}
        super().__init__(built, name="folder", invert=False, train_on=train_on)

    # -- classes and splits ----------------------------------------------------------------------
    def _classes(self) -> list[str]:
        if not self.root.is_dir():
            raise MetalearnError(
                f"the image folder `data.root` = {str(self.root)!r} does not exist"
                f"{' (it is a file)' if self.root.exists() else ''}. "
                "Point data.root at a folder laid out as <data.root>/<class>/<image>, e.g. `data.root=~/data/birds`."
            )
        names = [p.name for p in class_folders(self.root)]
        if not names:
            raise MetalearnError(
                f"the image folder `data.root` = {str(self.root)!r} has no class folders. Expected one sub-folder "
                "per class, each holding that class's images: <data.root>/<class>/<image>.png|jpg|..."
            )
        return names

    def _files(self, name: str) -> list[Path]:
        files = image_files(self.root / name)
        if not files:
            raise MetalearnError(
                f"the class folder {name!r} under `data.root` = {str(self.root)!r} holds no readable images "
                f"(looked for {', '.join(IMAGE_SUFFIXES)}, any case, not hidden). Add images to it, delete it, "
                "or leave it out of `data.splits`."
            )
        return files

    def _explicit(self, splits: object, available: list[str]) -> dict[str, list[str]]:
        if not isinstance(splits, Mapping) or sorted(splits) != sorted(SPLITS):
            keys = sorted(splits) if isinstance(splits, Mapping) else splits
            raise MetalearnError(
                f"invalid value for `data.splits`: {keys!r}. Allowed: null (split by `data.fractions`) or a mapping "
                "with exactly the keys train, val and test, each a list of class-folder names, e.g. "
                "`data.splits={train:[a,b,c],val:[d],test:[e]}`."
            )
        known = set(available)
        seen: dict[str, str] = {}
        groups: dict[str, list[str]] = {}
        for split in SPLITS:
            names = splits[split]
            if isinstance(names, str) or not isinstance(names, Sequence) or not names:
                raise MetalearnError(
                    f"invalid value for `data.splits.{split}`: {names!r}. Allowed: a non-empty list of class-folder "
                    f"names under `data.root` = {str(self.root)!r}."
                )
            groups[split] = []
            for name in (str(n) for n in names):
                if name not in known:
                    raise MetalearnError(
                        f"`data.splits.{split}` lists the class {name!r}, but `data.root` = {str(self.root)!r} has no "
                        f"folder of that name. Classes there: {', '.join(available[:20])}"
                        f"{', ...' if len(available) > 20 else ''}."
                    )
                if name in seen:
                    raise MetalearnError(
                        f"`data.splits` lists the class {name!r} in both {seen[name]} and {split}. Each class may be "
                        "in one split only (the test classes must be unseen in meta-training)."
                    )
                seen[name] = split
                groups[split].append(name)
        return groups

    def _by_fractions(self, available: list[str], fractions: object, seed: int) -> dict[str, list[str]]:
        values = list(fractions) if isinstance(fractions, Sequence) and not isinstance(fractions, str) else None
        if (
            values is None
            or len(values) != 3
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in values)
            or abs(sum(values) - 1.0) > 1e-6
        ):
            raise MetalearnError(
                f"invalid value for `data.fractions`: {fractions!r}. Allowed: three numbers >= 0 that sum to 1 "
                "(the shares of train, val and test classes), e.g. `data.fractions=[0.64,0.16,0.2]`."
            )
        groups = fraction_split(available, values, int(seed))
        empty = [s for s in SPLITS if not groups[s]]
        if empty:
            counts = ", ".join(f"{s} {len(groups[s])}" for s in SPLITS)
            raise MetalearnError(
                f"`data.fractions` = {values} leaves the {' and '.join(empty)} split empty: the {len(available)} class "
                f"folders of `data.root` = {str(self.root)!r} are cut into {counts}. Every split needs at least one "
                "class: add class folders, change data.fractions, or give an explicit `data.splits`."
            )
        return groups
