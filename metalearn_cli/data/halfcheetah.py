"""HalfCheetah locomotion, the MAML paper's section 5.3 tasks (reference code cbfinn/maml_rl,
`half_cheetah_env_rand.py` and `half_cheetah_env_rand_direc.py`), on Gymnasium's HalfCheetah-v5:

* `HalfCheetahVel` (`data=halfcheetah_vel`): run at a goal velocity, uniform in [0, 2];
  reward -|v_x - goal| - 0.05 ||a||^2.
* `HalfCheetahDir` (`data=halfcheetah_dir`): run forward or backward, +1 or -1 with probability 1/2;
  reward direction * v_x - 0.05 ||a||^2.

Episodes last `horizon` steps (200). The dynamics, the reward and how the simulations are stepped are
in `metalearn_cli.rl.halfcheetah`. Gymnasium's HalfCheetah advances 0.05 s per action where the paper's
rllab model advanced 0.01 s, so returns are not comparable with the paper's numbers.

Gymnasium and MuJoCo are an optional extra (`pip install 'metalearn[rl]'`): this module imports them
only when a source is built, and a missing one is reported with the command that installs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Sequence

import torch
from torch import Tensor

from metalearn_cli import options
from metalearn_cli.errors import MetalearnError
from metalearn_cli.rl.source import EnvSource

if TYPE_CHECKING:
    from metalearn_cli.rl.halfcheetah import HalfCheetahTaskEnv

#: the Gymnasium release that brought HalfCheetah-v5 and the vector API used here
MIN_GYMNASIUM = (1, 0)
INSTALL = "pip install 'metalearn[rl]'"


def require_simulator(data: str) -> None:
    """Gymnasium (>= 1.0) and MuJoCo, or a MetalearnError naming the extra that installs them."""
    try:
        gymnasium = importlib.import_module("gymnasium")
        importlib.import_module("mujoco")
    except ImportError as error:
        raise MetalearnError(
            f"`data={data}` runs on Gymnasium's HalfCheetah-v5 with the MuJoCo simulator, which cannot be imported "
            f"here ({error}). Install them with the `rl` extra: {INSTALL} (from a source checkout: pip install -e '.[rl]')."
        ) from None
    version = tuple(int(part) for part in gymnasium.__version__.split(".")[:2] if part.isdigit())
    if version < MIN_GYMNASIUM:
        raise MetalearnError(
            f"`data={data}` needs Gymnasium >= {'.'.join(map(str, MIN_GYMNASIUM))}, and {gymnasium.__version__} is "
            f"installed. Upgrade it with the `rl` extra: {INSTALL}."
        )


class HalfCheetahSource(EnvSource):
    """The settings both families share.

    horizon: the steps of every episode. workers: how the T x B simulations are stepped: `auto`
    (worker processes where there are cores to spare, see `rl.halfcheetah.resolve_workers`), 0 (in
    this process, Gymnasium's SyncVectorEnv) or n worker processes (AsyncVectorEnv, each stepping a
    group of simulations). Further keys (gamma, gae_lambda, baseline, normalize_advantages): `EnvSource`.
    """

    family: str

    def __init__(self, horizon: int = 200, workers: int | str = "auto", **settings) -> None:
        require_simulator(self.name)
        if workers != "auto" and (not isinstance(workers, int) or isinstance(workers, bool) or workers < 0):
            raise options.invalid("workers", workers, "auto, or an integer >= 0 (worker processes stepping the simulations; 0: this process)")
        self.workers = workers
        self._env: HalfCheetahTaskEnv | None = None
        super().__init__(horizon, **settings)

    def make_env(self) -> "HalfCheetahTaskEnv":
        """One environment for every batch this source draws: its simulations (and worker processes)
        are built once and reused, batch after batch (collections run one after another)."""
        if self._env is None:
            from metalearn_cli.rl.halfcheetah import HalfCheetahTaskEnv

            self._env = HalfCheetahTaskEnv(self.family, self.horizon, self.workers)
        return self._env

    def scoring_record(self, shots: int, queries: int | None) -> dict:
        return {**super().scoring_record(shots, queries), "environment": "Gymnasium HalfCheetah-v5 (0.05 s per step)"}


class HalfCheetahVel(HalfCheetahSource):
    """goal_velocity: each task's goal velocity is uniform in this range (the paper's [0, 2])."""

    name = "halfcheetah_vel"
    family = "vel"

    def __init__(self, goal_velocity: Sequence[float] = (0.0, 2.0), **settings) -> None:
        bounds = list(goal_velocity) if isinstance(goal_velocity, (list, tuple)) else None
        if bounds is None or len(bounds) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in bounds) \
                or bounds[0] > bounds[1]:
            raise options.invalid("goal_velocity", goal_velocity, "[low, high] with low <= high (each task's goal velocity is uniform in it)")
        self.goal_velocity = (float(bounds[0]), float(bounds[1]))
        super().__init__(**settings)

    def goals(self, generator: torch.Generator, num_tasks: int) -> Tensor:
        low, high = self.goal_velocity
        return torch.rand(num_tasks, 1, generator=generator) * (high - low) + low

    def scoring_record(self, shots: int, queries: int | None) -> dict:
        return {**super().scoring_record(shots, queries), "goal_velocity": list(self.goal_velocity)}

    def describe(self) -> str:
        low, high = self.goal_velocity
        return f"halfcheetah_vel (goal velocity in [{low:g}, {high:g}], horizon {self.horizon})"


class HalfCheetahDir(HalfCheetahSource):
    """Each task's direction is +1 (forward) or -1 (backward), with probability 1/2 each."""

    name = "halfcheetah_dir"
    family = "dir"

    def goals(self, generator: torch.Generator, num_tasks: int) -> Tensor:
        forward = torch.rand(num_tasks, 1, generator=generator) < 0.5
        return torch.where(forward, 1.0, -1.0)

    def describe(self) -> str:
        return f"halfcheetah_dir (direction +1 or -1, horizon {self.horizon})"
