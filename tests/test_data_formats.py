"""Omniglot's official background/evaluation split (on the real archives), and `data=folder` reading the
image formats and modes Pillow reads (tiny files written here in their real on-disk formats)."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest
import torch
from PIL import Image, features

from conftest import FAST, OMNIGLOT, assert_clean_error
from metalearn_cli.data.cache import OutOfRange, decode_image
from metalearn_cli.data.folder import ImageFolder, image_files, is_image
from metalearn_cli.data.omniglot import Omniglot
from metalearn_cli.errors import MetalearnError
from metalearn_cli.options import OptionError

needs_omniglot = pytest.mark.skipif(not (OMNIGLOT / "omniglot-py").exists(), reason="no Omniglot copy at ../shared")
SPLITS = ("train", "val", "test")


# -- Omniglot: data.split=background -----------------------------------------------------------
def archive_characters(part: str) -> set[str]:
    """'Alphabet/characterNN' of every character in the official archive, read from its file list."""
    with zipfile.ZipFile(OMNIGLOT / "omniglot-py" / f"images_{part}.zip") as archive:
        return {"/".join(n.split("/")[-3:-1]) for n in archive.namelist() if n.endswith(".png")}


@pytest.fixture(scope="module")
def background(omniglot_cache):
    return Omniglot(str(OMNIGLOT), split="background", cache_dir=str(omniglot_cache))


def counts(source) -> dict[str, int]:
    return {s: source.num_classes(s) for s in SPLITS}


@needs_omniglot
def test_background_split_is_lakes_background_and_evaluation_alphabets(background, omniglot_cache):
    assert counts(background) == {"train": 864, "val": 100, "test": 659}
    train, val, test = (set(background.splits[s].names) for s in SPLITS)
    assert len(train) == 864 and len(val) == 100 and not train & val and not (train | val) & test
    assert train | val == archive_characters("background")
    assert test == archive_characters("evaluation")
    assert len({c.split("/")[0] for c in test}) == 20 and len({c.split("/")[0] for c in train | val}) == 30
    assert background.splits["train"].rotations == 1 and not background.augment_rotations  # Lake: no rotations
    batch = background.sample("test", torch.Generator().manual_seed(0), 2, 5, 1, 1)
    assert batch.support_x.shape == (2, 5, 1, 28, 28) and int(batch.classes.max()) < 659

    rotated = Omniglot(str(OMNIGLOT), split="background", rotations=True, cache_dir=str(omniglot_cache))
    assert counts(rotated) == {"train": 3456, "val": 400, "test": 2636}
    assert {s: rotated.splits[s].names for s in SPLITS} == {s: background.splits[s].names for s in SPLITS}
    assert rotated.splits["val"].class_names[:2] == [f"{rotated.splits['val'].names[0]}/rot000",
                                                     f"{rotated.splits['val'].names[0]}/rot090"]
    assert not rotated.augment_rotations


@needs_omniglot
def test_background_validation_characters_are_drawn_by_seed(background, omniglot_cache):
    same = Omniglot(str(OMNIGLOT), split="background", split_seed=0, cache_dir=str(omniglot_cache))
    assert same.splits["val"].names == background.splits["val"].names
    assert torch.equal(same.splits["val"].pixels, background.splits["val"].pixels)
    other = Omniglot(str(OMNIGLOT), split="background", split_seed=1, val_characters=50, cache_dir=str(omniglot_cache))
    assert counts(other) == {"train": 914, "val": 50, "test": 659}
    assert set(other.splits["val"].names) != set(background.splits["val"].names[:50])
    assert not set(other.splits["val"].names) & set(other.splits["train"].names)
    assert other.splits["test"].names == background.splits["test"].names
    both = Omniglot(str(OMNIGLOT), split="background", train_on="trainval", cache_dir=str(omniglot_cache))
    assert sorted(both.splits["train"].names) == sorted(archive_characters("background"))


@needs_omniglot
def test_rotations_false_turns_nothing(omniglot_cache):
    vinyals = Omniglot(str(OMNIGLOT), rotations=False, cache_dir=str(omniglot_cache))
    assert counts(vinyals) == {"train": 1028, "val": 172, "test": 423} and not vinyals.augment_rotations
    maml = Omniglot(str(OMNIGLOT), split="maml", rotations=False, cache_dir=str(omniglot_cache))
    assert counts(maml) == {"train": 1100, "val": 100, "test": 423} and not maml.augment_rotations
    # every drawn image is one of its class's stored images as it is, never a turned one
    classes = maml.splits["train"]
    batch = maml.sample("train", torch.Generator().manual_seed(0), 8, 5, 1, 0)
    for image, c in zip(batch.support_x.flatten(0, 1), batch.classes.flatten().tolist()):
        stored = 1.0 - classes.pixels[classes.offsets[c]:classes.offsets[c] + classes.counts[c]].float() / 255.0
        assert bool((stored == image).flatten(1).all(1).any())
    assert Omniglot(str(OMNIGLOT), split="maml", cache_dir=str(omniglot_cache)).augment_rotations  # the default


@needs_omniglot
def test_a_cache_written_before_parts_were_stored_still_gives_the_split(background, omniglot_cache, tmp_path):
    [path] = omniglot_cache.glob("omniglot-28px-*.pt")
    old = torch.load(path, weights_only=True)
    del old["parts"]
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / path.name)
    again = Omniglot(str(OMNIGLOT), split="background", cache_dir=str(tmp_path / "old"))
    assert {s: again.splits[s].names for s in SPLITS} == {s: background.splits[s].names for s in SPLITS}
    assert len(list((tmp_path / "old").glob("*.pt"))) == 1  # read, not decoded again


@pytest.mark.parametrize(
    "kwargs, needles",
    [
        ({"split": "lake"}, ["`split`", "'lake'", "vinyals, maml, background"]),
        ({"rotations": "yes"}, ["`rotations`", "'yes'", "true, false"]),
        ({"split": "background", "val_characters": 0}, ["`val_characters`", "integer >= 1"]),
        ({"split": "background", "val_characters": 964}, ["`val_characters`", "964", "1 to 963"]),
        ({"split": "background", "split_seed": -1}, ["`split_seed`", "-1"]),
        ({"val_characters": 50}, ["`val_characters`", "split=background", "vinyals"]),
        ({"split": "maml", "split_seed": 3}, ["`split_seed`", "split=background", "maml"]),
    ],
)
def test_bad_omniglot_settings_name_the_key(tmp_path, kwargs, needles):
    with pytest.raises(OptionError) as error:  # before any file is read
        Omniglot(str(tmp_path / "nowhere"), **kwargs)
    message = str(error.value.under("data"))  # as build.py reports it
    for needle in needles:
        needle = needle.replace("`", "`data.", 1) if needle.startswith("`") else needle
        assert needle in message, message


# -- data=folder: decoding ---------------------------------------------------------------------
def decode(path, channels: int = 1, **kwargs) -> np.ndarray:
    """The uint8 [C, H, W] the cache stores for `path`, at the image's own size (no resampling)."""
    with Image.open(path) as image:
        size = image.size
    return decode_image(path, size, channels, **kwargs)


def write_pgm(path, array: np.ndarray, maxval: int) -> None:
    """Binary PGM (P5): big-endian 16-bit samples when maxval > 255."""
    dtype = ">u2" if maxval > 255 else np.uint8
    path.write_bytes(f"P5\n{array.shape[1]} {array.shape[0]}\n{maxval}\n".encode() + array.astype(dtype).tobytes())


#: a 16-bit ramp over the full range: 0, 65535, the midpoint, and values whose low byte is 0 or 255
RAMP16 = np.array([[0, 65535, 32768, 512], [257, 255, 65280, 1000], [30000, 128, 129, 60000]], dtype=np.uint16)


def test_sixteen_bit_greyscale_is_scaled_by_257_in_every_format(tmp_path):
    expected = np.rint(RAMP16 / 257.0).astype(np.uint8)
    assert expected.tolist()[0] == [0, 255, 128, 2] and expected.max() == 255 and (expected < 255).sum() == 11
    Image.fromarray(RAMP16).save(tmp_path / "ramp.png")
    Image.fromarray(RAMP16).save(tmp_path / "ramp.tif")
    write_pgm(tmp_path / "ramp.pgm", RAMP16, 65535)
    Image.fromarray(RAMP16.astype(np.int32)).save(tmp_path / "ramp32.tif")  # mode I, within 16 bits
    for name in ("ramp.png", "ramp.tif", "ramp.pgm", "ramp32.tif"):
        assert np.array_equal(decode(tmp_path / name)[0], expected), name
    rgb = decode(tmp_path / "ramp.tif", channels=3)
    assert rgb.shape == (3, 3, 4) and all(np.array_equal(c, expected) for c in rgb)

    # 12-bit data: maxval 4095 in a PGM is stretched by Pillow; in a 16-bit TIFF it needs data.max_value
    twelve = np.array([[0, 4095, 2048, 100]], dtype=np.uint16)
    write_pgm(tmp_path / "twelve.pgm", twelve, 4095)
    Image.fromarray(twelve).save(tmp_path / "twelve.tif")
    assert decode(tmp_path / "twelve.pgm")[0].tolist() == [[0, 255, 128, 6]]
    assert decode(tmp_path / "twelve.tif")[0].tolist() == [[0, 16, 8, 0]]
    assert decode(tmp_path / "twelve.tif", max_value=4095)[0].tolist() == [[0, 255, 128, 6]]


def test_wide_values_outside_their_range_are_refused_unless_max_value_says(tmp_path):
    big = np.array([[0, 35000, 140000]], dtype=np.int32)
    Image.fromarray(big).save(tmp_path / "big.tif")
    with pytest.raises(OutOfRange, match="from 0 to 140000.*data.max_value"):
        decode(tmp_path / "big.tif")
    assert decode(tmp_path / "big.tif", max_value=140000)[0].tolist() == [[0, 64, 255]]
    floats = np.array([[0.0, 0.2, 1.0, 0.25]], dtype=np.float32)
    Image.fromarray(floats).save(tmp_path / "float.tif")
    assert decode(tmp_path / "float.tif")[0].tolist() == [[0, 51, 255, 64]]
    Image.fromarray(floats * 3).save(tmp_path / "float3.tif")
    with pytest.raises(OutOfRange, match=r"0\.\.1"):
        decode(tmp_path / "float3.tif")
    assert decode(tmp_path / "float3.tif", max_value=3.0)[0].tolist() == [[0, 51, 255, 64]]
    assert decode(tmp_path / "float3.tif", max_value=1.5)[0, 0, :3].tolist() == [0, 102, 255]  # 3.0 clipped


def test_eight_bit_formats_read_the_same_pixels(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
    grey = rng.integers(0, 256, (5, 6), dtype=np.uint8)
    reference_rgb, reference_grey = rgb.transpose(2, 0, 1), grey[None]
    for suffix in (".png", ".bmp", ".ppm", ".tif", ".tga"):
        Image.fromarray(rgb).save(tmp_path / f"rgb{suffix}")
        assert np.array_equal(decode(tmp_path / f"rgb{suffix}", channels=3), reference_rgb), suffix
    for suffix in (".png", ".bmp", ".pgm", ".tif"):
        Image.fromarray(grey).save(tmp_path / f"grey{suffix}")
        assert np.array_equal(decode(tmp_path / f"grey{suffix}"), reference_grey), suffix
        assert np.array_equal(decode(tmp_path / f"grey{suffix}", channels=3), np.repeat(reference_grey, 3, 0)), suffix
    if features.check("webp"):
        Image.fromarray(rgb).save(tmp_path / "rgb.webp", lossless=True)
        assert np.array_equal(decode(tmp_path / "rgb.webp", channels=3), reference_rgb)
    luma = np.asarray(Image.fromarray(rgb).convert("L"))[None]  # ITU-R 601-2, as Pillow's L
    assert np.array_equal(decode(tmp_path / "rgb.png", channels=1), luma)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    cmyk.save(tmp_path / "cmyk.tif")
    assert np.array_equal(decode(tmp_path / "cmyk.tif", channels=3), np.asarray(cmyk.convert("RGB")).transpose(2, 0, 1))


def test_bilevel_palette_alpha_and_multiframe_images(tmp_path):
    bits = np.array([[True, False, True], [False, False, True]])
    Image.fromarray(bits).save(tmp_path / "bits.png")
    Image.fromarray(bits).save(tmp_path / "bits.pbm")
    for name in ("bits.png", "bits.pbm"):
        assert decode(tmp_path / name)[0].tolist() == [[255, 0, 255], [0, 0, 255]], name

    palette = Image.new("P", (3, 1))
    palette.putdata([0, 1, 2])
    palette.putpalette([10, 20, 30, 200, 100, 50, 255, 255, 255] + [0] * 759)
    palette.save(tmp_path / "palette.png", transparency=2)  # entry 2 (white) transparent
    palette.save(tmp_path / "palette.gif", transparency=2)
    for name in ("palette.png", "palette.gif"):
        assert decode(tmp_path / name, channels=3)[:, 0].T.tolist() == [[10, 20, 30], [200, 100, 50], [0, 0, 0]], name

    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 128], [255, 255, 255, 0]]], dtype=np.uint8)
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    Image.fromarray(rgba).save(tmp_path / "alpha.tif")
    for name in ("alpha.png", "alpha.tif"):
        assert decode(tmp_path / name, channels=3)[:, 0].T.tolist() == [[200, 100, 50], [100, 50, 25], [0, 0, 0]], name
    Image.fromarray(rgba[..., [0, 3]]).save(tmp_path / "grey_alpha.png")
    assert decode(tmp_path / "grey_alpha.png")[0].tolist() == [[200, 100, 0]]

    pages = [Image.fromarray(np.full((4, 4), v, dtype=np.uint16)) for v in (65535, 0, 257)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    with Image.open(tmp_path / "stack.tif") as stack:
        assert stack.n_frames == 3
    assert (decode(tmp_path / "stack.tif") == 255).all()  # the first page


# -- data=folder: which files, errors, a mixed folder ------------------------------------------
def test_files_are_recognised_by_pillow_not_by_a_list_of_suffixes(tmp_path):
    Image.fromarray(RAMP16).save(tmp_path / "scan.tiff")
    Image.fromarray(RAMP16).save(tmp_path / "no_suffix", format="PNG")
    Image.fromarray(RAMP16).save(tmp_path / "odd.suffix", format="TIFF")
    write_pgm(tmp_path / "plain.PGM", RAMP16, 65535)
    (tmp_path / "notes.txt").write_text("P5 looks like a PGM header")
    (tmp_path / "labels.csv").write_text("a,b\n")
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01 not an image")
    (tmp_path / ".thumb.png").write_bytes(b"hidden")
    assert [p.name for p in image_files(tmp_path)] == ["no_suffix", "odd.suffix", "plain.PGM", "scan.tiff"]
    assert not is_image(tmp_path / "notes.txt") and not is_image(tmp_path / "blob.bin")
    (tmp_path / "broken.tif").write_bytes(b"II*\x00 truncated")
    assert is_image(tmp_path / "broken.tif")  # an image suffix: it must decode, never skipped silently


def make_mixed_folder(root):
    """One class per format (3 images of 8x8 each); class `tiff16` holds 16-bit values 257 * (10 i + 1)."""
    rgb = lambda i: np.full((8, 8, 3), (40 * i, 100, 200), dtype=np.uint8)  # noqa: E731
    writers = {
        "png": lambda p, i: Image.fromarray(rgb(i)).save(p / f"{i}.png"),
        "jpeg": lambda p, i: Image.fromarray(rgb(i)).save(p / f"{i}.JPG", quality=95),
        "bmp": lambda p, i: Image.fromarray(rgb(i)).save(p / f"{i}.bmp"),
        "ppm": lambda p, i: Image.fromarray(rgb(i)).save(p / f"{i}.ppm"),
        "gif": lambda p, i: Image.fromarray(rgb(i)).convert("P").save(p / f"{i}.gif"),
        "tiff16": lambda p, i: Image.fromarray(np.full((8, 8), 257 * (10 * i + 1), dtype=np.uint16)).save(p / f"{i}.tif"),
        "pgm16": lambda p, i: write_pgm(p / f"{i}.pgm", np.full((8, 8), 65535 - 257 * i), 65535),
        "rgba": lambda p, i: Image.fromarray(np.full((8, 8, 4), (255, 0, 0, 64 * i), dtype=np.uint8)).save(p / f"{i}", format="PNG"),
    }
    if features.check("webp"):
        writers["webp"] = lambda p, i: Image.fromarray(rgb(i)).save(p / f"{i}.webp", lossless=True)
    for name, write in writers.items():
        (root / name).mkdir(parents=True)
        for i in range(3):
            write(root / name, i)
        (root / name / "info.json").write_text("{}")
    return root, sorted(writers)


def test_a_mixed_format_folder_samples_tasks(tmp_path):
    root, classes = make_mixed_folder(tmp_path / "mixed")
    splits = {"train": [c for c in classes if c not in ("tiff16", "pgm16")], "val": ["pgm16"], "test": ["tiff16"]}
    source = ImageFolder(str(root), image_size=8, channels=1, splits=splits, cache_dir=str(tmp_path / "cache"))
    assert source.splits["test"].pixels[:, 0, 0, 0].tolist() == [1, 11, 21]  # 16-bit / 257, not saturated
    assert source.splits["val"].pixels[:, 0, 0, 0].tolist() == [255, 254, 253]
    batch = source.sample("train", torch.Generator().manual_seed(0), 4, len(splits["train"]), 1, 2)
    assert batch.support_x.shape == (4, len(splits["train"]), 1, 8, 8) and batch.query_x.shape[1] == 2 * len(splits["train"])
    assert torch.equal(torch.bincount(batch.query_y[0]), torch.full((len(splits["train"]),), 2))
    rgb = ImageFolder(str(root), image_size=4, channels=3, splits=splits, cache_dir=str(tmp_path / "cache"))
    assert rgb.input_shape == (3, 4, 4) and rgb.splits["test"].pixels[0, :, 0, 0].tolist() == [1, 1, 1]


def test_a_damaged_image_is_named_with_the_reason(tmp_path, metalearn):
    root, _ = make_mixed_folder(tmp_path / "mixed")
    (root / "tiff16" / "damaged.tif").write_bytes(b"II*\x00\x08\x00\x00\x00 truncated")
    with pytest.raises(MetalearnError) as error:
        ImageFolder(str(root), image_size=8, cache_dir=str(tmp_path / "cache"))
    assert str(root / "tiff16" / "damaged.tif") in str(error.value) and "cannot be read (" in str(error.value)
    proc = metalearn("train", *FAST, "data=folder", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}",
                     "data.image_size=8", "sampler.ways=2")
    assert_clean_error(proc, "damaged.tif", "cannot be read", status=2)

    for folder in root.iterdir():
        for image in image_files(folder):
            image.unlink()
    with pytest.raises(MetalearnError, match=r"holds no images Pillow can read \(files there: info.json\)"):
        ImageFolder(str(root), image_size=8, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(MetalearnError, match="`data.max_value`: -1"):
        ImageFolder(str(root), max_value=-1)
