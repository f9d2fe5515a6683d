"""Omniglot on the real archives in ../shared/datasets/omniglot (read-only): layout, splits, cache."""

import shutil
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import OMNIGLOT
from metalearn_cli.data import cache as cache_module
from metalearn_cli.data.omniglot import Omniglot, maml_split, vinyals_split_of
from metalearn_cli.errors import MetalearnError

pytestmark = pytest.mark.skipif(not (OMNIGLOT / "omniglot-py").exists(), reason="no Omniglot copy at ../shared")


@pytest.fixture(scope="session")
def omniglot(omniglot_cache):
    return Omniglot(str(OMNIGLOT), cache_dir=str(omniglot_cache))


def test_vinyals_split_matches_the_split_files(omniglot):
    counts = {s: omniglot.num_classes(s) for s in ("train", "val", "test")}
    assert counts == {"train": 4112, "val": 688, "test": 1692}
    for split in ("train", "val", "test"):
        expected = (OMNIGLOT / "splits" / "vinyals" / f"{split}.txt").read_text().split()
        assert sorted(omniglot.splits[split].class_names) == sorted(expected)
    assert vinyals_split_of("Gurmukhi/character41") == "train" and vinyals_split_of("Gurmukhi/character42") == "test"


def test_trainval_trains_on_the_1200_characters_of_vinyals_et_al(omniglot_cache):
    """data.train_on=trainval: the split file trainval.txt (4800 classes); val and test unchanged."""
    trainval = Omniglot(str(OMNIGLOT), train_on="trainval", cache_dir=str(omniglot_cache))
    expected = (OMNIGLOT / "splits" / "vinyals" / "trainval.txt").read_text().split()
    assert sorted(trainval.splits["train"].class_names) == sorted(expected) and len(expected) == 4800
    assert sorted(trainval.splits["val"].class_names) == sorted((OMNIGLOT / "splits/vinyals/val.txt").read_text().split())
    assert not set(trainval.splits["train"].names) & set(trainval.splits["test"].names)
    assert (trainval.train_on, trainval.validation_held_out) == ("trainval", False)
    batch = trainval.sample("train", torch.Generator().manual_seed(0), 400, 5, 1, 1)
    assert (batch.classes >= 4112).any()  # the validation characters are drawn in training


def test_images_are_28px_strokes_on_zero_background(omniglot):
    classes = omniglot.splits["train"]
    assert classes.pixels.shape == (1028 * 20, 1, 28, 28)
    assert classes.pixels.dtype == torch.uint8 and classes.pixels.shape[-2:] == (28, 28)
    batch = omniglot.sample("train", torch.Generator().manual_seed(0), 4, 5, 1, 3)
    assert batch.support_x.shape == (4, 5, 1, 28, 28) and batch.query_x.shape == (4, 15, 1, 28, 28)
    assert 0.0 <= batch.support_x.min() and batch.support_x.max() <= 1.0
    assert batch.support_x.mean() < 0.3  # inverted: background 0, strokes 1 (as MAML)
    assert batch.support_y.tolist() == [[0, 1, 2, 3, 4]] * 4
    assert batch.query_y[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]


def test_rotated_classes_are_rotated_images(omniglot):
    classes = omniglot.splits["test"]
    rotated = classes.rotated()
    assert torch.equal(rotated[1, 0], torch.rot90(classes.pixels[0], 1, dims=(-2, -1)))
    assert classes.class_names[:2] == [f"{classes.names[0]}/rot000", f"{classes.names[0]}/rot090"]


def test_maml_split_is_seeded_and_disjoint(omniglot_cache):
    maml = Omniglot(str(OMNIGLOT), split="maml", cache_dir=str(omniglot_cache))
    sizes = {s: maml.num_classes(s) for s in ("train", "val", "test")}
    assert sizes == {"train": 1100, "val": 100, "test": 423}
    names = [set(maml.splits[s].names) for s in ("train", "val", "test")]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    assert maml_split(sorted(names[0] | names[1] | names[2]))["test"] == maml.splits["test"].names


def test_the_cache_is_used_and_the_root_is_never_written(omniglot, omniglot_cache, monkeypatch):
    before = sorted(p.name for p in OMNIGLOT.rglob("*"))
    monkeypatch.setattr(cache_module.Image, "open", lambda *a, **k: pytest.fail("re-decoded despite the cache"))
    again = Omniglot(str(OMNIGLOT), cache_dir=str(omniglot_cache))
    assert torch.equal(again.splits["val"].pixels, omniglot.splits["val"].pixels)
    assert sorted(p.name for p in OMNIGLOT.rglob("*")) == before
    assert len(list(Path(omniglot_cache).glob("omniglot-28px-*.pt"))) == 1


def test_extracted_folders_give_the_same_images(tmp_path, omniglot):
    root = tmp_path / "data" / "omniglot-py"
    root.mkdir(parents=True)
    with zipfile.ZipFile(OMNIGLOT / "omniglot-py" / "images_evaluation.zip") as archive:
        archive.extractall(root)
    shutil.copy(OMNIGLOT / "omniglot-py" / "images_background.zip", root)
    extracted = Omniglot(str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"))
    assert torch.equal(extracted.splits["test"].pixels, omniglot.splits["test"].pixels)


def test_missing_or_malformed_data_is_reported(tmp_path):
    with pytest.raises(MetalearnError, match="data.root"):
        Omniglot(str(tmp_path / "nowhere"), cache_dir=str(tmp_path / "cache"))
    bad = tmp_path / "bad" / "omniglot-py"
    bad.mkdir(parents=True)
    for part in ("background", "evaluation"):
        with zipfile.ZipFile(bad / f"images_{part}.zip", "w") as archive:
            archive.writestr(f"images_{part}/Alpha/character01/0001_01.png", b"")
    with pytest.raises(MetalearnError, match="does not look like Omniglot"):
        Omniglot(str(tmp_path / "bad"), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(MetalearnError, match="`split`: 'lake'"):  # build.py adds the group: `data.split`
        Omniglot(str(tmp_path), split="lake")
