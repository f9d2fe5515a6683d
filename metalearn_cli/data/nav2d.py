"""2D navigation, the MAML paper's first reinforcement-learning benchmark (section 5.3): a point robot
in the plane must reach a goal drawn uniformly from [-0.5, 0.5]^2, starting at (0, 0), within 100
steps; the reward is minus the distance to the goal (the reference code's; the paper's text says the
squared distance). See `metalearn_cli.rl.nav2d` for the dynamics and the two action scalings.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from metalearn_cli import options
from metalearn_cli.rl.nav2d import Nav2dEnv
from metalearn_cli.rl.source import EnvSource


class Nav2d(EnvSource):
    """goal_range: each coordinate of a goal is uniform in it. action_scale: the displacement per step is
    clip(action_scale * a, -0.1, 0.1) for the policy's action a: 0.1 as rllab's normalize() scaled the
    reference environment (the default), 1.0 for the raw actions of later ports."""

    name = "nav2d"

    def __init__(self, horizon: int = 100, action_scale: float = 0.1, goal_range: Sequence[float] = (-0.5, 0.5),
                 **settings) -> None:
        self.action_scale = options.number("action_scale", action_scale, "the displacement per unit of action")
        if len(goal_range) != 2 or not all(isinstance(v, (int, float)) for v in goal_range) or goal_range[0] >= goal_range[1]:
            raise options.invalid("goal_range", list(goal_range), "[low, high] with low < high (each goal coordinate is uniform in it)")
        self.goal_range = (float(goal_range[0]), float(goal_range[1]))
        super().__init__(horizon, **settings)

    def make_env(self) -> Nav2dEnv:
        return Nav2dEnv(self.horizon, self.action_scale)

    def goals(self, generator: torch.Generator, num_tasks: int) -> Tensor:
        low, high = self.goal_range
        return torch.rand(num_tasks, 2, generator=generator) * (high - low) + low

    def scoring_record(self, shots: int, queries: int | None) -> dict:
        return {**super().scoring_record(shots, queries), "action_scale": self.action_scale}

    def describe(self) -> str:
        return f"nav2d (goals in {list(self.goal_range)}^2, action scale {self.action_scale:g}, horizon {self.horizon})"
