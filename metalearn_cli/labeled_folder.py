"""A user's labeled folder `<root>/<class>/<image>` read as one task's images for a checkpoint: the support
(or query) set `metalearn export support=... query=...` adapts a checkpoint to.

The classes are the non-hidden sub-folders in sorted name order (label c is the c-th name); their images are
the files a data folder's would be (`metalearn_cli.data.folder.image_files`), decoded as the data sources
decode theirs (`decode_image`: grey or RGB, resized with Lanczos to the checkpoint's image size) and made
into the model's inputs by the checkpoint's own source (`ImageTasks.inputs`: /255, inverted where it inverts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from metalearn_cli.data.folder import class_folders, decode_classes, image_files, is_hidden
from metalearn_cli.errors import MetalearnError


@dataclass
class LabeledImages:
    """The images of a labeled folder, class after class."""

    root: Path
    classes: list[str]
    #: images per class, in label order
    counts: list[int]
    #: uint8 [n, C, H, W]
    pixels: Tensor
    #: [n] labels 0..len(classes)-1
    labels: Tensor


def read_labeled_folder(value: object, key: str, input_shape: tuple[int, ...], max_value: float | None = None) -> LabeledImages:
    """The folder `value` (named by the command's `key`) decoded to images of `input_shape` (C, H, W)."""
    root = Path(str(value)).expanduser()
    layout = f"<{key}>/<class>/<image>, one sub-folder of images per class, named for the class"
    if not root.is_dir():
        state = "is a file, not a folder" if root.exists() else "does not exist"
        raise MetalearnError(f"`{key}` = {str(value)!r} {state}. Point `{key}` at a folder laid out as {layout}.")
    folders = class_folders(root)
    if not folders:
        loose = image_files(root)
        found = f" It holds {len(loose)} images directly: sort them into one folder per class." if loose else ""
        raise MetalearnError(f"`{key}` = {str(value)!r} has no class folders. Expected {layout}.{found}")
    files: dict[str, list[Path]] = {}
    for folder in folders:
        images = image_files(folder)
        if not images:
            others = sorted(p.name for p in folder.iterdir() if not is_hidden(p) and p.is_file())
            seen = f"files there: {', '.join(others[:5])}{', ...' if len(others) > 5 else ''}" if others else "it is empty"
            raise MetalearnError(
                f"the class folder {folder.name!r} of `{key}` = {str(value)!r} holds no images Pillow can read ({seen}). "
                "Add images of that class to it, or delete it."
            )
        files[folder.name] = images
    channels, height, width = (int(v) for v in input_shape)
    decoded = decode_classes(files, (width, height), channels, root_key=key, max_value=max_value)
    counts = [len(paths) for paths in files.values()]
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    return LabeledImages(root.absolute(), list(files), counts, decoded["pixels"], labels)
