"""`metalearn episodes omniglot-within-alphabet root=... out=FILE`: Omniglot episodes in the protocol of
Lake et al. (2015, "Human-level concept learning through probabilistic program induction"): N-way
one-shot classification whose N characters all come from one alphabet of the evaluation set, harder
than episodes that mix alphabets.

Each episode draws one of the 20 evaluation alphabets (among those with at least `ways` characters),
`ways` of its characters in random order (the order is the label), and `shots + queries` of the 20
drawers who drew that alphabet: the first `shots` drew every support image, the others every query
image, so support and query images of a character are always by different people, as in Lake et
al.'s 20 runs (20-way, 1 shot, 1 query per class: one of their runs is one episode here). The images
used are copied, as they are (105 x 105 PNG), to `<out stem>_images/<alphabet>/<character>/` beside
the episode file; scoring a checkpoint on the file resizes them as its own training data was.

The episodes are a function of `seed` alone. Keys: root (the folder that holds omniglot-py/, as
`data.root`), out, ways (20), shots (1), queries (1), num (400, Lake et al.'s 20 runs x 20 trials
are 20 one-query episodes; more episodes narrow the confidence interval), seed (0), part
(evaluation, or background).
"""

from __future__ import annotations

import random
import re
import sys
import zipfile
from pathlib import Path

from metalearn_cli.errors import MetalearnError, exits_cleanly

DEFAULTS = {"root": None, "out": None, "ways": 20, "shots": 1, "queries": 1, "num": 400, "seed": 0, "part": "evaluation"}
INTEGERS = {"ways": 2, "shots": 1, "queries": 1, "num": 1, "seed": 0}  # each key's least value
DRAWERS = 20
USAGE = ("usage: metalearn episodes omniglot-within-alphabet root=<folder holding omniglot-py/> out=<file.jsonl> "
         "[ways=20] [shots=1] [queries=1] [num=400] [seed=0] [part=evaluation]")


def parse(args: list[str]) -> dict:
    settings = dict(DEFAULTS)
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in DEFAULTS:
            raise MetalearnError(f"`{arg}` is not a setting of omniglot-within-alphabet. Allowed keys: "
                                 f"{', '.join(DEFAULTS)}, each as key=value. {USAGE}")
        if key in INTEGERS:
            try:
                number = int(value)
            except ValueError:
                number = None
            if number is None or number < INTEGERS[key]:
                raise MetalearnError(f"invalid value for `{key}`: {value!r}. Allowed: an integer >= {INTEGERS[key]}.")
            settings[key] = number
        else:
            settings[key] = value
    for key in ("root", "out"):
        if not settings[key]:
            raise MetalearnError(f"`{key}` is missing. {USAGE}")
    if settings["part"] not in ("evaluation", "background"):
        raise MetalearnError(f"invalid value for `part`: {settings['part']!r}. Allowed: evaluation (Lake et al.'s "
                             "test alphabets), background.")
    if settings["shots"] + settings["queries"] > DRAWERS:
        raise MetalearnError(f"`shots` + `queries` = {settings['shots']} + {settings['queries']}, but each character has "
                             f"{DRAWERS} drawings. Allowed: shots + queries <= {DRAWERS}.")
    return settings


def drawings(root: Path, part: str) -> tuple[dict[str, dict[str, dict[int, str]]], zipfile.ZipFile | None, Path]:
    """{alphabet: {character: {drawer: entry}}} of Omniglot's images_<part>, with the archive to read them
    from (None: `entry` is a path under the returned folder)."""
    base = root / "omniglot-py" if (root / "omniglot-py").exists() else root
    folder, archive = base / f"images_{part}", base / f"images_{part}.zip"
    if folder.is_dir():
        reader, entries = None, [str(p.relative_to(folder)) for p in sorted(folder.glob("*/*/*.png"))]
    elif archive.is_file():
        reader = zipfile.ZipFile(archive)
        entries = [n for n in reader.namelist() if n.lower().endswith(".png")]
    else:
        raise MetalearnError(f"Omniglot not found under `root` = {str(root)!r}: expected omniglot-py/images_{part}.zip "
                             f"(or the extracted folder images_{part}/). Point root at the folder that holds omniglot-py/ "
                             "(the `data.root` of data=omniglot).")
    found: dict[str, dict[str, dict[int, str]]] = {}
    for entry in entries:
        alphabet, character, name = entry.split("/")[-3:]
        drawer = re.search(r"_(\d+)\.png$", name, flags=re.IGNORECASE)
        if drawer:
            found.setdefault(alphabet, {}).setdefault(character, {})[int(drawer.group(1))] = entry
    if not found:
        raise MetalearnError(f"{archive if reader else folder} holds no Omniglot drawings (<alphabet>/<character>/NNNN_DD.png).")
    return found, reader, folder


def make_episodes(settings: dict) -> tuple[int, int]:
    from metalearn_cli.episodes import write_lines

    out = Path(str(settings["out"])).expanduser().absolute()
    if out.exists():
        raise MetalearnError(f"`out` = {settings['out']!r} already exists; an episode file is never overwritten. "
                             "Name a new file, or delete that one (and its _images folder) first.")
    found, reader, folder = drawings(Path(str(settings["root"])).expanduser(), settings["part"])
    ways, shots, queries = settings["ways"], settings["shots"], settings["queries"]
    # an alphabet qualifies if `ways` of its characters were each drawn by the same shots + queries drawers
    alphabets = sorted(a for a, chars in found.items() if len(chars) >= ways)
    if not alphabets:
        largest = max(len(chars) for chars in found.values())
        raise MetalearnError(f"invalid value for `ways`: {ways}. The {settings['part']} alphabets have at most {largest} "
                             f"characters. Allowed: at most {largest}.")
    rng = random.Random(settings["seed"])
    images = out.parent / f"{out.stem}_images"
    written: set[str] = set()
    records = []
    for index in range(settings["num"]):
        alphabet = rng.choice(alphabets)
        characters = rng.sample(sorted(found[alphabet]), ways)
        common = sorted(set.intersection(*(set(found[alphabet][c]) for c in characters)))
        if len(common) < shots + queries:
            raise MetalearnError(f"the characters drawn from {alphabet} share only {len(common)} drawers; "
                                 f"shots + queries = {shots + queries} need as many. Lower shots or queries.")
        drawers = rng.sample(common, shots + queries)
        record = {"task": index, "alphabet": alphabet, "classes": [f"{alphabet}/{c}" for c in characters],
                  "drawers": {"support": drawers[:shots], "query": drawers[shots:]}, "support": [], "query": []}
        for part, chosen in (("support", drawers[:shots]), ("query", drawers[shots:])):
            for label, character in enumerate(characters):
                for drawer in chosen:
                    entry = found[alphabet][character][drawer]
                    relative = f"{images.name}/{alphabet}/{character}/{Path(entry).name}"
                    if relative not in written:
                        target = out.parent / relative
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(reader.read(entry) if reader else (folder / entry).read_bytes())
                        written.add(relative)
                    record[part].append([relative, label])
        records.append(record)
    if reader:
        reader.close()
    write_lines(out, records)
    return len(records), len(written)


@exits_cleanly
def run(args: list[str]) -> None:
    if any(a in ("-h", "--help", "help") for a in args):
        print(__doc__)
        print(USAGE)
        return
    settings = parse(args)
    count, images = make_episodes(settings)
    out = Path(str(settings["out"])).expanduser().absolute()
    print(f"wrote {count} {settings['ways']}-way {settings['shots']}-shot within-alphabet episodes ({settings['queries']} "
          f"queries per class, seed {settings['seed']}) of Omniglot's {settings['part']} alphabets to {out}, with {images} "
          f"images in {out.parent / (out.stem + '_images')}. Score a checkpoint on them: metalearn eval ckpt=... eval.episodes={out}")


def main() -> None:
    run(sys.argv[1:])


if __name__ == "__main__":
    main()
