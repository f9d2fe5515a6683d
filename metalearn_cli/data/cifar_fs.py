"""CIFAR-FS (Bertinetto et al. 2019): the 100 classes of CIFAR-100 split 64 / 16 / 20 for few-shot learning.

Reads the python version of CIFAR-100 where torchvision keeps it, `<root>/cifar-100-python/{train,test,meta}`
(the pickles of https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz). The training and test files are
pooled, so every class has 600 images of 3x32x32. The pickles are read here, in the format torchvision
reads them (`data` uint8 [N, 3072], `fine_labels`, and `fine_label_names` in `meta`), because
`torchvision.datasets.CIFAR100(root, download=False)` refuses any file whose md5 is not the official one;
files are accepted by their structure instead, so re-encoded copies work. `download=True` fetches and
extracts the official archive with torchvision's downloader (`CIFAR100(root, train=True, download=True)`),
which checks its md5. The pickles are trusted input: only load files you got from a source you trust.
Images are kept at 32x32 (or resized with Lanczos to `image_size`) and cached as uint8 tensors.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from metalearn_cli.data.cache import cached, fingerprint
from metalearn_cli.data.folder import check_image_size, resize_uint8, split_decoded
from metalearn_cli.data.images import ImageClasses, ImageTasks
from metalearn_cli.errors import MetalearnError

BASE_FOLDER = "cifar-100-python"
ARCHIVE = "cifar-100-python.tar.gz"
PARTS = ("train", "test")
META = "meta"

# The standard CIFAR-FS split by CIFAR-100 fine-label name (Bertinetto, Henriques, Torr, Vedaldi 2019,
# "Meta-learning with differentiable closed-form solvers", split files of github.com/bertinetto/r2d2).
# Read from torchmeta: repository tristandeleu/pytorch-meta, files
# torchmeta/datasets/assets/cifar100/cifar-fs/{train,val,test}.json (commit ac3c48e5889645a2d05dd9a13b35aa2d986c0bec),
# and checked against the identical lists of the `mcp` package (mcp/data/dataset/cifar.py: CLASSES_TRAIN,
# CLASSES_VALID, CLASSES_TEST). Order as in torchmeta's files (by CIFAR-100 superclass).
TRAIN_CLASSES = (
    "dolphin", "seal", "aquarium_fish", "ray", "trout", "orchid", "sunflower", "tulip", "bottle", "bowl",
    "can", "cup", "plate", "apple", "mushroom", "orange", "pear", "clock", "keyboard", "chair", "couch", "bee",
    "caterpillar", "cockroach", "bear", "lion", "tiger", "wolf", "bridge", "castle", "house", "road",
    "skyscraper", "cloud", "forest", "mountain", "elephant", "kangaroo", "porcupine", "possum", "raccoon",
    "skunk", "lobster", "spider", "boy", "girl", "dinosaur", "lizard", "snake", "turtle", "hamster", "mouse",
    "rabbit", "shrew", "squirrel", "oak_tree", "palm_tree", "pine_tree", "willow_tree", "bus", "train",
    "lawn_mower", "streetcar", "tank",
)
VAL_CLASSES = (
    "beaver", "otter", "flatfish", "shark", "lamp", "television", "beetle", "butterfly", "sea", "camel",
    "cattle", "crab", "crocodile", "maple_tree", "motorcycle", "tractor",
)
TEST_CLASSES = (
    "whale", "poppy", "rose", "sweet_pepper", "telephone", "bed", "table", "wardrobe", "leopard", "plain",
    "chimpanzee", "fox", "snail", "worm", "baby", "man", "woman", "bicycle", "pickup_truck", "rocket",
)
SPLIT_CLASSES = {"train": TRAIN_CLASSES, "val": VAL_CLASSES, "test": TEST_CLASSES}
ALL_CLASSES = frozenset(TRAIN_CLASSES + VAL_CLASSES + TEST_CLASSES)
IMAGE_SHAPE = (3, 32, 32)


def read_pickle(path: Path) -> dict:
    """A CIFAR pickle (written by Python 2) as a dict with str keys."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}


class CIFARFS(ImageTasks):
    def __init__(
        self,
        root: str,
        download: bool = False,
        image_size: int = 32,
        cache_dir: str | None = None,
        train_on: str = "train",
    ) -> None:
        image_size = check_image_size(image_size)
        self.root = Path(str(root)).expanduser()
        if download:
            self._download()
        files = self._sources()
        key = fingerprint(files, image_size)
        data = cached(cache_dir, f"cifar100-{image_size}px", key, lambda: self._decode(image_size))
        by_name = split_decoded(data)
        splits = {s: ImageClasses.from_lists([by_name[c] for c in names], list(names)) for s, names in SPLIT_CLASSES.items()}
        super().__init__(splits, name="cifar-fs", invert=False, train_on=train_on)

    # -- files -------------------------------------------------------------------------------
    @property
    def folder(self) -> Path:
        return self.root / BASE_FOLDER

    def _download(self) -> None:
        from torchvision.datasets import CIFAR100

        try:
            # one archive holds both parts and the meta file: one call fetches (md5 checked) and extracts all
            CIFAR100(str(self.root), train=True, download=True)
        except Exception as error:
            raise MetalearnError(
                f"downloading CIFAR-100 into `data.root` = {str(self.root)!r} failed ({error}). Check the connection, "
                f"or download https://www.cs.toronto.edu/~kriz/{ARCHIVE}, extract it into <data.root> (giving "
                f"<data.root>/{BASE_FOLDER}/train, test and meta) and run with data.download=false."
            ) from None

    def _sources(self) -> list[Path]:
        expected = [self.folder / name for name in (*PARTS, META)]
        missing = [p.name for p in expected if not p.is_file()]
        if not missing:
            return expected
        hint = ""
        if (self.root / ARCHIVE).is_file():
            hint = (
                f" {ARCHIVE} is there but not extracted: run once with data.download=true (torchvision checks its md5 "
                "and extracts it, no internet needed) or extract it yourself."
            )
        elif all((self.root / name).is_file() for name in missing):
            hint = f" The files seem to be in {str(self.root)!r} itself: point data.root at its parent folder."
        raise MetalearnError(
            f"CIFAR-100 not found under `data.root` = {str(self.root)!r}: expected <data.root>/{BASE_FOLDER}/"
            f"{{train,test,meta}} (the python version of CIFAR-100, as torchvision extracts it), and "
            f"{'none of them is there' if len(missing) == len(expected) else ', '.join(missing) + ' missing'}.{hint} Pass data.download=true to "
            "fetch it (needs internet), or point data.root at the folder that holds cifar-100-python/."
        )

    def _fail(self, path: Path, problem: str) -> MetalearnError:
        return MetalearnError(
            f"{str(path)!r} (under `data.root` = {str(self.root)!r}) does not look like a CIFAR-100 python pickle: "
            f"{problem}. Replace the files with the official ones (delete {BASE_FOLDER}/ and pass data.download=true)."
        )

    def _decode(self, image_size: int) -> dict:
        """All 100 classes, train and test files pooled: {"names", "counts", "pixels" [N, 3, S, S]}."""
        meta_path = self.folder / META
        try:
            names = list(read_pickle(meta_path)["fine_label_names"])
        except Exception as error:
            raise self._fail(meta_path, f"no fine_label_names ({type(error).__name__}: {error})") from None
        absent = sorted(ALL_CLASSES - set(names))
        if absent:
            raise self._fail(meta_path, f"the CIFAR-FS classes {absent[:5]}{' ...' if len(absent) > 5 else ''} are not in fine_label_names")
        pixels, labels = [], []
        for part in PARTS:
            path = self.folder / part
            try:
                entry = read_pickle(path)
                data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, *IMAGE_SHAPE)
                fine = np.asarray(entry["fine_labels"], dtype=np.int64)
            except Exception as error:
                raise self._fail(path, f"no data of 3x32x32 images with fine_labels ({type(error).__name__}: {error})") from None
            if fine.shape != (data.shape[0],) or (fine.size and (fine.min() < 0 or fine.max() >= len(names))):
                raise self._fail(path, f"{data.shape[0]} images but fine_labels of shape {fine.shape} with values outside 0-{len(names) - 1}")
            pixels.append(torch.from_numpy(data))
            labels.append(torch.from_numpy(fine))
        pooled, label = torch.cat(pixels), torch.cat(labels)
        counts = torch.bincount(label, minlength=len(names))
        empty = [n for n, c in zip(names, counts.tolist()) if c == 0 and n in ALL_CLASSES]
        if empty:
            raise self._fail(self.folder / PARTS[0], f"no images of the classes {empty[:5]}{' ...' if len(empty) > 5 else ''}")
        order = torch.argsort(label, stable=True)  # grouped by class; within a class train images come first
        return {"names": names, "counts": counts, "pixels": resize_uint8(pooled[order].contiguous(), image_size)}
