"""MNIST digits (LeCun et al. 1998) as few-shot tasks, split by digit.

Reads the files where torchvision keeps them, `<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte`,
with torchvision's reader (`torchvision.datasets.MNIST(root, train=..., download=False)`, which
checks that the files exist, not their md5). `download=True` fetches the official archives with
torchvision's downloader, which checks their md5 and extracts them. Digits are white on black, as
the model expects (no inversion); at `image_size` other than 28 they are resized (Lanczos). The
images grouped by digit are cached as uint8 tensors.

Splits (`classes`): by default digits 0-4 train, 5-9 validation and 5-9 test. Validation draws its
images from MNIST's training file and test from MNIST's test file, so validation and test tasks
share classes but never an image; meta-training uses the training file. A digit may not be both a
training digit and a validation or test digit (training and validation would then share images,
and the test classes would not be new).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from metalearn_cli.data.base import SPLITS
from metalearn_cli.data.cache import cached, fingerprint
from metalearn_cli.data.folder import check_image_size, resize_uint8, split_decoded
from metalearn_cli.data.images import ImageClasses, ImageTasks
from metalearn_cli.errors import MetalearnError

#: the files torchvision reads, per MNIST part, under <root>/MNIST/raw/
RAW_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
#: torchvision's old cache of both parts (read instead of the raw files when present)
LEGACY_FILES = ("training.pt", "test.pt")
#: which MNIST file the images of each split come from
PART_OF_SPLIT = {"train": "train", "val": "train", "test": "test"}
DEFAULT_CLASSES = {"train": (0, 1, 2, 3, 4), "val": (5, 6, 7, 8, 9), "test": (5, 6, 7, 8, 9)}
DIGITS = 10


def check_classes(classes: object) -> dict[str, list[int]]:
    """`data.classes` -> {split: [digits]}, or a MetalearnError naming the key."""
    example = "`data.classes={train:[0,1,2,3,4],val:[5,6,7,8,9],test:[5,6,7,8,9]}`"
    if not isinstance(classes, Mapping) or sorted(classes) != sorted(SPLITS):
        keys = sorted(classes) if isinstance(classes, Mapping) else classes
        raise MetalearnError(
            f"invalid value for `data.classes`: {keys!r}. Allowed: a mapping with exactly the keys train, val and "
            f"test, each a list of digits 0-9, e.g. {example}."
        )
    groups: dict[str, list[int]] = {}
    for split in SPLITS:
        digits = classes[split]
        valid = (
            isinstance(digits, Sequence)
            and not isinstance(digits, str)
            and len(digits) > 0
            and all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < DIGITS for d in digits)
            and len(set(digits)) == len(digits)
        )
        if not valid:
            raise MetalearnError(
                f"invalid value for `data.classes.{split}`: {digits!r}. Allowed: a non-empty list of distinct digits "
                f"0-9, e.g. {example}."
            )
        groups[split] = [int(d) for d in digits]
    for split in ("val", "test"):
        shared = sorted(set(groups["train"]) & set(groups[split]))
        if shared:
            raise MetalearnError(
                f"`data.classes` has the digits {shared} in both train and {split}. Meta-training digits must be "
                f"unseen at validation and test; take them out of data.classes.train or data.classes.{split}."
            )
    return groups


class MNIST(ImageTasks):
    def __init__(
        self,
        root: str,
        download: bool = False,
        image_size: int = 28,
        classes: Mapping[str, Sequence[int]] | None = None,
        cache_dir: str | None = None,
        train_on: str = "train",
    ) -> None:
        image_size = check_image_size(image_size)
        groups = check_classes(DEFAULT_CLASSES if classes is None else classes)
        self.root = Path(str(root)).expanduser()
        if download:
            self._download()
        key = fingerprint(self._sources(), image_size)
        data = cached(cache_dir, f"mnist-{image_size}px", key, lambda: self._decode(image_size))
        parts = {part: split_decoded(data[part]) for part in RAW_FILES}
        splits = {}
        for split, digits in groups.items():
            by_digit = parts[PART_OF_SPLIT[split]]
            names = [str(d) for d in digits]
            splits[split] = ImageClasses.from_lists([by_digit[n] for n in names], names)
        super().__init__(splits, name="mnist", invert=False, train_on=train_on)

    # -- files -------------------------------------------------------------------------------
    @property
    def raw_folder(self) -> Path:
        return self.root / "MNIST" / "raw"

    def _download(self) -> None:
        from torchvision.datasets import MNIST as TorchvisionMNIST

        for train in (True, False):
            try:
                TorchvisionMNIST(str(self.root), train=train, download=True)
            except Exception as error:
                raise MetalearnError(
                    f"downloading MNIST into `data.root` = {str(self.root)!r} failed ({error}). Check the connection, "
                    f"or put the four files {', '.join(f for files in RAW_FILES.values() for f in files)} "
                    f"(gunzipped) into {str(self.raw_folder)!r} and run with data.download=false."
                ) from None

    def _sources(self) -> list[Path]:
        legacy = [self.root / "MNIST" / "processed" / name for name in LEGACY_FILES]
        if all(p.is_file() for p in legacy):
            return legacy
        expected = [self.raw_folder / name for files in RAW_FILES.values() for name in files]
        missing = [p for p in expected if not p.is_file()]
        if not missing:
            return expected
        hint = ""
        if all(p.with_name(p.name + ".gz").is_file() for p in missing):
            hint = (
                " The .gz archives are there but not extracted: run once with data.download=true (torchvision checks "
                "their md5 and extracts them, no internet needed) or gunzip them."
            )
        elif all((self.root / p.name).is_file() for p in missing) or all((self.root / "raw" / p.name).is_file() for p in missing):
            hint = f" The files seem to be in or under {str(self.root)!r} itself: move them into <data.root>/MNIST/raw/."
        raise MetalearnError(
            f"MNIST not found under `data.root` = {str(self.root)!r}: torchvision expects "
            f"<data.root>/MNIST/raw/{{{','.join(p.name for p in expected)}}}, and "
            f"{'none of them is there' if len(missing) == len(expected) else ', '.join(p.name for p in missing) + ' missing'}.{hint} "
            "Pass data.download=true to fetch MNIST (needs internet), or point data.root at the folder that holds MNIST/."
        )

    def _decode(self, image_size: int) -> dict:
        """Both MNIST files, each as {"names": "0".."9", "counts", "pixels" [N, 1, S, S]} grouped by digit."""
        from torchvision.datasets import MNIST as TorchvisionMNIST

        data = {}
        for part in RAW_FILES:
            try:
                dataset = TorchvisionMNIST(str(self.root), train=part == "train", download=False)
                pixels, labels = dataset.data, dataset.targets.long()
            except Exception as error:
                raise MetalearnError(
                    f"the MNIST {part} files under `data.root` = {str(self.root)!r} cannot be read "
                    f"({type(error).__name__}: {error}). Files: {', '.join(str(self.raw_folder / f) for f in RAW_FILES[part])}. "
                    "Replace them with the official files (delete them and pass data.download=true)."
                ) from None
            if pixels.ndim != 3 or labels.shape != pixels.shape[:1] or labels.min() < 0 or labels.max() >= DIGITS:
                raise MetalearnError(
                    f"the MNIST {part} files under `data.root` = {str(self.root)!r} do not hold 28x28 digit images "
                    f"with labels 0-9 (images {tuple(pixels.shape)}, labels {tuple(labels.shape)}). "
                    "Replace them with the official files (delete them and pass data.download=true)."
                )
            counts = torch.bincount(labels, minlength=DIGITS)
            if bool((counts == 0).any()):
                absent = [d for d in range(DIGITS) if counts[d] == 0]
                raise MetalearnError(
                    f"the MNIST {part} files under `data.root` = {str(self.root)!r} have no images of the digits "
                    f"{absent}. Replace them with the official files (delete them and pass data.download=true)."
                )
            order = torch.argsort(labels, stable=True)
            data[part] = {
                "names": [str(d) for d in range(DIGITS)],
                "counts": counts,
                "pixels": resize_uint8(pixels[order].unsqueeze(1).contiguous(), image_size),
            }
        return data
