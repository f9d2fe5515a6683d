"""HalfCheetah with a goal per task, the MAML paper's locomotion families, on Gymnasium's HalfCheetah-v5.

Each task gives the cheetah a goal: a forward velocity to run at (`vel`, reward -|v_x - goal|) or a
direction, +1 or -1 (`dir`, reward goal * v_x); both subtract 0.05 ||a||^2, as the reference code
(cbfinn/maml_rl, half_cheetah_env_rand*.py) does. v_x is Gymnasium's `info["x_velocity"]`, and the
reward is computed here from it and the actions: Gymnasium's own reward (forward velocity minus
0.1 ||a||^2) is not used.

Actions: the policy's output, clipped to the action space [-1, 1] (rllab's `normalize()` maps [-1, 1]
to HalfCheetah's own bounds, which are [-1, 1]: the clip is all it did). The control cost is of the
clipped action, the one the simulator receives.

Gymnasium's HalfCheetah advances 0.05 s per action (5 MuJoCo steps of 0.01 s) where the paper's rllab
model advanced 0.01 s, and its observation (17 numbers: joint positions but the x position, and
velocities) is not rllab's: returns are not comparable with the paper's numbers.

All T x B simulations run as one Gymnasium vector environment. The simulations are split into groups;
a group is one Gymnasium environment that steps its simulations in a loop, so that a worker process
answers one message per step for a whole group, not one per simulation. With no workers, one group
runs in this process (`SyncVectorEnv`); with n workers, n groups run in n processes
(`AsyncVectorEnv`). `resolve_workers` holds the `auto` rule.
"""

from __future__ import annotations

import atexit
import math
import os
import signal
import sys
import weakref
from contextlib import contextmanager
from typing import Iterator, Sequence

import gymnasium
import mujoco
import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor

from metalearn_cli.rl.env import TaskEnv

ENV_ID = "HalfCheetah-v5"
OBS_DIM = 17
ACT_DIM = 6
#: 0.05 ||a||^2: the reference's 1e-1 * 0.5 * sum(a^2)
CTRL_COST = 0.05
FAMILIES = ("vel", "dir")
#: under `workers=auto`, each worker process steps at least this many simulations
MIN_GROUP = 16
#: MuJoCo 3.3+ deprecates an attribute of Gymnasium's half_cheetah.xml (the model it builds is the same)
_KNOWN_WARNING = "compiler attribute 'settotalmass' is deprecated"


@contextmanager
def _quiet_deprecation() -> Iterator[None]:
    """Silence MuJoCo's deprecation notice about Gymnasium's model file while it is compiled (one line
    on stderr per simulation otherwise); any other MuJoCo warning still reaches stderr."""
    previous = mujoco.get_mju_user_warning()

    def handler(message: str) -> None:
        if _KNOWN_WARNING not in message:
            print(f"WARNING: {message}", file=sys.stderr)

    mujoco.set_mju_user_warning(handler)
    try:
        yield
    finally:
        mujoco.set_mju_user_warning(previous)


def make_simulation(horizon: int) -> gymnasium.Env:
    """One HalfCheetah-v5 as `gymnasium.make` builds it; its time limit is the task's horizon."""
    with _quiet_deprecation():
        return gymnasium.make(ENV_ID, max_episode_steps=horizon)


def episode_seeds(generator: torch.Generator, count: int) -> list[int]:
    """The reset seeds of `count` simulations, drawn from `generator`: an episode's only randomness is
    its initial state's noise; the rest is a function of its actions."""
    return torch.randint(0, 2**31 - 1, (count,), generator=generator).tolist()


def group_bounds(count: int, groups: int) -> list[int]:
    """Where each group's simulations start (and the last ends): contiguous, as equal as can be."""
    size = math.ceil(count / groups)
    return [min(i * size, count) for i in range(groups + 1)]


class SimulationGroup(gymnasium.Env):
    """Up to `capacity` HalfCheetah-v5 simulations as one Gymnasium environment (one per worker).

    Observation: [capacity, OBS_DIM + 1], each active simulation's observation followed by its x
    velocity over the last step (the vector environment's shared memory carries both); the rows of
    inactive simulations are zero. Action: [capacity, ACT_DIM]. `reset(options={"seeds": [...],
    "bounds": [...]})` activates this group's share of the batch, seeds[bounds[i]:bounds[i + 1]].
    """

    metadata: dict = {"render_modes": []}

    def __init__(self, index: int, capacity: int, horizon: int, in_worker: bool = False) -> None:
        self.in_worker = in_worker
        self.index = index
        self.capacity = capacity
        self.horizon = horizon
        self.observation_space = spaces.Box(-np.inf, np.inf, (capacity, OBS_DIM + 1), np.float64)
        self.action_space = spaces.Box(-1.0, 1.0, (capacity, ACT_DIM), np.float32)
        self.simulations: list[gymnasium.Env] = []
        self.active = 0
        self._obs = np.zeros((capacity, OBS_DIM + 1))

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        if self.in_worker and not self.simulations:
            # Ctrl-C and SIGTERM reach every process of a job: the training process decides when to stop
            # (after its meta-iteration) and ends its workers by closing their pipes. Not in __init__:
            # AsyncVectorEnv also builds a group in the training process, to read its spaces.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bounds = options["bounds"]
        seeds = options["seeds"][bounds[self.index]: bounds[self.index + 1]]
        while len(self.simulations) < len(seeds):
            self.simulations.append(make_simulation(self.horizon))
        self.active = len(seeds)
        self._obs[:] = 0.0
        for i, simulation_seed in enumerate(seeds):
            self._obs[i, :OBS_DIM], _ = self.simulations[i].reset(seed=int(simulation_seed))
        return self._obs.copy(), {}

    def step(self, action):
        for i in range(self.active):
            observation, _, _, _, info = self.simulations[i].step(action[i])
            self._obs[i, :OBS_DIM] = observation
            self._obs[i, OBS_DIM] = info["x_velocity"]
        return self._obs.copy(), 0.0, False, False, {}

    def close(self) -> None:
        for simulation in self.simulations:
            simulation.close()
        self.simulations = []


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def local_processes() -> int:
    """Training processes sharing this machine's cores (the DDP ranks of this node)."""
    if os.environ.get("LOCAL_WORLD_SIZE"):
        return max(1, int(os.environ["LOCAL_WORLD_SIZE"]))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def resolve_workers(workers: int | str, simulations: int) -> int:
    """Worker processes to step a batch of `simulations` (0: this process steps them).

    `auto`: one worker per usable core (the cores shared among this machine's training processes),
    each stepping at least MIN_GROUP simulations; none where that leaves fewer than 2 workers (one
    core, or a small batch: starting processes is not worth it there). Grouping is what makes
    workers pay: a worker answers one message per step for its whole group, where Gymnasium's usual
    AsyncVectorEnv (one process per simulation) costs the main process a message per simulation,
    more than stepping the simulation itself.
    """
    if workers != "auto":
        return min(int(workers), simulations)
    cores = usable_cores() // local_processes()
    count = min(cores, simulations // MIN_GROUP)
    return count if count >= 2 else 0


#: environments with worker processes, closed at exit before multiprocessing ends its daemons (with
#: SIGTERM, which the workers ignore)
_OPEN: "weakref.WeakSet[HalfCheetahTaskEnv]" = weakref.WeakSet()


@atexit.register
def _close_open_environments() -> None:
    for env in list(_OPEN):
        env.close()


class HalfCheetahTaskEnv(TaskEnv):
    """T tasks x B episodes of HalfCheetah-v5, each task with its goal ([T, 1]: a velocity or a direction).

    family: `vel` or `dir`. horizon: the steps of every episode (HalfCheetah never ends one sooner).
    workers: `auto`, 0 (`SyncVectorEnv` in this process) or n worker processes (`AsyncVectorEnv`).
    The vector environment, with its workers and simulations, is kept for later batches that fit in it.
    """

    obs_dim = OBS_DIM
    act_dim = ACT_DIM

    def __init__(self, family: str, horizon: int = 200, workers: int | str = "auto") -> None:
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")
        self.family = family
        self.horizon = horizon
        self.workers = workers
        self._vector: gymnasium.vector.VectorEnv | None = None
        self._layout: tuple[int, int] = (0, 0)  # (workers, capacity of a group) of self._vector
        self._bounds: list[int] = []
        self._goals: Tensor | None = None  # [T, 1], float64 on the CPU
        self._shape: tuple[int, int] = (0, 0)
        self._t = 0
        self._last_obs: Tensor | None = None  # [T, B, OBS_DIM], float64 on the CPU
        self._dtype, self._device = torch.get_default_dtype(), torch.device("cpu")

    @property
    def num_workers(self) -> int:
        """Worker processes of the current vector environment (0: stepped in this process)."""
        return self._layout[0]

    def _vector_env(self, simulations: int) -> gymnasium.vector.VectorEnv:
        """The vector environment for a batch of `simulations`: the current one where they fit in it
        (a smaller batch, evaluation's between training's, leaves groups part empty), else a new one."""
        if self._vector is not None and simulations <= self._vector.num_envs * self._layout[1]:
            return self._vector
        self.close()
        workers = resolve_workers(self.workers, simulations)
        groups = max(workers, 1)
        capacity = math.ceil(simulations / groups)
        horizon, in_worker = self.horizon, workers > 0
        makers = [lambda i=i: SimulationGroup(i, capacity, horizon, in_worker) for i in range(groups)]
        if workers == 0:
            self._vector = gymnasium.vector.SyncVectorEnv(makers, copy=False)
        else:
            self._vector = gymnasium.vector.AsyncVectorEnv(makers, shared_memory=True, copy=True, daemon=True)
            _OPEN.add(self)
        self._layout = (workers, capacity)
        return self._vector

    def _batch(self, grouped: np.ndarray) -> np.ndarray:
        """[groups, capacity, k] -> [T * B, k], in the order of the batch."""
        bounds = self._bounds
        return np.concatenate([grouped[g, : bounds[g + 1] - bounds[g]] for g in range(len(bounds) - 1)], axis=0)

    def reset(self, goals: Tensor, per_task: int, generators: Sequence[torch.Generator]) -> Tensor:
        num_tasks = goals.shape[0]
        simulations = num_tasks * per_task
        vector = self._vector_env(simulations)
        self._bounds = group_bounds(simulations, vector.num_envs)
        # task i's episodes start from seeds of its own generator, whatever it is batched with
        seeds = [seed for generator in generators for seed in episode_seeds(generator, per_task)]
        grouped, _ = vector.reset(options={"seeds": seeds, "bounds": self._bounds})
        self._dtype, self._device = goals.dtype, goals.device
        self._goals = goals.detach().to("cpu", torch.float64).reshape(num_tasks, 1)
        self._shape = (num_tasks, per_task)
        self._t = 0
        self._last_obs = torch.as_tensor(self._batch(grouped)[:, :OBS_DIM]).reshape(num_tasks, per_task, OBS_DIM)
        return self._last_obs.to(self._device, self._dtype)

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        if self._goals is None:
            raise RuntimeError("step() before reset()")
        num_tasks, per_task = self._shape
        if tuple(actions.shape) != (num_tasks, per_task, ACT_DIM):
            raise ValueError(f"actions of shape {tuple(actions.shape)}, expected {(num_tasks, per_task, ACT_DIM)}")
        if self._t >= self.horizon:  # every episode ended at the horizon: nothing moves any more
            reward = torch.zeros(num_tasks, per_task, dtype=self._dtype, device=self._device)
            done = torch.ones(num_tasks, per_task, dtype=torch.bool, device=self._device)
            return self._last_obs.to(self._device, self._dtype), reward, done
        # the simulator receives float32 actions (its action space's type); the cost is of those
        clipped = actions.detach().to("cpu", torch.float32).clamp(-1.0, 1.0).reshape(-1, ACT_DIM)
        grouped_actions = np.zeros((self._vector.num_envs, self._layout[1], ACT_DIM), np.float32)
        for g in range(self._vector.num_envs):
            start, stop = self._bounds[g], self._bounds[g + 1]
            grouped_actions[g, : stop - start] = clipped[start:stop].numpy()
        grouped, _, _, _, _ = self._vector.step(grouped_actions)
        batch = torch.as_tensor(self._batch(grouped)).reshape(num_tasks, per_task, OBS_DIM + 1)
        velocity = batch[..., OBS_DIM]
        ctrl = CTRL_COST * clipped.to(torch.float64).reshape(num_tasks, per_task, ACT_DIM).square().sum(-1)
        if self.family == "vel":
            forward = -(velocity - self._goals).abs()
        else:
            forward = self._goals * velocity
        self._t += 1
        self._last_obs = batch[..., :OBS_DIM]
        done = torch.full((num_tasks, per_task), self._t >= self.horizon, device=self._device)
        return self._last_obs.to(self._device, self._dtype), (forward - ctrl).to(self._device, self._dtype), done

    def close(self) -> None:
        """End the worker processes and the simulations (a later reset starts new ones)."""
        if self._vector is not None:
            self._vector.close()
            self._vector = None
            self._layout = (0, 0)
        _OPEN.discard(self)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the workers are daemons and end with it
            pass

    def __getstate__(self) -> dict:
        """A copy (pickled, deep-copied) starts without simulations or workers, which cannot be copied."""
        state = dict(self.__dict__)
        state["_vector"], state["_layout"] = None, (0, 0)
        return state
