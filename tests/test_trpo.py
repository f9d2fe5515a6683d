"""MAML's trust-region outer step (algo.outer_optimizer=trpo): conjugate gradient, Fisher-vector
products through the inner loop, the KL limit and line search, the step applied by the Lightning
module; the KL between predictive distributions that supervised tasks give; and evaluation's
step-size schedule (algo.eval_inner_lr as a list)."""

import copy
import math

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from metalearn_cli.algorithms import MAML, FunctionalModel, Reptile
from metalearn_cli.algorithms.base import adapt
from metalearn_cli.algorithms.inner_optim import InnerSGD
from metalearn_cli.algorithms.trpo import AdaptationFisher, conjugate_gradient, flat, hessian_vector_product, trpo_step
from metalearn_cli.build import build_experiment, build_tasks, build_trainer
from metalearn_cli.data.sinusoid import Sinusoid
from metalearn_cli.models import MLP, Conv4
from metalearn_cli.module import MetaLearner
from metalearn_cli.options import OptionError
from metalearn_cli.tasks import CLASSIFICATION, REGRESSION, TaskBatch

MAX_KL = 0.01


def linear_tasks(generator, num_tasks=6, shots=8, queries=10, dim=4, ways=3, dtype=torch.float32) -> TaskBatch:
    """Random linear classification tasks: each task's labels are the argmax of its own linear map."""
    weights = torch.randn(num_tasks, dim, ways, generator=generator, dtype=dtype)
    support = torch.randn(num_tasks, shots, dim, generator=generator, dtype=dtype)
    query = torch.randn(num_tasks, queries, dim, generator=generator, dtype=dtype)
    return TaskBatch(support, (support @ weights).argmax(-1), query, (query @ weights).argmax(-1))


def image_tasks(generator, num_tasks=3, ways=3, dtype=torch.float64) -> TaskBatch:
    labels = torch.arange(2 * ways).remainder(ways).expand(num_tasks, -1)
    images = [torch.randn(num_tasks, 2 * ways, 1, 8, 8, generator=generator, dtype=dtype) for _ in range(2)]
    return TaskBatch(images[0], labels, images[1], labels)


def sinusoid_tasks(generator, num_tasks=4, dtype=torch.float32) -> TaskBatch:
    tasks = Sinusoid().sample("train", generator, num_tasks, None, 5, 5)
    return TaskBatch(*(t.to(dtype) for t in tasks.tensors()))


def trpo_maml(**kwargs) -> MAML:
    settings = dict(inner_lr=0.3, inner_steps=1, eval_inner_steps=1, outer_lr=1e-3, outer_optimizer="trpo", max_kl=MAX_KL)
    return MAML(**{**settings, **kwargs})


# -- the parts of a step ------------------------------------------------------------------------
def test_conjugate_gradient_solves_a_symmetric_positive_definite_system():
    generator = torch.Generator().manual_seed(0)
    m = torch.randn(8, 8, generator=generator, dtype=torch.float64)
    matrix = m @ m.T + 0.5 * torch.eye(8, dtype=torch.float64)
    b = torch.randn(8, generator=generator, dtype=torch.float64)
    x = conjugate_gradient(lambda v: matrix @ v, b, iters=8)
    torch.testing.assert_close(matrix @ x, b, rtol=0, atol=1e-9)
    torch.testing.assert_close(x, torch.linalg.solve(matrix, b), rtol=1e-8, atol=1e-9)
    # fewer iterations than dimensions: an approximation, better than the start
    rough = conjugate_gradient(lambda v: matrix @ v, b, iters=2)
    assert 1e-6 < (matrix @ rough - b).norm() < b.norm()


def _query_kl_problem(tasks, model, steps, first_order, keys=None):
    """theta's leaves, its adapted parameters (with the graph), and kl(theta) as one function."""
    fmodel = FunctionalModel(model)
    task_model = fmodel.on("batched")
    theta = {k: v.detach().requires_grad_(True) for k, v in fmodel.params().items()}
    keys = None if keys is None else fmodel.inner_keys(keys)
    adapted, _ = adapt(task_model, theta, tasks, steps, InnerSGD(0.3), keys, differentiable=True, first_order=first_order)
    old = {k: v.detach() for k, v in adapted.items()}

    def kl_of_adapted(new):
        return tasks.query_kl(task_model, old, new, steps).sum() / tasks.num_tasks

    def kl(parameters):
        again, _ = adapt(task_model, parameters, tasks, steps, InnerSGD(0.3), keys, differentiable=True, first_order=first_order)
        return kl_of_adapted(again)

    return theta, adapted, kl_of_adapted, kl


@pytest.mark.parametrize("kind, first_order, keys", [
    ("classification", False, None), ("regression", False, None), ("classification", True, None), ("classification", False, "head"),
])
def test_fisher_vector_product_through_the_inner_loop_is_the_hessian_of_the_kl(kind, first_order, keys):
    """J^T H_KL J v equals the plain double-backward Hessian-vector product of the mean query KL as a
    function of theta (exact MAML, FO-MAML's identity J, and adapting only the head)."""
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    if kind == "classification":
        tasks, model = linear_tasks(generator, 3, 5, 6, dtype=torch.float64), MLP((4,), 3, hidden=(6,)).double()
    else:
        tasks, model = sinusoid_tasks(generator, 3, torch.float64), MLP((1,), 1, hidden=(6,)).double()
    theta, adapted, kl_of_adapted, kl = _query_kl_problem(tasks, model, 2, first_order, keys)
    fisher = AdaptationFisher(theta, [(adapted, kl_of_adapted)])
    plain = hessian_vector_product(kl, theta)
    for _ in range(2):
        v = torch.randn(flat(theta).numel(), generator=generator, dtype=torch.float64)
        expected = plain(v)
        assert expected.abs().max() > 1e-3
        torch.testing.assert_close(fisher(v), expected, rtol=1e-10, atol=1e-12)


def test_fisher_vector_product_through_conv_and_batch_norm_matches_finite_differences():
    """With batch norm the plain product needs third-order autograd, which PyTorch's fused batch norm lacks
    (`metalearn_cli.batch_norm` has it); the product through the inner loop does not, and both equal central
    differences of the KL's gradient."""
    generator = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    model = Conv4((1, 8, 8), 3, channels=4, blocks=2, bn="per_step").double()
    theta, adapted, kl_of_adapted, kl = _query_kl_problem(image_tasks(generator), model, 1, False)
    v = torch.randn(flat(theta).numel(), generator=generator, dtype=torch.float64)
    plain = hessian_vector_product(kl, theta)(v)
    product = AdaptationFisher(theta, [(adapted, kl_of_adapted)])(v)

    def kl_gradient(shift: float) -> torch.Tensor:
        moved = {k: (t.detach() + shift * d).requires_grad_(True) for (k, t), d in zip(theta.items(), _cut(v, theta))}
        return flat(dict(zip(moved, torch.autograd.grad(kl(moved), list(moved.values())))))

    eps = 1e-5
    torch.testing.assert_close(product, (kl_gradient(eps) - kl_gradient(-eps)) / (2 * eps), rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(plain, product, rtol=1e-8, atol=1e-10)


def _cut(vector, like):
    out, start = [], 0
    for t in like.values():
        out.append(vector[start : start + t.numel()].view_as(t))
        start += t.numel()
    return out


def test_supervised_query_kl_is_that_of_the_predictive_distributions():
    generator = torch.Generator().manual_seed(3)
    torch.manual_seed(3)
    tasks = linear_tasks(generator, 2, 4, 5, dtype=torch.float64)
    model = MLP((4,), 3, hidden=(5,)).double()
    fmodel = FunctionalModel(model)
    task_model = fmodel.on("loop")
    old = {k: v.detach().expand(2, *v.shape) for k, v in fmodel.params().items()}
    new = {k: v + 0.1 * torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in old.items()}
    p, q = (task_model(params, tasks.query_x).softmax(-1) for params in (old, new))
    expected = (p * (p / q).log()).sum(-1).mean(1)
    torch.testing.assert_close(tasks.query_kl(task_model, old, new, 0), expected)
    torch.testing.assert_close(tasks.query_kl(task_model, old, old, 0), torch.zeros(2, dtype=torch.float64))
    regression = TaskBatch(tasks.support_x, torch.randn(2, 4, 3, dtype=torch.float64), tasks.query_x, torch.randn(2, 5, 3, dtype=torch.float64))
    assert regression.objective is REGRESSION and tasks.objective is CLASSIFICATION
    mu_old, mu_new = (task_model(params, tasks.query_x) for params in (old, new))
    torch.testing.assert_close(regression.query_kl(task_model, old, new, 0), 0.5 * (mu_old - mu_new).pow(2).sum(-1).mean(1))


# -- whole steps ------------------------------------------------------------------------------
def test_a_step_on_a_quadratic_goes_to_the_trust_region_edge_and_a_wrong_gradient_is_rejected():
    theta = {"w": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)}
    target = torch.zeros(3, dtype=torch.float64)

    def loss_and_kl(candidate):  # Fisher = identity: kl = 0.5 |theta' - theta|^2
        return (candidate["w"] - target).pow(2).sum().item(), 0.5 * (candidate["w"] - theta["w"]).pow(2).sum().item()

    loss_before = loss_and_kl(theta)[0]
    gradient = {"w": 2 * (theta["w"] - target)}
    step = trpo_step(theta, gradient, lambda v: v, loss_and_kl, loss_before, max_kl=MAX_KL, damping=1e-5)
    assert step.accepted and step.tries == 1 and step.loss_after < loss_before
    assert step.kl == pytest.approx(MAX_KL / (1 + 1e-5), rel=1e-9)
    torch.testing.assert_close(theta["w"] - step.params["w"], math.sqrt(2 * MAX_KL) * gradient["w"] / gradient["w"].norm() / math.sqrt(1 + 1e-5))
    uphill = trpo_step(theta, {"w": -gradient["w"]}, lambda v: v, loss_and_kl, loss_before, max_kl=MAX_KL)
    assert not uphill.accepted and uphill.tries == 15 and uphill.kl == 0.0 and uphill.loss_after == loss_before
    assert torch.equal(uphill.params["w"], theta["w"])


@pytest.mark.parametrize("first_order", [False, True])
def test_each_maml_trpo_step_stays_within_the_kl_limit_and_lowers_the_loss_or_stays(first_order):
    generator = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    model = MLP((4,), 3, hidden=(16,))
    fmodel = FunctionalModel(model)
    algorithm = trpo_maml(first_order=first_order, vectorize="batched")
    accepted = 0
    for _ in range(4):
        tasks = linear_tasks(generator)
        theta = {k: v.detach().clone() for k, v in fmodel.params().items()}
        step = algorithm.meta_step(fmodel, tasks)
        new = {k: theta[k] - step.direction[k] for k in theta}
        kl, loss_after = step.metrics["kl"].item(), step.metrics["loss_after"].item()
        assert kl <= MAX_KL and step.metrics["line_search_tries"] >= 1
        if step.metrics["step_accepted"]:
            accepted += 1
            assert loss_after < step.metrics["loss"].item() and kl > 0
            # recomputed independently: adapt from theta and theta_new, compare the query predictions
            task_model = fmodel.on("loop")
            before, _ = adapt(task_model, theta, tasks, 1, InnerSGD(0.3))
            after, _ = adapt(task_model, new, tasks, 1, InnerSGD(0.3))
            with torch.no_grad():
                assert tasks.query_kl(task_model, before, after, 1).mean().item() == pytest.approx(kl, rel=1e-4)
                assert tasks.query_loss(task_model, after, 1).mean().item() == pytest.approx(loss_after, rel=1e-5)
        else:
            assert all(torch.equal(d, torch.zeros_like(d)) for d in step.direction.values())
            assert loss_after == step.metrics["loss"].item()
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(new[name])
    assert accepted >= 3


def test_every_execution_takes_the_same_trpo_step():
    """Parts of the meta-batch (batched in chunks, the loop) sum to the same gradient, Fisher products and
    line search as one pass."""
    generator = torch.Generator().manual_seed(10)
    torch.manual_seed(10)
    fmodel = FunctionalModel(MLP((4,), 3, hidden=(16,)).double())
    tasks = linear_tasks(generator, dtype=torch.float64)
    whole = trpo_maml(vectorize="batched").meta_step(fmodel, tasks)
    assert whole.metrics["step_accepted"] == 1
    for execution in (dict(vectorize="batched", task_chunk=4), dict(vectorize="loop")):
        step = trpo_maml(**execution).meta_step(fmodel, tasks)
        for name, direction in whole.direction.items():
            torch.testing.assert_close(step.direction[name], direction, rtol=1e-9, atol=1e-12)


def test_a_trpo_meta_iteration_through_the_lightning_module_applies_theta_new(tmp_path):
    """The module's direction path with SGD(lr=1) leaves exactly theta_new; batch-norm running statistics
    (model.bn=frozen) are still recorded after the step."""
    generator = torch.Generator().manual_seed(5)
    torch.manual_seed(5)
    tasks = image_tasks(generator, num_tasks=4, dtype=torch.float32)
    model = Conv4((1, 8, 8), 3, channels=4, blocks=2, bn="frozen")
    algorithm = trpo_maml(vectorize="batched")
    copied = copy.deepcopy(model)
    expected = algorithm.meta_step(FunctionalModel(copied), tasks)
    assert expected.metrics["step_accepted"] == 1
    theta = {k: v.detach().clone() for k, v in model.named_parameters()}
    theta_new = {k: theta[k] - expected.direction[k] for k in theta}
    running = [b.clone() for name, b in model.named_buffers() if "running_mean" in name]
    module = MetaLearner(model, algorithm, CLASSIFICATION, metadata={})
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                         inference_mode=False, enable_progress_bar=False, enable_model_summary=False,
                         limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=DataLoader([[tasks]], batch_size=None))
    assert trainer.global_step == 1
    assert type(trainer.optimizers[0]) is torch.optim.SGD and trainer.optimizers[0].param_groups[0]["lr"] == 1.0
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.detach(), theta_new[name], rtol=0, atol=1e-6)
    assert any(not torch.equal(model.get_parameter(k), theta[k]) for k in theta)
    after = [b for name, b in model.named_buffers() if "running_mean" in name]
    assert all(not torch.equal(a, b) for a, b in zip(after, running))


def test_trpo_settings_are_checked_by_maml(compose_cfg):
    with pytest.raises(OptionError, match="`algo.outer_optimizer`: 'sgd'"):
        build_tasks(compose_cfg("algo.outer_optimizer=sgd"))
    with pytest.raises(OptionError, match="`algo.max_kl`: 0"):
        build_tasks(compose_cfg("algo.outer_optimizer=trpo", "algo.max_kl=0"))
    with pytest.raises(OptionError, match="algo.outer_lr_schedule=cosine"):
        build_tasks(compose_cfg("algo.outer_optimizer=trpo", "algo.outer_lr_schedule=cosine"))
    with pytest.raises(OptionError, match="not available for algo=metasgd"):
        build_tasks(compose_cfg("algo=metasgd", "algo.outer_optimizer=trpo"))
    parts = build_tasks(compose_cfg("algo=fomaml", "algo.outer_optimizer=trpo"))
    assert parts.algorithm.outer_optimizer == "trpo" and parts.algorithm.first_order


def test_trpo_builds_a_multi_process_trainer(compose_cfg, tmp_path):
    """The ranks combine the step's quantities (tests/test_distributed.py); nothing is refused."""
    cfg = compose_cfg("algo.outer_optimizer=trpo", "trainer=ddp_cpu", "~logger")
    assert build_trainer(cfg, tmp_path, build_experiment(cfg), training=True).world_size == 2


# -- evaluation's step sizes ------------------------------------------------------------------
def test_evaluation_follows_the_step_size_schedule():
    """eval_inner_lr=[0.1, 0.05]: 0.1 for the first step, 0.05 for every later one, as plain SGD by hand."""
    generator = torch.Generator().manual_seed(6)
    torch.manual_seed(6)
    tasks = sinusoid_tasks(generator, 3, torch.float64)
    model = MLP((1,), 1, hidden=(8,)).double()
    fmodel = FunctionalModel(model)
    algorithm = MAML(inner_lr=0.01, inner_steps=1, eval_inner_steps=3, outer_lr=1e-3, eval_inner_lr=[0.1, 0.05], vectorize="vmap")
    assert algorithm.eval_protocol()["eval_inner_lr"] == [0.1, 0.05]
    scores = algorithm.evaluate(fmodel, tasks)
    for t in range(tasks.num_tasks):
        params = {k: v.detach() for k, v in fmodel.params().items()}
        expected = []
        for step, lr in enumerate([None, 0.1, 0.05, 0.05]):
            if lr is not None:
                grads = torch.func.grad(lambda p: torch.nn.functional.mse_loss(fmodel(p, tasks.support_x[t]), tasks.support_y[t]))(params)
                params = {k: params[k] - lr * grads[k] for k in params}
            expected.append(torch.nn.functional.mse_loss(fmodel(params, tasks.query_x[t]), tasks.query_y[t]))
        torch.testing.assert_close(scores[t], torch.stack(expected).detach())
    constant = MAML(inner_lr=0.01, inner_steps=1, eval_inner_steps=3, outer_lr=1e-3, eval_inner_lr=[0.1], vectorize="vmap")
    assert constant.eval_inner_lr == 0.1 and not torch.allclose(constant.evaluate(fmodel, tasks), scores)
    reptile = Reptile(inner_lr=0.01, inner_steps=1, eval_inner_steps=3, outer_lr=0.1, eval_inner_lr=[0.1, 0.05], vectorize="vmap")
    torch.testing.assert_close(reptile.evaluate(fmodel, tasks), scores)


@pytest.mark.parametrize("value", [[], [0.1, -0.05], [0.1, "x"], "x", 0])
def test_a_bad_step_size_schedule_is_refused(value):
    with pytest.raises(OptionError, match="`eval_inner_lr`.*a non-empty list of them|`eval_inner_lr`.*finite number > 0"):
        MAML(inner_lr=0.01, inner_steps=1, eval_inner_steps=3, outer_lr=1e-3, eval_inner_lr=value)


def test_a_schedule_needs_sgd_at_evaluation():
    with pytest.raises(OptionError, match="one number with eval_inner_optimizer=adam"):
        Reptile(inner_lr=0.01, inner_steps=1, eval_inner_steps=3, outer_lr=0.1, eval_inner_lr=[0.1, 0.05], eval_inner_optimizer="adam")


def test_trpo_on_episodes_stays_within_the_kl_limit_and_its_fisher_product_is_the_kl_hessian():
    """Reinforcement learning (nav2d, a tiny policy, short episodes): the product through the
    policy-gradient inner step equals the plain Hessian-vector product of the query episodes' mean KL
    (float64), and a meta-step keeps the KL within the limit and lowers the surrogate, or stays."""
    from metalearn_cli.data.nav2d import Nav2d
    from metalearn_cli.models import GaussianMLP

    source = Nav2d(horizon=10)
    torch.manual_seed(7)
    model = GaussianMLP(source.input_shape, source.output_dim(None), hidden=(8,)).double()
    tasks = source.sample("train", torch.Generator().manual_seed(7), 3, None, 4, 4)
    theta, adapted, kl_of_adapted, kl = _query_kl_problem(tasks, model, 1, False)
    tasks.query_loss(FunctionalModel(model).on("batched"), adapted, 1)  # the query episodes, by the adapted policy
    v = torch.randn(flat(theta).numel(), generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    expected = hessian_vector_product(kl, theta)(v)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(AdaptationFisher(theta, [(adapted, kl_of_adapted)])(v), expected, rtol=1e-10, atol=1e-12)

    algorithm = trpo_maml(inner_lr=0.1, vectorize="batched")
    step = algorithm.meta_step(FunctionalModel(model), source.sample("train", torch.Generator().manual_seed(9), 3, None, 4, 4))
    assert step.metrics["kl"] <= MAX_KL and "return" in step.metrics
    if step.metrics["step_accepted"]:
        assert step.metrics["loss_after"] < step.metrics["loss"] and step.metrics["kl"] > 0
    else:
        assert all(not d.any() for d in step.direction.values())
