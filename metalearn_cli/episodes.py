"""Episode files: a fixed list of few-shot classification episodes, one JSON object a line.

    {"support": [["images/a/01.png", 0], ["images/b/07.png", 1]], "query": [["images/a/03.png", 0], ["images/b/02.png", 1]]}

Paths are relative to the file's folder (absolute paths are allowed too). Labels are integers
0..N-1: each of them labels at least one support image, and every query label is one of them.
Episodes may differ in N and in their numbers of support and query images. Other keys are left
to the reader: `metalearn episodes export` writes "task" (the index of the fixed test task),
"classes" (the class behind each label) and "seed", an integer that fixes the randomness of the
episode's adaptation (Reptile's mini-batches) as the seed drawn with each fixed test task does;
without it, an episode's seed is derived from `eval.task_seed` and its line number.

`read_episode_file` checks a file and `load_episode_tasks` turns its episodes into tasks through a
checkpoint's own preprocessing (`metalearn eval ckpt=... eval.episodes=FILE`); `write_episode_file`
writes tasks out as a file and PNG images (`metalearn episodes export`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from metalearn_cli.errors import MetalearnError

FORMAT = (
    'each line is one episode, {"support": [["path/to/image.png", 0], ...], "query": [["path/to/other.png", 0], ...]}, '
    "paths relative to the file's folder, labels 0..N-1 (docs/usage.md, \"Episode files\")"
)
#: derive_seed code of an episode's seed when its line gives none (samplers.py uses 0-4)
_EPISODE_SEEDS = 5


@dataclass
class Episode:
    """One line of an episode file: (image path, label) pairs, paths resolved against the file's folder."""

    line: int
    support: list[tuple[Path, int]]
    query: list[tuple[Path, int]]
    seed: int | None = None

    @property
    def ways(self) -> int:
        return 1 + max(label for _, label in self.support)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(classes, support images, query images): episodes of one shape are scored in one batch."""
        return self.ways, len(self.support), len(self.query)

    def per_class(self, part: str) -> int | None:
        """Images per class in `part` ("support": shots, "query": queries) if every class has as many, else None."""
        counts = np.bincount([label for _, label in getattr(self, part)], minlength=self.ways)
        return int(counts[0]) if (counts == counts[0]).all() else None


@dataclass
class EpisodeFile:
    path: Path
    sha256: str
    episodes: list[Episode]


def read_episode_file(path: str | os.PathLike, key: str = "eval.episodes") -> EpisodeFile:
    """Read and check every episode of the file at `path`; a problem is a MetalearnError that names the
    file, the line and what is wrong. The images must exist (they are decoded by `load_episode_tasks`)."""
    file = Path(str(path)).expanduser()
    if not file.is_file():
        state = "is a folder, not a file" if file.is_dir() else "does not exist"
        raise MetalearnError(f"the episode file `{key}` = {str(path)!r} {state}. Pass a JSON Lines file: {FORMAT}.")
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise MetalearnError(f"the episode file `{key}` = {str(path)!r} is not UTF-8 text ({error}). Pass a JSON Lines file: {FORMAT}.") from None
    episodes = []
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            episodes.append(_parse(line, number, file, key))
    if not episodes:
        raise MetalearnError(f"the episode file `{key}` = {str(path)!r} holds no episodes. {FORMAT[0].upper()}{FORMAT[1:]}.")
    seen: set[Path] = set()
    for episode in episodes:
        for image, _ in episode.support + episode.query:
            if image not in seen:
                if not image.is_file():
                    _fail(file, key, episode.line, f"the image {str(image)!r} does not exist (paths are relative to {str(file.parent)!r})")
                seen.add(image)
    return EpisodeFile(file.absolute(), hashlib.sha256(data).hexdigest(), episodes)


def line_error(file: Path, key: str, line: int, what: str, format_hint: bool = True) -> MetalearnError:
    """The error for a problem with one episode of a file: the file, the line and what is wrong."""
    hint = f" In an episode file {FORMAT}." if format_hint else ""
    return MetalearnError(f"the episode file `{key}` = {str(file)!r}, line {line}: {what}.{hint}")


def _fail(file: Path, key: str, line: int, what: str) -> None:
    raise line_error(file, key, line, what)


def _parse(text: str, number: int, file: Path, key: str) -> Episode:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as error:
        _fail(file, key, number, f"not valid JSON ({error.msg} at column {error.colno})")
    if not isinstance(record, dict):
        _fail(file, key, number, f"a JSON {type(record).__name__}, not an object with \"support\" and \"query\"")
    parts = {}
    for part in ("support", "query"):
        entries = record.get(part)
        if not isinstance(entries, list) or not entries:
            found = "missing" if part not in record else f"{entries!r}"[:80]
            _fail(file, key, number, f'"{part}" is {found}; it must be a non-empty list of [path, label] pairs')
        pairs = []
        for i, entry in enumerate(entries, 1):
            ok = (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str) and entry[0].strip()
                  and isinstance(entry[1], int) and not isinstance(entry[1], bool) and entry[1] >= 0)
            if not ok:
                _fail(file, key, number, f'entry {i} of "{part}" is {json.dumps(entry)[:80]}, not a [path, label] pair '
                      "with a path and an integer label >= 0")
            image = Path(entry[0]).expanduser()
            pairs.append((image if image.is_absolute() else file.parent / image, entry[1]))
        parts[part] = pairs
    labels = {label for _, label in parts["support"]}
    ways = max(labels) + 1
    missing = sorted(set(range(ways)) - labels)
    if missing:
        _fail(file, key, number, f"the support labels are {sorted(labels)}, so label(s) {missing} label no support image; "
              f"the labels of an N-way episode are 0..N-1, each in the support set")
    if ways < 2:
        _fail(file, key, number, "the support set has one class (label 0); an episode needs at least 2 classes")
    stray = sorted({label for _, label in parts["query"]} - labels)
    if stray:
        _fail(file, key, number, f"query label(s) {stray} are not among the support labels 0..{ways - 1}")
    seed = record.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        _fail(file, key, number, f'"seed" is {json.dumps(seed)[:40]}; it must be an integer >= 0 (or be left out)')
    return Episode(number, parts["support"], parts["query"], seed)


# -- episodes as tasks ----------------------------------------------------------------------------
class EpisodeGroup:
    """The episodes of a file that share one shape, as tasks: float `TaskBatch`es are made a slice at a
    time from the shared uint8 images, so a long file costs its distinct images' memory, not its tasks'."""

    def __init__(self, pixels: torch.Tensor, inputs: Callable[[torch.Tensor], torch.Tensor], positions: list[int],
                 support: torch.Tensor, support_y: torch.Tensor, query: torch.Tensor, query_y: torch.Tensor,
                 seeds: torch.Tensor) -> None:
        self.pixels = pixels  # uint8 [images, C, H, W]
        self.inputs = inputs
        #: each task's index among the file's episodes
        self.positions = positions
        self.support, self.support_y, self.query, self.query_y = support, support_y, query, query_y  # [T, S], [T, Q]
        self.seeds = seeds

    @property
    def num_tasks(self) -> int:
        return len(self.positions)

    def slice(self, start: int, stop: int):
        from metalearn_cli.tasks import CLASSIFICATION, TaskBatch

        return TaskBatch(
            self.inputs(self.pixels[self.support[start:stop]]), self.support_y[start:stop].clone(),
            self.inputs(self.pixels[self.query[start:stop]]), self.query_y[start:stop].clone(),
            task_seeds=self.seeds[start:stop].clone(), objective=CLASSIFICATION,
        )


@dataclass
class EpisodeTasks:
    groups: list[EpisodeGroup]
    #: sha256 of the bytes of every distinct image, in the order they are first named
    images_sha256: str
    images: int


def load_episode_tasks(episodes: EpisodeFile, input_shape: tuple[int, int, int],
                       inputs: Callable[[torch.Tensor], torch.Tensor], task_seed: int, key: str = "eval.episodes") -> EpisodeTasks:
    """The episodes as tasks for a model that takes images of `input_shape` (C, H, W): each image decoded
    as the data sources decode theirs (`decode_image`: grey or RGB, resized with Lanczos) and turned into
    inputs by `inputs` (the checkpoint's data source's: /255, inverted where it inverts). Episodes of one
    shape form one group, in file order; the groups come in the order of their first episode."""
    from metalearn_cli.data.cache import decode_image
    from metalearn_cli.samplers import derive_seed

    channels, height, width = (int(v) for v in input_shape)
    index: dict[Path, int] = {}
    pixels: list[np.ndarray] = []
    digest = hashlib.sha256()
    for episode in episodes.episodes:
        for image, _ in episode.support + episode.query:
            if image in index:
                continue
            try:
                data = image.read_bytes()
                pixels.append(decode_image(data, (width, height), channels))
            except Exception as error:  # Pillow raises UnidentifiedImageError, OSError, ValueError, ...
                _fail(episodes.path, key, episode.line, f"the image {str(image)!r} cannot be read as an image ({error})")
            digest.update(data)
            index[image] = len(index)
    table = torch.from_numpy(np.stack(pixels))
    by_shape: dict[tuple[int, int, int], list[int]] = {}
    for position, episode in enumerate(episodes.episodes):
        by_shape.setdefault(episode.shape, []).append(position)
    groups = []
    for positions in by_shape.values():
        chosen = [episodes.episodes[p] for p in positions]
        rows = {part: torch.tensor([[index[image] for image, _ in getattr(e, part)] for e in chosen]) for part in ("support", "query")}
        labels = {part: torch.tensor([[label for _, label in getattr(e, part)] for e in chosen]) for part in ("support", "query")}
        seeds = torch.tensor([e.seed if e.seed is not None else derive_seed(task_seed, _EPISODE_SEEDS, e.line) % 2**62 for e in chosen])
        groups.append(EpisodeGroup(table, inputs, positions, rows["support"], labels["support"], rows["query"], labels["query"], seeds))
    return EpisodeTasks(groups, digest.hexdigest(), len(index))


def describe_shapes(episodes: list[Episode]) -> dict:
    """The record's ways / shots / queries of a file's episodes (null where they differ) and every shape's count."""
    def common(values: list) -> int | None:
        return values[0] if values[0] is not None and all(v == values[0] for v in values) else None

    shapes: dict[str, int] = {}
    for e in episodes:
        name = f"{e.ways}-way, {len(e.support)} support, {len(e.query)} query"
        shapes[name] = shapes.get(name, 0) + 1
    return {
        "ways": common([e.ways for e in episodes]),
        "shots": common([e.per_class("support") for e in episodes]),
        "queries": common([e.per_class("query") for e in episodes]),
        "episode_shapes": shapes,
    }


# -- writing ----------------------------------------------------------------------------------------
def write_png(path: Path, pixels: torch.Tensor | np.ndarray) -> None:
    """uint8 [C, H, W] (C = 1 or 3) -> a PNG file (lossless: reading it back gives the same pixels)."""
    array = np.asarray(pixels, dtype=np.uint8)
    image = Image.fromarray(array[0], "L") if array.shape[0] == 1 else Image.fromarray(array.transpose(1, 2, 0).copy(), "RGB")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")


def _folder_name(name: str) -> str:
    """A class name as a relative folder path: its '/'-separated parts with other characters made safe."""
    parts = [re.sub(r"[^A-Za-z0-9._-]+", "_", p).strip(".") or "_" for p in str(name).split("/")]
    return "/".join(parts)


def write_lines(out: Path, records: list[dict]) -> None:
    """`records` as JSON Lines at `out`, written to a temporary file and renamed (never half a file)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            for record in records:
                handle.write(json.dumps(record, separators=(", ", ": ")) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_episode_file(out: Path, tasks, pixels_of: Callable[[torch.Tensor], torch.Tensor],
                       class_names: list[list[str]] | None = None) -> tuple[int, int]:
    """Write classification `tasks` (a TaskBatch) as an episode file at `out`: the images as PNG files under
    `<out stem>_images/<class>/<hash>.png` beside it, one file per distinct image (`pixels_of` turns the
    tasks' inputs back into the uint8 images they were made of), support then query, in the tasks' order.
    Returns (episodes, image files)."""
    folder = out.parent / f"{out.stem}_images"
    written: dict[bytes, str] = {}
    records = []
    for t in range(tasks.num_tasks):
        names = class_names[t] if class_names is not None else None
        record: dict = {"task": t}
        if tasks.task_seeds is not None:
            record["seed"] = int(tasks.task_seeds[t])
        if names is not None:
            record["classes"] = list(names)
        for part, x, y in (("support", tasks.support_x[t], tasks.support_y[t]), ("query", tasks.query_x[t], tasks.query_y[t])):
            images = pixels_of(x)
            entries = []
            for image, label in zip(images, y.tolist()):
                array = image.contiguous().numpy()
                digest = hashlib.sha256(repr(array.shape).encode() + array.tobytes()).digest()
                if digest not in written:
                    sub = _folder_name(names[label]) if names is not None else "images"
                    relative = f"{folder.name}/{sub}/{digest.hex()[:16]}.png"
                    write_png(out.parent / relative, array)
                    written[digest] = relative
                entries.append([written[digest], int(label)])
            record[part] = entries
        records.append(record)
    write_lines(out, records)
    return len(records), len(written)
