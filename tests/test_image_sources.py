"""The image folder, MNIST, CIFAR-FS and miniImageNet sources on tiny files in their real on-disk formats.

Every test writes its own data under tmp_path (PNG/JPEG trees, MNIST idx files, CIFAR-100 pickles,
miniImageNet pickles, folders and csv files); nothing is downloaded.
"""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from PIL import Image

import metalearn_cli.data.folder as folder_module
from metalearn_cli.data import cifar_fs
from metalearn_cli.data.cifar_fs import CIFARFS
from metalearn_cli.data.folder import ImageFolder
from metalearn_cli.data.miniimagenet import MiniImageNet
from metalearn_cli.data.mnist import MNIST
from metalearn_cli.errors import MetalearnError

#: torchvision's CIFAR-100 fine label names (`CIFAR100(...).classes`, the meta file's fine_label_names)
CIFAR100_NAMES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle", "bowl", "boy",
    "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle", "chair", "chimpanzee", "clock",
    "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish",
    "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange",
    "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy", "porcupine",
    "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk",
    "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank",
    "telephone", "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
]


# -- helpers ----------------------------------------------------------------------------------
def check_batch(source, split: str, ways: int, shots: int, queries: int, shape: tuple[int, int, int]) -> None:
    """3 tasks of `split`: shapes, labels 0..ways-1 (each `shots` / `queries` times), pixels in [0, 1]."""
    batch = source.sample(split, torch.Generator().manual_seed(0), 3, ways, shots, queries)
    assert batch.support_x.shape == (3, ways * shots, *shape)
    assert batch.query_x.shape == (3, ways * queries, *shape)
    assert batch.support_y.shape == (3, ways * shots) and batch.query_y.shape == (3, ways * queries)
    for labels, per_class in ((batch.support_y, shots), (batch.query_y, queries)):
        assert labels.dtype == torch.long
        assert torch.equal(torch.bincount(labels[0], minlength=ways), torch.full((ways,), per_class))
    for x in (batch.support_x, batch.query_x):
        assert x.dtype == torch.float32 and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert source.input_shape == shape


def class_counts(source) -> dict[str, int]:
    return {s: source.num_classes(s) for s in ("train", "val", "test")}


def cache_files(cache) -> list:
    return sorted(p.name for p in cache.glob("*.pt"))


def no_decoding(monkeypatch) -> None:
    """Make any decoding of an image file fail, to prove a construction reads only the cache."""

    def refuse(*args, **kwargs):
        raise AssertionError("decoded an image although the cache should have been used")

    monkeypatch.setattr(folder_module, "decode_image", refuse)


def compose_data(overrides: list[str]):
    GlobalHydra.instance().clear()
    try:
        with initialize_config_module(version_base="1.3", config_module="metalearn_cli.configs"):
            cfg = compose(config_name="train", overrides=overrides)
    finally:
        GlobalHydra.instance().clear()
    return cfg


def write_image(path, size: tuple[int, int], value: int, mode: str = "RGB") -> None:
    rng = np.random.default_rng(value)
    channels = 3 if mode == "RGB" else 1
    array = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    array[0, 0] = value % 256
    image = Image.fromarray(array if channels == 3 else array[..., 0], mode)
    image.save(path)


# -- image folder ------------------------------------------------------------------------------
def make_tree(root, classes: int = 10, images: int = 3):
    """root/class00..: PNG and JPEG (some with upper-case suffixes) of varied sizes, plus files to ignore."""
    root.mkdir(parents=True, exist_ok=True)
    suffixes = [".png", ".jpg", ".JPEG", ".PNG"]
    for c in range(classes):
        folder = root / f"class{c:02d}"
        folder.mkdir()
        for i in range(images):
            write_image(folder / f"img{i}{suffixes[(c + i) % 4]}", (12 + i, 10), 10 * c + i)
        (folder / "notes.txt").write_text("not an image")
        (folder / ".hidden.png").write_bytes(b"not even a png")  # hidden: ignored
    (root / ".git").mkdir()  # hidden class folder: ignored
    (root / "README.md").write_text("a file at the top: not a class")
    return root


def test_folder_fraction_split_samples_and_caches(tmp_path, monkeypatch):
    root, cache = make_tree(tmp_path / "tree"), tmp_path / "cache"
    source = ImageFolder(root, image_size=16, cache_dir=cache)
    assert class_counts(source) == {"train": 6, "val": 2, "test": 2}  # 10 classes cut at 0.64 / 0.80
    assert source.name == "folder"
    names = [n for s in ("train", "val", "test") for n in source.splits[s].names]
    assert sorted(names) == [f"class{c:02d}" for c in range(10)]
    assert all(int(source.splits[s].counts.min()) == 3 for s in ("train", "val", "test"))
    assert source.splits["train"].pixels.dtype == torch.uint8
    check_batch(source, "train", ways=5, shots=1, queries=2, shape=(3, 16, 16))
    check_batch(source, "test", ways=2, shots=2, queries=1, shape=(3, 16, 16))
    assert len(cache_files(cache)) == 1

    no_decoding(monkeypatch)
    again = ImageFolder(root, image_size=16, cache_dir=cache)
    assert torch.equal(again.splits["train"].pixels, source.splits["train"].pixels)
    assert again.splits["val"].names == source.splits["val"].names
    assert len(cache_files(cache)) == 1


def test_folder_trainval_trains_on_the_validation_classes_too(tmp_path):
    root, cache = make_tree(tmp_path / "tree"), tmp_path / "cache"
    plain = ImageFolder(root, image_size=8, cache_dir=cache)
    both = ImageFolder(root, image_size=8, cache_dir=cache, train_on="trainval")
    assert both.splits["train"].names == plain.splits["train"].names + plain.splits["val"].names
    assert torch.equal(both.splits["train"].pixels, torch.cat([plain.splits["train"].pixels, plain.splits["val"].pixels]))
    assert both.splits["val"].names == plain.splits["val"].names and both.splits["test"].names == plain.splits["test"].names
    assert plain.validation_held_out and not both.validation_held_out
    check_batch(both, "train", ways=8, shots=1, queries=2, shape=(3, 8, 8))  # 8 classes: more than train's 6
    with pytest.raises(MetalearnError, match="data.train_on"):
        ImageFolder(root, image_size=8, cache_dir=cache, train_on="everything")


def test_folder_split_seed_explicit_splits_and_grey(tmp_path):
    root, cache = make_tree(tmp_path / "tree"), tmp_path / "cache"
    first = ImageFolder(root, image_size=8, cache_dir=cache, split_seed=0)
    other = ImageFolder(root, image_size=8, cache_dir=cache, split_seed=1)
    assert sorted(first.splits["test"].names) != sorted(other.splits["test"].names) or sorted(
        first.splits["val"].names
    ) != sorted(other.splits["val"].names)
    assert ImageFolder(root, image_size=8, cache_dir=cache, split_seed=0).splits["val"].names == first.splits["val"].names

    splits = {"train": ["class00", "class01", "class02"], "val": ["class03", "class04"], "test": ["class09"]}
    grey = ImageFolder(root, image_size=8, channels=1, splits=splits, cache_dir=cache)
    assert {s: grey.splits[s].names for s in splits} == splits
    check_batch(grey, "val", ways=2, shots=1, queries=2, shape=(1, 8, 8))
    assert ImageFolder(root, image_size=8, fractions=[0.5, 0.2, 0.3], cache_dir=cache).num_classes("train") == 5


def test_folder_edited_tree_is_decoded_again(tmp_path):
    root, cache = make_tree(tmp_path / "tree", classes=5), tmp_path / "cache"
    ImageFolder(root, image_size=8, fractions=[0.6, 0.2, 0.2], cache_dir=cache)
    write_image(root / "class00" / "extra.webp", (9, 9), 7)
    source = ImageFolder(root, image_size=8, fractions=[0.6, 0.2, 0.2], cache_dir=cache)
    assert len(cache_files(cache)) == 2
    assert sum(int(source.splits[s].counts.sum()) for s in ("train", "val", "test")) == 16


@pytest.mark.parametrize(
    "case, key",
    [
        ("missing_root", "data.root"),
        ("no_classes", "data.root"),
        ("unknown_class", "data.splits"),
        ("class_twice", "data.splits"),
        ("split_keys", "data.splits"),
        ("empty_class", "data.root"),
        ("unreadable", "data.root"),
        ("empty_split", "data.fractions"),
        ("bad_fractions", "data.fractions"),
        ("channels", "data.channels"),
        ("image_size", "data.image_size"),
    ],
)
def test_folder_errors_name_the_key(tmp_path, case, key):
    root = tmp_path / "tree"
    kwargs = {}
    if case == "missing_root":
        root = tmp_path / "nowhere"
    elif case == "no_classes":
        root.mkdir()
        (root / "image.png").write_bytes(b"")
        (root / ".hidden").mkdir()
    else:
        make_tree(root, classes=5 if case != "empty_split" else 3, images=2)
    if case == "unknown_class":
        kwargs["splits"] = {"train": ["class00"], "val": ["class01"], "test": ["nope"]}
    elif case == "class_twice":
        kwargs["splits"] = {"train": ["class00", "class01"], "val": ["class01"], "test": ["class02"]}
    elif case == "split_keys":
        kwargs["splits"] = {"train": ["class00"], "test": ["class01"]}
    elif case == "empty_class":
        for p in (root / "class03").glob("img*"):
            p.unlink()
    elif case == "unreadable":
        (root / "class02" / "broken.jpg").write_bytes(b"this is not a jpeg")
    elif case == "bad_fractions":
        kwargs["fractions"] = [0.5, 0.5]
    elif case == "channels":
        kwargs["channels"] = 2
    elif case == "image_size":
        kwargs["image_size"] = 0
    with pytest.raises(MetalearnError) as error:
        ImageFolder(root, cache_dir=tmp_path / "cache", **{"image_size": 8, **kwargs})
    message = str(error.value)
    assert f"`{key}" in message
    if case == "unreadable":
        assert "broken.jpg" in message
    if case in ("unknown_class", "empty_class"):
        assert "nope" in message or "class03" in message
    if case == "class_twice":
        assert "class01" in message


# -- MNIST -------------------------------------------------------------------------------------
def write_idx(path, array: np.ndarray) -> None:
    """The idx-ubyte format of MNIST: magic 0x0000080<ndim>, big-endian int32 sizes, then the bytes."""
    with open(path, "wb") as f:
        f.write(struct.pack(">I", 0x800 + array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.astype(np.uint8).tobytes())


def make_mnist(root, per_digit: int = 4):
    """<root>/MNIST/raw/ with both parts; every image of digit d is the constant 10 d + 1 (train) or 10 d + 2 (test)."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for part, offset in (("train", 1), ("t10k", 2)):
        labels = np.tile(np.arange(10), per_digit)  # interleaved, as in the real files
        images = np.broadcast_to((10 * labels + offset)[:, None, None], (len(labels), 28, 28))
        write_idx(raw / f"{part}-images-idx3-ubyte", images)
        write_idx(raw / f"{part}-labels-idx1-ubyte", labels)
    return root


def test_mnist_splits_by_digit_and_file(tmp_path, monkeypatch):
    root, cache = make_mnist(tmp_path / "data"), tmp_path / "cache"
    source = MNIST(root, cache_dir=cache)
    assert class_counts(source) == {"train": 5, "val": 5, "test": 5}
    assert source.splits["train"].names == ["0", "1", "2", "3", "4"] and source.splits["test"].names == ["5", "6", "7", "8", "9"]
    values = {s: set(source.splits[s].pixels.unique().tolist()) for s in ("train", "val", "test")}
    assert values["train"] == {1, 11, 21, 31, 41}
    assert values["val"] == {51, 61, 71, 81, 91}  # digits 5-9 of the training file
    assert values["test"] == {52, 62, 72, 82, 92}  # digits 5-9 of the test file: no image shared with val
    check_batch(source, "train", ways=5, shots=1, queries=3, shape=(1, 28, 28))
    check_batch(source, "test", ways=3, shots=2, queries=2, shape=(1, 28, 28))
    batch = source.sample("val", torch.Generator().manual_seed(0), 2, 5, 1, 1)
    assert torch.allclose(batch.support_x.amax(dim=(-3, -2, -1)) * 255, batch.support_x.amin(dim=(-3, -2, -1)) * 255)
    assert len(cache_files(cache)) == 1

    import torchvision.datasets

    def refuse(*args, **kwargs):
        raise AssertionError("read the MNIST files although the cache should have been used")

    monkeypatch.setattr(torchvision.datasets, "MNIST", refuse)
    again = MNIST(root, cache_dir=cache)
    assert torch.equal(again.splits["val"].pixels, source.splits["val"].pixels)


def test_mnist_trainval_is_refused_where_val_and_test_share_digits(tmp_path):
    """The default MNIST split validates and tests on digits 5-9: training on val would train on test classes."""
    root = make_mnist(tmp_path / "data")
    with pytest.raises(MetalearnError, match=r"`data.train_on`.*share classes \(5, 6, 7, 8, 9\)"):
        MNIST(root, cache_dir=tmp_path / "c", train_on="trainval")
    own = MNIST(root, cache_dir=tmp_path / "c", train_on="trainval", classes={"train": [0, 1, 2], "val": [3, 4], "test": [5, 6, 7]})
    assert own.splits["train"].names == ["0", "1", "2", "3", "4"]


def test_mnist_resize_and_custom_classes(tmp_path):
    root = make_mnist(tmp_path / "data")
    source = MNIST(root, image_size=14, classes={"train": [0, 1, 2], "val": [3, 4], "test": [5, 6, 7]}, cache_dir=tmp_path / "c")
    assert class_counts(source) == {"train": 3, "val": 2, "test": 3}
    check_batch(source, "test", ways=3, shots=1, queries=1, shape=(1, 14, 14))


def test_mnist_missing_files(tmp_path):
    with pytest.raises(MetalearnError) as error:
        MNIST(tmp_path / "empty", cache_dir=tmp_path / "c")
    message = str(error.value)
    assert "`data.root`" in message and "data.download=true" in message and "MNIST/raw/" in message
    assert "train-images-idx3-ubyte" in message

    raw = tmp_path / "gz" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / f"{name}.gz").write_bytes(b"")
    with pytest.raises(MetalearnError, match="not extracted"):
        MNIST(tmp_path / "gz", cache_dir=tmp_path / "c")


def test_mnist_damaged_file(tmp_path):
    root = make_mnist(tmp_path / "data")
    (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x09garbage")
    with pytest.raises(MetalearnError, match="`data.root`"):
        MNIST(root, cache_dir=tmp_path / "c")


def test_mnist_download_goes_through_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    def offline(root, train=True, download=False, **kwargs):
        calls.append((root, train, download))
        raise RuntimeError("no network here")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(MetalearnError, match="downloading MNIST into `data.root`"):
        MNIST(tmp_path / "data", download=True, cache_dir=tmp_path / "c")
    assert calls == [(str(tmp_path / "data"), True, True)]


@pytest.mark.parametrize(
    "classes",
    [
        {"train": [0, 1], "val": [2, 3]},
        {"train": [0, 1], "val": [2, 10], "test": [3]},
        {"train": [0, 1], "val": [], "test": [3]},
        {"train": [0, 1], "val": [1, 2], "test": [3]},
        {"train": [0, 1], "val": [2], "test": [0, 3]},
    ],
)
def test_mnist_bad_classes(tmp_path, classes):
    with pytest.raises(MetalearnError, match="`data.classes"):
        MNIST(tmp_path / "data", classes=classes, cache_dir=tmp_path / "c")


# -- CIFAR-FS ----------------------------------------------------------------------------------
def make_cifar100(root, per_part: int = 2, names: list[str] = CIFAR100_NAMES):
    """<root>/cifar-100-python/{train,test,meta}: Python-2-style pickles; an image of label l is l (train), l + 100 (test)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for part, offset in (("train", 0), ("test", 100)):
        labels = np.tile(np.arange(100), per_part)
        data = np.broadcast_to((labels + offset)[:, None], (len(labels), 3072)).astype(np.uint8)
        entry = {
            "filenames": [f"img_{i}.png" for i in range(len(labels))],
            "batch_label": f"{part} batch",
            "fine_labels": labels.tolist(),
            "coarse_labels": (labels // 5).tolist(),
            "data": data,
        }
        with open(folder / part, "wb") as f:
            pickle.dump(entry, f, protocol=2)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": list(names), "coarse_label_names": [f"super{i}" for i in range(20)]}, f, protocol=2)
    return root


def test_cifar_fs_class_lists_are_the_standard_split():
    train, val, test = set(cifar_fs.TRAIN_CLASSES), set(cifar_fs.VAL_CLASSES), set(cifar_fs.TEST_CLASSES)
    assert (len(cifar_fs.TRAIN_CLASSES), len(cifar_fs.VAL_CLASSES), len(cifar_fs.TEST_CLASSES)) == (64, 16, 20)
    assert (len(train), len(val), len(test)) == (64, 16, 20)
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(CIFAR100_NAMES) and len(CIFAR100_NAMES) == 100


def test_torchvision_refuses_unofficial_cifar_files(tmp_path):
    """Why CIFARFS reads the pickles itself: torchvision checks the md5 of train and test even with download=False."""
    from torchvision.datasets import CIFAR100

    root = make_cifar100(tmp_path / "data")
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        CIFAR100(str(root), train=True, download=False)


def test_cifar_fs_pools_both_files_and_caches(tmp_path, monkeypatch):
    root, cache = make_cifar100(tmp_path / "data"), tmp_path / "cache"
    source = CIFARFS(root, cache_dir=cache)
    assert class_counts(source) == {"train": 64, "val": 16, "test": 20}
    assert source.name == "cifar-fs"
    assert source.splits["test"].names == list(cifar_fs.TEST_CLASSES)
    assert torch.equal(source.splits["train"].counts, torch.full((64,), 4))
    dolphin = CIFAR100_NAMES.index("dolphin")  # first training class: rows 0-3, two from each file
    assert source.splits["train"].pixels[:4].flatten(1).amax(1).tolist() == [dolphin, dolphin, dolphin + 100, dolphin + 100]
    check_batch(source, "train", ways=5, shots=1, queries=3, shape=(3, 32, 32))
    check_batch(source, "val", ways=5, shots=2, queries=2, shape=(3, 32, 32))
    assert len(cache_files(cache)) == 1

    def refuse(path):
        raise AssertionError("read a CIFAR pickle although the cache should have been used")

    monkeypatch.setattr(cifar_fs, "read_pickle", refuse)
    again = CIFARFS(root, cache_dir=cache)
    assert torch.equal(again.splits["test"].pixels, source.splits["test"].pixels)


def test_cifar_fs_resize(tmp_path):
    source = CIFARFS(make_cifar100(tmp_path / "data", per_part=1), image_size=16, cache_dir=tmp_path / "c")
    check_batch(source, "test", ways=5, shots=1, queries=1, shape=(3, 16, 16))


def test_cifar_fs_errors(tmp_path):
    with pytest.raises(MetalearnError) as error:
        CIFARFS(tmp_path / "empty", cache_dir=tmp_path / "c")
    message = str(error.value)
    assert "`data.root`" in message and "cifar-100-python" in message and "data.download=true" in message

    renamed = [n if n != "whale" else "orca" for n in CIFAR100_NAMES]
    root = make_cifar100(tmp_path / "renamed", per_part=1, names=renamed)
    with pytest.raises(MetalearnError, match="whale"):
        CIFARFS(root, cache_dir=tmp_path / "c")

    root = make_cifar100(tmp_path / "broken", per_part=1)
    (root / "cifar-100-python" / "test").write_bytes(b"not a pickle")
    with pytest.raises(MetalearnError, match="`data.root`"):
        CIFARFS(root, cache_dir=tmp_path / "c")


def test_cifar_fs_download_goes_through_torchvision(tmp_path, monkeypatch):
    import torchvision.datasets

    root = make_cifar100(tmp_path / "data", per_part=1)
    calls = []

    def fetched(root, train=True, download=False, **kwargs):  # stands in for the real download (md5-checked)
        calls.append((root, train, download))

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fetched)
    source = CIFARFS(root, download=True, cache_dir=tmp_path / "c")
    assert calls == [(str(root), True, True)]
    assert source.num_classes("train") == 64


# -- miniImageNet ------------------------------------------------------------------------------
MINI_SPLITS = {"train": 8, "val": 6, "test": 6}


def mini_classes():
    """{split: [wnid]} for 20 tiny classes."""
    classes, n = {}, 0
    for split, count in MINI_SPLITS.items():
        classes[split] = [f"n{1000 + n + i:08d}" for i in range(count)]
        n += count
    return classes


def make_mini_pickles(root, images: int = 3, size: int = 84, val_name: str = "val"):
    """mini-imagenet-cache-*.pkl; image j of class c (global index) is the constant 10 c + j."""
    root.mkdir(parents=True, exist_ok=True)
    offset = 0
    for split, wnids in mini_classes().items():
        values = [10 * (offset + c) + j for c in range(len(wnids)) for j in range(images)]
        order = np.random.default_rng(0).permutation(len(values))  # classes interleaved in image_data
        data = np.empty((len(values), size, size, 3), dtype=np.uint8)
        class_dict = {w: [] for w in wnids}
        for row, k in enumerate(order):
            data[row] = values[k] % 256
            class_dict[wnids[k // images]].append(row)
        name = val_name if split == "val" else split
        with open(root / f"mini-imagenet-cache-{name}.pkl", "wb") as f:
            pickle.dump({"image_data": data, "class_dict": class_dict}, f, protocol=4)
        offset += len(wnids)
    return root


def make_mini_folders(root, images: int = 3):
    for split, wnids in mini_classes().items():
        for c, wnid in enumerate(wnids):
            (root / split / wnid).mkdir(parents=True)
            for j in range(images):
                write_image(root / split / wnid / f"{wnid}_{j:04d}.jpg", (20, 16), c * 10 + j)
    return root


def make_mini_csv(root, images: int = 3):
    (root / "images").mkdir(parents=True)
    for split, wnids in mini_classes().items():
        lines = ["filename,label"]
        for wnid in wnids:
            for j in range(images):
                name = f"{wnid}{j + 1:08d}.jpg"
                write_image(root / "images" / name, (20, 16), j)
                lines.append(f"{name},{wnid}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("val_name", ["val", "validation"])
def test_miniimagenet_pickles(tmp_path, val_name):
    root, cache = make_mini_pickles(tmp_path / "mini", val_name=val_name), tmp_path / "cache"
    source = MiniImageNet(root, cache_dir=cache)
    assert source.layout == "pickle" and source.name == "miniimagenet"
    assert class_counts(source) == MINI_SPLITS
    assert source.splits["val"].names == mini_classes()["val"]
    # grouped by class through class_dict: class 8 (first of val) holds 80, 81, 82
    assert sorted(source.splits["val"].pixels[:3, 0, 0, 0].tolist()) == [80, 81, 82]
    check_batch(source, "train", ways=5, shots=1, queries=2, shape=(3, 84, 84))
    check_batch(source, "test", ways=5, shots=2, queries=1, shape=(3, 84, 84))
    assert not cache.exists()  # already uint8 at 84x84: used as it is, not copied into the cache


def test_miniimagenet_pickles_resized_are_cached(tmp_path, monkeypatch):
    root, cache = make_mini_pickles(tmp_path / "mini", size=24), tmp_path / "cache"
    source = MiniImageNet(root, image_size=12, cache_dir=cache)
    check_batch(source, "val", ways=5, shots=1, queries=1, shape=(3, 12, 12))
    assert len(cache_files(cache)) == 1

    def refuse(self, path):
        raise AssertionError("read a pickle although the cache should have been used")

    monkeypatch.setattr(MiniImageNet, "_read_pickle", refuse)
    assert torch.equal(MiniImageNet(root, image_size=12, cache_dir=cache).splits["train"].pixels, source.splits["train"].pixels)


@pytest.mark.parametrize("layout", ["folder", "csv"])
def test_miniimagenet_image_layouts(tmp_path, monkeypatch, layout):
    root, cache = tmp_path / "mini", tmp_path / "cache"
    (make_mini_folders if layout == "folder" else make_mini_csv)(root)
    source = MiniImageNet(root, image_size=32, cache_dir=cache)
    assert source.layout == layout
    assert class_counts(source) == MINI_SPLITS
    assert source.splits["test"].names == mini_classes()["test"]
    check_batch(source, "train", ways=5, shots=1, queries=2, shape=(3, 32, 32))
    assert len(cache_files(cache)) == 1

    no_decoding(monkeypatch)
    again = MiniImageNet(root, image_size=32, cache_dir=cache)
    assert torch.equal(again.splits["val"].pixels, source.splits["val"].pixels)


def test_miniimagenet_missing_data_lists_the_layouts(tmp_path):
    root = tmp_path / "mini"
    root.mkdir()
    (root / "train.csv").write_text("filename,label\n")
    with pytest.raises(MetalearnError) as error:
        MiniImageNet(root, cache_dir=tmp_path / "c")
    message = str(error.value)
    assert "`data.root`" in message
    assert "mini-imagenet-cache-" in message and "{train,val,test}/<wnid>" in message and "images/" in message
    assert "https://github.com/twitter/meta-learning-lstm/tree/master/data/miniImagenet" in message
    assert "learn2learn" in message and "mini-imagenet-tools" in message
    with pytest.raises(MetalearnError, match="`data.root`"):
        MiniImageNet(tmp_path / "nowhere", cache_dir=tmp_path / "c")


def test_miniimagenet_bad_inputs(tmp_path):
    root = make_mini_csv(tmp_path / "csv")
    (root / "images" / f"{mini_classes()['test'][0]}00000001.jpg").unlink()
    with pytest.raises(MetalearnError, match=r"n0000101400000001\.jpg.*`data.root`"):
        MiniImageNet(root, cache_dir=tmp_path / "c")

    root = make_mini_folders(tmp_path / "folders")
    shared = mini_classes()["train"][0]
    (root / "test" / shared).mkdir()
    write_image(root / "test" / shared / "x.png", (8, 8), 1)
    with pytest.raises(MetalearnError, match=f"{shared}.*`data.root`"):
        MiniImageNet(root, cache_dir=tmp_path / "c")

    root = make_mini_folders(tmp_path / "broken")
    (root / "val" / mini_classes()["val"][0] / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(MetalearnError, match=r"bad\.jpg"):
        MiniImageNet(root, cache_dir=tmp_path / "c")

    root = make_mini_pickles(tmp_path / "pickles")
    with open(root / "mini-imagenet-cache-test.pkl", "wb") as f:
        pickle.dump({"images": np.zeros((2, 84, 84, 3), np.uint8)}, f)
    with pytest.raises(MetalearnError, match="mini-imagenet-cache-test.pkl.*`data.root`"):
        MiniImageNet(root, cache_dir=tmp_path / "c")


# -- configs -----------------------------------------------------------------------------------
def test_config_folder(tmp_path):
    root = make_tree(tmp_path / "tree")
    cfg = compose_data(["data=folder", f"data.root={root}", f"data.cache_dir={tmp_path}/c", "data.image_size=16"])
    assert (cfg.model.downsample, cfg.model.pool, cfg.model.channels) == ("maxpool", "flatten", 32)
    assert (cfg.sampler.ways, cfg.sampler.shots, cfg.sampler.queries, cfg.sampler.meta_batch_size) == (5, 1, 15, 4)
    source = instantiate(cfg.data, _convert_="all")
    assert isinstance(source, ImageFolder) and class_counts(source) == {"train": 6, "val": 2, "test": 2}


def test_config_folder_needs_a_root(tmp_path):
    cfg = compose_data(["data=folder"])
    with pytest.raises(Exception, match="root"):
        instantiate(cfg.data, _convert_="all")


def test_config_folder_explicit_splits(tmp_path):
    root = make_tree(tmp_path / "tree", classes=4)
    cfg = compose_data(
        ["data=folder", f"data.root={root}", f"data.cache_dir={tmp_path}/c", "data.image_size=8",
         "data.splits={train:[class00,class01],val:[class02],test:[class03]}"]
    )
    source = instantiate(cfg.data, _convert_="all")
    assert source.splits["val"].names == ["class02"]


def test_config_mnist(tmp_path):
    root = make_mnist(tmp_path / "data")
    cfg = compose_data(["data=mnist", f"data.root={root}", f"data.cache_dir={tmp_path}/c"])
    assert (cfg.model.downsample, cfg.model.pool, cfg.model.channels) == ("stride", "mean", 64)
    assert (cfg.sampler.ways, cfg.sampler.shots, cfg.sampler.queries, cfg.sampler.meta_batch_size) == (5, 1, 5, 32)
    assert compose_data(["data=mnist"]).data.root == "~/data"
    source = instantiate(cfg.data, _convert_="all")
    assert isinstance(source, MNIST) and source.input_shape == (1, 28, 28)
    assert class_counts(source) == {"train": 5, "val": 5, "test": 5}


def test_config_cifar_fs(tmp_path):
    root = make_cifar100(tmp_path / "data", per_part=1)
    overrides = ["data=cifar_fs", f"data.root={root}", f"data.cache_dir={tmp_path}/c"]
    cfg = compose_data(overrides)
    assert (cfg.model.downsample, cfg.model.pool, cfg.model.channels) == ("maxpool", "flatten", 64)
    assert (cfg.sampler.ways, cfg.sampler.shots, cfg.sampler.queries, cfg.sampler.meta_batch_size) == (5, 1, 15, 4)
    assert compose_data(["data=cifar_fs"]).data.root == "~/data"
    source = instantiate(cfg.data, _convert_="all")
    assert isinstance(source, CIFARFS) and source.input_shape == (3, 32, 32)
    assert class_counts(source) == {"train": 64, "val": 16, "test": 20}
    trainval = instantiate(compose_data([*overrides, "data.train_on=trainval"]).data, _convert_="all")
    assert class_counts(trainval) == {"train": 80, "val": 16, "test": 20}


def test_config_miniimagenet(tmp_path):
    root = make_mini_pickles(tmp_path / "mini")
    overrides = ["data=miniimagenet", f"data.root={root}", f"data.cache_dir={tmp_path}/c"]
    cfg = compose_data(overrides)
    assert (cfg.model.downsample, cfg.model.pool, cfg.model.channels) == ("maxpool", "flatten", 32)
    assert (cfg.sampler.ways, cfg.sampler.shots, cfg.sampler.queries, cfg.sampler.meta_batch_size) == (5, 1, 15, 4)
    assert compose_data(["data=miniimagenet"]).data.root == "~/data/miniimagenet"
    source = instantiate(cfg.data, _convert_="all")
    assert isinstance(source, MiniImageNet) and source.input_shape == (3, 84, 84)
    assert class_counts(source) == MINI_SPLITS
    trainval = instantiate(compose_data([*overrides, "data.train_on=trainval"]).data, _convert_="all")
    assert class_counts(trainval) == {**MINI_SPLITS, "train": MINI_SPLITS["train"] + MINI_SPLITS["val"]}
