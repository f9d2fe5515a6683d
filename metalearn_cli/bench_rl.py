"""`metalearn bench nav2d halfcheetah`: the speed of reinforcement learning, against the loops users write.

For each environment family, with the shipped settings (`configs/data/<data>.yaml` and MAML's tuning
file; `--tasks`, `--episodes` and `--horizon` change the sizes):

* **Environment steps per second.** Our environment steps the T tasks x B episodes of a meta-batch as
  one batch; the reference runs one episode after another. First with random actions, the same for
  both (the environment alone), then with the Gaussian policy choosing every action (collecting
  episodes as training does: `rl.rollouts.collect` evaluates the policy once per step for every
  episode; the reference evaluates it on one observation per step, as rllab's `rollout` did), with the
  same action noise. For nav2d the reference is a NumPy point robot written here from the MAML paper's
  reference code, independently of `metalearn_cli.rl.nav2d` (the tests check that both follow the same
  trajectories); for HalfCheetah it is one `gymnasium.make("HalfCheetah-v5")`, and ours the vector
  environment of `data.workers`: in this process (`0`) and with the worker processes `auto` starts,
  where it starts some. Rounds of the reference and ours alternate, so that machine noise hits both
  alike; medians.
* **One meta-iteration** of MAML-TRPO: draw the tasks, collect, adapt, the TRPO step, apply it. The
  median of `--rl-repeats` after one warm-up, and the median iteration split into its phases. The
  phases are timed by wrapping the functions the meta-iteration calls, so the code timed is training's.
"""

from __future__ import annotations

import argparse
import copy
import functools
import math
import statistics
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from metalearn_cli.errors import MetalearnError
from metalearn_cli.samplers import derive_seed


@dataclass(frozen=True)
class RLWorkload:
    name: str
    data: str  # the data config it runs (configs/data/<data>.yaml)
    description: str


RL_WORKLOADS = {
    w.name: w
    for w in [
        RLWorkload("nav2d", "nav2d", "2D navigation: our torch environment against a NumPy loop, one episode at a time"),
        RLWorkload("halfcheetah", "halfcheetah_vel", "HalfCheetah-v5 goal velocity: our Gymnasium vector environment "
                                                    "against one gymnasium.make environment at a time"),
    ]
}
#: the RL workloads of `metalearn bench all`: HalfCheetah's take minutes and need the `rl` extra
IN_ALL = ("nav2d",)

#: the phases of a MAML-TRPO meta-iteration, in the order it runs them
COLLECTION = "collection"
INNER_STEP = "inner step"
FISHER_GRAPHS = "Fisher graphs"
FISHER_PRODUCTS = "Fisher-vector products"
LINE_SEARCH = "line search"
#: what no phase covers: the query surrogate and the meta-gradient's backward (nearly all of it), drawing
#: the goals and applying the step
REST = "meta-gradient and rest"
PHASES = (COLLECTION, INNER_STEP, FISHER_GRAPHS, FISHER_PRODUCTS, LINE_SEARCH, REST)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: expected an integer >= 1")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reinforcement-learning workloads (nav2d, halfcheetah)")
    group.add_argument("--tasks", type=_positive, help="tasks per meta-batch (default: the data config's, 20 for nav2d, 40 for halfcheetah)")
    group.add_argument("--episodes", type=_positive, help="episodes per task, support and query alike (default: the config's 20)")
    group.add_argument("--horizon", type=_positive, help="steps per episode (default: the config's, 100 for nav2d, 200 for halfcheetah)")
    group.add_argument("--rl-repeats", type=_positive, default=3,
                       help="rounds of each steps/s measurement, and meta-iterations timed after one warm-up (medians)")


# -- the shipped settings ------------------------------------------------------------------------
def shipped_config(w: RLWorkload, tasks: int | None = None, episodes: int | None = None, horizon: int | None = None):
    """`metalearn train data=<data>`'s composed configuration (MAML with its tuning file), with the sizes given."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    overrides = [f"data={w.data}"]
    if tasks:
        overrides.append(f"sampler.meta_batch_size={tasks}")
    if episodes:
        overrides += [f"sampler.shots={episodes}", f"sampler.queries={episodes}"]
    if horizon:
        overrides.append(f"data.horizon={horizon}")
    GlobalHydra.instance().clear()
    with initialize_config_module(version_base="1.3", config_module="metalearn_cli.configs"):
        return compose(config_name="train", overrides=overrides)


def _generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


# -- the references: one episode at a time ---------------------------------------------------------
class ReferenceNav2d:
    """2D navigation one episode at a time, in NumPy: the point robot of the MAML paper's reference code
    (cbfinn/maml_rl `point_env_randgoal.py`) inside rllab's `normalize()`, written from that code and
    not from `metalearn_cli.rl.nav2d`.

    The robot starts at (0, 0); `normalize()` maps an action a in [-1, 1] onto the box [-0.1, 0.1]^2 as
    lb + (a + 1) (ub - lb) / 2 = 0.1 a and clips to the box (`action_scale` 1 applies a itself, clipped);
    the reward is minus the distance to the goal after the move; the episode ends when both
    coordinates are within 0.01 of the goal."""

    BOX = 0.1
    TOLERANCE = 0.01

    def __init__(self, goals: np.ndarray, action_scale: float) -> None:
        self.goals = np.asarray(goals, dtype=np.float64)
        self.action_scale = float(action_scale)
        self.goal = self.goals[0]
        self.state = np.zeros(2)

    def start(self, task: int, episode: int) -> np.ndarray:
        self.goal = self.goals[task]
        self.state = np.zeros(2)
        return self.state.copy()

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool]:
        self.state = self.state + np.clip(self.action_scale * action, -self.BOX, self.BOX)
        x, y = self.state - self.goal
        done = abs(x) < self.TOLERANCE and abs(y) < self.TOLERANCE
        return self.state.copy(), -math.sqrt(x * x + y * y), done


class ReferenceHalfCheetah:
    """HalfCheetah goal velocity one episode at a time: one `gymnasium.make("HalfCheetah-v5")`, reset with
    each episode's seed, the action clipped to [-1, 1] (float32), the reward -|v_x - goal| - 0.05 ||a||^2."""

    def __init__(self, goals: np.ndarray, seeds: list[list[int]], horizon: int) -> None:
        from metalearn_cli.rl.halfcheetah import make_simulation

        self.env = make_simulation(horizon)  # gymnasium.make, quiet about MuJoCo's deprecation notice
        self.goals = np.asarray(goals, dtype=np.float64).reshape(-1)
        self.seeds = seeds
        self.goal = 0.0

    def start(self, task: int, episode: int) -> np.ndarray:
        self.goal = float(self.goals[task])
        observation, _ = self.env.reset(seed=int(self.seeds[task][episode]))
        return observation

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool]:
        action = np.clip(action, -1.0, 1.0).astype(np.float32)
        observation, _, terminated, truncated, info = self.env.step(action)
        reward = -abs(info["x_velocity"] - self.goal) - 0.05 * float(np.square(action, dtype=np.float64).sum())
        return observation, reward, terminated or truncated

    def close(self) -> None:
        self.env.close()


def reference_random(env, actions: np.ndarray) -> int:
    """Every episode one after another with the given actions [T, B, H, act]; the steps taken."""
    tasks, per_task, horizon = actions.shape[:3]
    steps = 0
    for i in range(tasks):
        for b in range(per_task):
            env.start(i, b)
            for t in range(horizon):
                steps += 1
                if env.step(actions[i, b, t])[2]:
                    break
    return steps


@torch.no_grad()
def reference_policy(env, policy: nn.Module, noise: Tensor, horizon: int) -> int:
    """rllab's `rollout`, episode after episode: the policy's action for one observation per step (mean +
    std * noise, noise [T, H, B, act] as `collect` draws it), each path recorded; the steps taken."""
    from metalearn_cli.rl.gaussian import bounded

    std = bounded(policy.log_std).exp()
    tasks, per_task = noise.shape[0], noise.shape[2]
    steps = 0
    for i in range(tasks):
        for b in range(per_task):
            observation = env.start(i, b)
            path: list[tuple[np.ndarray, np.ndarray, float]] = []
            for t in range(horizon):
                mean = policy(torch.as_tensor(observation, dtype=torch.float32).unsqueeze(0))[0]
                action = (mean + std * noise[i, t, b]).numpy()
                following, reward, done = env.step(action)
                path.append((observation, action, reward))
                observation = following
                steps += 1
                if done:
                    break
    return steps


# -- ours: every episode of the batch at once --------------------------------------------------------
@torch.no_grad()
def ours_random(env, goals: Tensor, actions: Tensor, env_seeds: Sequence[int]) -> int:
    """The T x B episodes stepped together with the given actions [H, T, B, act], until all have ended;
    the steps taken (an episode's steps up to the one that ended it)."""
    env.reset(goals, actions.shape[2], _generators(env_seeds))
    alive = torch.ones(actions.shape[1:3], dtype=torch.bool, device=goals.device)
    steps = torch.zeros((), dtype=torch.long, device=goals.device)
    for action in actions:
        _, _, done = env.step(action)
        steps += alive.sum()
        alive = alive & ~done
        if not alive.any():
            break
    return int(steps)


def batched_policy(module: nn.Module, tasks: int) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """The policy as `EpisodeTasks` collects with it: per-task parameters (here all theta), on the kernel
    training picks; observations [T, B, obs] -> (action means, log standard deviations)."""
    from metalearn_cli.batched import expand
    from metalearn_cli.execution import Execution
    from metalearn_cli.functional import FunctionalModel

    fmodel, execution = FunctionalModel(module), Execution()
    model = fmodel.on(execution.kernel(module, execution.strategy(module)))
    params = expand({k: v.detach() for k, v in fmodel.params().items()}, tasks)
    return lambda obs: (model(params, obs, 0), params["log_std"])


def ours_policy(env, policy: Callable, goals: Tensor, per_task: int, env_seeds: Sequence[int], noise_seeds: Sequence[int]) -> int:
    """Episodes collected by `rl.rollouts.collect`, as training collects them; the steps taken."""
    from metalearn_cli.rl.rollouts import collect

    return int(collect(env, policy, goals, per_task, _generators(env_seeds), _generators(noise_seeds)).mask.sum())


def alternate(runs: dict[str, Callable[[], int]], rounds: int) -> dict[str, dict]:
    """Each run (returning the steps it took) `rounds` times, in turn; its steps per second over the
    median round."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    steps: dict[str, int] = {}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            steps[name] = run()
            seconds[name].append(time.perf_counter() - start)
    return {name: {"steps": steps[name], "seconds": seconds[name], "steps_per_s": steps[name] / statistics.median(seconds[name])}
            for name in runs}


def environment_steps(w: RLWorkload, cfg, rounds: int, device: torch.device, seed: int = 0) -> list[dict]:
    """Steps per second of ours against the reference, with random actions and with the policy: one row
    per (actions, way of stepping ours)."""
    from metalearn_cli.build import build_tasks

    torch.manual_seed(seed)
    parts = build_tasks(cfg)
    source = parts.source
    policy = copy.deepcopy(parts.model)  # the reference evaluates the same network, on the CPU
    module = parts.model.to(device)
    tasks, per_task, horizon = int(cfg.sampler.meta_batch_size), int(cfg.sampler.shots), int(cfg.data.horizon)
    goals = source.goals(torch.Generator().manual_seed(seed), tasks)
    env_seeds = [derive_seed(seed, 0, i) for i in range(tasks)]
    noise_seeds = [derive_seed(seed, 1, i) for i in range(tasks)]
    act_dim = source.act_dim
    actions = np.random.default_rng(seed).standard_normal((tasks, per_task, horizon, act_dim)).astype(np.float32)
    actions_t = torch.from_numpy(actions).permute(2, 0, 1, 3).contiguous().to(device)  # [H, T, B, act]
    noise = torch.stack([torch.randn(horizon, per_task, act_dim, generator=g) for g in _generators(noise_seeds)])
    if w.name == "nav2d":
        ours_envs = {"torch, every episode at once": source.make_env()}
        reference = ReferenceNav2d(goals.numpy(), source.action_scale)
    else:
        from metalearn_cli.rl.halfcheetah import HalfCheetahTaskEnv, episode_seeds, resolve_workers

        ours_envs = {"workers=0 (this process)": HalfCheetahTaskEnv(source.family, horizon, 0)}
        workers = resolve_workers("auto", tasks * per_task)
        if workers:
            ours_envs[f"workers=auto ({workers} processes)"] = HalfCheetahTaskEnv(source.family, horizon, "auto")
        seeds = [episode_seeds(g, per_task) for g in _generators(env_seeds)]
        reference = ReferenceHalfCheetah(goals.numpy(), seeds, horizon)
    goals = goals.to(device)
    rows = []
    try:
        ours_policy_fn = batched_policy(module, tasks)
        with torch.no_grad():  # the first calls of the kernels, and HalfCheetah's simulations and workers, outside the timing
            ours_policy_fn(goals.new_zeros(tasks, per_task, source.input_shape[0]))
            policy(torch.zeros(1, source.input_shape[0]))
            for env in ours_envs.values():
                ours_random(env, goals, actions_t[:1], env_seeds)
        for kind in ("random", "policy"):
            if kind == "random":
                runs = {"reference": functools.partial(reference_random, reference, actions)}
                runs.update({how: functools.partial(ours_random, env, goals, actions_t, env_seeds) for how, env in ours_envs.items()})
            else:
                runs = {"reference": functools.partial(reference_policy, reference, policy, noise, horizon)}
                runs.update({how: functools.partial(ours_policy, env, ours_policy_fn, goals, per_task, env_seeds, noise_seeds)
                             for how, env in ours_envs.items()})
            measured = alternate(runs, rounds)
            ref = measured.pop("reference")
            for how, ours in measured.items():
                rows.append({
                    "workload": w.name, "data": w.data,
                    "actions": "random" if kind == "random" else f"Gaussian policy {_architecture(module)}",
                    "ours": how, "tasks": tasks, "episodes": per_task, "horizon": horizon,
                    "reference_steps_per_s": ref["steps_per_s"], "ours_steps_per_s": ours["steps_per_s"],
                    "speedup": ours["steps_per_s"] / ref["steps_per_s"],
                    "reference_steps": ref["steps"], "ours_steps": ours["steps"],
                    "reference_seconds": ref["seconds"], "ours_seconds": ours["seconds"], "rounds": rounds,
                })
    finally:
        for env in ours_envs.values():
            getattr(env, "close", lambda: None)()
        getattr(reference, "close", lambda: None)()
    return rows


def _architecture(module: nn.Module) -> str:
    """The hidden layers, as the MAML paper names them (2x100)."""
    widths = [m.out_features for m in module.modules() if isinstance(m, nn.Linear)][:-1]
    if len(set(widths)) == 1:
        return f"{len(widths)}x{widths[0]}"
    return "-".join(str(w) for w in widths) or "linear"


# -- one meta-iteration, by phase ---------------------------------------------------------------------
class PhaseClock:
    """Wall time of named phases, each exclusive of the phases nested in it, and how often each ran."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._open: list[list] = []  # [name, seconds of the phases nested in it so far]

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self._open.append([name, 0.0])
        start = time.perf_counter()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            _, nested = self._open.pop()
            self.seconds[name] += elapsed - nested
            self.calls[name] += 1
            if self._open:
                self._open[-1][1] += elapsed

    def inside(self, name: str) -> bool:
        return any(open_name == name for open_name, _ in self._open)

    def timed(self, name: str, function: Callable, unless_inside: str | None = None) -> Callable:
        """`function`, its calls timed as phase `name` (except within phase `unless_inside`, whose time they stay)."""
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            if unless_inside is not None and self.inside(unless_inside):
                return function(*args, **kwargs)
            with self.phase(name):
                return function(*args, **kwargs)

        return wrapper


def _replace_everywhere(original: object, replacement: object) -> list[tuple[object, str]]:
    """Set every module attribute of metalearn_cli that is `original` to `replacement` (wherever a module
    imported it); the (module, name) pairs changed."""
    import sys

    changed = []
    for module_name, module in list(sys.modules.items()):
        if module is None or not module_name.startswith("metalearn_cli"):
            continue
        for name, value in list(vars(module).items()):
            if value is original:
                setattr(module, name, replacement)
                changed.append((module, name))
    return changed


@contextmanager
def phases_timed(clock: PhaseClock) -> Iterator[None]:
    """Within it, the functions a MAML-TRPO meta-iteration calls report their time to `clock`: episode
    collection, the inner step (`adapt`; the line search's re-adaptations count as line search), the
    Fisher-vector products' graphs and the products, and the line search's evaluations."""
    from metalearn_cli.algorithms import base, trpo
    from metalearn_cli.tasks.episodes import EpisodeTasks

    class TimedFisher(trpo.AdaptationFisher):
        def __init__(self, *args, **kwargs) -> None:
            with clock.phase(FISHER_GRAPHS):
                super().__init__(*args, **kwargs)

        def __call__(self, v: Tensor) -> Tensor:
            with clock.phase(FISHER_PRODUCTS):
                return super().__call__(v)

    trpo_step = trpo.trpo_step

    def timed_trpo_step(theta, gradient, fisher_product, loss_and_kl, *args, **kwargs):
        return trpo_step(theta, gradient, fisher_product, clock.timed(LINE_SEARCH, loss_and_kl), *args, **kwargs)

    collect = EpisodeTasks._collect
    replaced = [
        (base.adapt, _replace_everywhere(base.adapt, clock.timed(INNER_STEP, base.adapt, unless_inside=LINE_SEARCH))),
        (trpo.AdaptationFisher, _replace_everywhere(trpo.AdaptationFisher, TimedFisher)),
        (trpo_step, _replace_everywhere(trpo_step, timed_trpo_step)),
    ]
    EpisodeTasks._collect = clock.timed(COLLECTION, collect)
    try:
        yield
    finally:
        EpisodeTasks._collect = collect
        for original, places in replaced:
            for module, name in places:
                setattr(module, name, original)


def apply_step(step, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The outer update, as the Lightning module makes it: the meta-objective's gradient, or the step's
    direction (TRPO, Reptile) as the gradient."""
    optimizer.zero_grad(set_to_none=True)
    if step.loss is not None:
        step.loss.backward()
    else:
        for name, parameter in model.named_parameters():
            parameter.grad = step.direction[name].to(parameter.dtype)
    optimizer.step()


def meta_iterations(w: RLWorkload, cfg, iterations: int, device: torch.device, warmup: int = 1) -> dict:
    """`warmup` + `iterations` meta-iterations of `metalearn train` with `cfg` (its meta-batches 0, 1, ...,
    the outer step applied after each) without Lightning; seconds of each and the phases of the median."""
    from metalearn_cli.build import build_tasks
    from metalearn_cli.functional import FunctionalModel

    torch.manual_seed(int(cfg.seed))
    parts = build_tasks(cfg)
    sampler, algorithm, model = parts.sampler, parts.algorithm, parts.model.to(device)
    fmodel = FunctionalModel(model)
    optimizer = algorithm.configure_optimizers(model.parameters(), int(cfg.trainer.max_steps))["optimizer"]
    clock = PhaseClock()
    totals, splits, counts, metrics = [], [], [], []
    env = parts.source.make_env()  # HalfCheetah's: one for every batch, its worker processes kept
    try:
        with phases_timed(clock):
            for i in range(warmup + iterations):
                clock.reset()
                start = time.perf_counter()
                batch = sampler.train_batch(int(cfg.seed), i)
                if device.type != "cpu":
                    batch = batch.to(device)
                step = algorithm.meta_step(fmodel, batch, iteration=i)
                apply_step(step, model, optimizer)
                total = time.perf_counter() - start
                if i < warmup:
                    continue
                split = {name: clock.seconds.get(name, 0.0) for name in PHASES[:-1]}
                split[REST] = total - sum(split.values())
                totals.append(total)
                splits.append(split)
                counts.append({"fisher_products": clock.calls.get(FISHER_PRODUCTS, 0), "line_search_tries": clock.calls.get(LINE_SEARCH, 0)})
                metrics.append({k: float(v) for k, v in step.metrics.items()})
        workers = getattr(env, "num_workers", None)
    finally:
        getattr(env, "close", lambda: None)()
    median = sorted(range(len(totals)), key=totals.__getitem__)[(len(totals) - 1) // 2]
    return {
        "workload": w.name, "data": w.data,
        "algorithm": f"{algorithm.name}, outer_optimizer={algorithm.outer_optimizer}",
        "tasks": int(cfg.sampler.meta_batch_size), "episodes": int(cfg.sampler.shots), "queries": int(cfg.sampler.queries),
        "horizon": int(cfg.data.horizon), "workers": cfg.data.get("workers"), "workers_started": workers,
        "iterations": iterations, "warmup": warmup,
        "seconds": totals, "median_s": totals[median], "phases_s": splits[median], **counts[median],
        "metrics": metrics[median],
    }


# -- `metalearn bench nav2d halfcheetah` ----------------------------------------------------------
def _simulator_missing(w: RLWorkload) -> str | None:
    if w.name != "halfcheetah":
        return None
    from metalearn_cli.data.halfcheetah import require_simulator

    try:
        require_simulator(w.data)
    except MetalearnError as error:
        return str(error)
    return None


def run(names: Sequence[str], args: argparse.Namespace) -> dict:
    """Measure the RL workloads `names`, print their tables; what `--json` records under `rl`."""
    device = torch.device(args.device)
    report: dict = {"steps": [], "meta_iterations": [], "skipped": []}
    for name in names:
        w = RL_WORKLOADS[name]
        missing = _simulator_missing(w)
        if missing:
            print(f"{name}: skipped: {missing}")
            report["skipped"].append({"workload": name, "reason": missing})
            continue
        cfg = shipped_config(w, args.tasks, args.episodes, args.horizon)
        print(f"{name} (data={w.data}): {w.description}; {cfg.sampler.meta_batch_size} tasks x {cfg.sampler.shots} episodes, "
              f"horizon {cfg.data.horizon}")
        print(f"  environment steps per second, median of {args.rl_repeats} rounds (reference: one episode at a time):")
        print(f"  {'actions':<26} {'ours':<30} {'reference':>11} {'ours':>11} {'speedup':>8}")
        for row in environment_steps(w, cfg, args.rl_repeats, device):
            report["steps"].append(row)
            print(f"  {row['actions']:<26} {row['ours']:<30} {row['reference_steps_per_s']:>11,.0f} {row['ours_steps_per_s']:>11,.0f} "
                  f"{row['speedup']:>7.2f}x")
        r = meta_iterations(w, cfg, args.rl_repeats, device)
        report["meta_iterations"].append(r)
        p = r["phases_s"]
        workers = f", {r['workers_started']} worker processes" if r["workers_started"] else ""
        print(f"  one meta-iteration ({r['algorithm']}{workers}), seconds, median of {r['iterations']} after {r['warmup']} warm-up:")
        print(f"  {'total':>7} {'collection':>10} {'inner step':>10} {'Fisher graphs':>13} {'Fisher-vector products':>22} "
              f"{'line search':>15} {'meta-gradient, rest':>19}")
        print(f"  {r['median_s']:>7.2f} {p[COLLECTION]:>10.3f} {p[INNER_STEP]:>10.3f} {p[FISHER_GRAPHS]:>13.3f} "
              f"{p[FISHER_PRODUCTS]:>17.3f} ({r['fisher_products']:>2}) {p[LINE_SEARCH]:>10.3f} ({r['line_search_tries']:>2}) {p[REST]:>19.3f}")
    return report
