"""Meta-training tasks from unlabeled images: UMTRA (augmented copies) and CACTUs (k-means clusters)."""

import json
from pathlib import Path

import pytest
import torch

from conftest import OMNIGLOT, assert_clean_error
from metalearn_cli.data.images import ImageClasses, ImageTasks
from metalearn_cli.errors import MetalearnError
from metalearn_cli.unsupervised import partitions as partitions_module
from metalearn_cli.unsupervised.augment import Augmentation, PixelDropout
from metalearn_cli.unsupervised.cactus import CactusSampler
from metalearn_cli.unsupervised.umtra import AugmentedTasks, UMTRASampler

has_omniglot = pytest.mark.skipif(not (OMNIGLOT / "omniglot-py").exists(), reason="no Omniglot copy at ../shared")


def tiny_source(train_images: int = 60, seed: int = 0) -> ImageTasks:
    """Blobs on a black background: 8 classes of 6 images per labelled split, `train_images` training images."""
    g = torch.Generator().manual_seed(seed)

    def classes(n_classes, per_class, prefix):
        pixels = []
        for _ in range(n_classes):
            centre = torch.randint(6, 22, (2,), generator=g)
            yy, xx = torch.meshgrid(torch.arange(28), torch.arange(28), indexing="ij")
            blob = ((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < 25).to(torch.uint8) * 200
            noise = torch.randint(0, 40, (per_class, 1, 28, 28), generator=g).to(torch.uint8)
            pixels.append(blob.expand(per_class, 1, 28, 28) + noise)
        return ImageClasses.from_lists(pixels, [f"{prefix}{i}" for i in range(n_classes)])

    train = classes(train_images // 5, 5, "t")
    return ImageTasks({"train": train, "val": classes(8, 6, "v"), "test": classes(8, 6, "s")}, name="tiny")


def relabelled(source: ImageTasks, counts: list[int] | None) -> ImageTasks:
    """The same images with other training labels: `counts` regroups them (None: one class, the labels dropped)."""
    train = source.splits["train"]
    total = int(train.counts.sum())
    counts = counts or [total]
    assert sum(counts) == total
    names = [f"shuffled{i}" for i in torch.randperm(len(counts)).tolist()]
    other = ImageTasks({**source.splits, "train": ImageClasses(train.pixels.clone(), torch.tensor(counts), names)}, name=source.name,
                       invert=source.invert)
    return other


def umtra(source, **kw) -> UMTRASampler:
    sampler = UMTRASampler(source, shots=1, queries=2, meta_batch_size=6, ways=5, **kw)
    sampler.check_source(source)
    return sampler


def cactus(source, **kw) -> CactusSampler:
    settings = dict(clusters=6, partitions=3, embedding_dim=8, cache_dir=kw.pop("cache_dir"))
    settings.update(kw)
    sampler = CactusSampler(source, shots=1, queries=2, meta_batch_size=6, ways=3, **settings)
    sampler.check_source(source)
    return sampler


# -- augmentation ---------------------------------------------------------------------------------
def test_augmentation_is_per_image_seeded_and_stays_on_the_device():
    images = torch.rand(1, 1, 28, 28).expand(6, 1, 28, 28).contiguous()
    augment = Augmentation("auto", channels=1, image_size=28)
    out = augment(images, seed=3)
    assert out.shape == images.shape and out.device == images.device and out.dtype == images.dtype
    assert torch.equal(out, augment(images, seed=3))  # the seed fixes every draw
    assert not torch.equal(out, augment(images, seed=4))
    assert len({tuple(o.flatten().tolist()) for o in out}) == 6  # one identical image, six different copies
    assert torch.equal(Augmentation("none", 1, 28)(images, seed=3), images)
    rgb = Augmentation("auto", channels=3, image_size=32)(torch.rand(4, 3, 32, 32), seed=0)
    assert rgb.shape == (4, 3, 32, 32)
    custom = Augmentation([{"_target_": "torchvision.transforms.v2.RandomHorizontalFlip", "p": 1.0}], 1, 28)
    assert torch.equal(custom(images, seed=0), images.flip(-1))


def test_pixel_dropout_zeroes_about_the_asked_share_of_pixels_in_all_channels():
    torch.manual_seed(0)
    out = PixelDropout(0.5)(torch.ones(3, 64, 64))
    assert 0.45 < (out[0] == 0).float().mean() < 0.55 and torch.equal(out[0], out[2])


def test_bad_augment_settings_name_the_key():
    with pytest.raises(MetalearnError, match="augment"):
        UMTRASampler(None, 1, 1, 2, ways=5, augment="sharpen")
    with pytest.raises(MetalearnError, match="augment"):
        Augmentation([{"_target_": "torchvision.transforms.v2.NoSuchTransform"}], 1, 28)


# -- UMTRA ------------------------------------------------------------------------------------------
def test_umtra_tasks_are_distinct_images_with_augmented_queries():
    source = tiny_source()
    sampler = umtra(source, train_queries=3)
    pending = sampler.train_batch(seed=0, step=7)
    assert isinstance(pending, AugmentedTasks)
    batch = pending.to("cpu")
    assert batch.support_x.shape == (6, 5, 1, 28, 28) and batch.query_x.shape == (6, 15, 1, 28, 28)
    assert torch.equal(batch.support_y, torch.arange(5).expand(6, 5))
    assert torch.equal(batch.query_y, torch.arange(5).repeat_interleave(3).expand(6, 15))
    pool = source.inputs(source.unlabeled_images("train"))
    assert torch.equal(batch.support_x, pool[batch.classes])  # the support set is the images themselves
    assert all(len(set(row.tolist())) == 5 for row in batch.classes)  # N distinct images
    assert sampler.train_classes() == pool.shape[0]
    queries = batch.query_x.reshape(6, 5, 3, 1, 28, 28)
    assert not torch.equal(queries[:, :, 0], batch.support_x)  # augmented copies ...
    close = (queries[:, :, 0] - batch.support_x).abs().flatten(2).mean(-1)
    other = (queries[:, :, 0] - batch.support_x.roll(1, dims=1)).abs().flatten(2).mean(-1)
    assert (close < other).float().mean() > 0.8  # ... of their own image
    again = sampler.train_batch(seed=0, step=7).to("cpu")
    assert torch.equal(again.query_x, batch.query_x)
    none = umtra(source, augment="none").train_batch(seed=0, step=7).to("cpu")
    assert torch.equal(none.query_x, none.support_x)


def test_umtra_rank_shares_are_the_single_process_tasks():
    sampler = umtra(tiny_source(), train_shots=2)
    whole = sampler.train_batch(seed=1, step=3).to("cpu")
    parts = [sampler.train_batch(seed=1, step=3, rank=r, world_size=4).to("cpu") for r in range(4)]
    assert torch.equal(torch.cat([p.query_x for p in parts]), whole.query_x)
    assert torch.equal(torch.cat([p.support_x for p in parts]), whole.support_x)
    # with 2 shots the second support example of each image is an augmented copy
    support = whole.support_x.reshape(6, 5, 2, 1, 28, 28)
    assert not torch.equal(support[:, :, 0], support[:, :, 1])


def label_blind(make, source, steps=3) -> None:
    """`make(source)`'s meta-training batches do not change when the training labels are shuffled or dropped."""
    shuffled_counts = torch.randperm(source.splits["train"].counts.numel()).tolist()  # regroup into other classes
    total = int(source.splits["train"].counts.sum())
    regrouped = [total // 3, total // 3, total - 2 * (total // 3)] if shuffled_counts else None
    reference = [make(source).train_batch(0, s).to("cpu") for s in range(steps)]
    for other in (relabelled(source, regrouped), relabelled(source, None)):
        batches = [make(other).train_batch(0, s).to("cpu") for s in range(steps)]
        for a, b in zip(reference, batches):
            assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))
            assert torch.equal(a.classes, b.classes)


@has_omniglot
def test_umtra_never_reads_omniglot_training_labels(omniglot_cache):
    from metalearn_cli.data.omniglot import Omniglot

    source = Omniglot(str(OMNIGLOT), cache_dir=str(omniglot_cache))
    label_blind(lambda s: umtra(s), source)


def test_the_labelled_sampler_would_notice_the_relabelling():
    """The control of the label-blindness tests: the episodic sampler's tasks do change with the labels."""
    from metalearn_cli.samplers import EpisodicSampler

    source = tiny_source()
    a = EpisodicSampler(source, 1, 1, 4, ways=3).train_batch(0, 0)
    b = EpisodicSampler(relabelled(source, [20, 20, 20]), 1, 1, 4, ways=3).train_batch(0, 0)
    assert not torch.equal(a.support_x, b.support_x)


# -- CACTUs ----------------------------------------------------------------------------------------
def test_cactus_tasks_are_clusters_of_one_partition(tmp_path):
    source = tiny_source(train_images=90)
    sampler = cactus(source, cache_dir=tmp_path, train_queries=2)
    sampler.prepare_training()
    labels = partitions_module.kmeans_partitions(sampler.embed(), 6, 3, 0, tmp_path)
    assert labels.shape == (3, 90) and int(labels.max()) < 6
    batch = sampler.train_batch(0, 0)
    assert batch.support_x.shape == (6, 3, 1, 28, 28) and batch.query_x.shape == (6, 6, 1, 28, 28)
    pool = source.inputs(source.unlabeled_images("train"))
    rows_of = {tuple(pool[i].flatten().tolist()): i for i in range(90)}
    for t in range(6):
        part, clusters = batch.classes[t] // 6, batch.classes[t] % 6
        assert len(set(part.tolist())) == 1 and len(set(clusters.tolist())) == 3
        for n in range(3):
            images = torch.cat([batch.support_x[t, n:n + 1], batch.query_x[t, 2 * n:2 * n + 2]])
            rows = [rows_of[tuple(x.flatten().tolist())] for x in images]
            assert len(set(rows)) == 3 and all(labels[part[0], r] == clusters[n] for r in rows)
    assert sampler.train_classes() == 18


def test_cactus_partitions_are_cached_and_reused(tmp_path, monkeypatch):
    source = tiny_source()
    first = cactus(source, cache_dir=tmp_path)
    first.prepare_training()
    assert len(list(Path(tmp_path).glob("cactus-partitions-*.pt"))) == 1

    def no_kmeans(*args, **kwargs):
        raise AssertionError("k-means ran again")

    monkeypatch.setattr("sklearn.cluster.KMeans.fit_predict", no_kmeans)
    again = cactus(source, cache_dir=tmp_path)
    again.prepare_training()
    assert torch.equal(again.train_batch(0, 2).support_x, first.train_batch(0, 2).support_x)
    with pytest.raises(AssertionError, match="k-means ran again"):  # other settings: other partitions
        cactus(source, cache_dir=tmp_path, clusters=5).prepare_training()


def test_cactus_never_reads_training_labels(tmp_path):
    label_blind(lambda s: cactus(s, cache_dir=tmp_path), tiny_source())


def test_cactus_clusters_a_simclr_embedding_trained_on_the_pool(tmp_path):
    source = tiny_source()
    sampler = cactus(source, cache_dir=tmp_path, embedding="simclr", simclr_steps=3, simclr_batch_size=16)
    embedding = sampler.embed()
    assert embedding.shape == (60, 64) and torch.allclose(embedding.norm(dim=1), torch.ones(60), atol=1e-5)
    sampler.prepare_training()
    assert sampler.train_batch(0, 0).support_x.shape == (6, 3, 1, 28, 28)
    assert len(list(tmp_path.glob("simclr-*/embeddings.pt"))) == 1


def test_cactus_and_umtra_refuse_what_cannot_work(tmp_path):
    source = tiny_source(train_images=20)
    with pytest.raises(MetalearnError, match=r"`sampler.clusters` = 50 is more than the 20"):
        cactus(source, cache_dir=tmp_path, clusters=50)
    with pytest.raises(MetalearnError, match=r"`sampler.train_ways` = 30.*only 20"):
        umtra(source, train_ways=30)
    with pytest.raises(MetalearnError, match="no such checkpoint"):
        cactus(source, cache_dir=tmp_path, embedding=f"ckpt:{tmp_path}/missing.ckpt")
    with pytest.raises(MetalearnError, match="embedding"):
        CactusSampler(source, 1, 1, 2, ways=3, embedding="autoencoder")
    too_many = cactus(source, cache_dir=tmp_path, clusters=19, train_queries=3)  # ~1 image per cluster
    with pytest.raises(MetalearnError, match="no partition has 3 clusters"):
        too_many.prepare_training()
    with pytest.raises(MetalearnError, match="pretrain_batch_size"):
        umtra(source).pretrain_batch(0, 0, 16)


# -- from the command line ----------------------------------------------------------------------------
def write_images(folder: Path, count: int, seed: int, prefix: str = "") -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (16, 16))
    for i in range(count):
        Image.fromarray(np.clip(base + rng.integers(-40, 40, (16, 16)), 0, 255).astype(np.uint8)).save(folder / f"{prefix}{i}.png")


def test_umtra_and_cactus_train_on_an_unlabeled_folder_and_are_scored_on_labelled_tasks(metalearn, tmp_path):
    for c in range(8):  # the labelled source: a class per folder
        write_images(tmp_path / "labeled" / f"kind{c}", 6, seed=c)
    for c in range(12):  # the unlabeled images: folder names that mean nothing
        write_images(tmp_path / "scans" / f"batch{c % 3}", 5, seed=100 + c, prefix=f"s{c}_")
    common = ["data=folder", f"data.root={tmp_path / 'scans'}", "data.labeled=false", f"data.test_root={tmp_path / 'labeled'}",
              "data.image_size=16", "data.channels=1", f"data.cache_dir={tmp_path / 'cache'}", "model.channels=8",
              "sampler.meta_batch_size=2", "sampler.queries=1", "trainer.max_steps=2", "trainer.val_check_interval=2",
              "eval.val_tasks=4", "eval.num_tasks=4", "trainer.enable_progress_bar=false"]
    metalearn("train", *common, "sampler=umtra", "algo=maml", "algo.eval_inner_steps=1", "hydra.run.dir=umtra", check=True)
    record = json.loads((tmp_path / "umtra" / "test.json").read_text())
    assert (record["metric"], record["sampler"], record["shots"]) == ("acc", "umtra", 1) and len(record["per_step"]) > 1
    # scored 5-shot on the labelled tasks
    metalearn("eval", f"ckpt={tmp_path}/umtra/checkpoints/last.ckpt", "sampler.shots=5", check=True)
    assert json.loads((tmp_path / "umtra" / "eval.json").read_text())["shots"] == 5
    # CACTUs on that checkpoint's features, with ProtoNets
    metalearn("train", *common, "sampler=cactus", "algo=protonet", "sampler.clusters=6", "sampler.partitions=2",
              "sampler.train_queries=1", f"sampler.cache_dir={tmp_path / 'cache'}",
              f"sampler.embedding=ckpt:{tmp_path}/umtra/checkpoints/last.ckpt", "hydra.run.dir=cactus", check=True)
    assert json.loads((tmp_path / "cactus" / "test.json").read_text())["per_step"]
    from metalearn_cli.unsupervised.embeddings import checkpoint_features

    with pytest.raises(MetalearnError, match=r"does not fit these images of shape \(3, 16, 16\)"):
        checkpoint_features(torch.rand(4, 3, 16, 16), f"{tmp_path}/umtra/checkpoints/last.ckpt")
    assert list((tmp_path / "cache").glob("cactus-partitions-*.pt"))
    # the unlabeled folder cannot feed the labelled sampler, and a sampler of images needs images
    assert_clean_error(metalearn("train", *common, "hydra.run.dir=episodic"), "data.labeled", "sampler=umtra", status=2)
    assert_clean_error(metalearn("train", "data=sinusoid", "sampler=umtra", "hydra.run.dir=bad"), "sampler=umtra", "images", status=2)
    assert_clean_error(metalearn("train", *common, "sampler=umtra", "sampler.ways=80", "hydra.run.dir=ways"), "sampler.", status=2)


def test_cactus_without_scikit_learn_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    with pytest.raises(MetalearnError, match=r"pip install 'metalearn\[unsupervised\]'"):
        CactusSampler(None, 1, 1, 2, ways=3)
