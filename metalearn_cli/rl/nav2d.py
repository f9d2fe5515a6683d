"""2D navigation: the point robot of the MAML paper (section 5.3), as its reference code defines it
(cbfinn/maml_rl, `point_env_randgoal.py`, wrapped in rllab's `normalize`).

The robot starts at (0, 0) and moves by a displacement each step; the reward is minus the Euclidean
distance to the goal after the move; an episode ends when both coordinates are within 0.01 of the goal,
or after `horizon` steps. (The paper's text says the squared distance; the code, followed here, uses
the distance.) The policy acts in [-1, 1] units and the displacement is clip(action_scale * a, -0.1,
0.1): with action_scale 0.1 this is what rllab's `normalize()` did to the point environment's [-0.1,
0.1] action box (lb + (a + 1) (ub - lb) / 2 = 0.1 a, clipped to the box); with 1.0 the policy's
output is the displacement, clipped to the same box, as later ports apply it.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from metalearn_cli.rl.env import TaskEnv

#: the largest displacement per step and coordinate (the reference's action box)
MAX_DISPLACEMENT = 0.1
#: the goal is reached when both coordinates are closer than this
GOAL_TOLERANCE = 0.01


class Nav2dEnv(TaskEnv):
    obs_dim = 2
    act_dim = 2

    def __init__(self, horizon: int = 100, action_scale: float = 0.1) -> None:
        self.horizon = int(horizon)
        self.action_scale = float(action_scale)
        self.position: Tensor | None = None
        self.goals: Tensor | None = None
        self.done: Tensor | None = None

    def reset(self, goals: Tensor, per_task: int, generators: Sequence[torch.Generator]) -> Tensor:
        tasks = goals.shape[0]
        self.goals = goals.unsqueeze(1)  # [T, 1, 2]
        self.position = goals.new_zeros(tasks, per_task, 2)
        self.done = torch.zeros(tasks, per_task, dtype=torch.bool, device=goals.device)
        return self.position.clone()

    def displacement(self, actions: Tensor) -> Tensor:
        """The move of policy actions [..., 2]."""
        return (self.action_scale * actions).clamp(-MAX_DISPLACEMENT, MAX_DISPLACEMENT)

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        self.position = self.position + self.displacement(actions.to(self.position.dtype))
        offset = self.position - self.goals
        reward = -offset.norm(dim=-1)
        self.done = self.done | (offset.abs() < GOAL_TOLERANCE).all(dim=-1)
        return self.position.clone(), reward, self.done.clone()
