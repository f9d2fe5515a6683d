"""`metalearn bench`: time one meta-iteration of our MAML against the two per-task loops users run.

For each workload, in one process, on the same model weights, the same tasks and the same seed,
the implementations alternate step by step (so machine noise hits all alike); we report the
median milliseconds per meta-iteration of each, our ratio against each reference, the peak memory
of each (RSS on the CPU, measured in a fresh subprocess per implementation; allocator peak on a
GPU), and check that all give the same meta-gradient (relative error < 1e-4).

Both references run, for every task, functional_call on the support set,
torch.autograd.grad(create_graph=True), an SGD step and the query loss. They differ in the backward:

* `per_task_backward`: backward() of each task's query loss (divided by the meta-batch) inside the
  task loop, which frees each task's graph before the next is built: what learn2learn's own
  examples (examples/vision/maml_omniglot.py) do, and the faster of the two on a CPU;
* `one_backward`: one backward of the mean query loss after the loop, which keeps every task's
  graph alive until then: what higher's examples and many papers' code do.

The reinforcement-learning workloads (nav2d, halfcheetah: environment steps per second against one
episode at a time, and one MAML-TRPO meta-iteration by phase) are `metalearn_cli.bench_rl`'s.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Sequence
from pathlib import Path

import torch
from torch.func import functional_call

from metalearn_cli import bench_rl
from metalearn_cli.algorithms import MAML, FunctionalModel
from metalearn_cli.models import MLP, Conv4
from metalearn_cli.tasks import CLASSIFICATION, REGRESSION, TaskBatch


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    kind: str  # "sinusoid" or "image"
    meta_batch: int
    ways: int = 1
    shots: int = 10
    queries: int = 10
    image: tuple[int, int, int] = (1, 28, 28)
    channels: int = 64
    downsample: str = "stride"
    pool: str = "mean"
    inner_steps: int = 1
    inner_lr: float = 0.01
    first_order: bool = False

    def model(self) -> torch.nn.Module:
        if self.kind == "sinusoid":
            return MLP((1,), 1, hidden=(40, 40))
        return Conv4(self.image, self.ways, channels=self.channels, downsample=self.downsample, pool=self.pool)

    def objective(self):
        return REGRESSION if self.kind == "sinusoid" else CLASSIFICATION

    def tasks(self, seed: int, device: torch.device) -> TaskBatch:
        g = torch.Generator().manual_seed(seed)
        t = self.meta_batch
        if self.kind == "sinusoid":
            amp = torch.rand(t, 1, 1, generator=g) * 4.9 + 0.1
            phase = torch.rand(t, 1, 1, generator=g) * torch.pi
            xs = torch.rand(t, self.shots, 1, generator=g) * 10 - 5
            xq = torch.rand(t, self.queries, 1, generator=g) * 10 - 5
            batch = TaskBatch(xs, amp * torch.sin(xs - phase), xq, amp * torch.sin(xq - phase))
        else:
            s, q = self.ways * self.shots, self.ways * self.queries
            batch = TaskBatch(
                torch.rand(t, s, *self.image, generator=g),
                torch.arange(self.ways).repeat_interleave(self.shots).expand(t, s).contiguous(),
                torch.rand(t, q, *self.image, generator=g),
                torch.arange(self.ways).repeat_interleave(self.queries).expand(t, q).contiguous(),
            )
        return batch.to(device)


WORKLOADS = {
    w.name: w
    for w in [
        Workload("sinusoid", "MLP 1-40-40-1, meta-batch 25, K=10+10, 1 step, 2nd order", "sinusoid", 25),
        Workload("omniglot-5w1s", "conv4 64f stride 2, 28x28, 5-way 1-shot, 1 query/class, meta-batch 32, 1 step, 2nd order",
                 "image", 32, ways=5, shots=1, queries=1, inner_lr=0.4),
        Workload("omniglot-5w1s-fo", "the same, first order", "image", 32, ways=5, shots=1, queries=1, inner_lr=0.4, first_order=True),
        Workload("omniglot-5w5s", "conv4, 5-way 5-shot, 1 query/class, meta-batch 32, 1 step, 2nd order",
                 "image", 32, ways=5, shots=5, queries=1, inner_lr=0.4),
        Workload("omniglot-20w1s", "conv4, 20-way 1-shot, 1 query/class, meta-batch 16, 5 steps (lr 0.1), 2nd order",
                 "image", 16, ways=20, shots=1, queries=1, inner_steps=5, inner_lr=0.1),
        Workload("mini-5w1s", "conv4 32f max-pool, 84x84x3, 5-way 1-shot, 15 queries/class, meta-batch 4, 5 steps, 2nd order",
                 "image", 4, ways=5, shots=1, queries=15, image=(3, 84, 84), channels=32, downsample="maxpool",
                 pool="flatten", inner_steps=5, inner_lr=0.01),
    ]
}
DEFAULT_WORKLOADS = ["sinusoid", "omniglot-5w1s", "omniglot-5w1s-fo"]


#: the reference loops, in the order they are reported (module docstring)
REFERENCES = ("per_task_backward", "one_backward")


def reference_step(model: torch.nn.Module, objective, tasks: TaskBatch, steps: int, lr: float, first_order: bool,
                   reference: str = "per_task_backward") -> float:
    """The textbook MAML meta-gradient: a Python loop over tasks (fills model .grad), with one backward per
    task or one for the meta-batch (`reference`)."""
    params = dict(model.named_parameters())
    total = 0.0
    for i in range(tasks.num_tasks):
        fast = params
        for _ in range(steps):
            loss = objective.loss(functional_call(model, fast, (tasks.support_x[i],)), tasks.support_y[i])
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=not first_order)
            fast = {k: v - lr * g for (k, v), g in zip(fast.items(), grads)}
        query = objective.loss(functional_call(model, fast, (tasks.query_x[i],)), tasks.query_y[i]) / tasks.num_tasks
        if reference == "per_task_backward":
            query.backward()
            query = query.detach()
        total = total + query
    if reference == "one_backward":
        total.backward()
    return float(total.detach())


def ours_step(algo: MAML, fmodel: FunctionalModel, tasks: TaskBatch) -> float:
    step = algo.meta_step(fmodel, tasks)
    step.loss.backward()
    return float(step.loss.detach())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _grads(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def gradient_agreement(w: Workload, model: torch.nn.Module, algo: MAML, tasks: TaskBatch) -> float:
    """The largest relative error between our meta-gradient and each reference's, in float64 on the same
    weights and tasks (float32 rounding differs between algorithms, and with several second-order steps on
    random data the difference can reach 1e-3 in float32 while the math is identical: 1e-14 in float64)."""
    import copy

    model64 = copy.deepcopy(model).double()
    tasks64 = TaskBatch(*(t.double() if t.is_floating_point() else t for t in tasks.tensors()))
    ours_step(algo, FunctionalModel(model64), tasks64)
    g_ours = _grads(model64).clone()
    worst = 0.0
    for reference in REFERENCES:
        model64.zero_grad()
        reference_step(model64, w.objective(), tasks64, w.inner_steps, w.inner_lr, w.first_order, reference)
        g_ref = _grads(model64)
        worst = max(worst, float((g_ours - g_ref).norm() / g_ref.norm().clamp_min(1e-300)))
    return worst


def run_workload(w: Workload, strategy: str, repeats: int, warmup: int, device: torch.device, seed: int = 0,
                 task_chunks: Sequence[int | str] = ("auto",), task_threads: Sequence[int | str] = ("auto",)) -> list[dict]:
    """Time both references and our step with each `algo.task_chunk` in `task_chunks` and each
    `algo.task_threads` in `task_threads`, interleaved (the references, then each of ours, repeated), on the
    same weights and tasks: one row per (chunk, threads)."""
    torch.manual_seed(seed)
    model = w.model().to(device)
    objective = w.objective()
    fmodel = FunctionalModel(model)
    tasks = w.tasks(seed, device)
    algos = [
        MAML(inner_lr=w.inner_lr, inner_steps=w.inner_steps, eval_inner_steps=1, outer_lr=1e-3,
             first_order=w.first_order, vectorize=strategy, task_chunk=chunk, task_threads=threads)
        for chunk in task_chunks for threads in task_threads
    ]
    errors = [gradient_agreement(w, model, algo, tasks) for algo in algos]
    refs = len(REFERENCES)
    times: list[list[float]] = [[] for _ in range(len(algos) + refs)]  # the references first
    for i in range(warmup + repeats):
        for j in range(len(algos) + refs):
            model.zero_grad(set_to_none=True)
            _sync(device)
            start = time.perf_counter()
            if j < refs:
                reference_step(model, objective, tasks, w.inner_steps, w.inner_lr, w.first_order, REFERENCES[j])
            else:
                ours_step(algos[j - refs], fmodel, tasks)
            _sync(device)
            if i >= warmup:
                times[j].append((time.perf_counter() - start) * 1e3)
    ref_ms = {name: statistics.median(t) for name, t in zip(REFERENCES, times)}
    rows = []
    for algo, error, ours in zip(algos, errors, times[refs:]):
        chosen = algo.execution.describe(fmodel, tasks)
        ours_ms = statistics.median(ours)
        rows.append({
            "workload": w.name,
            "description": w.description,
            "strategy": strategy,
            "resolved": chosen["strategy"],
            "task_chunk": chosen["task_chunk"],
            "task_threads": chosen["task_threads"],
            **{f"{name}_ms": ms for name, ms in ref_ms.items()},
            "ours_ms": ours_ms,
            **{f"speedup_vs_{name}": ms / ours_ms for name, ms in ref_ms.items()},
            "grad_rel_error": error,
            "repeats": repeats,
        })
    return rows


def peak_memory(w: Workload, impl: str, strategy: str, device: torch.device, steps: int = 3, inner_steps: int | None = None,
                task_chunk: int | str = "auto", task_threads: int | str = "auto") -> dict:
    """Peak memory in MiB of one implementation, in a fresh process: `rss`, the resident set above
    its level at start over the first `steps` meta-iterations (one-time costs such as kernel caches
    included), and `heap`, the bytes the allocator holds live during one more meta-iteration, above
    the level before it (what the meta-iteration itself needs; glibc's malloc statistics). On a GPU
    both are the CUDA allocator's peak."""
    code = (
        "import sys, json, resource, torch;"
        "from metalearn_cli import bench as b;"
        f"print(json.dumps(b._measure_memory({w.name!r}, {impl!r}, {strategy!r}, {str(device)!r}, {steps}, {inner_steps!r}, "
        f"{task_chunk!r}, {task_threads!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _measure_memory(name: str, impl: str, strategy: str, device: str, steps: int, inner_steps: int | None,
                    task_chunk: int | str = "auto", task_threads: int | str = "auto") -> dict:
    from metalearn_cli.allocator import keep_freed_memory

    keep_freed_memory()  # as the `metalearn` process that times them
    w = WORKLOADS[name]
    if inner_steps is not None:
        w = Workload(**{**w.__dict__, "inner_steps": inner_steps})
    dev = torch.device(device)
    torch.manual_seed(0)
    model = w.model().to(dev)
    objective = w.objective()
    fmodel = FunctionalModel(model)
    algo = MAML(inner_lr=w.inner_lr, inner_steps=w.inner_steps, eval_inner_steps=1, outer_lr=1e-3,
                first_order=w.first_order, vectorize=strategy, task_chunk=task_chunk, task_threads=task_threads)
    tasks = w.tasks(0, dev)

    def one() -> None:
        model.zero_grad(set_to_none=True)
        if impl in REFERENCES:
            reference_step(model, objective, tasks, w.inner_steps, w.inner_lr, w.first_order, impl)
        else:
            ours_step(algo, fmodel, tasks)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        for _ in range(steps):
            one()
        peak = torch.cuda.max_memory_allocated(dev) / 2**20
        return {"rss": peak, "heap": peak}
    with PeakRSS() as rss:
        for _ in range(steps):
            one()
    with PeakRSS(heap=True) as heap:
        one()
    return {"rss": rss.peak_mib, "heap": heap.peak_mib}


@functools.lru_cache(maxsize=1)
def _mallinfo2():
    """glibc's mallinfo2, loaded once (the watcher thread samples it every millisecond)."""
    import ctypes

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

    function = ctypes.CDLL("libc.so.6").mallinfo2
    function.restype = MallInfo2
    return function


def _heap_in_use() -> int:
    info = _mallinfo2()()
    return info.uordblks + info.hblkhd  # in use in the heap + in mmapped chunks


class PeakRSS:
    """Peak resident memory above the level at entry, in MiB, sampled every millisecond from /proc
    (ru_maxrss cannot be used: importing torch alone peaks higher than a small meta-step); with
    `heap=True`, the bytes malloc has handed out and not taken back (glibc's mallinfo2), which
    leaves out memory the allocator keeps after a free."""

    def __init__(self, heap: bool = False) -> None:
        import threading

        if heap:
            self._rss = _heap_in_use
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self.peak_mib = 0.0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize()

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak_mib = max(self.peak_mib, (self._rss() - self._base) / 2**20)
            time.sleep(0.001)

    def __enter__(self) -> "PeakRSS":
        self._base = self._rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def end_to_end(overrides: list[str], steps: int, warmup: int, rounds: int = 3) -> dict:
    """ms per meta-iteration through `metalearn train` (Lightning Trainer, logging, checkpoints every
    1000 steps) against the bare loop over the same experiment: sample, meta-step, backward, optimizer.
    The two alternate `rounds` times in this process; medians."""
    import tempfile

    import pytorch_lightning as pl
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    from metalearn_cli.build import build_experiment, build_trainer
    from metalearn_cli.config_checks import iterations_per_batch
    from metalearn_cli.console import quiet_third_party

    quiet_third_party()
    GlobalHydra.instance().clear()
    with initialize_config_module(version_base="1.3", config_module="metalearn_cli.configs"):
        composed = compose(config_name="train", return_hydra_config=True, overrides=[
            *overrides, f"trainer.max_steps={warmup + steps}", "trainer.val_check_interval=1000000",
            "trainer.enable_progress_bar=false", "eval.num_tasks=2", "eval.val_tasks=2"])
    times: dict[str, float] = {}

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == warmup:
                times["start"] = time.perf_counter()

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == warmup + steps:
                times["end"] = time.perf_counter()

    lightning, bare = [], []
    for _ in range(rounds):
        out = Path(tempfile.mkdtemp(prefix="metalearn-bench-"))
        with read_write(composed.hydra):
            composed.hydra.runtime.output_dir = str(out)
        HydraConfig().set_config(composed)
        cfg = composed.copy()
        with open_dict(cfg):
            del cfg["hydra"]
        pl.seed_everything(0, verbose=False)
        experiment = build_experiment(cfg)
        trainer = build_trainer(cfg, out, experiment, training=True)
        trainer.callbacks.append(Clock())
        trainer.fit(experiment.module, datamodule=experiment.datamodule)
        lightning.append((times["end"] - times["start"]) / steps * 1e3)
        module, sampler, algo = experiment.module, experiment.sampler, experiment.algorithm
        optimizer = algo.configure_optimizers(module.parameters(), warmup + steps)["optimizer"]
        for i in range(warmup + steps):
            if i == warmup:
                start = time.perf_counter()
            batch = sampler.train_batch(0, i)
            step = algo.meta_step(module.fmodel, batch)
            optimizer.zero_grad(set_to_none=True)
            step.loss.backward()
            optimizer.step()
        bare.append((time.perf_counter() - start) / steps * 1e3)
    lightning_ms, bare_ms = statistics.median(lightning), statistics.median(bare)
    return {"overrides": overrides, "iterations_per_batch": iterations_per_batch(cfg), "lightning_ms": lightning_ms,
            "bare_ms": bare_ms, "fraction": bare_ms / lightning_ms, "lightning_rounds_ms": lightning, "bare_rounds_ms": bare}


def sampling_share(root: str, ways: int = 5, shots: int = 1, queries: int = 5, meta_batch: int = 32, repeats: int = 30) -> dict:
    """Time to draw one Omniglot meta-batch with the real sampler, next to one meta-iteration."""
    from metalearn_cli.data.omniglot import Omniglot
    from metalearn_cli.samplers import EpisodicSampler

    sampler = EpisodicSampler(Omniglot(root), shots, queries, meta_batch, ways)
    for i in range(3):
        sampler.train_batch(0, i)
    start = time.perf_counter()
    for i in range(repeats):
        batch = sampler.train_batch(0, i)
    sample_ms = (time.perf_counter() - start) / repeats * 1e3
    torch.manual_seed(0)
    model = Conv4((1, 28, 28), ways)
    algo = MAML(inner_lr=0.4, inner_steps=1, eval_inner_steps=1, outer_lr=1e-3)
    fmodel = FunctionalModel(model)
    times = []
    for _ in range(5):
        model.zero_grad(set_to_none=True)
        start = time.perf_counter()
        ours_step(algo, fmodel, batch)
        times.append((time.perf_counter() - start) * 1e3)
    step_ms = statistics.median(times[1:])
    return {"sample_ms": sample_ms, "step_ms": step_ms, "share": sample_ms / (sample_ms + step_ms)}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name()}"
    return text


def _chunks(text: str) -> list[int | str]:
    values = [v.strip() for v in text.split(",")]
    if not all(v == "auto" or (v.isdigit() and int(v) >= 1) for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: expected auto or integers >= 1, comma-separated (e.g. 32,8,4)")
    return [v if v == "auto" else int(v) for v in values]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="metalearn bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("workloads", nargs="*", default=DEFAULT_WORKLOADS,
                        help=f"any of: {', '.join([*WORKLOADS, *bench_rl.RL_WORKLOADS])} or 'all' "
                             f"(every one but {', '.join(n for n in bench_rl.RL_WORKLOADS if n not in bench_rl.IN_ALL)})")
    parser.add_argument("--strategy", default="auto", help="algo.vectorize value to time (auto, vmap, loop, ...)")
    parser.add_argument("--task-chunk", default="auto", type=_chunks,
                        help="algo.task_chunk: tasks per pass with batched execution (auto or a number); "
                             "several, comma-separated, are timed interleaved in one process, e.g. 32,8,4")
    parser.add_argument("--task-threads", default="auto", type=_chunks,
                        help="algo.task_threads: parts differentiated at once on the CPU (auto or a number); several, "
                             "comma-separated, are timed interleaved with every --task-chunk, e.g. 1,2")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory (a subprocess per implementation)")
    parser.add_argument("--memory-steps", default="", help="inner steps for a memory sweep, e.g. 1,3,5,10")
    parser.add_argument("--memory-workload", default="mini-5w1s", choices=list(WORKLOADS), help="the workload of the memory sweep")
    parser.add_argument("--end-to-end", action="store_true", help="also time `metalearn train` against the bare loop (sinusoid; Omniglot with --omniglot-root)")
    parser.add_argument("--omniglot-root", help="the folder holding omniglot-py/: measure the sampler's share of a meta-iteration")
    parser.add_argument("--json", type=Path, help="write the results here")
    bench_rl.add_arguments(parser)
    args = parser.parse_args(argv)
    requested = [*WORKLOADS, *bench_rl.IN_ALL] if args.workloads == ["all"] else args.workloads
    unknown = [n for n in requested if n not in WORKLOADS and n not in bench_rl.RL_WORKLOADS]
    if unknown:
        print(f"Error: unknown workload(s) {', '.join(unknown)}. Allowed: {', '.join([*WORKLOADS, *bench_rl.RL_WORKLOADS])}, all.",
              file=sys.stderr)
        sys.exit(2)
    names = [n for n in requested if n in WORKLOADS]
    rl_names = [n for n in requested if n in bench_rl.RL_WORKLOADS]
    device = torch.device(args.device)
    print(f"machine: {machine()}")
    if names:
        print("references: per-task backward (learn2learn's examples) | one backward of the mean query loss")
        print(f"{'workload':<18} {'strategy':<13} {'per-task ms':>11} {'one-bwd ms':>10} {'ours ms':>9} "
              f"{'vs per-task':>11} {'vs one-bwd':>10} {'grad rel err':>12}")
    results = []
    for name in names:
        ref_mem = {ref: peak_memory(WORKLOADS[name], ref, args.strategy, device) for ref in REFERENCES} if args.memory else None
        for r in run_workload(WORKLOADS[name], args.strategy, args.repeats, args.warmup, device, task_chunks=args.task_chunk,
                              task_threads=args.task_threads):
            if args.memory:  # the references do not depend on the chunk size: measured once per workload
                for ref in REFERENCES:
                    r[f"{ref}_peak_mib"] = ref_mem[ref]
                r["ours_peak_mib"] = ours_mem = peak_memory(WORKLOADS[name], "ours", args.strategy, device, task_chunk=r["task_chunk"],
                                                            task_threads=r["task_threads"])
            results.append(r)
            how = f"{r['resolved']}/{r['task_chunk']}" if r["resolved"] == "batched" else r["resolved"]
            how += f" x{r['task_threads']}" if r["task_threads"] > 1 else ""
            print(f"{name:<18} {how:<13} {r['per_task_backward_ms']:>11.2f} {r['one_backward_ms']:>10.2f} {r['ours_ms']:>9.2f} "
                  f"{r['speedup_vs_per_task_backward']:>10.2f}x {r['speedup_vs_one_backward']:>9.2f}x {r['grad_rel_error']:>12.1e}"
                  + ("   peak MiB (rss / heap) " + ", ".join(f"{ref.replace('_', '-')} {m['rss']:.0f} / {m['heap']:.0f}"
                                                           for ref, m in ref_mem.items())
                     + f", ours {ours_mem['rss']:.0f} / {ours_mem['heap']:.0f}" if args.memory else ""))
            if r["grad_rel_error"] >= 1e-4:
                print(f"  WARNING: meta-gradients differ (relative error {r['grad_rel_error']:.1e})", file=sys.stderr)
    sweep = []
    if args.memory_steps:
        w = WORKLOADS[args.memory_workload]
        print(f"second-order MAML peak memory (MiB, rss / heap) against inner steps, {w.name}:")
        for k in [int(s) for s in args.memory_steps.split(",")]:
            row = {f"{impl}_peak_mib": peak_memory(w, impl, args.strategy, device, inner_steps=k, task_chunk=args.task_chunk[0])
                   for impl in (*REFERENCES, "ours")}
            sweep.append({"workload": w.name, "inner_steps": k, **row})
            print(f"  {k:>2} steps: " + "   ".join(f"{impl.replace('_peak_mib', '').replace('_', '-')} {m['rss']:7.0f} / {m['heap']:7.0f}"
                                                 for impl, m in row.items()))
    extra: dict = {}
    if rl_names:
        extra["rl"] = bench_rl.run(rl_names, args)
    if args.omniglot_root:
        share = sampling_share(args.omniglot_root)
        extra["sampling"] = share
        print(f"Omniglot 5-way 1-shot, 5 queries, meta-batch 32: sampling {share['sample_ms']:.1f} ms, "
              f"meta-iteration {share['step_ms']:.0f} ms: sampling is {100 * share['share']:.1f}% of the total")
    if args.end_to_end:
        configs = [["algo=maml"]]
        if args.omniglot_root:
            configs.append(["data=omniglot", f"data.root={args.omniglot_root}"])
        extra["end_to_end"] = []
        for overrides in configs:
            steps, warmup = (2000, 200) if overrides == ["algo=maml"] else (30, 5)
            r = end_to_end(overrides, steps=steps, warmup=warmup)
            extra["end_to_end"].append(r)
            print(f"metalearn train {' '.join(o for o in overrides if 'root' not in o)} "
                  f"(iterations_per_batch={r['iterations_per_batch']}): {r['lightning_ms']:.2f} ms/iteration "
                  f"through Lightning, {r['bare_ms']:.2f} bare: {100 * r['fraction']:.0f}% of the bare speed")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "results": results, "memory_sweep": sweep, **extra}, indent=2))


if __name__ == "__main__":
    main()
