"""Ranks that hold uneven parts of a meta-batch follow the same math as one process (issue: DDP).

The DDP runs are real processes (Lightning starts the second rank by re-running the command); the
single-process runs they are compared with run in the test process. How the parts combine is also
checked without processes: each rank's meta-step on its part, combined as the ranks combine them
(`distributed.weighted_flat`, summed as the all-reduce sums, `set_weighted_mean_`), is the step of
the whole meta-batch."""

import copy
import csv
import threading

import pytest
import torch

from metalearn_cli.algorithms import MAML, Finetune, MAMLpp, MetaSGD, ProtoNet, Reptile
from metalearn_cli.algorithms.trpo import flat
from metalearn_cli.data.images import ImageClasses, ImageTasks
from metalearn_cli.data.sinusoid import Sinusoid
from metalearn_cli.distributed import set_weighted_mean_, weighted_flat
from metalearn_cli.errors import MetalearnError
from metalearn_cli.functional import FunctionalModel
from metalearn_cli.models import MLP, Conv4
from metalearn_cli.samplers import EpisodicSampler, rank_share
from metalearn_cli.tasks import TaskBatch

# the default experiment (sinusoid) has 25 tasks per meta-batch: 13 and 12 on two ranks
COMMON = ["trainer.val_check_interval=100000", "trainer.enable_progress_bar=false", "eval.num_tasks=4",
          "eval.val_tasks=4", "trainer.log_every_n_steps=1"]


@pytest.mark.parametrize("algo", ["maml", "reptile"])
def test_two_ranks_with_uneven_parts_make_the_same_meta_updates_as_one_process(run_cli, metalearn, tmp_path, algo):
    # three updates: Adam's first one is about lr * sign(gradient), blind to how the parts were weighted
    metalearn("train", *COMMON, f"algo={algo}", "trainer.max_steps=3", "hydra.run.dir=single", check=True)
    proc = run_cli("train", *COMMON, f"algo={algo}", "trainer.max_steps=3", "trainer=ddp_cpu", "hydra.run.dir=ddp",
                   check=True, timeout=600)
    losses = [[float(row["train/loss"]) for row in csv.DictReader((tmp_path / run / "metrics.csv").open()) if row["train/loss"]]
              for run in ("single", "ddp")]
    assert len(losses[0]) == 3 and losses[1] == pytest.approx(losses[0], rel=1e-5)  # the whole meta-batch's loss
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    single = torch.load(tmp_path / "single/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    ddp = torch.load(tmp_path / "ddp/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    for key, value in single.items():
        torch.testing.assert_close(ddp[key], value, rtol=1e-5, atol=1e-6)
    test_single = (tmp_path / "single/test.json").read_text()
    assert '"num_tasks": 4' in test_single and '"num_tasks": 4' in (tmp_path / "ddp/test.json").read_text()


@pytest.mark.parametrize("total, world", [(25, 2), (7, 3), (6, 3), (4, 4)])
def test_ranks_take_contiguous_parts_the_first_ones_one_larger(total, world):
    parts = [rank_share(total, rank, world, "sampler.meta_batch_size") for rank in range(world)]
    sizes = [p.stop - p.start for p in parts]
    assert sizes == [total // world + 1] * (total % world) + [total // world] * (world - total % world)
    assert [p.start for p in parts] == [0, *(p.stop for p in parts[:-1])] and parts[-1].stop == total
    sampler = EpisodicSampler(Sinusoid(), shots=3, queries=2, meta_batch_size=total)
    whole = sampler.train_batch(seed=1, step=4)
    batches = [sampler.train_batch(seed=1, step=4, rank=rank, world_size=world) for rank in range(world)]
    assert [b.num_tasks for b in batches] == sizes
    assert torch.equal(torch.cat([b.support_x for b in batches]), whole.support_x)
    assert torch.equal(torch.cat([b.query_y for b in batches]), whole.query_y)


def test_fewer_tasks_than_ranks_is_refused_naming_the_setting():
    sampler = EpisodicSampler(Sinusoid(), shots=3, queries=2, meta_batch_size=3)
    with pytest.raises(MetalearnError) as error:
        sampler.train_batch(seed=0, step=0, rank=0, world_size=4)
    message = str(error.value)
    assert "`sampler.meta_batch_size` = 3" in message and "4 processes" in message and "at least 4" in message


# -- the weighted combination, without processes -----------------------------------------------

def _double(batch: TaskBatch) -> TaskBatch:
    tensors = (t.double() if t.is_floating_point() else t for t in batch.tensors())
    return TaskBatch(*tensors, seed=batch.seed, classes=batch.classes, objective=batch.objective)


def _images():
    """6 image classes of 4..9 random 8x8 images, 2 rotations each."""
    generator = torch.Generator().manual_seed(0)
    pixels = [torch.randint(0, 256, (4 + c, 1, 8, 8), dtype=torch.uint8, generator=generator) for c in range(6)]
    classes = ImageClasses.from_lists(pixels, [str(c) for c in range(6)], rotations=2)
    return ImageTasks({"train": classes, "val": classes, "test": classes}, name="tiny")


INNER = dict(inner_lr=0.05, inner_steps=2, eval_inner_steps=2, outer_lr=1e-3)
MLP_ON_SINES = lambda: MLP((1,), 1, hidden=(16, 16))  # noqa: E731
ALGORITHMS = {  # name: (the algorithm, classification data?, the model)
    "maml": (lambda: MAML(**INNER), False, MLP_ON_SINES),  # second order
    "mamlpp": (lambda: MAMLpp(**INNER, msl_steps=10), False, MLP_ON_SINES),  # the multi-step loss
    "metasgd": (lambda: MetaSGD(**INNER), False, MLP_ON_SINES),
    "reptile": (lambda: Reptile(**INNER, inner_optimizer="adam"), False, MLP_ON_SINES),  # a direction, not a loss
    "protonet": (lambda: ProtoNet(outer_lr=1e-3), True, lambda: Conv4((1, 8, 8), 3, channels=4)),
    "finetune": (lambda: Finetune(**INNER), False, MLP_ON_SINES),  # a mean over pooled examples
    # images, not tasks; no batch norm, which would normalise each rank's images by their own statistics
    "finetune_pretrain": (lambda: Finetune(**INNER, pretrain_batch_size=25), True, lambda: MLP((1, 8, 8), 3, hidden=(16,))),
}


def _step(algo, model, tasks):
    """What a rank all-reduces: its gradient (or direction) and logged loss, and its weight."""
    parameters = list(model.parameters()) + [p for m in _extras(algo) for p in m.parameters()]
    for p in parameters:
        p.grad = None
    step = algo.meta_step(FunctionalModel(model), tasks, iteration=3)
    if step.loss is not None:
        step.loss.backward()
        values = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in parameters]
    else:
        values = [step.direction[name].clone() for name, _ in model.named_parameters()]
    return values + [step.metrics["loss"].clone()], step.weight_on(tasks)


def _extras(algo):
    return [m for m in (getattr(algo, "rates", None), getattr(algo, "classifier", None)) if m is not None]


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_uneven_parts_weighted_by_their_size_make_the_meta_step_of_the_whole_batch(name):
    make, images, network = ALGORITHMS[name]
    torch.manual_seed(0)
    algo, model = make(), network().double()
    if images:
        source = _images()
        sampler = EpisodicSampler(source, shots=2, queries=2, meta_batch_size=25, ways=3)
    else:
        source = Sinusoid()
        sampler = EpisodicSampler(source, shots=5, queries=4, meta_batch_size=25)
    for extra in algo.extra_modules(model, source, sampler).values():
        extra.double()
    batch = algo.train_batch if isinstance(algo, Finetune) else lambda s, *args: s.train_batch(*args)
    whole = _step(algo, model, _double(batch(sampler, 2, 7)))[0]
    parts = [_step(algo, model, _double(batch(sampler, 2, 7, rank, 2))) for rank in range(2)]
    assert parts[0][1] * 12 == parts[1][1] * 13  # 13 and 12 tasks (or their examples, or images)
    combined = [t.clone() for t in parts[0][0]]
    set_weighted_mean_(combined, sum(weighted_flat(values, weight) for values, weight in parts))
    for got, want in zip(combined, whole):
        torch.testing.assert_close(got, want)
    # an unweighted mean of the two parts is not the whole batch's step
    assert not torch.allclose((parts[0][0][0] + parts[1][0][0]) / 2, whole[0])


# -- the trust-region step (TRPO) ----------------------------------------------------------------

class ThreadRanks:
    """A weighted all-reduce between threads, each one rank: what `distributed.weighted_mean_over_ranks`
    does between processes, as a `TrustRegion.reduce`."""

    def __init__(self, world: int) -> None:
        self.barrier = threading.Barrier(world, timeout=60)
        self.slots: list = [None] * world
        self.calls = [0] * world

    def reduce_of(self, rank: int):
        def reduce(value: torch.Tensor, weight: float) -> torch.Tensor:
            self.calls[rank] += 1
            self.slots[rank] = (value.detach().clone(), weight)
            self.barrier.wait()
            out = sum(v * w for v, w in self.slots) / sum(w for _, w in self.slots)
            self.barrier.wait()  # every rank has read the slots before any overwrites its own
            return out

        return reduce


def test_ranks_holding_parts_of_the_meta_batch_take_the_trpo_step_of_the_whole_batch():
    """5 tasks as 3 and 2 on two ranks (threads): with the ranks' gradients, Fisher-vector products and line
    search combined weighted by their parts' sizes, each rank takes the whole batch's step (second-order
    MAML, float64); without the combination a part's step is another one."""
    # random linear classification tasks (each task's labels the argmax of its own linear map): a Fisher
    # whose conjugate gradient does not amplify rounding in its last iterations
    generator = torch.Generator().manual_seed(10)
    torch.manual_seed(10)
    model = MLP((4,), 3, hidden=(16,)).double()
    maps = torch.randn(5, 4, 3, generator=generator, dtype=torch.float64)
    support, query = (torch.randn(5, n, 4, generator=generator, dtype=torch.float64) for n in (8, 10))
    whole = TaskBatch(support, (support @ maps).argmax(-1), query, (query @ maps).argmax(-1))
    parts = [TaskBatch(*(t[part] for t in whole.tensors())) for part in (slice(0, 3), slice(3, 5))]

    def trpo() -> MAML:
        return MAML(inner_lr=0.3, inner_steps=1, eval_inner_steps=1, outer_lr=1e-3, outer_optimizer="trpo", max_kl=0.01)

    expected = trpo().meta_step(FunctionalModel(model), whole)
    assert expected.metrics["step_accepted"] == 1
    ranks, steps, errors = ThreadRanks(2), [None, None], []

    def rank(r: int) -> None:
        try:
            algorithm = trpo()
            algorithm.trust_region.reduce = ranks.reduce_of(r)
            steps[r] = algorithm.meta_step(FunctionalModel(copy.deepcopy(model)), parts[r])
        except BaseException as error:  # noqa: BLE001 - reported by the test thread
            errors.append(error)
            ranks.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    # the gradient with the loss, 11 Fisher-vector products (10 CG iterations and the curvature), each try
    assert ranks.calls[0] == ranks.calls[1] == 12 + int(expected.metrics["line_search_tries"])
    for step in steps:
        for name, direction in expected.direction.items():
            torch.testing.assert_close(step.direction[name], direction, rtol=1e-9, atol=1e-12)
        for key in ("loss_after", "kl", "line_search_tries", "step_accepted"):
            torch.testing.assert_close(step.metrics[key], expected.metrics[key], rtol=1e-9, atol=1e-12)
    alone = trpo().meta_step(FunctionalModel(model), parts[0])
    assert not torch.allclose(flat(alone.direction), flat(expected.direction))


#: MAML-TRPO on nav2d, 5 tasks (3 and 2 on two ranks) of 2 episodes of 10 steps, 2 meta-iterations. In
#: float32 the last of the 10 conjugate-gradient iterations amplify rounding: one process that merely
#: chunks its tasks otherwise (algo.task_chunk=3) moves the parameters by ~1e-3 from the unchunked run,
#: as 2 ranks do; with 3 iterations both agree to ~1e-7.
NAV2D_TRPO = ["data=nav2d", "data.horizon=10", "sampler.meta_batch_size=5", "sampler.shots=2", "sampler.queries=2",
              "algo.outer_optimizer=trpo", "algo.trpo_cg_iters=3", "trainer.max_steps=2",
              "trainer.val_check_interval=100000", "eval.num_tasks=2", "eval.val_tasks=2",
              "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "logger=csv"]


def test_two_ranks_take_the_trpo_steps_of_one_process_on_episodes(run_cli, metalearn, tmp_path):
    metalearn("train", *NAV2D_TRPO, "hydra.run.dir=single", check=True)
    proc = run_cli("train", *NAV2D_TRPO, "trainer=ddp_cpu", "hydra.run.dir=ddp", check=True, timeout=600)
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    rows = [[row for row in csv.DictReader((tmp_path / run / "metrics.csv").open()) if row.get("train/kl")]
            for run in ("single", "ddp")]
    assert len(rows[0]) == len(rows[1]) == 2 and all(float(row["train/step_accepted"]) == 1 for row in rows[0])
    for key in ("train/loss_after", "train/kl", "train/line_search_tries", "train/step_accepted"):
        assert [float(r[key]) for r in rows[1]] == pytest.approx([float(r[key]) for r in rows[0]], rel=1e-5)
    single = torch.load(tmp_path / "single/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    ddp = torch.load(tmp_path / "ddp/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    for key, value in single.items():
        torch.testing.assert_close(ddp[key], value, rtol=1e-5, atol=1e-6)
