"""Omniglot (Lake et al. 2015): 1623 handwritten characters from 50 alphabets, 20 drawings each.

Reads the official layout under `root`: `omniglot-py/images_background.zip` and
`images_evaluation.zip` (or their extracted folders, which is what torchvision's downloader
leaves). An archive is accepted by its structure (964 + 659 characters of 20 images), not by its
md5, so re-encoded copies work. `download=True` fetches the official archives with torchvision's
downloader, which checks their md5. Images are decoded once, resized (default 28x28, Lanczos) and
cached as uint8 tensors; later runs load the cache in about a second.

Splits (characters for train / val / test; classes with the split's default `rotations`):
* `vinyals` (default): the standard few-shot split of Vinyals et al. 2016: 1028 / 172 / 423
  characters, defined below by alphabet exactly as in the split files of Prototypical Networks.
  Each 90-degree rotation is a class of its own: 4112 / 688 / 1692 classes (`rotations=False`:
  1028 / 172 / 423).
* `maml`: the MAML paper's split: the 1623 characters shuffled with seed 1, the first 1100 for
  training, the next 100 for validation and the remaining 423 for test; each drawn class is turned
  by a random multiple of 90 degrees in every task (MAML's augmentation; `rotations=False`: never
  turned). 1100 / 100 / 423 classes either way.
* `background`: the dataset authors' split (Lake et al. 2015): meta-train on the 30 background
  alphabets (964 characters of images_background), less `val_characters` of them (default 100)
  drawn with `random.Random(split_seed)` from the sorted names and held out for validation; test
  on the 20 evaluation alphabets (659 characters of images_evaluation). No rotated classes by
  default, as in Lake's protocol: 864 / 100 / 659 classes; `rotations=True` makes each 90-degree
  rotation a class of its own, as `vinyals` (3456 / 400 / 2636).

`train_on="trainval"` meta-trains on the train and val characters together (for `vinyals`,
Vinyals et al.'s 1200 training characters, `splits/vinyals/trainval.txt` of Prototypical Networks;
for `background`, all 964 background characters).
"""

from __future__ import annotations

import random
import re
import zipfile
from pathlib import Path

import numpy as np
import torch

from metalearn_cli import options
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
SPLIT_CHOICES = ("vinyals", "maml", "background")
#: data.rotations when not given: each split's own convention
DEFAULT_ROTATIONS = {"vinyals": True, "maml": True, "background": False}
#: background characters held out for validation in the `background` split when not given (about 10%)
DEFAULT_VAL_CHARACTERS = 100


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


def background_split(characters: list[str], parts: list[str], val_characters: int, seed: int) -> dict[str, list[str]]:
    """Lake et al.'s split: background characters for train, less `val_characters` of them (sorted, shuffled with
    `random.Random(seed)`, the first ones) for val; the evaluation characters for test."""
    background = sorted(c for c, part in zip(characters, parts) if part == "background")
    shuffled = list(background)
    random.Random(seed).shuffle(shuffled)
    held_out = set(shuffled[:val_characters])
    return {
        "train": [c for c in background if c not in held_out],
        "val": [c for c in background if c in held_out],
        "test": sorted(c for c, part in zip(characters, parts) if part == "evaluation"),
    }


class Omniglot(ImageTasks):
    def __init__(
        self,
        root: str,
        split: str = "vinyals",
        image_size: int = 28,
        download: bool = False,
        cache_dir: str | None = None,
        train_on: str = "train",
        rotations: bool | None = None,
        val_characters: int | None = None,
        split_seed: int | None = None,
    ) -> None:
        split = options.choice("split", split, SPLIT_CHOICES)
        if rotations is not None and not isinstance(rotations, bool):
            raise options.invalid("rotations", rotations, "true, false, or null (the split's own convention: "
                                  "true for vinyals and maml, false for background)")
        if split == "background":
            val_characters = options.integer("val_characters", DEFAULT_VAL_CHARACTERS if val_characters is None else val_characters,
                                             "background characters held out for validation")
            if val_characters >= PARTS["background"]:
                raise options.invalid("val_characters", val_characters, f"an integer from 1 to {PARTS['background'] - 1} "
                                      f"(of the {PARTS['background']} background characters, the rest are for training)")
            split_seed = options.integer("split_seed", 0 if split_seed is None else split_seed,
                                         "the seed that draws the validation characters", minimum=0)
        else:
            for key, value in (("val_characters", val_characters), ("split_seed", split_seed)):
                if value is not None:  # a setting that would change nothing must not look as if it did
                    raise options.OptionError(
                        f"`{{p}}{key}` = {value!r} applies only to `{{p}}split=background`; the {split} split fixes its own "
                        f"validation characters. Drop `{{p}}{key}`, or set `{{p}}split=background`."
                    )
        self.rotations = DEFAULT_ROTATIONS[split] if rotations is None else rotations
        self.root = Path(str(root)).expanduser()
        if download:
            self._download()
        characters, parts, pixels = self._load(image_size, cache_dir)
        by_name = dict(zip(characters, pixels))
        if split == "vinyals":
            groups = {s: [c for c in characters if vinyals_split_of(c) == s] for s in ("train", "val", "test")}
        elif split == "maml":
            groups = maml_split(characters)
        else:
            groups = background_split(characters, parts, val_characters, split_seed)
        # MAML turns each drawn class at random; the others make each quarter turn a class of its own
        augment = split == "maml" and self.rotations
        classes_per_image = 4 if self.rotations and not augment else 1
        splits = {
            s: ImageClasses.from_lists([by_name[c] for c in names], names, rotations=classes_per_image)
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

    def _load(self, image_size: int, cache_dir: str | None) -> tuple[list[str], list[str], list[torch.Tensor]]:
        """The characters ('Alphabet/characterNN'), the part each came from ('background' or 'evaluation')
        and their images, uint8 [20, 1, H, W] each."""
        sources = self._sources()
        files = [p for p in sources.values() if p.is_file()] or list(sources.values())
        key = fingerprint(files, image_size, sorted(str(p) for p in sources.values()))
        data = cached(cache_dir, f"omniglot-{image_size}px", key, lambda: self._decode(sources, image_size))
        characters = data["characters"]
        # caches written before parts were stored hold the background characters first, as `_decode` writes them
        parts = data.get("parts") or [part for part, count in PARTS.items() for _ in range(count)]
        return characters, list(parts), list(data["pixels"])

    def _decode(self, sources: dict[str, Path], image_size: int) -> dict:
        characters: list[str] = []
        parts: list[str] = []
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
                parts.append(part)
                pixels.append(torch.from_numpy(np.stack(images)))
            if reader:
                reader.close()
        return {"characters": characters, "parts": parts, "pixels": torch.stack(pixels)}

    @staticmethod
    def _list(source: Path, part: str) -> list[str]:
        if source.is_file():
            with zipfile.ZipFile(source) as archive:
                return [n for n in archive.namelist() if n.lower().endswith(".png")]
        return [str(p.relative_to(source)) for p in sorted(source.glob("*/*/*.png"))]
