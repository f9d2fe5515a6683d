"""What every reinforcement-learning task family shares as a `TaskSource`: the episodes' settings
(horizon, discount, GAE's lambda, baseline, normalisation), the objective (average return, larger is
better), the policy it needs, and what test.json and eval.json record about the episodes scored.

A family subclasses `EnvSource` and says what a task is: `goals(generator, T)` draws T goals and
`make_env()` builds the environment that steps them. The train, validation and test parts draw their
goals from the same distribution; they differ only in the seeds (as in the MAML paper).
"""

from __future__ import annotations

from abc import abstractmethod

import torch
from torch import Tensor, nn

from metalearn_cli import options
from metalearn_cli.data.base import TaskSource
from metalearn_cli.errors import MetalearnError
from metalearn_cli.rl.env import TaskEnv
from metalearn_cli.tasks.episodes import BASELINES, EpisodeSettings, EpisodeTasks
from metalearn_cli.tasks.objectives import REINFORCEMENT


class EnvSource(TaskSource):
    """A distribution of goals of one environment family, answered with episodes (`EpisodeTasks`).

    horizon: the most steps an episode takes. gamma: the discount of returns and advantages.
    gae_lambda: GAE's lambda (1: advantages are discounted returns less the baseline).
    baseline: linear (rllab's linear feature baseline, fitted per task) or zero.
    normalize_advantages: centre and scale each task's advantages (rllab's center_adv).
    """

    objective = REINFORCEMENT

    def __init__(self, horizon: int, gamma: float = 0.99, gae_lambda: float = 1.0, baseline: str = "linear",
                 normalize_advantages: bool = True) -> None:
        self.horizon = options.integer("horizon", horizon, "the most steps an episode takes")
        for key, value, meaning in (("gamma", gamma, "the discount of rewards"), ("gae_lambda", gae_lambda, "GAE's lambda")):
            if options.number(key, value, meaning, strict=False) > 1:
                raise options.invalid(key, value, f"a number in [0, 1] ({meaning})")
        options.choice("baseline", baseline, BASELINES)
        if not isinstance(normalize_advantages, bool):
            raise options.invalid("normalize_advantages", normalize_advantages, "true or false")
        self.settings = EpisodeSettings(float(gamma), float(gae_lambda), baseline, normalize_advantages)
        env = self.make_env()
        self.input_shape = (env.obs_dim,)
        self.act_dim = env.act_dim

    @abstractmethod
    def make_env(self) -> TaskEnv:
        """The environment that steps this family's tasks (horizon `self.horizon`)."""

    @abstractmethod
    def goals(self, generator: torch.Generator, num_tasks: int) -> Tensor:
        """[T, goal_dim]: T goals drawn with `generator` only."""

    def output_dim(self, ways: int | None) -> int:
        """The policy's output: the action mean."""
        return self.act_dim

    def sample(self, split, generator, num_tasks, ways, shots, queries) -> EpisodeTasks:
        """`num_tasks` goals; `shots` episodes per task for each adaptation step, `queries` of the adapted
        policy in meta-training. Every split draws from the same distribution."""
        return EpisodeTasks(self.make_env(), self.goals(generator, num_tasks), shots, queries, self.settings)

    def check_model(self, model: nn.Module) -> None:
        """The tasks sample actions from a Gaussian whose mean is the model's output and whose log standard
        deviation is its `log_std` parameter."""
        log_std = getattr(model, "log_std", None)
        if not isinstance(log_std, nn.Parameter) or tuple(log_std.shape) != (self.act_dim,):
            raise MetalearnError(
                f"`data={self.name}` needs a Gaussian policy: a model whose output is the action mean and which has a "
                f"learned `log_std` of {self.act_dim} entries, and {type(model).__name__} has none. Use model=gaussian_mlp."
            )

    def scoring_record(self, shots: int, queries: int | None) -> dict:
        return {
            "trajectories_per_step": shots,
            "query_trajectories": queries,
            "horizon": self.horizon,
            "gamma": self.settings.gamma,
            "gae_lambda": self.settings.gae_lambda,
            "baseline": self.settings.baseline,
        }
