"""Episodic sampling: shapes, the sinusoid distribution, fixed evaluation tasks, resumable streams."""

import itertools
import math

import torch

from metalearn_cli.data.sinusoid import Sinusoid
from metalearn_cli.samplers import EpisodicSampler, TaskChunks, TrainStream


def sampler(**kwargs):
    args = dict(shots=10, queries=7, meta_batch_size=4)
    args.update(kwargs)
    return EpisodicSampler(Sinusoid(), **args)


def test_sinusoid_batch_shapes_and_ranges():
    batch = sampler().train_batch(seed=0, step=0)
    assert batch.support_x.shape == (4, 10, 1) and batch.support_y.shape == (4, 10, 1)
    assert batch.query_x.shape == (4, 7, 1) and batch.query_y.shape == (4, 7, 1)
    assert batch.support_x.min() >= -5 and batch.support_x.max() <= 5
    assert batch.support_y.abs().max() <= 5.0


def test_sinusoid_tasks_follow_the_paper_distribution():
    source = Sinusoid()
    amplitude, phase = source.functions(torch.Generator().manual_seed(0), 20000)
    assert 0.1 <= amplitude.min() and amplitude.max() <= 5.0
    assert 0.0 <= phase.min() and phase.max() <= math.pi
    assert abs(amplitude.mean().item() - 2.55) < 0.05 and abs(phase.mean().item() - math.pi / 2) < 0.05
    # targets are A sin(x - phase) for the task's own A and phase
    generator = torch.Generator().manual_seed(5)
    batch = source.sample("train", generator, 3, None, 10, 10)
    amplitude, phase = source.functions(torch.Generator().manual_seed(5), 3)
    torch.testing.assert_close(batch.support_y, amplitude * torch.sin(batch.support_x - phase))


def test_training_batches_are_a_function_of_seed_and_step():
    s = sampler()
    a, b = s.train_batch(seed=1, step=5), s.train_batch(seed=1, step=5)
    assert all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors())) and a.seed == b.seed
    assert not torch.equal(s.train_batch(seed=1, step=6).support_x, a.support_x)
    assert not torch.equal(s.train_batch(seed=2, step=5).support_x, a.support_x)


def test_stream_resumes_at_the_given_step():
    s = sampler()
    full = [b for [b] in itertools.islice(iter(TrainStream(s, seed=3)), 6)]
    resumed = [b for [b] in itertools.islice(iter(TrainStream(s, seed=3, start_step=lambda: 4)), 2)]
    for x, y in zip(full[4:], resumed):
        assert torch.equal(x.support_x, y.support_x)


def test_stream_serves_consecutive_meta_iterations_per_training_step():
    s = sampler()
    one = [b for [b] in itertools.islice(iter(TrainStream(s, seed=3)), 6)]
    chunks = list(itertools.islice(iter(TrainStream(s, seed=3, per_batch=3)), 2))
    assert [len(c) for c in chunks] == [3, 3]
    for x, y in zip(one, chunks[0] + chunks[1]):
        assert torch.equal(x.support_x, y.support_x) and torch.equal(x.query_y, y.query_y)


def test_ranks_split_the_same_meta_batch():
    s = sampler(meta_batch_size=6)
    whole = s.train_batch(seed=0, step=2)
    parts = [s.train_batch(seed=0, step=2, rank=r, world_size=3) for r in range(3)]
    assert all(p.num_tasks == 2 for p in parts)
    assert torch.equal(torch.cat([p.support_x for p in parts]), whole.support_x)


def test_fixed_evaluation_tasks():
    s = sampler()
    ten = s.fixed_tasks("test", 10, task_seed=0)
    assert ten.num_tasks == 10
    again = s.fixed_tasks("test", 10, task_seed=0)
    assert torch.equal(ten.query_y, again.query_y)
    # task i does not depend on how many tasks are asked for
    assert torch.equal(s.fixed_tasks("test", 4, task_seed=0).support_x, ten.support_x[:4])
    # each task carries its own seed (for randomness at evaluation), the same however many are drawn
    assert ten.task_seeds.shape == (10,) and len(set(ten.task_seeds.tolist())) == 10
    assert torch.equal(s.fixed_tasks("test", 4, task_seed=0).task_seeds, ten.task_seeds[:4])
    assert torch.equal(ten.slice(2, 5).task_seeds, ten.task_seeds[2:5])
    # splits and seeds give other tasks; training never draws a test task
    assert not torch.equal(s.fixed_tasks("val", 10, task_seed=0).support_x, ten.support_x)
    assert not torch.equal(s.fixed_tasks("test", 10, task_seed=1).support_x, ten.support_x)
    # served in chunks that cover every task once
    chunks = TaskChunks(ten, chunk_size=4)
    assert [c.num_tasks for c in chunks] == [4, 4, 2]
    assert torch.equal(torch.cat([c.support_x for c in chunks]), ten.support_x)
    assert torch.equal(torch.cat([c.task_seeds for c in chunks]), ten.task_seeds)
