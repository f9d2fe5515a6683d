"""Decode image files once into uint8 tensors under a cache folder, so later runs load in seconds.

The data root may be read-only: the cache lives in `data.cache_dir` (default
`$METALEARN_CACHE_DIR`, else `~/.cache/metalearn`). A cache file is named by the data set, the
image size and a fingerprint of the source files (paths, sizes, modification times), so a
changed source is decoded again; files are written to a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image

from metalearn_cli.errors import MetalearnError


def default_cache_dir() -> Path:
    return Path(os.environ.get("METALEARN_CACHE_DIR", Path.home() / ".cache" / "metalearn"))


def fingerprint(paths: Iterable[Path], *extra: object) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(p) for p in paths):
        stat = path.stat()
        digest.update(f"{path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}\n".encode())
    for item in extra:
        digest.update(repr(item).encode())
    return digest.hexdigest()[:16]


def cached(cache_dir: str | os.PathLike | None, name: str, key: str, build: Callable[[], dict],
           setting: str = "data.cache_dir") -> dict:
    """Load `<cache_dir>/<name>-<key>.pt`, or build it, save it atomically and return it (`setting`: the key
    that chose the folder, named if it cannot be written)."""
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    path = folder / f"{name}-{key}.pt"
    if path.exists():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # a damaged cache file is rebuilt, never trusted
            pass
    data = build()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=folder)
        os.close(fd)
        torch.save(data, tmp)
        os.replace(tmp, path)
    except OSError as error:
        raise MetalearnError(
            f"the cache folder `{setting}` = {str(folder)!r} cannot be written ({error.strerror or error}). "
            f"Set `{setting}` (or the METALEARN_CACHE_DIR environment variable) to a writable folder."
        ) from None
    return data


#: version of the rules `decode_image` follows; a cache key that includes it is rebuilt when they change
DECODE_RULES = 2

#: Pillow's modes wider than 8 bits per pixel (16-bit unsigned in any byte order, 32-bit integer, 32-bit float)
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class OutOfRange(ValueError):
    """An image whose values do not fit the range its type implies (its message says what was found)."""


def decode_image(data: bytes | Path, size: int | tuple[int, int], channels: int, max_value: float | None = None) -> np.ndarray:
    """Image bytes or a file, in any format Pillow reads -> uint8 [C, H, W], resized with Lanczos (as MAML's
    preprocessing). The first frame of a multi-frame file is used; see `eight_bits` for the pixel values."""
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    with Image.open(source) as image:
        image = eight_bits(image, max_value).convert("L" if channels == 1 else "RGB")
        if isinstance(size, int):
            size = (size, size)
        if image.size != size:
            image = image.resize(size, Image.LANCZOS)
        array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1).copy()


def eight_bits(image: Image.Image, max_value: float | None = None) -> Image.Image:
    """Any Pillow image -> an 8-bit one (mode L, RGB, or a mode Pillow converts to them), without saturating.

    * 16-bit, 32-bit and float pixels are scaled by their type's range, so relative intensities are kept
      across images: 16-bit values (mode I;16, and mode I, which is how Pillow gives 16-bit PGM/PPM) are
      divided by 257 (65535 -> 255), floats are read as 0..1. With `max_value` that value maps to 255
      instead (values outside 0..max_value are clipped); without it, values outside the type's range
      raise `OutOfRange` rather than being clipped or wrapped.
    * Transparency (alpha, or a palette's transparent entry) is composited over black: what is hidden
      under a transparent pixel never reaches the model.
    """
    mode = image.mode
    if mode in WIDE_MODES:
        values = np.asarray(image).astype(np.float64)
        top = float(max_value) if max_value is not None else (1.0 if mode == "F" else 65535.0)
        if not np.isfinite(values).all():
            raise OutOfRange("it holds values that are not finite numbers (NaN or infinity)")
        low, high = float(values.min()), float(values.max())
        if max_value is None and (low < 0 or high > top):
            kind = "floating-point values are read as 0..1" if mode == "F" else "integer values are read as 16-bit, 0..65535"
            raise OutOfRange(
                f"its {mode!r} pixels range from {low:g} to {high:g}, but {kind}. Set `data.max_value` to the value "
                "that should map to white (255), e.g. `data.max_value="
                + (np.format_float_positional(high, trim="-") if high > 0 else "1") + "`"
            )
        scaled = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(scaled)  # uint8 [H, W]: mode L
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("PA", "LA", "La", "RGBa") or (mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        black = Image.new("RGBA", image.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, image).convert("RGB")
    return image
