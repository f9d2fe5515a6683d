"""`data=folder data.labeled=false`: a tree of unlabeled images as the meta-training pool, labeled folders
for validation and test. Every test writes small PNG trees under tmp_path and builds `ImageFolder` directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import metalearn_cli.data.folder as folder_module
from metalearn_cli.data.folder import UNLABELED, ImageFolder
from metalearn_cli.errors import MetalearnError

SIZE = 8


def write_png(path, value: int) -> None:
    """A 10x12 RGB image filled with `value`, so its decoded pixels say which file it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 10, 3), value, dtype=np.uint8), "RGB").save(path)


def make_labeled(root, classes: int = 3, images: int = 3, first: int = 100) -> dict[str, list[int]]:
    """root/<class>/<image>.png; returns each class's fill values in file order."""
    values: dict[str, list[int]] = {}
    for c in range(classes):
        name = f"{root.name}_c{c}"
        values[name] = [first + 10 * c + i for i in range(images)]
        for i, value in enumerate(values[name]):
            write_png(root / name / f"img{i}.png", value)
    return values


def fills(pixels: torch.Tensor) -> list[int]:
    """The fill value of each uint8 [N, C, H, W] image (each image is one value throughout)."""
    assert all(int(image.min()) == int(image.max()) for image in pixels)
    return [int(image[0, 0, 0]) for image in pixels]


def build(root, tmp_path, **kwargs) -> ImageFolder:
    return ImageFolder(root, **{"image_size": SIZE, "cache_dir": tmp_path / "cache", "labeled": False, **kwargs})


def test_flat_folder_is_one_pool_in_path_order(tmp_path):
    root, test_root = tmp_path / "scans", tmp_path / "labeled"
    for name, value in [("b.png", 2), ("a.png", 1), ("c10.png", 4), ("c2.png", 3)]:
        write_png(root / name, value)
    write_png(root / ".hidden.png", 99)
    (root / "notes.txt").write_text("not an image")
    make_labeled(test_root)
    source = build(root, tmp_path, test_root=str(test_root))
    train = source.splits["train"]
    assert train.names == [UNLABELED] and train.counts.tolist() == [4]
    assert fills(train.pixels) == [1, 2, 4, 3]  # a.png, b.png, c10.png, c2.png
    assert source.labeled is False and source.input_shape == (3, SIZE, SIZE)
    assert source.name == "folder:scans+test:labeled"


def test_nested_tree_ignores_folder_names_and_hidden_entries(tmp_path, monkeypatch):
    root, test_root = tmp_path / "unlabeled", tmp_path / "labeled"
    layout = {
        "z.png": 1,
        "batch_2/x.png": 2,
        "batch_10/deep/er/y.png": 3,
        "batch_10/a.png": 4,
        "misc/q/r.png": 5,
    }
    for relative, value in layout.items():
        write_png(root / relative, value)
    write_png(root / ".trash" / "old.png", 98)  # hidden folder: not entered
    write_png(root / "misc" / ".thumb.png", 97)  # hidden file
    (root / "empty_dir").mkdir()
    make_labeled(test_root)
    source = build(root, tmp_path, test_root=str(test_root))
    train = source.splits["train"]
    in_order = sorted(layout, key=lambda p: tuple(p.split("/")))
    assert train.names == [UNLABELED] and train.counts.tolist() == [len(layout)]
    assert fills(train.pixels) == [layout[p] for p in in_order]

    # the pool is cached by its files: a second build decodes nothing
    def refuse(*args, **kwargs):
        raise AssertionError("decoded an image although the cache should have been used")

    monkeypatch.setattr(folder_module, "decode_image", refuse)
    again = build(root, tmp_path, test_root=str(test_root))
    assert torch.equal(again.splits["train"].pixels, train.pixels)


def test_test_and_val_splits_come_from_their_labeled_folders(tmp_path):
    root = tmp_path / "pool"
    for i in range(6):
        write_png(root / f"{i}.png", i)
    test_values = make_labeled(tmp_path / "test", classes=3, images=3, first=100)
    val_values = make_labeled(tmp_path / "val", classes=2, images=4, first=200)

    without_val = build(root, tmp_path, test_root=str(tmp_path / "test"))
    test = without_val.splits["test"]
    assert test.names == sorted(test_values) and test.counts.tolist() == [3, 3, 3]
    assert fills(test.pixels) == [v for name in sorted(test_values) for v in test_values[name]]
    assert without_val.splits["val"].names == test.names  # validation falls back to the test classes
    assert without_val.validation_held_out is False

    with_val = build(root, tmp_path, test_root=str(tmp_path / "test"), val_root=str(tmp_path / "val"), channels=1)
    val = with_val.splits["val"]
    assert val.names == sorted(val_values) and val.counts.tolist() == [4, 4]
    assert with_val.splits["test"].names == sorted(test_values)
    assert with_val.validation_held_out is True
    assert with_val.name == "folder:pool+test:test+val:val"
    assert all(with_val.splits[s].pixels.shape[1:] == (1, SIZE, SIZE) for s in ("train", "val", "test"))

    # val and test tasks are ordinary labeled tasks of their classes
    with_val.check_task_shape({"val": 2, "test": 3}, {"val": 1, "test": 2}, 1)
    batch = with_val.sample("test", torch.Generator().manual_seed(0), 2, 3, 2, 1)
    assert batch.support_x.shape == (2, 6, 1, SIZE, SIZE)
    assert torch.equal(torch.bincount(batch.query_y[0], minlength=3), torch.ones(3, dtype=torch.long))
    with pytest.raises(MetalearnError, match="sampler.ways"):
        with_val.check_task_shape({"val": 3, "test": 3}, {"val": 1, "test": 1}, 1)

    labeled = ImageFolder(tmp_path / "test", image_size=SIZE, cache_dir=tmp_path / "cache", fractions=[0.34, 0.33, 0.33])
    assert labeled.labeled is True and labeled.name == "folder" and labeled.validation_held_out is True


@pytest.mark.parametrize(
    "case, key, words",
    [
        ("no_test_root", "data.test_root", "labeled source"),
        ("test_root_when_labeled", "data.test_root", "data.labeled=false"),
        ("val_root_when_labeled", "data.val_root", "data.labeled=false"),
        ("empty_root", "data.root", "no images"),
        ("missing_root", "data.root", "does not exist"),
        ("flat_test_root", "data.test_root", "images directly"),
        ("missing_test_root", "data.test_root", "does not exist"),
        ("val_is_test", "data.val_root", "test classes"),
        ("test_inside_root", "data.test_root", "also meta-training images"),
        ("splits", "data.splits", "labeled folders"),
        ("fractions", "data.fractions", "labeled folders"),
        ("split_seed", "data.split_seed", "labeled folders"),
        ("train_on", "data.train_on", "labeled folders"),
        ("labeled_not_bool", "data.labeled", "Allowed"),
    ],
)
def test_errors_name_the_key(tmp_path, case, key, words):
    root, test_root = tmp_path / "pool", tmp_path / "test"
    for i in range(3):
        write_png(root / "x" / f"{i}.png", i)
    make_labeled(test_root, classes=2, images=2)
    kwargs: dict = {"test_root": str(test_root)}
    if case == "no_test_root":
        kwargs = {}
    elif case in ("test_root_when_labeled", "val_root_when_labeled"):
        kwargs = {"labeled": True, case.split("_when")[0]: str(test_root)}
        make_labeled(root, classes=3, images=2)
    elif case == "empty_root":
        root = tmp_path / "empty"
        (root / "sub").mkdir(parents=True)
        (root / "readme.txt").write_text("no images here")
        write_png(root / ".hidden" / "a.png", 1)
    elif case == "missing_root":
        root = tmp_path / "nowhere"
    elif case == "flat_test_root":
        flat = tmp_path / "flat"
        for i in range(3):
            write_png(flat / f"{i}.png", i)
        kwargs["test_root"] = str(flat)
    elif case == "missing_test_root":
        kwargs["test_root"] = str(tmp_path / "nowhere")
    elif case == "val_is_test":
        kwargs["val_root"] = str(test_root)
    elif case == "test_inside_root":
        make_labeled(root / "labeled", classes=2, images=2)
        kwargs["test_root"] = str(root / "labeled")
    elif case == "splits":
        kwargs["splits"] = {"train": ["a"], "val": ["b"], "test": ["c"]}
    elif case == "fractions":
        kwargs["fractions"] = [0.5, 0.25, 0.25]
    elif case == "split_seed":
        kwargs["split_seed"] = 3
    elif case == "train_on":
        kwargs["train_on"] = "trainval"
    elif case == "labeled_not_bool":
        kwargs["labeled"] = "no"
    with pytest.raises(MetalearnError) as error:
        build(root, tmp_path, **kwargs)
    message = str(error.value)
    assert f"`{key}`" in message and words in message
    if case == "no_test_root":
        assert "data.test_root=~/labeled_scans" in message  # an example to copy


def test_default_split_keys_are_accepted(tmp_path):
    """The config's own defaults for the labeled-only keys are not taken as set."""
    root = tmp_path / "pool"
    write_png(root / "a.png", 1)
    make_labeled(tmp_path / "test", classes=2, images=2)
    source = build(root, tmp_path, test_root=str(tmp_path / "test"), splits=None, fractions=[0.64, 0.16, 0.2],
                   split_seed=0, train_on="train")
    assert source.splits["train"].counts.tolist() == [1]
