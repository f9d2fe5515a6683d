"""Collecting episodes: T tasks x B episodes of a Gaussian policy in a `TaskEnv`, stepped as one batch.

Episodes are padded to the horizon: `mask` is 1 on the steps an episode took (up to and including the
one that ended it) and 0 after, where observations, actions and rewards are 0. Task i's episodes are a
pure function of its two generators (the environment's and the policy noise's) and its policy, whatever
tasks it is collected with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from metalearn_cli.rl.env import TaskEnv
from metalearn_cli.rl.gaussian import bounded

#: obs [T, B, obs_dim] -> (action mean [T, B, act_dim], log standard deviation [T, act_dim])
Policy = Callable[[Tensor], tuple[Tensor, Tensor]]


@dataclass
class Episodes:
    """B episodes of each of T tasks, padded to the horizon H."""

    observations: Tensor  # [T, B, H, obs_dim]: the observation each action was taken in
    actions: Tensor  # [T, B, H, act_dim]: the policy's samples, in policy units
    rewards: Tensor  # [T, B, H]
    mask: Tensor  # [T, B, H], 1.0 on the steps taken

    @property
    def num_tasks(self) -> int:
        return self.observations.shape[0]

    def returns(self) -> Tensor:
        """[T, B]: each episode's undiscounted return."""
        return (self.rewards * self.mask).sum(-1)

    def steps(self) -> Tensor:
        """[T]: the steps taken by each task's episodes together."""
        return self.mask.sum((1, 2))


@torch.no_grad()
def collect(
    env: TaskEnv,
    policy: Policy,
    goals: Tensor,
    per_task: int,
    env_generators: Sequence[torch.Generator],
    noise_generators: Sequence[torch.Generator],
) -> Episodes:
    """Run `per_task` episodes of each task (goals [T, goal_dim]) to the end or the horizon, with
    actions a = mean(s) + std * noise; task i's noise is drawn, for the whole horizon at once, from
    `noise_generators[i]` and its initial states from `env_generators[i]`."""
    tasks, horizon = goals.shape[0], env.horizon
    dtype, device = goals.dtype, goals.device
    noise = torch.stack([
        torch.randn(horizon, per_task, env.act_dim, generator=g, dtype=dtype) for g in noise_generators
    ]).to(device)  # [T, H, B, act]
    observations = goals.new_zeros(tasks, per_task, horizon, env.obs_dim)
    actions = goals.new_zeros(tasks, per_task, horizon, env.act_dim)
    rewards = goals.new_zeros(tasks, per_task, horizon)
    mask = goals.new_zeros(tasks, per_task, horizon)
    obs = env.reset(goals, per_task, env_generators).to(dtype)
    alive = torch.ones(tasks, per_task, dtype=torch.bool, device=device)
    for t in range(horizon):
        mean, log_std = policy(obs)
        action = mean + bounded(log_std).exp().unsqueeze(1) * noise[:, t]
        live = alive.to(dtype)
        observations[:, :, t] = obs * live.unsqueeze(-1)
        actions[:, :, t] = action * live.unsqueeze(-1)
        mask[:, :, t] = live
        obs, reward, done = env.step(action)
        obs = obs.to(dtype)
        rewards[:, :, t] = reward.to(dtype) * live
        alive = alive & ~done
        if not alive.any():
            break
    return Episodes(observations, actions, rewards, mask)
