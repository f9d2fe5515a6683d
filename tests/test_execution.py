"""How a meta-batch's parts are differentiated (`Execution.mean_loss`): part by part, on threads on the CPU, with
the exact meta-gradient of the mean, the same numbers whichever threads ran the parts, and the caller's
thread settings restored."""

import pytest
import torch

from metalearn_cli.algorithms import MAML, FunctionalModel, MetaSGD, ProtoNet
from metalearn_cli.execution import Execution, graph_leaves, in_threads
from metalearn_cli.models import Conv4
from metalearn_cli.tasks import CLASSIFICATION, TaskBatch


def _tasks(num_tasks=6, ways=3, shots=2, queries=2, side=8):
    g = torch.Generator().manual_seed(0)
    s, q = ways * shots, ways * queries
    return TaskBatch(torch.rand(num_tasks, s, 1, side, side, generator=g, dtype=torch.float64),
                     torch.arange(ways).repeat_interleave(shots).expand(num_tasks, s).contiguous(),
                     torch.rand(num_tasks, q, 1, side, side, generator=g, dtype=torch.float64),
                     torch.arange(ways).repeat_interleave(queries).expand(num_tasks, q).contiguous(), objective=CLASSIFICATION)


def _gradient(algorithm, model, tasks):
    fmodel = FunctionalModel(model)
    model.zero_grad(set_to_none=True)
    step = algorithm.meta_step(fmodel, tasks)
    step.loss.backward()
    extra = [p for m in (getattr(algorithm, "rates", None),) if m is not None for p in m.parameters()]
    return step, [None if p.grad is None else p.grad.clone() for p in [*model.parameters(), *extra]]  # ProtoNets: no head


@pytest.mark.parametrize("make", [
    lambda **k: MAML(inner_lr=0.3, inner_steps=2, eval_inner_steps=1, outer_lr=1e-3, **k),
    lambda **k: MetaSGD(inner_lr=0.3, inner_steps=1, eval_inner_steps=1, outer_lr=1e-3, **k),
    lambda **k: ProtoNet(outer_lr=1e-3, **k),
], ids=["maml", "metasgd", "protonet"])
def test_parts_on_threads_give_the_one_pass_meta_gradient_and_the_same_bits_on_every_run(make):
    """Differentiated in three parts, one after another or on two or three threads, the meta-gradient (learned
    inner rates included) is the one-pass gradient to 1e-12 in float64; run again with the same settings, the
    same bits (the parts' gradients are added in part order, whichever thread finished first)."""
    torch.manual_seed(0)
    model = Conv4((1, 8, 8), 3, channels=4).double()
    tasks = _tasks()
    gradients, one_pass_loss = {}, None
    for label, kwargs in {"one pass": dict(task_chunk=6), "1 thread": dict(task_chunk=2, task_threads=1),
                          "2 threads": dict(task_chunk=2, task_threads=2), "3 threads": dict(task_chunk=2, task_threads=3),
                          "3 threads again": dict(task_chunk=2, task_threads=3)}.items():
        algorithm = make(vectorize="batched", **kwargs)
        if hasattr(algorithm, "rates"):
            torch.manual_seed(1)
            algorithm.extra_modules(model, None, None)
        step, gradients[label] = _gradient(algorithm, model, tasks)
        if label != "one pass":
            assert algorithm.execution.describe(FunctionalModel(model), tasks)["task_threads"] == min(kwargs["task_threads"], 3)
            assert step.loss.item() == pytest.approx(one_pass_loss, rel=1e-14)
        else:
            one_pass_loss = step.loss.item()
    for label in ("1 thread", "2 threads", "3 threads"):
        for ours, exact in zip(gradients[label], gradients["one pass"]):
            assert (ours is None) == (exact is None)
            if exact is not None:
                torch.testing.assert_close(ours, exact, rtol=1e-12, atol=1e-12)
    for ours, first in zip(gradients["3 threads again"], gradients["3 threads"]):
        assert ours is first is None or torch.equal(ours, first)


def test_threads_only_for_the_batched_kernel_on_the_cpu_with_several_parts():
    tasks = _tasks()
    execution = Execution("batched", 2, "auto")
    assert execution.threads(tasks, 3, "batched") == min(torch.get_num_threads(), 3)
    assert execution.threads(tasks, 1, "batched") == 1
    assert execution.threads(tasks, 3, "loop") == 1  # functional_call swaps the module's parameters: not shareable
    assert execution.threads(tasks.to("meta"), 3, "batched") == 1
    assert Execution("batched", 2, 5).threads(tasks, 3, "batched") == 3


def test_in_threads_keeps_order_settings_and_raises_a_workers_error():
    before = torch.get_num_threads()
    seen = []

    def work(i):
        seen.append(torch.is_grad_enabled())
        return i * i

    with torch.no_grad():
        assert in_threads(work, list(range(7)), 3) == [i * i for i in range(7)]
    assert not any(seen) and torch.get_num_threads() == before

    def fails(i):
        if i == 4:
            raise ValueError("part 4")
        return i

    with pytest.raises(ValueError, match="part 4"):
        in_threads(fails, list(range(6)), 2)
    assert torch.get_num_threads() == before


def test_graph_leaves_are_the_parameters_an_output_depends_on():
    a, b, c = (torch.randn(3, requires_grad=True) for _ in range(3))
    leaves = graph_leaves((a * 2 + b.exp()).sum() + (a * b).sum())
    assert {id(t) for t in leaves} == {id(a), id(b)} and len(leaves) == 2
    assert graph_leaves(c.detach().sum()) == []


def test_bad_task_threads_is_refused():
    from metalearn_cli.options import OptionError

    for value in (0, -1, "many", True, 1.5):
        with pytest.raises(OptionError, match="task_threads"):
            Execution("auto", "auto", value)
