"""Conv4, batch-norm modes, and the algorithms on convolutional models (small, float64)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from metalearn_cli import execution
from metalearn_cli.algorithms import MAML, Finetune, FunctionalModel, Reptile
from metalearn_cli.data.images import ImageClasses, ImageTasks
from metalearn_cli.models import Conv4, MetaBatchNorm2d
from metalearn_cli.samplers import EpisodicSampler
from metalearn_cli.tasks import CLASSIFICATION, TaskBatch
from metalearn_cli.tasks.objectives import _task_cross_entropy


def test_conv4_shapes_match_the_papers():
    omniglot = Conv4((1, 28, 28), 5)
    assert omniglot(torch.zeros(7, 1, 28, 28)).shape == (7, 5) and omniglot.head.in_features == 64
    mini = Conv4((3, 84, 84), 5, channels=32, downsample="maxpool", pool="flatten")
    assert mini.head.in_features == 32 * 5 * 5
    assert sum(p.numel() for p in mini.parameters()) == 32 * 3 * 9 + 32 + 3 * (32 * 32 * 9 + 32) + 4 * 64 + 800 * 5 + 5


def test_conv4_reference_init_is_the_maml_codes():
    """model.init=reference: Glorot-uniform convolutions, zero biases, a N(0, 1) head (MAML's
    TensorFlow code); the default stays PyTorch's (head weights within 1/sqrt(64))."""
    torch.manual_seed(0)
    default, reference = Conv4((1, 28, 28), 5), Conv4((1, 28, 28), 5, init="reference")
    assert default.head.weight.abs().max() <= 1 / 8 and default.head.bias.abs().max() > 0
    assert 0.85 < reference.head.weight.std() < 1.15 and reference.head.weight.abs().max() > 1.5
    convs = [m for m in reference.features if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        fan_in, fan_out = conv.in_channels * 9, conv.out_channels * 9
        assert conv.weight.abs().max() <= (6 / (fan_in + fan_out)) ** 0.5
        assert torch.all(conv.bias == 0)
    assert torch.all(reference.head.bias == 0)
    with pytest.raises(ValueError, match="init"):
        Conv4((1, 28, 28), 5, init="xavier")


def _tiny_tasks(num_tasks=3, ways=3, shots=2, queries=2, seed=0):
    torch.manual_seed(seed)
    classes = ImageClasses.from_lists([torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8) for _ in range(8)], [str(i) for i in range(8)])
    source = ImageTasks({"train": classes, "val": classes, "test": classes}, name="tiny")
    batch = source.sample("train", torch.Generator().manual_seed(seed), num_tasks, ways, shots, queries)
    return source, TaskBatch(*(t.double() if t.is_floating_point() else t for t in batch.tensors()), seed=1, classes=batch.classes)


def _reference_maml_gradient(model, tasks, inner_lr, steps, first_order, adapted=None):
    """The textbook per-task loop: functional_call + torch.autograd.grad(create_graph=True); only the
    parameters named in `adapted` (default all) take the inner step."""
    params = dict(model.named_parameters())
    total = 0.0
    for i in range(tasks.num_tasks):
        fast = params
        for _ in range(steps):
            loss = F.cross_entropy(torch.func.functional_call(model, fast, (tasks.support_x[i],)), tasks.support_y[i])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {k: v - inner_lr * g if adapted is None or k in adapted else v for (k, v), g in zip(fast.items(), grads)}
        total = total + F.cross_entropy(torch.func.functional_call(model, fast, (tasks.query_x[i],)), tasks.query_y[i])
    return torch.autograd.grad(total / tasks.num_tasks, list(params.values()))


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("vectorize, task_chunk", [("batched", "auto"), ("batched", 2), ("vmap", "auto"), ("loop", "auto")])
def test_maml_on_conv4_matches_the_textbook_loop(vectorize, task_chunk, first_order):
    _, tasks = _tiny_tasks()  # 3 tasks: task_chunk=2 runs slices of 2 and 1
    model = Conv4((1, 8, 8), 3, channels=4).double()
    reference = _reference_maml_gradient(model, tasks, 0.3, 2, first_order)
    algo = MAML(inner_lr=0.3, inner_steps=2, eval_inner_steps=1, outer_lr=1e-3, first_order=first_order,
                vectorize=vectorize, task_chunk=task_chunk)
    model.zero_grad()
    algo.meta_step(FunctionalModel(model), tasks).loss.backward()
    for p, r in zip(model.parameters(), reference):
        torch.testing.assert_close(p.grad, r)


def _norm_and_head_names(model):
    """Conv4's parameter names, written out from its layout: block b is features.(3b) conv,
    features.(3b+1) batch norm, features.(3b+2) ReLU."""
    norms = {f"features.{3 * b + 1}.{w}" for b in range(4) for w in ("weight", "bias")}
    assert norms <= set(dict(model.named_parameters()))
    return norms, {"head.weight", "head.bias"}


@pytest.mark.parametrize("inner_params", ["no_bn", "head"])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("vectorize, task_chunk", [("batched", "auto"), ("batched", 2), ("vmap", "auto"), ("loop", "auto")])
def test_maml_adapting_part_of_the_network_matches_the_textbook_loop(vectorize, task_chunk, first_order, inner_params):
    """algo.inner_params: the inner loop moves only the chosen parameters; every parameter still gets
    the exact meta-gradient (batch norm's scale and shift, left out by no_bn, are meta-learned)."""
    _, tasks = _tiny_tasks()
    model = Conv4((1, 8, 8), 3, channels=4).double()
    names = set(dict(model.named_parameters()))
    norms, head = _norm_and_head_names(model)
    adapted = names - norms if inner_params == "no_bn" else head
    fmodel = FunctionalModel(model)
    assert set(fmodel.inner_keys(inner_params)) == adapted and set(fmodel.inner_keys("all")) == names
    reference = _reference_maml_gradient(model, tasks, 0.3, 2, first_order, adapted)
    everything = _reference_maml_gradient(model, tasks, 0.3, 2, first_order)
    assert max((r - e).abs().max().item() for r, e in zip(reference, everything)) > 1e-4  # the choice matters
    algo = MAML(inner_lr=0.3, inner_steps=2, eval_inner_steps=1, outer_lr=1e-3, first_order=first_order,
                vectorize=vectorize, task_chunk=task_chunk, inner_params=inner_params)
    model.zero_grad()
    algo.meta_step(fmodel, tasks).loss.backward()
    for (name, p), r in zip(model.named_parameters(), reference):
        torch.testing.assert_close(p.grad, r, msg=name)
        assert p.grad.abs().max() > 0, name


@pytest.mark.parametrize("inner_params", ["no_bn", "head"])
@pytest.mark.parametrize("vectorize", ["batched", "vmap", "loop"])
def test_evaluation_adapts_the_same_parameters_as_training(vectorize, inner_params):
    """Scored by the query loss (a continuous metric, so a parameter moved or not shows)."""
    _, tasks = _tiny_tasks()
    model = Conv4((1, 8, 8), 3, channels=4).double()
    norms, head = _norm_and_head_names(model)
    adapted = set(dict(model.named_parameters())) - norms if inner_params == "no_bn" else head
    query_loss = dataclasses.replace(CLASSIFICATION, metric=F.cross_entropy, task_metric=_task_cross_entropy)
    scores = {}
    for which in (inner_params, "all"):
        algo = MAML(inner_lr=0.3, inner_steps=1, eval_inner_steps=3, outer_lr=1e-3, vectorize=vectorize, inner_params=which)
        with torch.no_grad():
            scores[which] = algo.evaluate(FunctionalModel(model), dataclasses.replace(tasks, objective=query_loss))
    assert (scores[inner_params][:, 1:] - scores["all"][:, 1:]).abs().min() > 1e-6
    for i in range(tasks.num_tasks):
        xs, ys, xq, yq = (t[i] for t in tasks.tensors())
        fast = {k: v.detach() for k, v in model.named_parameters()}
        expected = [F.cross_entropy(torch.func.functional_call(model, fast, (xq,)), yq)]
        for _ in range(3):
            leaves = {k: v.clone().requires_grad_(k in adapted) for k, v in fast.items()}
            loss = F.cross_entropy(torch.func.functional_call(model, leaves, (xs,)), ys)
            grads = dict(zip(adapted, torch.autograd.grad(loss, [leaves[k] for k in adapted])))
            fast = {k: (v - 0.3 * grads[k] if k in adapted else v).detach() for k, v in leaves.items()}
            expected.append(F.cross_entropy(torch.func.functional_call(model, fast, (xq,)), yq))
        torch.testing.assert_close(scores[inner_params][i], torch.stack(expected).detach())


def test_inner_params_head_needs_a_head_and_unknown_choices_are_refused():
    net = torch.nn.Sequential(torch.nn.Linear(1, 3))
    with pytest.raises(ValueError, match="head"):
        FunctionalModel(net).inner_keys("head")
    with pytest.raises(ValueError, match="all, no_bn, head"):
        MAML(inner_lr=0.3, inner_steps=1, eval_inner_steps=1, outer_lr=1e-3, inner_params="bn")


def test_auto_task_chunk_is_eight_conv_tasks_on_the_cpu_and_the_whole_batch_elsewhere():
    """`algo.task_chunk=auto`: the measured rule (BENCHMARKS.md): 8 conv tasks per pass on the CPU,
    the whole meta-batch on an accelerator (tensors on the meta device stand in for a GPU here)."""
    _, tasks = _tiny_tasks(num_tasks=12)
    net = Conv4((1, 8, 8), 3, channels=4)
    algo = MAML(inner_lr=0.3, inner_steps=1, eval_inner_steps=1, outer_lr=1e-3)
    assert algo.execution.chunk(net, tasks, "batched") == 8
    assert algo.execution.chunk(net, tasks.to("meta"), "batched") == 12
    assert algo.execution.chunk(net, tasks.to("meta"), "loop") == 1
    fixed = MAML(inner_lr=0.3, inner_steps=1, eval_inner_steps=1, outer_lr=1e-3, task_chunk=5)
    assert fixed.execution.chunk(net, tasks.to("meta"), "batched") == 5


def test_auto_execution_counts_the_examples_an_inner_step_sees(monkeypatch):
    """`algo.task_chunk=auto` on conv4 and the CPU: fewer tasks per pass for large support sets, but Reptile's
    inner steps see mini-batches of `inner_batch_size`, which count as small (BENCHMARKS.md, "Speed")."""
    monkeypatch.setattr(execution, "AUTO_LARGE_SUPPORT", 10)  # the tiny images allow 12 support examples, not 21
    _, tasks = _tiny_tasks(shots=4)  # 3 ways x 4 shots = 12 support examples
    fmodel = FunctionalModel(Conv4((1, 8, 8), 3, channels=4).double())
    maml = MAML(inner_lr=0.3, inner_steps=1, eval_inner_steps=1, outer_lr=1e-3).execution
    assert maml.strategy(fmodel.module, tasks) == "batched"
    assert maml.chunk(fmodel.module, tasks, "batched") == execution.AUTO_CONV_TASK_CHUNK_LARGE_SUPPORT
    assert maml.chunk(fmodel.module, tasks, "batched", examples=5) == execution.AUTO_CONV_TASK_CHUNK
    seen = []
    for batch_size, expected in ((5, execution.AUTO_CONV_TASK_CHUNK), (None, execution.AUTO_CONV_TASK_CHUNK_LARGE_SUPPORT)):
        algo = Reptile(inner_lr=0.01, inner_steps=2, eval_inner_steps=1, outer_lr=1.0, inner_batch_size=batch_size)
        chosen = algo.execution.chunk
        algo.execution.chunk = lambda *a, _f=chosen, **k: seen.append(_f(*a, **k)) or seen[-1]
        algo.meta_step(fmodel, tasks)
        assert seen[-1] == expected
        assert algo.evaluate(fmodel, tasks).shape[0] == tasks.num_tasks  # evaluation: the whole support set
        assert seen[-1] == execution.AUTO_CONV_TASK_CHUNK_LARGE_SUPPORT


def test_transductive_batch_norm_mixes_query_examples_and_frozen_does_not():
    _, tasks = _tiny_tasks()
    x = tasks.query_x[0]
    for mode, mixes in (("transductive", True), ("frozen", False), ("per_step", False)):
        model = Conv4((1, 8, 8), 3, channels=4, bn=mode).double().eval()
        alone = model(x[:1])
        together = model(x)[:1]
        assert (not torch.allclose(alone, together)) == mixes, mode


def test_running_statistics_are_recorded_outside_the_inner_loop_only():
    _, tasks = _tiny_tasks()
    model = Conv4((1, 8, 8), 3, channels=4, bn="per_step", bn_steps=3).double()
    fmodel = FunctionalModel(model)
    layer = next(m for m in model.modules() if isinstance(m, MetaBatchNorm2d))
    before = layer.running_mean.clone()
    MAML(inner_lr=0.3, inner_steps=2, eval_inner_steps=1, outer_lr=1e-3).meta_step(fmodel, tasks).loss.backward()
    assert torch.equal(layer.running_mean, before), "the meta-step must not touch buffers"
    MAML(inner_lr=0.3, inner_steps=2, eval_inner_steps=1, outer_lr=1e-3).record_statistics(fmodel, tasks)
    assert not torch.allclose(layer.running_mean[0], before[0])
    assert not torch.allclose(layer.running_mean[1], layer.running_mean[0])  # one set per step
    assert torch.equal(layer.running_mean[3], layer.running_mean[2])  # unseen steps reuse the last
    # at test (eval mode) step k normalises with slot k
    model.eval()
    layer.step = 1
    h = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    expected = F.batch_norm(h, layer.running_mean[1], layer.running_var[1], layer.weight, layer.bias, False, 0.0, layer.eps)
    torch.testing.assert_close(layer(h), expected)


@pytest.mark.parametrize("head", ["linear", "cosine"])
def test_baseline_pretrains_on_global_classes_and_adapts_a_new_head(head):
    source, tasks = _tiny_tasks()
    model = Conv4((1, 8, 8), 3, channels=16).double()
    algo = Finetune(inner_lr=0.01, inner_steps=1, eval_inner_steps=100, outer_lr=1e-3, eval_inner_lr=0.5, head=head, vectorize="loop")
    extras = algo.extra_modules(model, source, None)
    extras["classifier"].double()
    assert extras["classifier"].weight.shape[0] == 8  # one output per training class
    fmodel = FunctionalModel(model)
    step = algo.meta_step(fmodel, tasks)
    step.loss.backward()
    assert extras["classifier"].weight.grad is not None and model.features[0].weight.grad is not None
    scores = algo.evaluate(fmodel, tasks)
    assert scores.shape == (3, 101)
    support_tasks = TaskBatch(tasks.support_x, tasks.support_y, tasks.support_x, tasks.support_y, seed=1)
    assert algo.evaluate(fmodel, support_tasks)[:, -1].mean() == 1.0  # a head trained on the support set fits it
    vmapped = Finetune(inner_lr=0.01, inner_steps=1, eval_inner_steps=100, outer_lr=1e-3, eval_inner_lr=0.5, head=head, vectorize="vmap")
    vmapped.classifier = algo.classifier
    torch.testing.assert_close(vmapped.evaluate(fmodel, tasks), scores)


def test_reptile_runs_on_conv4_with_minibatches():
    _, tasks = _tiny_tasks(shots=4)
    model = Conv4((1, 8, 8), 3, channels=4).double()
    algo = Reptile(inner_lr=0.01, inner_steps=3, eval_inner_steps=2, outer_lr=1.0, inner_optimizer="adam", inner_batch_size=5)
    step = algo.meta_step(FunctionalModel(model), tasks)
    assert set(step.direction) == {k for k, _ in model.named_parameters()}
    assert all(torch.isfinite(d).all() for d in step.direction.values())


def test_baseline_with_whole_network_finetuning_changes_the_backbone_per_task():
    source, tasks = _tiny_tasks()
    model = Conv4((1, 8, 8), 3, channels=8).double()
    kwargs = dict(inner_lr=0.01, inner_steps=1, eval_inner_steps=5, outer_lr=1e-3, eval_inner_lr=0.1)
    frozen = Finetune(**kwargs, vectorize="loop")
    whole = Finetune(**kwargs, finetune_backbone=True, vectorize="loop")
    for algo in (frozen, whole):
        algo.extra_modules(model, source, None)
    fmodel = FunctionalModel(model)
    a, b = frozen.evaluate(fmodel, tasks), whole.evaluate(fmodel, tasks)
    assert torch.equal(a[:, 0], b[:, 0]) and not torch.equal(a, b)
    whole.vectorize = "vmap"
    torch.testing.assert_close(whole.evaluate(fmodel, tasks), b)
