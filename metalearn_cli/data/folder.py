"""Any folder of images, one sub-folder per class: `root/<class>/<image>`, as a task distribution.

Every non-hidden sub-folder of `root` is a class; its image files are its examples. An image file
is one Pillow can read, whatever its format (PNG, JPEG, TIFF, BMP, PGM/PPM/PBM, GIF, WebP, ...):
a file whose suffix Pillow registers for a format it decodes is an image (and must decode, else
the run stops naming it); a file with another suffix, or none, is an image if Pillow recognises its
contents. Hidden files and the text, table, archive and video suffixes of `NOT_IMAGES` are skipped
without a look. Images are decoded once (`cache.decode_image`: first frame of a multi-frame file,
16-bit and float pixels scaled by their type's range or by `max_value`, transparency over black),
converted to `channels` (1: grey, 3: RGB), resized to `image_size` x `image_size` (Lanczos; the
aspect ratio is not kept, as in the usual miniImageNet preprocessing) and cached as uint8 tensors;
the cache key is a fingerprint of every image file used, the size, the channels and the decoding
rules, so an edited tree is decoded again.

Splits:
* `splits` given: an explicit split, {"train": [...], "val": [...], "test": [...]} of class-folder
  names. Each class may be listed in one split only; classes listed nowhere are not used.
* `splits` null: the classes, sorted by name, are shuffled with `random.Random(split_seed)` and cut
  by `fractions` (train, val, test; default 0.64 / 0.16 / 0.20, the 64/16/20 of miniImageNet).

Unlabeled (`labeled=False`): every image file under `root`, at any depth, sorted by relative path, is
one pool of meta-training images (one class, "unlabeled"; folder names are never read), for samplers
that make up their own labels (UMTRA, CACTUs). Test classes are those of `test_root`, a labeled
`<class>/<image>` folder; validation classes those of `val_root` if given, else the test classes (then
validation is not held out, and the last checkpoint is scored). `splits`, `fractions`, `split_seed` and
`train_on` do not apply and are refused.

The helpers below (listing a tree, decoding classes, resizing uint8 arrays) are shared by the
MNIST, CIFAR-FS and miniImageNet sources.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

from metalearn_cli import options
from metalearn_cli.data.base import SPLITS
from metalearn_cli.data.cache import DECODE_RULES, OutOfRange, cached, decode_image, fingerprint
from metalearn_cli.data.images import ImageClasses, ImageTasks
from metalearn_cli.errors import MetalearnError

#: suffixes skipped without opening the file: what sits beside images in data folders and is never one
NOT_IMAGES = frozenset({
    ".txt", ".md", ".rst", ".json", ".jsonl", ".csv", ".tsv", ".yaml", ".yml", ".xml", ".html", ".htm", ".log", ".ini",
    ".py", ".ipynb", ".pdf", ".db", ".zip", ".tar", ".gz", ".7z", ".npy", ".npz", ".pkl", ".pt", ".mat", ".h5", ".hdf",
    ".mp4", ".avi", ".mov", ".mkv", ".mpg", ".mpeg",
})
DEFAULT_FRACTIONS = (0.64, 0.16, 0.20)
#: the one class of an unlabeled folder's meta-training images
UNLABELED = "unlabeled"
#: examples in the error messages about each folder key
EXAMPLE_ROOTS = {"data.root": "~/data/birds", "data.test_root": "~/labeled_scans", "data.val_root": "~/labeled_scans_val"}


# -- helpers shared by the image sources -------------------------------------------------------
def is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def class_folders(root: Path) -> list[Path]:
    """The non-hidden sub-folders of `root`, sorted by name."""
    return sorted((p for p in root.iterdir() if p.is_dir() and not is_hidden(p)), key=lambda p: p.name)


@functools.lru_cache(maxsize=None)
def readable_formats() -> frozenset[str]:
    """The formats Pillow decodes; not those it only identifies (stubs that need a handler installed, MPEG)."""
    Image.init()
    return frozenset(
        name for name, (factory, _) in Image.OPEN.items()
        if name != "MPEG" and not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))
    )


@functools.lru_cache(maxsize=None)
def image_suffixes() -> frozenset[str]:
    """The suffixes (lower case, with the dot) Pillow registers for the formats it decodes."""
    formats = readable_formats()
    return frozenset(s for s, name in Image.registered_extensions().items() if name in formats) - NOT_IMAGES


def is_image(path: Path) -> bool:
    """An image suffix (`image_suffixes`) makes a file an image; any other suffix but `NOT_IMAGES`, or none,
    is asked of Pillow, which reads only the header."""
    suffix = path.suffix.lower()
    if suffix in NOT_IMAGES:
        return False
    if suffix in image_suffixes():
        return True
    try:
        with Image.open(path) as image:
            return image.format in readable_formats()
    except Exception:  # unidentified, unreadable: not an image
        return False


def image_files(folder: Path) -> list[Path]:
    """The non-hidden image files (`is_image`) directly in `folder`, sorted by name."""
    return sorted((p for p in folder.iterdir() if not is_hidden(p) and p.is_file() and is_image(p)), key=lambda p: p.name)


def images_under(root: Path, key: str = "data.root") -> list[Path]:
    """Every non-hidden image file (`is_image`) under `root` at any depth, sorted by relative path (folder by
    folder); hidden folders are not entered, and a linked folder is walked once however often it is linked."""
    found: list[Path] = []
    seen: set[Path] = set()
    pending = [root]
    while pending:
        folder = pending.pop()
        real = folder.resolve()
        if real in seen:  # a link back up the tree, or a second link to one folder
            continue
        seen.add(real)
        try:
            entries = sorted(folder.iterdir(), key=lambda p: p.name)
        except OSError as error:
            raise MetalearnError(
                f"the folder {str(folder)!r} under `{key}` = {str(root)!r} cannot be listed ({error.strerror or error}). "
                "Make it readable, or move it out of the data folder."
            ) from None
        for entry in entries:
            if is_hidden(entry):
                continue
            if entry.is_dir():
                pending.append(entry)
            elif entry.is_file() and is_image(entry):
                found.append(entry)
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def check_image_size(image_size: object, key: str = "data.image_size") -> int:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise MetalearnError(
            f"invalid value for `{key}`: {image_size!r}. Allowed: an integer >= 1 (images are resized to that "
            f"many pixels square). Set it on the command line, e.g. `{key}=84`."
        )
    return image_size


def decode_classes(files: dict[str, list[Path]], image_size: int, channels: int, root_key: str = "data.root",
                   max_value: float | None = None) -> dict:
    """{class: [files]} -> {"names", "counts", "pixels" uint8 [N, C, H, W]}, classes in the given order.

    An image that cannot be decoded fails with a MetalearnError naming the file and the reason.
    """
    pixels: list[np.ndarray] = []
    for name, paths in files.items():
        for path in paths:
            try:
                pixels.append(decode_image(path, image_size, channels, max_value))
            except OutOfRange as error:
                raise MetalearnError(
                    f"the image file {str(path)!r} (class {name!r} under `{root_key}`) cannot be scaled to 8 bits: {error}."
                ) from None
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


def optional_root(value: object) -> Path | None:
    """A folder key that may be unset (null or empty) -> its path, or None."""
    if value is None or str(value) == "":
        return None
    return Path(str(value)).expanduser()


def folder_label(path: Path) -> str:
    """The folder's own name, for a source's name (the path itself where it has none, as '/')."""
    return path.resolve().name or str(path)


def refuse_split_keys(splits: object, fractions: object, split_seed: object, train_on: object) -> None:
    """With `labeled=false` the keys that split a labeled folder's classes would change nothing: refuse them when set."""
    try:
        default_fractions = len(fractions) == 3 and all(abs(float(a) - b) < 1e-9 for a, b in zip(fractions, DEFAULT_FRACTIONS))
    except (TypeError, ValueError):
        default_fractions = False
    for key, value, default in (("splits", splits, splits is None), ("fractions", fractions, default_fractions),
                                ("split_seed", split_seed, split_seed == 0), ("train_on", train_on, train_on == "train")):
        if not default:
            raise MetalearnError(
                f"`data.{key}` = {value!r} applies only to labeled folders: with `data.labeled=false` every image under "
                "`data.root` is meta-training data, validation classes come from `data.val_root` (else the test classes) "
                f"and test classes from `data.test_root`. Drop `data.{key}`."
            )


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
        max_value: float | None = None,
        labeled: bool = True,
        test_root: str | None = None,
        val_root: str | None = None,
    ) -> None:
        image_size = check_image_size(image_size)
        if channels not in (1, 3) or isinstance(channels, bool):
            raise MetalearnError(
                f"invalid value for `data.channels`: {channels!r}. Allowed: 1 (grey) or 3 (RGB). "
                "Set it on the command line, e.g. `data.channels=3`."
            )
        if max_value is not None and (
            not isinstance(max_value, (int, float)) or isinstance(max_value, bool) or not math.isfinite(max_value) or max_value <= 0
        ):
            raise MetalearnError(
                f"invalid value for `data.max_value`: {max_value!r}. Allowed: null (16-bit pixels are divided by 257, "
                "float pixels read as 0..1) or a number > 0, the pixel value of 16-bit, 32-bit and float images that "
                "maps to white (255), e.g. `data.max_value=4095` for 12-bit scans."
            )
        if not isinstance(labeled, bool):
            raise MetalearnError(str(options.invalid(
                "data.labeled", labeled, "true (<data.root>/<class>/<image>: folder names are classes) or false (any tree "
                "of unlabeled images for meta-training, with `data.test_root` giving labeled test classes)")))
        self.root = Path(str(root)).expanduser()
        #: whether the meta-training images carry labels (samplers that need labels refuse an unlabeled source)
        self.labeled = labeled
        self.test_root = optional_root(test_root)
        self.val_root = optional_root(val_root)
        if not labeled:
            refuse_split_keys(splits, fractions, split_seed, train_on)
            built = self._unlabeled(image_size, channels, cache_dir, max_value)
            super().__init__(built, name=self._unlabeled_name(), invert=False)
            return
        for key, value in (("test_root", test_root), ("val_root", val_root)):
            if value is not None:  # a setting that would change nothing must not look as if it did
                raise MetalearnError(
                    f"`data.{key}` = {str(value)!r} applies only to `data.labeled=false`: a labeled folder takes its "
                    "validation and test classes from `data.root` itself (`data.splits` or `data.fractions`). Drop "
                    f"`data.{key}`, or set `data.labeled=false` if the folder names under `data.root` are not classes."
                )
        available = self._classes(self.root, "data.root")
        groups = self._explicit(splits, available) if splits is not None else self._by_fractions(available, fractions, split_seed)
        used = [name for split in SPLITS for name in groups[split]]
        files = {name: self._files(self.root, name, "data.root") for name in used}
        key = fingerprint([p for paths in files.values() for p in paths], image_size, channels, used, DECODE_RULES, max_value)
        data = cached(cache_dir, f"folder-{image_size}px-{channels}c", key,
                      lambda: decode_classes(files, image_size, channels, max_value=max_value))
        by_name = split_decoded(data)
        built = {s: ImageClasses.from_lists([by_name[c] for c in groups[s]], groups[s]) for s in SPLITS}
        super().__init__(built, name="folder", invert=False, train_on=train_on)

    @property
    def validation_held_out(self) -> bool:
        # unlabeled: validation classes are held out from test only when `val_root` gives classes of their own
        if not self.labeled:
            return self.val_root is not None
        return super().validation_held_out

    # -- unlabeled images for meta-training, labeled folders for validation and test ---------------
    def _unlabeled(self, image_size: int, channels: int, cache_dir: str | None, max_value: float | None) -> dict[str, ImageClasses]:
        if self.test_root is None:
            raise MetalearnError(
                "`data.test_root` is missing: with `data.labeled=false` the images under `data.root` carry no labels, so "
                "meta-training needs a labeled source to be scored on. Point `data.test_root` at a folder laid out as "
                "<data.test_root>/<class>/<image>, e.g. `data.labeled=false data.test_root=~/labeled_scans` "
                "(and optionally `data.val_root=...` for validation classes of their own)."
            )
        self._folder_exists(self.root, "data.root", "a folder of images, in any layout")
        pool = images_under(self.root)
        if not pool:
            raise MetalearnError(
                f"the image folder `data.root` = {str(self.root)!r} holds no images Pillow can read, at any depth "
                "(hidden files and folders are skipped). Point data.root at the folder of unlabeled images."
            )
        key = fingerprint(pool, image_size, channels, [p.relative_to(self.root).parts for p in pool], DECODE_RULES, max_value)
        data = cached(cache_dir, f"folder-unlabeled-{image_size}px-{channels}c", key,
                      lambda: decode_classes({UNLABELED: pool}, image_size, channels, max_value=max_value))
        train = ImageClasses(data["pixels"], data["counts"], [UNLABELED])
        in_pool = {p.resolve() for p in pool}
        test = self._labeled_tree(self.test_root, "data.test_root", in_pool, image_size, channels, cache_dir, max_value)
        if self.val_root is None:
            return {"train": train, "val": test, "test": test}
        if self.val_root.resolve() == self.test_root.resolve():
            raise MetalearnError(
                f"`data.val_root` = {str(self.val_root)!r} is `data.test_root` itself: picking the checkpoint by its "
                "validation score would pick it on the test classes. Drop `data.val_root` (validation then comes from "
                "the test classes and the last checkpoint is scored), or give validation classes of their own."
            )
        val = self._labeled_tree(self.val_root, "data.val_root", in_pool, image_size, channels, cache_dir, max_value)
        return {"train": train, "val": val, "test": test}

    def _labeled_tree(self, root: Path, key: str, in_pool: set[Path], image_size: int, channels: int,
                      cache_dir: str | None, max_value: float | None) -> ImageClasses:
        """All classes of the labeled folder `root` (`<root>/<class>/<image>`), none of whose images may be in the
        meta-training pool."""
        names = self._classes(root, key)
        files = {name: self._files(root, name, key) for name in names}
        shared = [p for paths in files.values() for p in paths if p.resolve() in in_pool]
        if shared:
            raise MetalearnError(
                f"{len(shared)} images of `{key}` = {str(root)!r} are also meta-training images under `data.root` = "
                f"{str(self.root)!r} (e.g. {str(shared[0])!r}): meta-training would see the images it is scored on. "
                f"Move the labeled folder out of data.root, or point data.root at the unlabeled images alone."
            )
        fp = fingerprint([p for paths in files.values() for p in paths], image_size, channels, names, DECODE_RULES, max_value)
        data = cached(cache_dir, f"folder-{image_size}px-{channels}c", fp,
                      lambda: decode_classes(files, image_size, channels, root_key=key, max_value=max_value))
        return ImageClasses(data["pixels"], data["counts"], list(data["names"]))

    def _unlabeled_name(self) -> str:
        """e.g. folder:scans+test:labeled_scans (+val:...): where meta-training, test and validation tasks come from."""
        parts = [f"folder:{folder_label(self.root)}", f"test:{folder_label(self.test_root)}"]
        if self.val_root is not None:
            parts.append(f"val:{folder_label(self.val_root)}")
        return "+".join(parts)

    # -- classes and splits ----------------------------------------------------------------------
    @staticmethod
    def _folder_exists(root: Path, key: str, layout: str) -> None:
        if not root.is_dir():
            raise MetalearnError(
                f"the image folder `{key}` = {str(root)!r} does not exist{' (it is a file)' if root.exists() else ''}. "
                f"Point {key} at {layout}, e.g. `{key}={EXAMPLE_ROOTS[key]}`."
            )

    def _classes(self, root: Path, key: str) -> list[str]:
        self._folder_exists(root, key, f"a folder laid out as <{key}>/<class>/<image>")
        names = [p.name for p in class_folders(root)]
        if not names:
            loose = image_files(root)
            hint = ""
            if loose and key == "data.root":
                hint = (f" It holds {len(loose)} images directly: for a folder of unlabeled images, set `data.labeled=false` "
                        "with a labeled `data.test_root`.")
            elif loose:
                hint = f" It holds {len(loose)} images directly: a labeled source needs its images sorted into one folder per class."
            raise MetalearnError(
                f"the image folder `{key}` = {str(root)!r} has no class folders. Expected one sub-folder "
                f"per class, each holding that class's images: <{key}>/<class>/<image>.png|jpg|...{hint}"
            )
        return names

    def _files(self, root: Path, name: str, key: str) -> list[Path]:
        folder = root / name
        files = image_files(folder)
        if not files:
            others = sorted(p.name for p in folder.iterdir() if not is_hidden(p) and p.is_file())
            seen = f"files there: {', '.join(others[:5])}{', ...' if len(others) > 5 else ''}" if others else "no other files but hidden ones"
            remedy = "Add images to it, delete it, or leave it out of `data.splits`." if key == "data.root" else "Add images to it or delete it."
            raise MetalearnError(
                f"the class folder {name!r} under `{key}` = {str(root)!r} holds no images Pillow can read "
                f"({seen}). {remedy}"
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
