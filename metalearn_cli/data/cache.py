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


def cached(cache_dir: str | os.PathLike | None, name: str, key: str, build: Callable[[], dict]) -> dict:
    """Load `<cache_dir>/<name>-<key>.pt`, or build it, save it atomically and return it."""
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
            f"the image cache folder `data.cache_dir` = {str(folder)!r} cannot be written ({error.strerror or error}). "
            "Set `data.cache_dir` (or the METALEARN_CACHE_DIR environment variable) to a writable folder."
        ) from None
    return data


def decode_image(data: bytes | Path, size: int | tuple[int, int], channels: int) -> np.ndarray:
    """PNG/JPEG bytes or a file -> uint8 [C, H, W], resized with Lanczos (as MAML's preprocessing)."""
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    with Image.open(source) as image:
        image = image.convert("L" if channels == 1 else "RGB")
        if isinstance(size, int):
            size = (size, size)
        if image.size != size:
            image = image.resize(size, Image.LANCZOS)
        array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1).copy()
