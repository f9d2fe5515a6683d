"""CACTUs' SimCLR embedding (metalearn_cli/unsupervised/simclr.py): the encoder it trains, its run folder,
its cache by content, and the NT-Xent loss."""

import contextlib
import csv
import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from metalearn_cli.errors import MetalearnError
from metalearn_cli.unsupervised import simclr
from metalearn_cli.unsupervised.augment import Augmentation

SETTINGS = dict(steps=30, batch_size=16, lr=1e-3, temperature=0.5, projection_dim=32, seed=0)
#: shifts and small rotations only: pixel dropout would change an image's intensity statistics, and the test
#: of augmented copies below compares them with un-augmented images under the pool's batch-norm statistics
AFFINE = [{"_target_": "torchvision.transforms.v2.RandomAffine", "degrees": 10.0, "translate": [0.15, 0.15]}]


def shapes(per_kind: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """[4 * per_kind, 1, 28, 28] images in [0, 1] of four kinds (filled square, cross, ring, diagonal bar),
    each moved by up to 3 pixels, with noise; and each image's kind."""
    generator = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    images, kinds = [], []
    for kind in range(4):
        for _ in range(per_kind):
            dy, dx = torch.randint(-3, 4, (2,), generator=generator).tolist()
            y, x = yy - dy, xx - dx
            if kind == 0:
                mask = (y >= 9) & (y < 19) & (x >= 9) & (x < 19)
            elif kind == 1:
                mask = (((y >= 13) & (y < 15)) & (x >= 4) & (x < 24)) | (((x >= 13) & (x < 15)) & (y >= 4) & (y < 24))
            elif kind == 2:
                radius = ((y - 14) ** 2 + (x - 14) ** 2).sqrt()
                mask = (radius > 6) & (radius < 9)
            else:
                mask = ((x - y).abs() <= 1) & (y >= 4) & (y < 24)
            images.append(mask.float()[None])
            kinds.append(kind)
    images = torch.stack(images)
    return (0.9 * images + 0.1 * torch.rand(images.shape, generator=generator)).clamp(0, 1), torch.tensor(kinds)


@contextlib.contextmanager
def one_thread():
    """Batches of a few small images gain nothing from a second thread, and on a busy machine two threads
    wait on each other for a multiple of the run's time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    images, kinds = shapes()
    augment = Augmentation(AFFINE, 1, 28)
    cache = tmp_path_factory.mktemp("simclr-cache")
    with one_thread():
        embeddings = simclr.simclr_embeddings(images, augment, cache_dir=str(cache), progress=False, **SETTINGS)
    (run,) = cache.glob("simclr-*")
    return images, kinds, augment, cache, run, embeddings


def load_encoder(run: Path) -> torch.nn.Module:
    saved = torch.load(run / "encoder.pt", weights_only=True)
    encoder, _ = simclr.build_networks((1, 28, 28), SETTINGS["projection_dim"])
    encoder.load_state_dict(saved["encoder"])
    return encoder.eval()


def test_embeddings_are_normalised_eval_mode_features_with_the_pool_statistics(trained):
    images, _, _, _, run, embeddings = trained
    assert embeddings.shape == (40, 64) and embeddings.dtype == torch.float32 and embeddings.device.type == "cpu"
    assert torch.isfinite(embeddings).all()
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(40))
    assert sorted(p.name for p in run.iterdir()) == ["embeddings.pt", "encoder.pt", "metrics.csv"]
    assert not [p for p in run.parent.iterdir() if p.name.startswith(".")]  # the scratch folder is gone
    encoder = load_encoder(run)
    # the saved encoder gives the same features, batch after batch: no image depends on its batch-mates
    alone = torch.cat([simclr.embed(encoder, image[None], torch.device("cpu")) for image in images[:5]])
    torch.testing.assert_close(alone, embeddings[:5])
    # batch norm's running statistics are the pool's own: eval mode = a train-mode pass over the whole pool
    encoder.train()
    with torch.no_grad():
        whole_pool = torch.nn.functional.normalize(encoder(images, features_only=True), dim=1)
    torch.testing.assert_close(whole_pool, embeddings, atol=1e-5, rtol=1e-5)


def test_run_folder_logs_one_loss_per_step_and_the_loss_goes_down(trained):
    run = trained[4]
    with open(run / "metrics.csv") as file:
        rows = [row for row in csv.DictReader(file) if row["loss"]]
    assert [int(row["step"]) for row in rows] == list(range(SETTINGS["steps"]))
    losses = [float(row["loss"]) for row in rows]
    assert all(math.isfinite(loss) for loss in losses)
    # NT-Xent of 2 x 16 views starts near log(31), that of random features
    assert abs(losses[0] - math.log(2 * SETTINGS["batch_size"] - 1)) < 0.5
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3


def augmented_copy_scores(encoder, images, kinds, augment, embeddings) -> float:
    """The share of images whose augmented copy is closer to the image than to any image of another kind."""
    copies = simclr.embed(encoder, augment(images, 12345), torch.device("cpu"))
    similarity = copies @ embeddings.T
    other_kinds = similarity.masked_fill(kinds[:, None] == kinds[None, :], -2.0).max(dim=1).values
    return (similarity.diag() > other_kinds).float().mean().item()


def test_augmented_copies_embed_next_to_their_image(trained):
    images, kinds, augment, _, run, embeddings = trained
    trained_share = augmented_copy_scores(load_encoder(run), images, kinds, augment, embeddings)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        untrained, _ = simclr.build_networks((1, 28, 28), SETTINGS["projection_dim"])
    simclr.set_pool_statistics(untrained, images, torch.device("cpu"))
    untrained_share = augmented_copy_scores(untrained, images, kinds, augment, simclr.embed(untrained, images, torch.device("cpu")))
    assert trained_share >= 0.8
    assert trained_share > untrained_share + 0.2


class Trained(Exception):
    pass


def refuse_training(*args, **kwargs):
    raise Trained


def test_cache_by_content(trained, monkeypatch, capsys):
    images, _, augment, cache, run, embeddings = trained
    monkeypatch.setattr(pl.Trainer, "fit", refuse_training)
    # the same content (a copy) and settings: loaded, not trained, and nothing printed
    again = simclr.simclr_embeddings(images.clone(), augment, cache_dir=str(cache), progress=False, **SETTINGS)
    assert torch.equal(again, embeddings)
    assert capsys.readouterr().err == ""
    # any change of the content, a setting or the augmentation trains again
    changed_images = images.clone()
    changed_images[3, 0, 0, 0] += 0.01
    for call in (
        dict(SETTINGS, seed=1),
        dict(SETTINGS, steps=29),
        dict(SETTINGS, temperature=0.2),
        dict(SETTINGS, batch_size=17),
        dict(SETTINGS, images=changed_images),
        dict(SETTINGS, augment=Augmentation("grey", 1, 28)),
    ):
        call.setdefault("images", images)
        call.setdefault("augment", augment)
        with pytest.raises(Trained):
            simclr.simclr_embeddings(cache_dir=str(cache), progress=False, **call)
        assert "training the SimCLR encoder for CACTUs: " in capsys.readouterr().err
    # the interrupted runs left no file behind, in their run folders or beside them
    assert [p for p in cache.iterdir() if p != run and any(p.rglob("*"))] == []


def test_a_rerun_trains_the_same_encoder_and_leaves_the_global_generators_alone(tmp_path, capfd, monkeypatch):
    images = shapes(per_kind=3)[0]
    augment = Augmentation("grey", 1, 28)
    settings = dict(SETTINGS, steps=3, batch_size=100)
    state = torch.get_rng_state()
    with one_thread():
        first = simclr.simclr_embeddings(images, augment, cache_dir=str(tmp_path / "a"), progress=False, **settings)
        assert torch.equal(torch.get_rng_state(), state)
        second = simclr.simclr_embeddings(images, augment, cache_dir=str(tmp_path / "b"), progress=False, **settings)
    assert torch.equal(first, second)
    out, err = capfd.readouterr()
    assert out == ""
    # one line per training, and none of Lightning's notices; the batch is the whole pool of 12
    assert err.splitlines() == [
        f"training the SimCLR encoder for CACTUs: 3 steps on 12 images, cached in {next((tmp_path / name).glob('simclr-*'))}"
        for name in ("a", "b")
    ]
    # a batch larger than the pool is the pool: the same run as any other size >= 12
    monkeypatch.setattr(pl.Trainer, "fit", refuse_training)
    same = simclr.simclr_embeddings(images, augment, cache_dir=str(tmp_path / "a"), progress=False, **dict(settings, batch_size=12))
    assert torch.equal(same, first)


def test_nt_xent_against_a_hand_computation():
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    z2 = torch.tensor([[0.6, 0.8], [0.0, -2.0]], dtype=torch.float64)  # the loss sees directions only
    # views a1 = (1, 0), b1 = (0, 1), a2 = (0.6, 0.8), b2 = (0, -1); logits are cosines / 0.5; each view's
    # positive is the other view of its image, among the 3 other views
    e = math.exp
    a1 = math.log(e(0.0) + e(1.2) + e(0.0)) - 1.2
    b1 = math.log(e(0.0) + e(1.6) + e(-2.0)) + 2.0
    a2 = math.log(e(1.2) + e(1.6) + e(-1.6)) - 1.2
    b2 = math.log(e(0.0) + e(-2.0) + e(-1.6)) + 2.0
    loss = simclr.nt_xent(z1, z2, temperature=0.5)
    assert loss.item() == pytest.approx((a1 + b1 + a2 + b2) / 4, abs=1e-12)


def test_bad_input(tmp_path):
    augment = Augmentation("grey", 1, 28)
    images = shapes(per_kind=1)[0]
    with pytest.raises(MetalearnError, match=r"`sampler.simclr_batch_size`.* holds 1 image\b"):
        simclr.simclr_embeddings(images[:1], augment, cache_dir=str(tmp_path), **SETTINGS)
    with pytest.raises(MetalearnError, match=r"invalid value for `sampler.simclr_temperature`: 0"):
        simclr.simclr_embeddings(images, augment, cache_dir=str(tmp_path), **dict(SETTINGS, temperature=0))
    with pytest.raises(MetalearnError, match=r"`sampler.simclr_batch_size`: 1\. Allowed: an integer >= 2"):
        simclr.simclr_embeddings(images, augment, cache_dir=str(tmp_path), **dict(SETTINGS, batch_size=1))
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    with pytest.raises(MetalearnError, match=r"the cache folder `sampler.cache_dir` = .*a-file.* cannot be written"):
        simclr.simclr_embeddings(images, augment, cache_dir=str(blocked), **SETTINGS)
