"""miniImageNet (Vinyals et al. 2016) with the split of Ravi & Larochelle 2017: 64 / 16 / 20 ImageNet
classes of 600 images for train / val / test, 84x84 RGB.

There is no official download, so three common layouts are accepted under `root`, tried in this order:

(a) pickles: `mini-imagenet-cache-{train,val,test}.pkl` (the learn2learn / mini-imagenet-tools format:
    a dict with `image_data`, uint8 [N, 84, 84, 3], and `class_dict`, {wnid: [row indices]}; learn2learn
    names the validation file `mini-imagenet-cache-validation.pkl`, which is accepted too). Pickles are
    trusted input: only load files you got from a source you trust.
(b) folders: `{train,val,test}/<wnid>/<image>` (any of png, jpg, jpeg, bmp, gif, webp).
(c) Ravi's csv files: `images/<file>` plus `{train,val,test}.csv` with the columns `filename,label`.

The pickles are already uint8 at 84x84: they are used as they are (no cache), or resized with Lanczos
and cached when `image_size` is not their size. Image files (b, c) are decoded once, resized to
`image_size` (Lanczos) and cached as uint8 tensors, keyed by a fingerprint of every file.
The number of classes and images is not enforced, so other splits in these layouts work too.
"""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import torch

from metalearn_cli.data.base import SPLITS
from metalearn_cli.data.cache import cached, fingerprint
from metalearn_cli.data.folder import check_image_size, class_folders, decode_classes, image_files, resize_uint8, split_decoded
from metalearn_cli.data.images import ImageClasses, ImageTasks
from metalearn_cli.errors import MetalearnError

PICKLE_NAME = "mini-imagenet-cache-{}.pkl"
#: the image size of the distributed pickles
PICKLE_SIZE = 84
#: other names of a split's pickle (learn2learn's downloader writes "validation")
PICKLE_ALIASES = {"val": ("validation",)}
LAYOUTS = ("pickle", "folder", "csv")
WHERE_TO_GET = (
    "There is no official download: take Ravi & Larochelle's split files (train.csv, val.csv, test.csv) from "
    "https://github.com/twitter/meta-learning-lstm/tree/master/data/miniImagenet and the images from ImageNet "
    "(e.g. with the mini-imagenet-tools script, which writes layout (a) or (c)), or the pickles as distributed by "
    "learn2learn (learn2learn.vision.datasets.MiniImagenet); then point data.root at the folder that holds them."
)


def _str(key: object) -> str:
    return key.decode() if isinstance(key, bytes) else str(key)


class MiniImageNet(ImageTasks):
    def __init__(self, root: str, image_size: int = 84, cache_dir: str | None = None, train_on: str = "train") -> None:
        image_size = check_image_size(image_size)
        self.root = Path(str(root)).expanduser()
        self.layout, found = self._find()
        if self.layout == "pickle":
            data = self._from_pickles(found, image_size, cache_dir)
        else:
            files = self._folder_files(found) if self.layout == "folder" else self._csv_files(found)
            self._check_disjoint({s: list(files[s]) for s in SPLITS})
            every = [p for split in SPLITS for paths in files[split].values() for p in paths]
            assignment = [(s, name) for s in SPLITS for name in files[s]]
            key = fingerprint(every, image_size, self.layout, assignment)
            data = cached(
                cache_dir,
                f"miniimagenet-{image_size}px",
                key,
                lambda: {s: decode_classes(files[s], image_size, channels=3) for s in SPLITS},
            )
        splits = {}
        for split in SPLITS:
            by_name = split_decoded(data[split])
            splits[split] = ImageClasses.from_lists(list(by_name.values()), list(by_name))
        super().__init__(splits, name="miniimagenet", invert=False, train_on=train_on)

    # -- layouts -----------------------------------------------------------------------------
    def _find(self) -> tuple[str, dict[str, Path]]:
        """The first complete layout, as (layout, {split: path}), or a MetalearnError listing all three."""
        if not self.root.is_dir():
            raise MetalearnError(
                f"miniImageNet not found: `data.root` = {str(self.root)!r} is not a folder. {WHERE_TO_GET}"
            )
        pickles = {}
        for split in SPLITS:
            for name in (split, *PICKLE_ALIASES.get(split, ())):
                if (self.root / PICKLE_NAME.format(name)).is_file():
                    pickles[split] = self.root / PICKLE_NAME.format(name)
                    break
        folders = {s: self.root / s for s in SPLITS if (self.root / s).is_dir()}
        csvs = {s: self.root / f"{s}.csv" for s in SPLITS if (self.root / f"{s}.csv").is_file()}
        candidates = {"pickle": pickles, "folder": folders, "csv": csvs}
        images_ok = (self.root / "images").is_dir()
        for layout in LAYOUTS:
            if len(candidates[layout]) == len(SPLITS) and (layout != "csv" or images_ok):
                return layout, candidates[layout]

        def missing(layout: str, pattern: str) -> str:
            absent = [pattern.format(s) for s in SPLITS if s not in candidates[layout]]
            if layout == "csv" and not images_ok:
                absent.insert(0, "images/")
            return "missing " + ", ".join(absent)

        raise MetalearnError(
            f"miniImageNet not found under `data.root` = {str(self.root)!r}. Looked for three layouts: "
            f"(a) pickles mini-imagenet-cache-{{train,val,test}}.pkl ({missing('pickle', 'mini-imagenet-cache-{}.pkl')}); "
            f"(b) folders {{train,val,test}}/<wnid>/<image>.jpg ({missing('folder', '{}/')}); "
            f"(c) images/<file>.jpg with Ravi's {{train,val,test}}.csv ({missing('csv', '{}.csv')}). {WHERE_TO_GET}"
        )

    def _check_disjoint(self, names: dict[str, list[str]]) -> None:
        seen: dict[str, str] = {}
        for split in SPLITS:
            if not names[split]:
                raise MetalearnError(
                    f"the {split} split of miniImageNet under `data.root` = {str(self.root)!r} ({self.layout} layout) "
                    f"has no classes. {WHERE_TO_GET}"
                )
            for name in names[split]:
                if name in seen:
                    raise MetalearnError(
                        f"the class {name!r} is in both the {seen[name]} and the {split} split of miniImageNet under "
                        f"`data.root` = {str(self.root)!r} ({self.layout} layout); the splits must not share classes."
                    )
                seen[name] = split

    def _folder_files(self, folders: dict[str, Path]) -> dict[str, dict[str, list[Path]]]:
        files: dict[str, dict[str, list[Path]]] = {}
        for split, folder in folders.items():
            files[split] = {}
            for class_folder in class_folders(folder):
                images = image_files(class_folder)
                if not images:
                    raise MetalearnError(
                        f"the class folder {str(class_folder)!r} under `data.root` holds no readable images. "
                        "Add its images or delete it."
                    )
                files[split][class_folder.name] = images
        return files

    def _csv_files(self, tables: dict[str, Path]) -> dict[str, dict[str, list[Path]]]:
        images = self.root / "images"
        files: dict[str, dict[str, list[Path]]] = {}
        for split, table in tables.items():
            per_class: dict[str, list[Path]] = {}
            with open(table, newline="") as f:
                rows = list(csv.reader(f))
            header = [c.strip() for c in rows[0]] if rows else []
            if "filename" not in header or "label" not in header:
                raise MetalearnError(
                    f"{str(table)!r} (under `data.root`) is not one of Ravi's split files: its first row should be "
                    f"the header filename,label, found {header!r}."
                )
            column, label = header.index("filename"), header.index("label")
            for number, row in enumerate(rows[1:], start=2):
                if not row:
                    continue
                if len(row) <= max(column, label):
                    raise MetalearnError(f"line {number} of {str(table)!r} (under `data.root`) has no filename,label: {row!r}.")
                path = images / row[column].strip()
                if not path.is_file():
                    raise MetalearnError(
                        f"{table.name} line {number} names the image {row[column]!r}, but {str(path)!r} does not exist "
                        f"(under `data.root` = {str(self.root)!r}). Put all images of the split files into "
                        "<data.root>/images/."
                    )
                per_class.setdefault(row[label].strip(), []).append(path)
            files[split] = {name: per_class[name] for name in sorted(per_class)}
        return files

    # -- pickles -----------------------------------------------------------------------------
    def _from_pickles(self, paths: dict[str, Path], image_size: int, cache_dir: str | None) -> dict:
        def load() -> dict:
            data = {split: self._read_pickle(path) for split, path in paths.items()}
            self._check_disjoint({s: data[s]["names"] for s in SPLITS})
            for part in data.values():
                part["pixels"] = resize_uint8(part["pixels"], image_size)
            return data

        if image_size == PICKLE_SIZE:  # already decoded at this size: loading the pickles is as fast as a cache
            return load()
        return cached(cache_dir, f"miniimagenet-pkl-{image_size}px", fingerprint(paths.values(), image_size), load)

    def _read_pickle(self, path: Path) -> dict:
        """One split's pickle -> {"names", "counts", "pixels" uint8 [N, 3, H, W]} grouped by class."""

        def fail(problem: str) -> MetalearnError:
            return MetalearnError(
                f"{str(path)!r} (under `data.root` = {str(self.root)!r}) is not a miniImageNet pickle: {problem}. "
                f"Expected a dict with image_data (uint8 [N, 84, 84, 3]) and class_dict ({{wnid: [indices]}}). {WHERE_TO_GET}"
            )

        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            entry = {_str(k): v for k, v in entry.items()}
            images = np.asarray(entry["image_data"])
            class_dict = {_str(k): np.asarray(v, dtype=np.int64).reshape(-1) for k, v in entry["class_dict"].items()}
        except Exception as error:
            raise fail(f"{type(error).__name__}: {error}") from None
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise fail(f"image_data is {images.dtype} of shape {images.shape}")
        names = sorted(class_dict)
        counts = [len(class_dict[n]) for n in names]
        if not names or min(counts) == 0 or any(int(i.min()) < 0 or int(i.max()) >= len(images) for i in class_dict.values()):
            raise fail("class_dict is empty, has a class without images or indices outside image_data")
        pixels = torch.empty(sum(counts), 3, images.shape[1], images.shape[2], dtype=torch.uint8)
        start = 0
        for name, count in zip(names, counts):  # class by class, so memory holds the pickle plus one copy
            pixels[start : start + count] = torch.from_numpy(images[class_dict[name]]).permute(0, 3, 1, 2)
            start += count
        return {"names": names, "counts": torch.tensor(counts), "pixels": pixels}
