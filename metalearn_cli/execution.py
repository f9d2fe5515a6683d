"""How the tasks of a meta-batch run, decided beneath every algorithm.

An algorithm states its math for a part of the meta-batch: T tasks with per-task parameters, a
`TaskModel` to evaluate them with. `Execution.run` chooses the model's kernel (`batched`, `vmap` or
`loop`; see `metalearn_cli.functional`) and how many tasks go in one pass, calls the algorithm's
function on each part and joins the per-task results. Every choice computes the same function;
which is fastest depends on the model, the task size and the device.

`algo.vectorize=auto` and `algo.task_chunk=auto` follow the measurements in BENCHMARKS.md
("Speed"): they are fixed rules, so a run's numbers never depend on timing noise.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from metalearn_cli import batched, options
from metalearn_cli.functional import FunctionalModel, TaskModel
from metalearn_cli.models import MLP
from metalearn_cli.tasks.base import Tasks

#: algo.vectorize: the kernel that runs the tasks of a meta-batch
VECTORIZE_CHOICES = ("auto", "batched", "vmap", "loop")
#: auto: the largest support set (examples per task and step) for which grouped convolutions beat the loop
AUTO_BATCHED_MAX_SUPPORT = 20
#: auto: tasks per pass for conv nets on the CPU: it bounds the double backward's temporaries of batch
#: norm and grouped convolutions (BENCHMARKS.md, "Memory"); accelerators take the whole meta-batch.
AUTO_CONV_TASK_CHUNK = 8


class Execution:
    """`vectorize`: auto, batched, vmap or loop. `task_chunk`: auto, or tasks per pass (batched)."""

    def __init__(self, vectorize: str = "auto", task_chunk: int | str = "auto") -> None:
        self.vectorize = options.choice("vectorize", vectorize, VECTORIZE_CHOICES)
        if task_chunk != "auto" and not (isinstance(task_chunk, int) and not isinstance(task_chunk, bool) and task_chunk >= 1):
            raise options.invalid("task_chunk", task_chunk, "auto, or an integer >= 1 (tasks per pass with batched execution)")
        self.task_chunk = task_chunk

    def strategy(self, module: nn.Module, tasks: Tasks | None = None, examples: int | None = None) -> str:
        """batched, vmap or loop. `auto`:

        * `batched` for the MLP, and for Conv4 while each inner step sees few examples per task (at
          most AUTO_BATCHED_MAX_SUPPORT; `examples`, default the task's support size): grouped
          convolutions win when each task alone is too small to keep the cores busy;
        * `loop` for Conv4 with larger support sets, where each task is a large enough batch on its
          own and the double backward of grouped convolutions costs more than it saves (it runs the
          batched kernel one task at a time);
        * `vmap` for models `metalearn_cli.batched` does not know.
        """
        if self.vectorize == "batched" and not batched.supports(module):
            raise ValueError(f"algo.vectorize=batched does not support {type(module).__name__}; use vmap or loop")
        if self.vectorize != "auto":
            return self.vectorize
        if not batched.supports(module):
            return "vmap"
        if isinstance(module, MLP) or tasks is None:
            return "batched"
        examples = tasks.support_size if examples is None else examples
        return "batched" if examples <= AUTO_BATCHED_MAX_SUPPORT else "loop"

    def chunk(self, module: nn.Module, tasks: Tasks, strategy: str) -> int:
        """Tasks per pass: 1 for the loop; otherwise `task_chunk`, whose `auto` is every task at once
        for the MLP (small: one pass saves Python overhead), on accelerators (fewer, larger kernels)
        and under vmap, and AUTO_CONV_TASK_CHUNK for batched conv nets on the CPU."""
        if strategy == "loop":
            return 1
        if self.task_chunk != "auto":
            return int(self.task_chunk)
        if strategy == "vmap" or isinstance(module, MLP) or tasks.device.type != "cpu":
            return tasks.num_tasks
        return AUTO_CONV_TASK_CHUNK

    def kernel(self, module: nn.Module, strategy: str) -> str:
        """The loop runs the batched kernel one task at a time where the model has one."""
        return "batched" if strategy == "loop" and batched.supports(module) else strategy

    def run(self, fn: Callable[..., Any], fmodel: FunctionalModel, tasks: Tasks, *per_task: Tensor,
            examples: int | None = None) -> Any:
        """fn(model, part, *per_task_part) -> per-task results ([t, ...] tensors, or dicts / tuples of
        them) for consecutive parts of `tasks` (and the matching rows of each tensor in `per_task`),
        joined over the parts. Each part's autograd graph is separate, so a backward through the
        joined result frees one part's temporaries before the next."""
        strategy = self.strategy(fmodel.module, tasks, examples)
        model = fmodel.on(self.kernel(fmodel.module, strategy))
        chunk = self.chunk(fmodel.module, tasks, strategy)
        if chunk >= tasks.num_tasks:
            return fn(model, tasks, *per_task)
        parts = [
            fn(model, tasks.slice(i, min(i + chunk, tasks.num_tasks)), *(t[i : i + chunk] for t in per_task))
            for i in range(0, tasks.num_tasks, chunk)
        ]
        return join(parts)

    def describe(self, fmodel: FunctionalModel, tasks: Tasks, examples: int | None = None) -> dict:
        """The choice `run` makes for these tasks (what `metalearn bench` reports)."""
        strategy = self.strategy(fmodel.module, tasks, examples)
        return {"strategy": strategy, "task_chunk": self.chunk(fmodel.module, tasks, strategy)}


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
