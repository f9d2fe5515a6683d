"""Meta-gradients against independent computations (float64, tiny models)."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metalearn_cli.algorithms import MAML, FunctionalModel, Reptile
from metalearn_cli.data.sinusoid import Sinusoid
from metalearn_cli.models import MLP
from metalearn_cli.tasks import REGRESSION, TaskBatch

INNER_LR = 0.05


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = MLP((1,), 1, hidden=(6, 5)).double()
    tasks = Sinusoid().sample("train", torch.Generator().manual_seed(3), 3, None, 5, 4)
    tasks = TaskBatch(*(t.double() for t in tasks.tensors()), seed=7)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().flatten() for p in model.parameters()])

    def unflatten(vector):
        out, i = {}, 0
        for name, shape in zip(names, shapes):
            out[name] = vector[i : i + shape.numel()].view(shape)
            i += shape.numel()
        return out

    def loss(vector, x, y):  # plain autograd, no torch.func transforms
        return F.mse_loss(functional_call(model, unflatten(vector), (x,)), y)

    return model, tasks, theta, unflatten, loss


def meta_gradient(model, tasks, **kwargs) -> torch.Tensor:
    algo = MAML(inner_lr=INNER_LR, eval_inner_steps=1, outer_lr=1e-3, **kwargs)
    model.zero_grad()
    algo.meta_step(FunctionalModel(model), tasks).loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("vectorize", ["batched", "vmap", "loop"])
def test_maml_gradient_matches_finite_differences(setup, vectorize):
    model, tasks, theta, _, loss = setup
    steps = 2

    def meta_objective(vector):
        total = 0.0
        for i in range(tasks.num_tasks):
            w = vector.clone().requires_grad_(True)
            with torch.enable_grad():
                for _ in range(steps):
                    g = torch.autograd.grad(loss(w, tasks.support_x[i], tasks.support_y[i]), w, create_graph=True)[0]
                    w = w - INNER_LR * g
                total = total + loss(w, tasks.query_x[i], tasks.query_y[i]).item()
        return total / tasks.num_tasks

    eps = 1e-6
    numeric = torch.zeros_like(theta)
    for j in range(theta.numel()):
        e = torch.zeros_like(theta)
        e[j] = eps
        numeric[j] = (meta_objective(theta + e) - meta_objective(theta - e)) / (2 * eps)
    ours = meta_gradient(model, tasks, inner_steps=steps, vectorize=vectorize)
    assert numeric.abs().max() > 1e-3  # the check is not vacuous
    torch.testing.assert_close(ours, numeric, rtol=1e-6, atol=1e-8)


def _explicit_terms(setup):
    """One inner step: MAML grad = mean_i (I - a H_s,i(theta)) g_q,i(theta'_i); FO drops the H term."""
    model, tasks, theta, _, loss = setup
    first, second = torch.zeros_like(theta), torch.zeros_like(theta)
    for i in range(tasks.num_tasks):
        xs, ys, xq, yq = (t[i] for t in tasks.tensors())
        w = theta.clone().requires_grad_(True)
        g_s = torch.autograd.grad(loss(w, xs, ys), w)[0]
        adapted = (theta - INNER_LR * g_s).requires_grad_(True)
        g_q = torch.autograd.grad(loss(adapted, xq, yq), adapted)[0]
        hessian = torch.autograd.functional.hessian(lambda v: loss(v, xs, ys), theta)
        first += g_q
        second += -INNER_LR * hessian @ g_q
    n = tasks.num_tasks
    return first / n, second / n


@pytest.mark.parametrize("vectorize", ["batched", "vmap", "loop"])
def test_maml_gradient_matches_hessian_formula(setup, vectorize):
    model, tasks, *_ = setup
    first, second = _explicit_terms(setup)
    assert second.abs().max() > 1e-6  # the second-order term is really there
    torch.testing.assert_close(meta_gradient(model, tasks, inner_steps=1, vectorize=vectorize), first + second)


@pytest.mark.parametrize("vectorize", ["batched", "vmap", "loop"])
def test_fomaml_drops_exactly_the_second_order_term(setup, vectorize):
    model, tasks, *_ = setup
    first, second = _explicit_terms(setup)
    full = meta_gradient(model, tasks, inner_steps=1, vectorize=vectorize)
    fo = meta_gradient(model, tasks, inner_steps=1, vectorize=vectorize, first_order=True)
    torch.testing.assert_close(fo, first)
    torch.testing.assert_close(full - fo, second)


def test_maml_does_not_modify_the_model(setup):
    model, tasks, *_ = setup
    before = {k: v.clone() for k, v in model.state_dict().items()}
    MAML(inner_lr=INNER_LR, inner_steps=3, eval_inner_steps=1, outer_lr=1e-3).meta_step(FunctionalModel(model), tasks)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def _reptile_reference(model, tasks, theta, loss, optimizer_cls, optimizer_kwargs, steps, epsilon):
    """theta + epsilon * mean_i(theta~_i - theta), with theta~_i from torch.optim on the support set."""
    adapted = []
    for i in range(tasks.num_tasks):
        w = theta.clone().requires_grad_(True)
        opt = optimizer_cls([w], **optimizer_kwargs)
        for _ in range(steps):
            opt.zero_grad()
            loss(w, tasks.support_x[i], tasks.support_y[i]).backward()
            opt.step()
        adapted.append(w.detach())
    return theta + epsilon * (torch.stack(adapted).mean(0) - theta)


@pytest.mark.parametrize(
    "inner, reference",
    [
        ("sgd", (torch.optim.SGD, {"lr": 0.02})),
        ("adam", (torch.optim.Adam, {"lr": 0.02, "betas": (0.0, 0.999)})),
    ],
)
@pytest.mark.parametrize("vectorize, task_chunk", [("batched", "auto"), ("batched", 2), ("vmap", "auto"), ("loop", "auto")])
def test_one_reptile_step_equals_the_formula(setup, inner, reference, vectorize, task_chunk):
    model, tasks, theta, _, loss = setup
    epsilon, steps = 0.7, 4
    algo = Reptile(
        inner_lr=0.02, inner_steps=steps, eval_inner_steps=1, outer_lr=epsilon,
        inner_optimizer=inner, vectorize=vectorize, task_chunk=task_chunk,
    )
    config = algo.configure_optimizers(model.parameters(), max_steps=100)
    step = algo.meta_step(FunctionalModel(model), tasks)
    for name, p in model.named_parameters():
        p.grad = step.direction[name]
    config["optimizer"].step()
    ours = torch.cat([p.detach().flatten() for p in model.parameters()])
    expected = _reptile_reference(model, tasks, theta, loss, *reference, steps, epsilon)
    assert (expected - theta).abs().max() > 1e-4
    torch.testing.assert_close(ours, expected)


def _adam_from(w, state, lr):
    """torch.optim.Adam on w (betas 0, 0.999), starting from `state` (t, m, v as flat vectors) if given."""
    opt = torch.optim.Adam([w], lr=lr, betas=(0.0, 0.999))
    if state is not None:
        opt.state[w] = {"step": torch.tensor(float(state[0]), dtype=torch.float64), "exp_avg": state[1].clone(), "exp_avg_sq": state[2].clone()}
    return opt


def _flat_state(carried, unflatten):
    state = carried.state()
    order = list(unflatten(torch.zeros(1000)).keys())
    return state["t"], torch.cat([state["m"][k].flatten() for k in order]), torch.cat([state["v"][k].flatten() for k in order])


@pytest.mark.parametrize("vectorize, task_chunk", [("batched", "auto"), ("batched", 2), ("vmap", "auto")])
def test_reptile_carried_adam_state_matches_torch_adam(setup, vectorize, task_chunk):
    """inner_state=carry: a task's inner Adam starts from the carried moments and step count (as a
    torch.optim.Adam given that state); after a meta-batch the state is the tasks' own steps
    combined one after another; evaluation starts from it too. Two meta-iterations from zero."""
    model, tasks, theta, unflatten, loss = setup
    lr, steps = 0.02, 3
    algo = Reptile(inner_lr=lr, inner_steps=steps, eval_inner_steps=2, eval_inner_lr=lr, outer_lr=1.0,
                   inner_optimizer="adam", eval_inner_optimizer="adam", inner_state="carry",
                   vectorize=vectorize, task_chunk=task_chunk)
    fmodel = FunctionalModel(model)
    state, w0 = None, theta.clone()
    for _ in range(2):
        step = algo.meta_step(fmodel, tasks)
        finals, moments = [], []
        for i in range(tasks.num_tasks):  # every task from the same carried state, by torch.optim.Adam
            w = w0.clone().requires_grad_(True)
            opt = _adam_from(w, state, lr)
            for _ in range(steps):
                opt.zero_grad()
                loss(w, tasks.support_x[i], tasks.support_y[i]).backward()
                opt.step()
            finals.append(w.detach())
            moments.append((opt.state[w]["exp_avg"], opt.state[w]["exp_avg_sq"]))
        torch.testing.assert_close(torch.cat([step.direction[k].flatten() for k in unflatten(theta)]), w0 - torch.stack(finals).mean(0))
        old_t, old_m, old_v = state if state is not None else (0, torch.zeros_like(theta), torch.zeros_like(theta))
        n = tasks.num_tasks  # one after another: older moments decay, each task adds its own steps
        m = sum(0.0 ** ((n - 1 - i) * steps) * (moments[i][0] - 0.0**steps * old_m) for i in range(n)) + 0.0 ** (n * steps) * old_m
        v = sum(0.999 ** ((n - 1 - i) * steps) * (moments[i][1] - 0.999**steps * old_v) for i in range(n)) + 0.999 ** (n * steps) * old_v
        t, ours_m, ours_v = _flat_state(algo.carried, unflatten)
        assert t == old_t + n * steps
        torch.testing.assert_close(ours_m, m)
        torch.testing.assert_close(ours_v, v)
        torch.testing.assert_close(ours_m, moments[-1][0])  # beta1 = 0: the last task's last gradient
        state = (t, ours_m, ours_v)
    # evaluation: every task adapts from the carried state (and the weights, untouched here: w0)
    scores = algo.evaluate(fmodel, tasks)
    for i in range(tasks.num_tasks):
        w = w0.clone().requires_grad_(True)
        opt = _adam_from(w, state, lr)
        for _ in range(2):
            opt.zero_grad()
            loss(w, tasks.support_x[i], tasks.support_y[i]).backward()
            opt.step()
        torch.testing.assert_close(scores[i, -1], loss(w.detach(), tasks.query_x[i], tasks.query_y[i]))
    reset = Reptile(inner_lr=lr, inner_steps=steps, eval_inner_steps=2, eval_inner_lr=lr, outer_lr=1.0,
                    inner_optimizer="adam", eval_inner_optimizer="adam", vectorize=vectorize, task_chunk=task_chunk)
    assert not torch.allclose(reset.evaluate(fmodel, tasks)[:, -1], scores[:, -1])  # the carried state matters


def test_reptile_carry_needs_adam():
    with pytest.raises(ValueError, match="carries Adam"):
        Reptile(inner_lr=0.1, inner_steps=1, eval_inner_steps=1, outer_lr=1.0, inner_state="carry")


def test_reptile_meta_step_size_is_annealed_linearly(setup):
    model, *_ = setup
    algo = Reptile(inner_lr=0.1, inner_steps=1, eval_inner_steps=1, outer_lr=1.0, outer_lr_final=0.2)
    config = algo.configure_optimizers(model.parameters(), max_steps=10)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(11):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    torch.testing.assert_close(torch.tensor(rates, dtype=torch.float64), torch.linspace(1.0, 0.2, 11, dtype=torch.float64))


@pytest.mark.parametrize("final", [0.0, 1e-4])
def test_maml_cosine_schedule_anneals_the_meta_learning_rate(setup, final):
    """outer_lr_schedule=cosine: lr_t = final + (lr - final) (1 + cos(pi t / T)) / 2, held at final after T;
    the default keeps Adam's rate constant, as in the paper."""
    model, *_ = setup
    algo = MAML(inner_lr=0.1, inner_steps=1, eval_inner_steps=1, outer_lr=1e-3, outer_lr_schedule="cosine", outer_lr_final=final)
    config = algo.configure_optimizers(model.parameters(), max_steps=8)
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.Adam)
    rates = []
    for _ in range(11):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [final + (1e-3 - final) * (1 + math.cos(math.pi * min(t, 8) / 8)) / 2 for t in range(11)]
    torch.testing.assert_close(torch.tensor(rates, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64))
    assert rates[4] == pytest.approx((1e-3 + final) / 2) and rates[8] == rates[10] == pytest.approx(final)
    constant = MAML(inner_lr=0.1, inner_steps=1, eval_inner_steps=1, outer_lr=1e-3).configure_optimizers(model.parameters(), 8)
    assert "lr_scheduler" not in constant and constant["optimizer"].param_groups[0]["lr"] == 1e-3
    with pytest.raises(ValueError, match="outer_lr_schedule`: 'linear'"):
        MAML(inner_lr=0.1, inner_steps=1, eval_inner_steps=1, outer_lr=1e-3, outer_lr_schedule="linear")


@pytest.mark.parametrize("vectorize", ["batched", "vmap"])
def test_maml_first_order_steps_then_the_exact_gradient(setup, vectorize):
    """first_order_steps=2: meta-iterations 0 and 1 follow FO-MAML's gradient, 2 and later the exact
    second-order one (each checked against the algorithm run with first_order fixed)."""
    model, tasks, *_ = setup

    def gradient(algo, iteration):
        model.zero_grad()
        algo.meta_step(FunctionalModel(model), tasks, iteration=iteration).loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    kwargs = dict(inner_lr=INNER_LR, inner_steps=2, eval_inner_steps=1, outer_lr=1e-3, vectorize=vectorize)
    first = gradient(MAML(first_order=True, **kwargs), 0)
    exact = gradient(MAML(**kwargs), 0)
    assert (first - exact).abs().max() > 1e-4  # the two differ, so the comparisons below can fail
    annealed = MAML(first_order_steps=2, **kwargs)
    for iteration, expected in [(0, first), (1, first), (2, exact), (7, exact)]:
        torch.testing.assert_close(gradient(annealed, iteration), expected, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="first_order_steps"):
        MAML(first_order_steps=-1, **kwargs)


def test_reptile_minibatches_cover_the_support_set_each_epoch(setup):
    _, tasks, *_ = setup
    algo = Reptile(inner_lr=0.1, inner_steps=5, eval_inner_steps=1, outer_lr=1.0, inner_batch_size=2)
    index = algo._batch_indices(tasks)  # 5 support points, batches of 2, 5 steps = 2 epochs
    assert index.shape == (tasks.num_tasks, 5, 2)
    first_epoch = index.flatten(1)[:, :5]
    assert all(sorted(row.tolist()) == [0, 1, 2, 3, 4] for row in first_epoch)


@pytest.mark.parametrize("vectorize, task_chunk", [("batched", "auto"), ("batched", 2), ("vmap", "auto"), ("loop", "auto")])
def test_evaluation_scores_match_manual_sgd(setup, vectorize, task_chunk):
    model, tasks, theta, unflatten, loss = setup
    algo = MAML(inner_lr=INNER_LR, inner_steps=1, eval_inner_steps=3, outer_lr=1e-3, vectorize=vectorize, task_chunk=task_chunk)
    with torch.no_grad():  # as in Lightning's validation loop: adaptation must still work
        scores = algo.evaluate(FunctionalModel(model), tasks)
    assert scores.shape == (tasks.num_tasks, 4)
    for i in range(tasks.num_tasks):
        xs, ys, xq, yq = (t[i] for t in tasks.tensors())
        w = theta.clone()
        expected = [loss(w, xq, yq).item()]
        for _ in range(3):
            w.requires_grad_(True)
            with torch.enable_grad():
                g = torch.autograd.grad(loss(w, xs, ys), w)[0]
            w = (w - INNER_LR * g).detach()
            expected.append(loss(w, xq, yq).item())
        torch.testing.assert_close(scores[i], torch.tensor(expected, dtype=scores.dtype))


@pytest.mark.parametrize("vectorize, task_chunk", [("batched", "auto"), ("batched", 2), ("vmap", "auto"), ("loop", "auto")])
def test_reptile_evaluation_on_minibatches_matches_manual_sgd(setup, vectorize, task_chunk):
    """eval_inner_batch_size (the reference's --eval-batch): each adaptation step sees a mini-batch of
    the support set, task t's drawn from its own seed, so the scores do not depend on how tasks are batched."""
    model, tasks, theta, unflatten, loss = setup
    tasks.task_seeds = torch.tensor([11, 12, 13])
    algo = Reptile(inner_lr=0.1, inner_steps=1, eval_inner_steps=4, eval_inner_lr=INNER_LR, outer_lr=1.0,
                   eval_inner_batch_size=2, vectorize=vectorize, task_chunk=task_chunk)
    fmodel = FunctionalModel(model)
    with torch.no_grad():
        scores = algo.evaluate(fmodel, tasks)
    for i in range(tasks.num_tasks):
        xs, ys, xq, yq = (t[i] for t in tasks.tensors())
        generator = torch.Generator().manual_seed(11 + i)  # the task's seed
        order = torch.cat([torch.rand(5, generator=generator).argsort() for _ in range(2)])
        assert sorted(order[:5].tolist()) == [0, 1, 2, 3, 4]  # 4 steps of 2 from 5 points: a shuffled epoch, then the next
        w = theta.clone()
        expected = [loss(w, xq, yq).item()]
        for step in range(4):
            batch = order[2 * step : 2 * step + 2]
            w.requires_grad_(True)
            with torch.enable_grad():
                g = torch.autograd.grad(loss(w, xs[batch], ys[batch]), w)[0]
            w = (w - INNER_LR * g).detach()
            expected.append(loss(w, xq, yq).item())
        torch.testing.assert_close(scores[i], torch.tensor(expected, dtype=scores.dtype))
    with torch.no_grad():  # the same scores for the tasks scored apart
        apart = torch.cat([algo.evaluate(fmodel, tasks.slice(0, 1)), algo.evaluate(fmodel, tasks.slice(1, 3))])
    torch.testing.assert_close(apart, scores)
    full = Reptile(inner_lr=0.1, inner_steps=1, eval_inner_steps=4, eval_inner_lr=INNER_LR, outer_lr=1.0, eval_inner_batch_size=5)
    with torch.no_grad():  # a batch as large as the support set is the whole support set
        torch.testing.assert_close(full.evaluate(fmodel, tasks), MAML(inner_lr=INNER_LR, inner_steps=1, eval_inner_steps=4, outer_lr=1e-3).evaluate(fmodel, tasks))


def test_models_unknown_to_the_batched_path_use_vmap_or_the_functional_loop(setup):
    """A plain nn.Sequential is not a metalearn model: auto falls back to vmap; both agree."""
    _, tasks, *_ = setup
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(1, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1)).double()
    fmodel = FunctionalModel(net)
    grads = []
    for how in ("auto", "vmap", "loop"):
        algo = MAML(inner_lr=INNER_LR, inner_steps=2, eval_inner_steps=1, outer_lr=1e-3, vectorize=how)
        if how == "auto":
            assert algo.execution.strategy(net, tasks) == "vmap"
        net.zero_grad()
        algo.meta_step(fmodel, tasks).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    torch.testing.assert_close(grads[0], grads[2])
    torch.testing.assert_close(grads[1], grads[2])
    with pytest.raises(ValueError, match="batched"):
        MAML(inner_lr=0.1, inner_steps=1, eval_inner_steps=1, outer_lr=1e-3, vectorize="batched").execution.strategy(net, tasks)
