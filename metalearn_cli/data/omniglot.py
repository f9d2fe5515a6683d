"""Omniglot (Lake et al. 2015): 1623 handwritten characters from 50 alphabets, 20 drawings each.

Reads the official layout under `root`: `omniglot-py/images_background.zip` and
`images_evaluation.zip` (or their extracted folders, which is what torchvision's downloader
leaves). An archive is accepted by its structure (964 + 659 characters of 20 images), not by its
md5, so re-encoded copies work. `download=True` fetches the official archives with torchvision's
downloader, which checks their md5. Images are decoded once, resized (default 28x28, Lanczos) and
cached as uint8 tensors; later runs load the cache in about a second.

Splits:
* `vinyals` (default): the standard few-shot split of Vinyals et al. 2016: 1028 / 172 / 423
  characters for train / val / test, each 90-degree rotation a class of its own (4112 / 688 / 1692
  classes), defined below by alphabet exactly as in the split files of Prototypical Networks.
* `maml`: the MAML paper's split: the 1623 characters shuffled with seed 1, the first 1100 for
  training, the next 100 for validation and the remaining 423 for test; each drawn class is turned
  by a random multiple of 90 degrees in every task (MAML's augmentation).

`train_on="trainval"` meta-trains on the train and val characters together (Vinyals et al.'s
1200 training characters; `splits/vinyals/trainval.txt` of Prototypical Networks).
"""

from __future__ import annotations

import random
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from metalearn_cli.data.cache import cached, decode_image, fingerprint
from metalearn_cli.data.images import ImageClasses, ImageTasks
from metalearn_cli.errors import MetalearnError

PARTS = {"background": 964, "evaluation": 659}
IMAGES_PER_CHARACTER = 20

VINYALS_VAL_ALPHABETS = ("Hebrew", "Mkhedruli_(Georgian)", "Armenian", "Early_Aramaic", "Bengali")
VINYALS_TEST_ALPHABETS = (
    "Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian", "Old_Church_Slavonic_(Cyrillic)",
    "Oriya", "Syriac_(Serto)", "Sylheti", "Tengwar", "Tibetan", "ULOG",
)
#: Gurmukhi is split: characters 42-45 are test, 01-41 train
VINYALS_TEST_GURMUKHI = range(42, 46)
SPLIT_CHOICES = ("vinyals", "maml")


def vinyals_split_of(character: str) -> str:
    """'Alphabet/characterNN' -> 'train', 'val' or 'test' in the Vinyals et al. split."""
    alphabet, name = character.split("/")
    if alphabet in VINYALS_VAL_ALPHABETS:
        return "val"
    if alphabet in VINYALS_TEST_ALPHABETS:
        return "test"
    if alphabet == "Gurmukhi" and int(re.sub(r"\D", "", name)) in VINYALS_TEST_GURMUKHI:
        return "test"
    return "train"


def maml_split(characters: list[str]) -> dict[str, list[str]]:
    """MAML's data_generator.py: random.seed(1); shuffle; 1100 train, 100 val, the rest test."""
    shuffled = sorted(characters)
    random.Random(1).shuffle(shuffled)
    return {"train": shuffled[:1100], "val": shuffled[1100:1200], "test": shuffled[1200:]}


class Omniglot(ImageTasks):
    def __init__(
        self,
        root: str,
        split: str = "vinyals",
        image_size: int = 28,
        download: bool = False,
        cache_dir: str | None = None,
        train_on: str = "train",
    ) -> None:
        if split not in SPLIT_CHOICES:
            raise MetalearnError(f"invalid value for `data.split`: {split!r}. Allowed: {', '.join(SPLIT_CHOICES)}.")
        self.root = Path(str(root)).expanduser()
        if download:
            self._download()
        characters, pixels = self._load(image_size, cache_dir)
        by_name = dict(zip(characters, pixels))
        if split == "vinyals":
            groups = {s: [c for c in characters if vinyals_split_of(c) == s] for s in ("train", "val", "test")}
            rotations, augment = 4, False
        else:
            groups = maml_split(characters)
            rotations, augment = 1, True
        splits = {
            s: ImageClasses.from_lists([by_name[c] for c in names], names, rotations=rotations)
            for s, names in groups.items()
        }
        super().__init__(splits, name=f"omniglot-{split}", invert=True, augment_rotations=augment, train_on=train_on)

    # -- files -------------------------------------------------------------------------------
    def _download(self) -> None:
        from torchvision.datasets import Omniglot as TorchvisionOmniglot

        for background in (True, False):
            try:
                TorchvisionOmniglot(str(self.root), background=background, download=True)
            except Exception as error:
                raise MetalearnError(
                    f"downloading Omniglot into `data.root` = {str(self.root)!r} failed ({error}). "
                    "Check the connection, or download images_background.zip and images_evaluation.zip from "
                    "https://github.com/brendenlake/omniglot/tree/master/python into <data.root>/omniglot-py/ "
                    "and run with data.download=false."
                ) from None

    def _sources(self) -> dict[str, Path]:
        base = self.root / "omniglot-py" if (self.root / "omniglot-py").exists() else self.root
        found = {}
        for part in PARTS:
            folder, archive = base / f"images_{part}", base / f"images_{part}.zip"
            if folder.is_dir():
                found[part] = folder
            elif archive.is_file():
                found[part] = archive
            else:
                raise MetalearnError(
                    f"Omniglot not found under `data.root` = {str(self.root)!r}: expected "
                    f"omniglot-py/images_{part}.zip (or the extracted folder images_{part}/). "
                    "Point data.root at the folder that holds omniglot-py/, or pass data.download=true to fetch "
                    "the official archives (needs internet)."
                )
        return found

    def _load(self, image_size: int, cache_dir: str | None) -> tuple[list[str], list[torch.Tensor]]:
        sources = self._sources()
        files = [p for p in sources.values() if p.is_file()] or list(sources.values())
        key = fingerprint(files, image_size, sorted(str(p) for p in sources.values()))
        data = cached(cache_dir, f"omniglot-{image_size}px", key, lambda: self._decode(sources, image_size))
        return data["characters"], list(data["pixels"])

    def _decode(self, sources: dict[str, Path], image_size: int) -> dict:
        characters: list[str] = []
        pixels: list[torch.Tensor] = []
        for part, source in sources.items():
            entries = self._list(source, part)
            per_character: dict[str, list[str]] = {}
            for entry in entries:
                alphabet, character, _ = entry.split("/")[-3:]
                per_character.setdefault(f"{alphabet}/{character}", []).append(entry)
            if len(per_character) != PARTS[part] or any(len(v) != IMAGES_PER_CHARACTER for v in per_character.values()):
                raise MetalearnError(
                    f"{source} does not look like Omniglot's images_{part}: expected {PARTS[part]} characters of "
                    f"{IMAGES_PER_CHARACTER} images, found {len(per_character)} characters. Re-download it "
                    "(data.download=true) or point `data.root` at a complete copy."
                )
            reader = zipfile.ZipFile(source) if source.is_file() else None
            for name in sorted(per_character):
                images = [
                    decode_image(reader.read(e) if reader else source / e, image_size, channels=1)
                    for e in sorted(per_character[name])
                ]
                characters.append(name)
                pixels.append(torch.from_numpy(np.stack(images)))
            if reader:
                reader.close()
        return {"characters": characters, "pixels": torch.stack(pixels)}

    @staticmethod
    def _list(source: Path, part: str) -> list[str]:
        if source.is_file():
            with zipfile.ZipFile(source) as archive:
                return [n for n in archive.namelist() if n.lower().endswith(".png")]
        return [str(p.relative_to(source)) for p in sorted(source.glob("*/*/*.png"))]
