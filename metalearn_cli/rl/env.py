"""The interface of an environment family: T tasks x B parallel episodes stepped as one batch."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch
from torch import Tensor


class TaskEnv(ABC):
    """T tasks (one goal each) x B parallel episodes of one task family, stepped as one batch of torch
    tensors (the goals' device and dtype).

    Actions are in the policy's units (the Gaussian policy's samples, unclipped): how they become the
    environment's controls (scaling, clipping) is the environment's business. An episode that is done
    stays done: `step` keeps returning done=True for it, and the collector (`rl.rollouts.collect`)
    masks its later steps. All randomness (initial-state noise, if any) comes from the generators
    passed to `reset`, one per task, so episodes are a pure function of seeds and task i's episodes do
    not depend on which other tasks are stepped with it.
    """

    #: size of an observation and of an action
    obs_dim: int
    act_dim: int
    #: the most steps an episode takes
    horizon: int

    @abstractmethod
    def reset(self, goals: Tensor, per_task: int, generators: Sequence[torch.Generator]) -> Tensor:
        """Start `per_task` episodes of each task: goals [T, goal_dim] -> first observations [T, B, obs_dim].
        `generators[i]` (CPU generators, one per task) is task i's only source of randomness."""

    @abstractmethod
    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """actions [T, B, act_dim] -> (observations [T, B, obs_dim], rewards [T, B], done [T, B] bool)."""
