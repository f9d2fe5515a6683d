"""algo=finetune's pre-training (Baseline of Chen et al. 2019): batches of single images over epochs of
the training classes, labelled with their global class, as pure functions of (seed, step)."""

import itertools
from functools import partial

import pytest
import torch

from metalearn_cli.algorithms import Finetune
from metalearn_cli.data.images import ImageClasses, ImageTasks
from metalearn_cli.data.sinusoid import Sinusoid
from metalearn_cli.errors import MetalearnError
from metalearn_cli.functional import FunctionalModel
from metalearn_cli.models import Conv4
from metalearn_cli.samplers import EpisodicSampler, TrainStream

ALGO = dict(inner_lr=0.01, inner_steps=1, eval_inner_steps=2, outer_lr=1e-2, vectorize="loop")


def _source(rotations=4, augment_rotations=False, invert=False, seed=0):
    """5 image classes of 3..7 random 8x8 images (uneven, so class boundaries are tested)."""
    generator = torch.Generator().manual_seed(seed)
    pixels = [torch.randint(0, 256, (3 + c, 1, 8, 8), dtype=torch.uint8, generator=generator) for c in range(5)]
    classes = ImageClasses.from_lists(pixels, [str(c) for c in range(5)], rotations=rotations)
    return ImageTasks({"train": classes, "val": classes, "test": classes}, name="tiny",
                      invert=invert, augment_rotations=augment_rotations)


def _identify(source, x, y):
    """(global class, image within its image class) of each image, found by its pixels: the image must be
    one of class y's images turned as class y says (any turn with augment_rotations)."""
    classes = source.splits["train"]
    keys = []
    for image, label in zip(x, y.tolist()):
        row0 = int(classes.offsets[label // classes.rotations])
        rows = classes.pixels[row0 : row0 + int(classes.counts[label // classes.rotations])]
        turns = range(4) if source.augment_rotations else [label % classes.rotations]
        found = [j for k in turns for j, p in enumerate(rows)
                 if torch.equal(source.inputs(torch.rot90(p, k, dims=(-2, -1))), image)]
        assert len(found) == 1, f"image of label {label} is not one of its class's images"
        keys.append((label, found[0]))
    return keys


def _stream(sampler, seed, batch_size, steps, rank=0, world_size=1):
    for step in range(steps):
        batch = sampler.pretrain_batch(seed, step, batch_size, rank, world_size)
        yield from zip(batch.support_x[0], batch.support_y[0])


@pytest.mark.parametrize("rotations, augment_rotations, invert", [(4, False, False), (1, True, True), (1, False, False)])
def test_an_epoch_covers_every_training_image_once_with_its_global_label(rotations, augment_rotations, invert):
    source = _source(rotations, augment_rotations, invert)
    sampler = EpisodicSampler(source, shots=1, queries=1, meta_batch_size=2, ways=3)
    count = source.num_images("train")
    assert count == 25 * rotations
    batch = sampler.pretrain_batch(0, 0, 5)
    assert batch.num_tasks == 1 and batch.support_x.shape == (1, 5, 1, 8, 8) and batch.query_x.shape[1] == 0
    assert torch.equal(batch.classes.gather(1, batch.support_y), batch.support_y)  # classes 0..C-1: labels are global
    assert batch.classes.shape == (1, source.num_classes("train"))
    for epoch in range(2):  # batch size 5 divides the epoch: epoch e is batches e*count/5 ...
        images = list(itertools.islice(_stream(sampler, 0, 5, 2 * count // 5), epoch * count, (epoch + 1) * count))
        x, y = torch.stack([i for i, _ in images]), torch.stack([label for _, label in images])
        keys = _identify(source, x, y)
        expected = {(c, j) for c in range(source.num_classes("train")) for j in range(3 + c // rotations)}
        assert len(keys) == count and set(keys) == expected  # every image once, with its class


def test_batches_are_a_function_of_seed_and_step_and_may_straddle_epochs():
    source = _source()
    count = source.num_images("train")  # 100: batches of 16 straddle epochs
    one, other = (EpisodicSampler(source, shots=1, queries=1, meta_batch_size=2, ways=3) for _ in range(2))
    for step in (7, 3, 12, 0):  # out of order, on a sampler with nothing cached
        a, b = one.pretrain_batch(1, step, 16), other.pretrain_batch(1, step, 16)
        assert torch.equal(a.support_x, b.support_x) and torch.equal(a.support_y, b.support_y) and a.seed == b.seed
    assert not torch.equal(one.pretrain_batch(1, 3, 16).support_x, one.pretrain_batch(2, 3, 16).support_x)
    images = list(_stream(one, 1, 16, 13))  # 208 images: epochs 0 and 1 and part of 2
    x, y = torch.stack([i for i, _ in images]), torch.stack([label for _, label in images])
    epochs = [_identify(source, x[e * count : (e + 1) * count], y[e * count : (e + 1) * count]) for e in range(2)]
    assert all(len(set(keys)) == count for keys in epochs) and epochs[0] != epochs[1]  # a new order each epoch
    # ranks take contiguous shares that make up the whole batch
    whole = one.pretrain_batch(1, 6, 16)
    for world in (2, 3, 4):  # 16 over 3 ranks: 6, 5 and 5 images
        parts = [one.pretrain_batch(1, 6, 16, rank, world) for rank in range(world)]
        assert torch.equal(torch.cat([p.support_x for p in parts], 1), whole.support_x)
        assert torch.equal(torch.cat([p.support_y for p in parts], 1), whole.support_y)
    # with random rotations, too (drawn for the whole batch, then shared out)
    turned = EpisodicSampler(_source(1, True), shots=1, queries=1, meta_batch_size=2, ways=3)
    whole = turned.pretrain_batch(1, 2, 8)
    assert torch.equal(torch.cat([turned.pretrain_batch(1, 2, 8, r, 2).support_x for r in range(2)], 1), whole.support_x)
    with pytest.raises(MetalearnError, match="algo.pretrain_batch_size"):  # a rank would have no image
        one.pretrain_batch(1, 0, 2, 0, 3)


def test_the_training_stream_serves_the_algorithms_batches():
    """build.py hands TaskDataModule `partial(algorithm.train_batch, sampler)`; the stream resumes at a step."""
    source = _source()
    sampler = EpisodicSampler(source, shots=1, queries=1, meta_batch_size=2, ways=3)
    algo = Finetune(**ALGO, pretrain_batch_size=8)
    algo.extra_modules(Conv4((1, 8, 8), 3, channels=4), source, sampler)
    stream = TrainStream(sampler, seed=3, start_step=lambda: 4, rank=1, world_size=2, per_batch=2,
                         train_batch=partial(algo.train_batch, sampler))
    [a, b] = next(iter(stream))
    assert torch.equal(a.support_x, sampler.pretrain_batch(3, 4, 8, 1, 2).support_x) and a.support_x.shape[1] == 4
    assert torch.equal(b.support_y, sampler.pretrain_batch(3, 5, 8, 1, 2).support_y)


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_pretraining_trains_a_head_over_all_training_classes(head):
    torch.manual_seed(0)
    source = _source()
    sampler = EpisodicSampler(source, shots=1, queries=1, meta_batch_size=2, ways=3)
    model = Conv4((1, 8, 8), 3, channels=16, bn="frozen")
    algo = Finetune(**ALGO, head=head, pretrain_batch_size=32)
    classifier = algo.extra_modules(model, source, sampler)["classifier"]
    assert classifier.weight.shape[0] == source.num_classes("train") == 20
    batch = algo.train_batch(sampler, 0, 0)
    assert batch.support_y.shape == (1, 32) and int(batch.support_y.max()) >= 3  # global labels, beyond the 3 ways
    fmodel = FunctionalModel(model)
    optimizer = torch.optim.Adam([*model.parameters(), *classifier.parameters()], lr=1e-2)
    losses = []
    for _ in range(30):
        step = algo.meta_step(fmodel, batch)
        optimizer.zero_grad()
        step.loss.backward()
        optimizer.step()
        losses.append(step.loss.item())
    assert losses[-1] < 0.5 * losses[0]
    before = model.features[1].running_mean.clone()
    algo.record_statistics(fmodel, batch)  # frozen batch norm: recorded from the backbone, not the 3-way head
    assert not torch.equal(model.features[1].running_mean, before)
    scores = algo.evaluate(fmodel, sampler.fixed_tasks("test", 2, 0))  # evaluation is unchanged: N-way tasks
    assert scores.shape == (2, 3)


def test_without_pretrain_batch_size_training_is_unchanged():
    for source in (_source(), Sinusoid()):
        sampler = EpisodicSampler(source, shots=2, queries=1, meta_batch_size=4, ways=3)
        model = Conv4((1, 8, 8), 3, channels=4) if source.name == "tiny" else torch.nn.Linear(1, 1)
        algo = Finetune(**ALGO)
        algo.extra_modules(model, source, sampler)
        for rank, world in ((0, 1), (1, 2)):
            got, want = algo.train_batch(sampler, 5, 2, rank, world), sampler.train_batch(5, 2, rank, world)
            assert all(torch.equal(g, w) for g, w in zip(got.tensors(), want.tensors())) and got.seed == want.seed
        assert TrainStream(sampler, seed=5).train_batch == sampler.train_batch  # the default stream
    with pytest.raises(MetalearnError, match="algo.pretrain_batch_size"):  # regression has no classes to pre-train on
        Finetune(**ALGO, pretrain_batch_size=16).extra_modules(torch.nn.Linear(1, 1), Sinusoid(), None)


@pytest.mark.parametrize("value", [0, -3, 2.5, True, "16"])
def test_invalid_pretrain_batch_sizes_are_refused(value):
    with pytest.raises(ValueError, match="pretrain_batch_size"):
        Finetune(**ALGO, pretrain_batch_size=value)
