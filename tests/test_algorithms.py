"""ProtoNets, Meta-SGD, ANIL and MAML++ against independent computations (textbook per-task loops
with plain autograd, float64, tiny conv nets)."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metalearn_cli.algorithms import ANIL, MAML, FunctionalModel, MAMLpp, MetaSGD, ProtoNet
from metalearn_cli.algorithms.mamlpp import msl_weights
from metalearn_cli.data.images import ImageClasses, ImageTasks
from metalearn_cli.models import Conv4
from metalearn_cli.samplers import EpisodicSampler
from metalearn_cli.tasks import TaskBatch

EXECUTIONS = [("batched", "auto"), ("batched", 2), ("vmap", "auto"), ("loop", "auto")]


def _tiny(num_tasks=3, ways=3, shots=2, queries=2, seed=0):
    torch.manual_seed(seed)
    classes = ImageClasses.from_lists([torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8) for _ in range(8)], [str(i) for i in range(8)])
    source = ImageTasks({"train": classes, "val": classes, "test": classes}, name="tiny")
    batch = source.sample("train", torch.Generator().manual_seed(seed), num_tasks, ways, shots, queries)
    tasks = TaskBatch(*(t.double() if t.is_floating_point() else t for t in batch.tensors()), seed=1, classes=batch.classes)
    return source, tasks, Conv4((1, 8, 8), ways, channels=4).double()


def _grads(model, extra=()):
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in [*model.parameters(), *extra]]


# -- ProtoNets --------------------------------------------------------------------------------

def _reference_protonet(model, tasks):
    """Per task: embed support and query with the module itself, class means, -squared distances."""
    losses, accuracies = [], []
    for i in range(tasks.num_tasks):
        xs, ys, xq, yq = (t[i] for t in tasks.tensors())
        support, query = model(xs, features_only=True), model(xq, features_only=True)
        prototypes = torch.stack([support[ys == c].mean(0) for c in range(int(ys.max()) + 1)])
        logits = -((query[:, None, :] - prototypes[None]) ** 2).sum(-1)
        losses.append(F.cross_entropy(logits, yq))
        accuracies.append((logits.argmax(1) == yq).double().mean())
    return torch.stack(losses).mean(), torch.stack(accuracies)


@pytest.mark.parametrize("vectorize, task_chunk", EXECUTIONS)
def test_protonet_loss_gradient_and_scores_match_the_textbook_computation(vectorize, task_chunk):
    _, tasks, model = _tiny(shots=3)
    algo = ProtoNet(outer_lr=1e-3, vectorize=vectorize, task_chunk=task_chunk)
    reference_loss, reference_accuracy = _reference_protonet(model, tasks)
    reference_loss.backward()
    expected = _grads(model)
    model.zero_grad()
    fmodel = FunctionalModel(model)
    step = algo.meta_step(fmodel, tasks)
    step.loss.backward()
    torch.testing.assert_close(step.loss, reference_loss)
    for name, got, want in zip([n for n, _ in model.named_parameters()], _grads(model), expected):
        torch.testing.assert_close(got, want, msg=name)
    assert model.head.weight.grad is None  # the head is not part of the embedding
    assert model.features[0].weight.grad.abs().max() > 1e-6
    with torch.no_grad():
        scores = algo.evaluate(fmodel, tasks)
    assert scores.shape == (tasks.num_tasks, 1)  # one step: there is no inner loop
    torch.testing.assert_close(scores[:, 0], reference_accuracy)


def test_protonet_trains_with_more_ways_than_it_tests_with():
    """sampler.train_ways: meta-training episodes have 6 classes, validation and test tasks 3."""
    source, _, _ = _tiny()
    sampler = EpisodicSampler(source, shots=1, queries=2, meta_batch_size=2, ways=3, train_ways=6)
    train, test = sampler.train_batch(0, 0), sampler.fixed_tasks("test", 2, 0)
    assert train.support_y.shape == (2, 6) and int(train.support_y.max()) == 5 and train.classes.shape == (2, 6)
    assert test.support_y.shape == (2, 3) and int(test.support_y.max()) == 2
    model = Conv4((1, 8, 8), 3, channels=4)
    fmodel = FunctionalModel(model)
    ProtoNet(outer_lr=1e-3).meta_step(fmodel, train).loss.backward()  # a 6-way episode with a 3-way head
    assert ProtoNet(outer_lr=1e-3).evaluate(fmodel, test).shape == (2, 1)
    assert EpisodicSampler(source, 1, 2, 2, ways=3).train_batch(0, 0).support_y.shape == (2, 3)  # default: ways


# -- Meta-SGD ---------------------------------------------------------------------------------

def _reference_one_step(model, tasks, rates):
    """theta'_i = theta - rates * grad L_s,i(theta); mean_i L_q,i(theta'_i), differentiable in theta and rates."""
    params = dict(model.named_parameters())
    total = 0.0
    for i in range(tasks.num_tasks):
        xs, ys, xq, yq = (t[i] for t in tasks.tensors())
        grads = torch.autograd.grad(F.cross_entropy(functional_call(model, params, (xs,)), ys), list(params.values()), create_graph=True)
        fast = {k: v - rates[k] * g for (k, v), g in zip(params.items(), grads)}
        total = total + F.cross_entropy(functional_call(model, fast, (xq,)), yq)
    return total / tasks.num_tasks


@pytest.mark.parametrize("vectorize, task_chunk", EXECUTIONS)
def test_metasgd_meta_gradient_reaches_weights_and_per_entry_rates_exactly(vectorize, task_chunk):
    source, tasks, model = _tiny()
    algo = MetaSGD(inner_lr=0.3, inner_steps=1, eval_inner_steps=2, outer_lr=1e-3, vectorize=vectorize, task_chunk=task_chunk)
    rates = algo.extra_modules(model, source, None)["inner_rates"].double()
    named = rates.by_name()
    assert all(named[k].shape == p.shape and torch.all(named[k] == 0.3) for k, p in model.named_parameters())
    with torch.no_grad():  # rates that differ per entry, so the test sees them used entry by entry
        for v in named.values():
            v.uniform_(0.1, 0.5)
    reference = _reference_one_step(model, tasks, named)
    reference.backward()
    expected = _grads(model, named.values())
    model.zero_grad()
    rates.zero_grad()
    algo.meta_step(FunctionalModel(model), tasks).loss.backward()
    for got, want in zip(_grads(model, named.values()), expected):
        torch.testing.assert_close(got, want)
    assert max(v.grad.abs().max() for v in named.values()) > 1e-6  # the rates are meta-learned
    # evaluation adapts with the learned rates: one step of theta - rates * g
    with torch.no_grad():
        scores = algo.evaluate(FunctionalModel(model), tasks, steps=1)
    for i in range(tasks.num_tasks):
        xs, ys, xq, yq = (t[i] for t in tasks.tensors())
        params = {k: v.detach().requires_grad_(True) for k, v in model.named_parameters()}
        grads = torch.autograd.grad(F.cross_entropy(functional_call(model, params, (xs,)), ys), list(params.values()))
        fast = {k: (v - named[k] * g).detach() for (k, v), g in zip(params.items(), grads)}
        accuracy = (functional_call(model, fast, (xq,)).argmax(1) == yq).double().mean()
        torch.testing.assert_close(scores[i, 1], accuracy)


# -- ANIL -------------------------------------------------------------------------------------

def test_anil_is_maml_adapting_only_the_head():
    _, tasks, model = _tiny()
    gradients = []
    for algo in (ANIL(inner_lr=0.3, inner_steps=2, eval_inner_steps=1, outer_lr=1e-3),
                 MAML(inner_lr=0.3, inner_steps=2, eval_inner_steps=1, outer_lr=1e-3, inner_params="head")):
        model.zero_grad()
        algo.meta_step(FunctionalModel(model), tasks).loss.backward()
        gradients.append(_grads(model))
    for a, b in zip(*gradients):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.zero_grad()
    MAML(inner_lr=0.3, inner_steps=2, eval_inner_steps=1, outer_lr=1e-3).meta_step(FunctionalModel(model), tasks).loss.backward()
    assert not torch.allclose(model.features[0].weight.grad, gradients[0][0])  # adapting all is another gradient
    with pytest.raises(ValueError, match="only the head"):
        ANIL(inner_lr=0.3, inner_steps=1, eval_inner_steps=1, outer_lr=1e-3, inner_params="all")


# -- MAML++ -----------------------------------------------------------------------------------

def test_msl_weights_start_uniform_and_anneal_to_the_last_step():
    torch.testing.assert_close(msl_weights(5, 0, 100), torch.full((5,), 0.2, dtype=torch.float64))
    middle, end = msl_weights(5, 50, 100), msl_weights(5, 100, 100)
    for w in (middle, end, msl_weights(5, 1000, 100)):
        assert w.sum().item() == pytest.approx(1.0)
    assert middle[0] == pytest.approx(0.2 - 0.5 * (0.2 - 0.006)) and middle[-1] > 0.2
    torch.testing.assert_close(end[:-1], torch.full((4,), 0.006, dtype=torch.float64))
    assert end[-1] == pytest.approx(1 - 4 * 0.006)
    torch.testing.assert_close(msl_weights(5, 0, 0), torch.tensor([0, 0, 0, 0, 1.0], dtype=torch.float64))  # off


@pytest.mark.parametrize("vectorize, task_chunk", EXECUTIONS)
@pytest.mark.parametrize("iteration, first_order", [(0, False), (30, False), (0, True)])
def test_mamlpp_gradient_matches_per_step_rates_and_the_weighted_multi_step_loss(vectorize, task_chunk, iteration, first_order):
    source, tasks, model = _tiny()
    steps = 3
    algo = MAMLpp(inner_lr=0.2, inner_steps=steps, eval_inner_steps=steps, outer_lr=1e-3, msl_steps=60,
                  first_order_steps=10 if first_order else 0, vectorize=vectorize, task_chunk=task_chunk)
    rates = algo.extra_modules(model, source, None)["inner_rates"].double()
    named = rates.by_name()
    assert all(v.shape == (steps,) and torch.all(v == 0.2) for v in named.values())
    with torch.no_grad():
        for v in named.values():
            v.uniform_(0.1, 0.3)
    weights = msl_weights(steps, iteration, 60)
    params = dict(model.named_parameters())
    total = 0.0
    for i in range(tasks.num_tasks):  # the textbook loop: per-layer per-step rates, query loss after every step
        xs, ys, xq, yq = (t[i] for t in tasks.tensors())
        fast = params
        for k in range(steps):
            grads = torch.autograd.grad(F.cross_entropy(functional_call(model, fast, (xs,)), ys), list(fast.values()),
                                        create_graph=not first_order)
            fast = {n: v - named[n][k] * g for (n, v), g in zip(fast.items(), grads)}
            total = total + weights[k].item() * F.cross_entropy(functional_call(model, fast, (xq,)), yq)
    (total / tasks.num_tasks).backward()
    expected = _grads(model, named.values())
    model.zero_grad()
    rates.zero_grad()
    algo.meta_step(FunctionalModel(model), tasks, iteration=iteration).loss.backward()
    for got, want in zip(_grads(model, named.values()), expected):
        torch.testing.assert_close(got, want)
    assert all(v.grad[-1].abs() > 0 for v in named.values() if v.grad is not None)


# -- through the configs ------------------------------------------------------------------------

@pytest.mark.parametrize("algo, data", [
    ("anil", "sinusoid"), ("metasgd", "sinusoid"), ("mamlpp", "sinusoid"),
    ("anil", "omniglot"), ("metasgd", "omniglot"), ("mamlpp", "omniglot"), ("protonet", "omniglot"),
])
def test_each_new_algorithm_builds_from_its_configs_and_learns_what_it_should(compose_cfg, omniglot_cache, algo, data):
    """configs/algo/<name>.yaml (+ tuning/<name>_omniglot.yaml) build the algorithm; one optimizer step
    moves the weights and the learned inner rates, which are saved in the checkpoint's state."""
    from metalearn_cli.build import build_experiment
    from tests.conftest import OMNIGLOT

    where = [f"data.root={OMNIGLOT}", f"data.cache_dir={omniglot_cache}"] if data == "omniglot" else []
    cfg = compose_cfg(f"algo={algo}", f"data={data}", "sampler.meta_batch_size=2", *where)
    experiment = build_experiment(cfg)
    module, sampler, algorithm = experiment.module, experiment.sampler, experiment.algorithm
    assert type(algorithm).__name__.lower() == {"mamlpp": "mamlpp", "metasgd": "metasgd"}.get(algo, algo)
    batch = sampler.train_batch(cfg.seed, 0)
    if algo == "protonet":
        assert batch.support_y.max() + 1 == 60 and cfg.sampler.ways == 5  # tuning: 60-way training episodes
    optimizer = algorithm.configure_optimizers(module.parameters(), 10)["optimizer"]
    before = {k: v.detach().clone() for k, v in module.state_dict().items()}
    step = algorithm.meta_step(module.fmodel, batch)
    optimizer.zero_grad()
    step.loss.backward()
    optimizer.step()
    after = module.state_dict()
    assert not torch.equal(after["model.features.0.weight" if data == "omniglot" else "model.body.1.weight"],
                           before["model.features.0.weight" if data == "omniglot" else "model.body.1.weight"])
    rates = [k for k in after if k.startswith("extras.inner_rates.")]
    assert bool(rates) == (algo in ("metasgd", "mamlpp"))  # learned rates live in the checkpoint
    # a convolution's bias before batch norm has no gradient (the mean is subtracted), so neither has its rate
    blind = {f"extras.inner_rates.rates.features__{i}__bias" for i in (0, 3, 6, 9)} if data == "omniglot" else set()
    assert all(not torch.equal(after[k], before[k]) for k in rates if k not in blind)
    assert all(torch.equal(after[k], before[k]) for k in rates if k in blind)
    scores = algorithm.evaluate(module.fmodel, sampler.fixed_tasks("val", 3, 0))
    steps = 0 if algo == "protonet" else cfg.algo.eval_inner_steps
    assert scores.shape == (3, steps + 1) and torch.isfinite(scores).all()
