"""How the tasks of a meta-batch run, decided beneath every algorithm.

An algorithm states its math for a part of the meta-batch: T tasks with per-task parameters, a
`TaskModel` to evaluate them with. `Execution.run` chooses the model's kernel (`batched`, `vmap` or
`loop`; see `metalearn_cli.functional`) and how many tasks go in one pass, calls the algorithm's
function on each part and joins the per-task results. Every choice computes the same function;
which is fastest depends on the model, the task size and the device.

A meta-objective (`mean_loss`) is differentiated part by part as each part is done, so only one part's
graph is alive per thread. On the CPU, `task_threads` parts run at once, each on its own thread with
its share of torch's intra-op threads: the small per-task convolutions of few-shot learning keep one
thread busy better than they keep two busy with one operation.

`algo.vectorize=auto`, `algo.task_chunk=auto` and `algo.task_threads=auto` follow the measurements in
BENCHMARKS.md ("Speed"): they are fixed rules, so a run's numbers never depend on timing noise.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch
from torch import Tensor, nn

from metalearn_cli import batched, options
from metalearn_cli.functional import FunctionalModel
from metalearn_cli.models import MLP
from metalearn_cli.tasks.base import Tasks

#: algo.vectorize: the kernel that runs the tasks of a meta-batch
VECTORIZE_CHOICES = ("auto", "batched", "vmap", "loop")
#: auto: tasks per pass for conv nets on the CPU: it bounds the double backward's temporaries of batch
#: norm and grouped convolutions (BENCHMARKS.md, "Memory"); accelerators take the whole meta-batch.
AUTO_CONV_TASK_CHUNK = 8
#: auto: above this many support examples per task and step, conv nets on the CPU run fewer tasks per pass
AUTO_LARGE_SUPPORT = 20
AUTO_CONV_TASK_CHUNK_LARGE_SUPPORT = 4


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


class Execution:
    """`vectorize`: auto, batched, vmap or loop. `task_chunk`: auto, or tasks per pass (batched).
    `task_threads`: auto, or how many parts of a meta-objective run at once on the CPU."""

    def __init__(self, vectorize: str = "auto", task_chunk: int | str = "auto", task_threads: int | str = "auto") -> None:
        self.vectorize = options.choice("vectorize", vectorize, VECTORIZE_CHOICES)
        if task_chunk != "auto" and not _count(task_chunk):
            raise options.invalid("task_chunk", task_chunk, "auto, or an integer >= 1 (tasks per pass with batched execution)")
        self.task_chunk = task_chunk
        if task_threads != "auto" and not _count(task_threads):
            raise options.invalid("task_threads", task_threads, "auto, or an integer >= 1 (parts of a meta-batch "
                                  "differentiated at once on the CPU, each on its own thread; 1: one after another)")
        self.task_threads = task_threads

    def strategy(self, module: nn.Module, tasks: Tasks | None = None, examples: int | None = None) -> str:
        """batched, vmap or loop. `auto`: `batched` for the models `metalearn_cli.batched` knows (the
        MLP, Conv4), `vmap` for others. (`loop`, the batched kernel one task at a time, was auto's choice for
        5-shot conv nets until batch norm's double backward was written by hand and parts ran on threads:
        BENCHMARKS.md, "Speed".)"""
        if self.vectorize == "batched" and not batched.supports(module):
            raise ValueError(f"algo.vectorize=batched does not support {type(module).__name__}; use vmap or loop")
        if self.vectorize != "auto":
            return self.vectorize
        return "batched" if batched.supports(module) else "vmap"

    def chunk(self, module: nn.Module, tasks: Tasks, strategy: str, examples: int | None = None) -> int:
        """Tasks per pass: 1 for the loop; otherwise `task_chunk`, whose `auto` is every task at once
        for the MLP (small: one pass saves Python overhead), on accelerators (fewer, larger kernels)
        and under vmap, and for batched conv nets on the CPU AUTO_CONV_TASK_CHUNK, or
        AUTO_CONV_TASK_CHUNK_LARGE_SUPPORT where each inner step sees more than AUTO_LARGE_SUPPORT examples
        per task (`examples`, default the task's support size)."""
        if strategy == "loop":
            return 1
        if self.task_chunk != "auto":
            return int(self.task_chunk)
        if strategy == "vmap" or isinstance(module, MLP) or tasks.device.type != "cpu":
            return tasks.num_tasks
        examples = tasks.support_size if examples is None else examples
        return AUTO_CONV_TASK_CHUNK if examples <= AUTO_LARGE_SUPPORT else AUTO_CONV_TASK_CHUNK_LARGE_SUPPORT

    def kernel(self, module: nn.Module, strategy: str) -> str:
        """The loop runs the batched kernel one task at a time where the model has one."""
        return "batched" if strategy == "loop" and batched.supports(module) else strategy

    def plan(self, fmodel: FunctionalModel, tasks: Tasks, examples: int | None = None) -> tuple[str, str, int]:
        """(strategy, kernel, tasks per pass) for these tasks."""
        strategy = self.strategy(fmodel.module, tasks, examples)
        return strategy, self.kernel(fmodel.module, strategy), self.chunk(fmodel.module, tasks, strategy, examples)

    def run(self, fn: Callable[..., Any], fmodel: FunctionalModel, tasks: Tasks, *per_task: Tensor,
            examples: int | None = None) -> Any:
        """fn(model, part, *per_task_part) -> per-task results ([t, ...] tensors, or dicts / tuples of
        them) for consecutive parts of `tasks` (and the matching rows of each tensor in `per_task`),
        joined over the parts. Each part's autograd graph is separate, so a backward through the
        joined result frees one part's temporaries before the next."""
        _, kernel, chunk = self.plan(fmodel, tasks, examples)
        model = fmodel.on(kernel)
        if chunk >= tasks.num_tasks:
            return fn(model, tasks, *per_task)
        parts = [
            fn(model, tasks.slice(i, min(i + chunk, tasks.num_tasks)), *(t[i : i + chunk] for t in per_task))
            for i in range(0, tasks.num_tasks, chunk)
        ]
        return join(parts)

    def threads(self, tasks: Tasks, parts: int, kernel: str) -> int:
        """Parts of a meta-objective differentiated at once: 1 off the CPU, with one part, or with a kernel
        other than `batched` (`functional_call`, behind vmap and the functional loop, swaps the module's
        parameters in place, which threads would share); else `task_threads` (at most the parts), whose
        auto is torch's intra-op threads, each part then running on one of them."""
        if parts < 2 or tasks.device.type != "cpu" or kernel != "batched":
            return 1
        wanted = torch.get_num_threads() if self.task_threads == "auto" else int(self.task_threads)
        return max(1, min(wanted, parts))

    def describe(self, fmodel: FunctionalModel, tasks: Tasks, examples: int | None = None) -> dict:
        """The choice `run` makes for these tasks (what `metalearn bench` reports)."""
        strategy, kernel, chunk = self.plan(fmodel, tasks, examples)
        parts = -(-tasks.num_tasks // chunk)
        return {"strategy": strategy, "task_chunk": chunk, "task_threads": self.threads(tasks, parts, kernel)}

    def mean_loss(self, fn: Callable[..., Any], fmodel: FunctionalModel, tasks: Tasks, *per_task: Tensor,
                  examples: int | None = None) -> tuple[Tensor, Any]:
        """A meta-objective: fn(model, part, *per_task_part) -> (losses [t], *further per-task results).
        Returns (the mean of the losses over all tasks, the further results joined over the parts, detached).

        With one part the mean carries the parts' autograd graph, as `run` gives it. With several, each
        part's share of the mean is differentiated with respect to the leaves of its graph as soon as the
        part is done (`threads` parts at a time), and the mean returned carries the sum of those gradients,
        added in part order, so a run's numbers do not depend on which thread finished first (the intra-op
        threads each part runs with can change the last bits between settings of `task_threads`). It is then first
        order in the leaves: the gradient is exact, its derivative is not (no algorithm differentiates a
        meta-objective twice)."""
        _, kernel, chunk = self.plan(fmodel, tasks, examples)
        model = fmodel.on(kernel)
        if chunk >= tasks.num_tasks:
            losses, *rest = fn(model, tasks, *per_task)
            return losses.mean(), detached(tuple(rest))
        starts = list(range(0, tasks.num_tasks, chunk))
        total = tasks.num_tasks

        def part(i: int) -> tuple[Tensor, tuple, list[Tensor], tuple[Tensor, ...]]:
            piece = tasks.slice(i, min(i + chunk, total))
            losses, *rest = fn(model, piece, *(t[i : i + chunk] for t in per_task))
            share = losses.sum() / total
            leaves = graph_leaves(share)
            grads = torch.autograd.grad(share, leaves, allow_unused=True, materialize_grads=True) if leaves else ()
            return losses.detach(), detached(tuple(rest)), leaves, grads

        done = in_threads(part, starts, self.threads(tasks, len(starts), kernel))
        losses = torch.cat([d[0] for d in done])
        gradient: dict[int, list] = {}
        for _, _, leaves, grads in done:  # in part order
            for leaf, grad in zip(leaves, grads):
                entry = gradient.setdefault(id(leaf), [leaf, None])
                entry[1] = grad if entry[1] is None else entry[1] + grad
        return with_gradient(losses.mean(), [(leaf, grad) for leaf, grad in gradient.values()]), join([d[1] for d in done])


def graph_leaves(output: Tensor) -> list[Tensor]:
    """The tensors `output`'s autograd graph accumulates gradients into (the parameters it depends on), in
    the order a walk of the graph from `output` first meets them."""
    leaves: list[Tensor] = []
    seen_leaves: set[int] = set()
    seen: set = set()
    stack = [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad
        if variable is not None and id(variable) not in seen_leaves:
            seen_leaves.add(id(variable))
            leaves.append(variable)
        stack.extend(child for child, _ in node.next_functions)
    return leaves


def with_gradient(value: Tensor, gradients: list[tuple[Tensor, Tensor]]) -> Tensor:
    """`value` (detached), made a differentiable function of the leaves whose backward gives each leaf its
    gradient: value + sum_l <l, g_l> - (the same, detached). The added terms cancel exactly in the value."""
    if not gradients:
        return value.detach()
    linear = sum((leaf * grad.detach()).sum() for leaf, grad in gradients)
    return value.detach() + (linear - linear.detach())


def in_threads(work: Callable[[int], Any], items: list[int], threads: int) -> list[Any]:
    """[work(i) for i in items], run by `threads` threads (this one among them), each with its share of
    torch's intra-op threads; the results in the order of `items`. The helper threads are new each call:
    an idle thread that has run torch operations was measured to slow this thread's multi-threaded
    operations afterwards (docs/speed-and-memory.md)."""
    if threads <= 1:
        return [work(i) for i in items]
    results: list[Any] = [None] * len(items)
    errors: list[BaseException] = []
    position = iter(range(len(items)))
    lock = threading.Lock()
    intra = torch.get_num_threads()
    share = max(1, intra // threads)
    grad_mode = torch.is_grad_enabled()
    autocast = torch.is_autocast_enabled("cpu")
    autocast_dtype = torch.get_autocast_dtype("cpu")

    def worker() -> None:
        torch.set_num_threads(share)
        with torch.set_grad_enabled(grad_mode), torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast):
            while not errors:
                with lock:
                    k = next(position, None)
                if k is None:
                    return
                try:
                    results[k] = work(items[k])
                except BaseException as error:  # re-raised in the calling thread
                    errors.append(error)
                    return

    helpers = [threading.Thread(target=worker, daemon=True) for _ in range(threads - 1)]
    torch.set_num_threads(share)
    try:
        for helper in helpers:
            helper.start()
        worker()
        for helper in helpers:
            helper.join()
    finally:
        torch.set_num_threads(intra)
    if errors:
        raise errors[0]
    return results


def detached(results: Any) -> Any:
    """Per-task results (tensors, or dicts / tuples of them) without their autograd graph."""
    if isinstance(results, Tensor):
        return results.detach()
    if isinstance(results, dict):
        return {k: detached(v) for k, v in results.items()}
    return type(results)(detached(r) for r in results)


def join(parts: list[Any]) -> Any:
    """Concatenate per-task results along the task dimension (tensors, dicts and tuples of them)."""
    first = parts[0]
    if isinstance(first, Tensor):
        return torch.cat(parts)
    if isinstance(first, dict):
        return {k: join([p[k] for p in parts]) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(join([p[i] for p in parts]) for i in range(len(first)))
    raise TypeError(f"cannot join results of type {type(first).__name__}")
