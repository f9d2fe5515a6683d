"""Reinforcement-learning tasks: the losses and returns of episodes a policy collects in an environment.

An algorithm asks these tasks what it asks any task (`tasks.base.Tasks`), and they answer with
episodes (`rl.rollouts.collect`) of the Gaussian policy whose per-task parameters it passes
(`model(params, s)` the action mean, `params["log_std"]` the log standard deviation):

* `support_loss(params, k)`: the episodes of adaptation step k are collected once, by the policy
  `params` (detached), and kept; the loss is the vanilla policy-gradient surrogate
  -mean_t log pi_params(a_t | s_t) A_t over the steps the task's episodes took, whose gradient is
  the policy gradient. Later calls with other parameters (a line search re-adapting) reuse them, as
  the MAML reference code does.
* `query_loss(params, k)`: the query episodes, collected once by the policy `params` with their
  log-likelihoods, and the importance-weighted surrogate -mean_t pi_params / pi_collecting * A_t; at
  the collecting parameters its gradient is the policy gradient of the adapted policy, and through
  `params` (adapted from theta) it gives MAML's meta-gradient.
* `query_metric(params, k)`: the average undiscounted return of the policy `params`, on the episodes
  of step k (collected by these very parameters, or collected anew), so evaluation's score after k
  steps is the return of the episodes adaptation step k+1 then learns from: nothing is sampled twice.

Advantages are generalised advantage estimates (gamma, gae_lambda) over a linear feature baseline
fitted to the task's own episodes, normalised per task (rllab's center_adv), or (baseline=zero) of
the discounted returns alone.

Episodes are a pure function of seeds: task i's are drawn with generators derived from its seed (the
batch's seed and the task's place in the batch the sampler drew, or the fixed task's own seed), the
part (support or query) and the step, so a resumed run, a run split over processes and any chunking
of the tasks collect the same episodes with the same policies. The episodes a batch collected are
shared with its slices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from metalearn_cli.rl import baseline as linear_feature_baseline
from metalearn_cli.rl import gaussian
from metalearn_cli.rl.advantages import discounted_cumsum, gae, normalized
from metalearn_cli.rl.env import TaskEnv
from metalearn_cli.rl.rollouts import Episodes, collect
from metalearn_cli.samplers import derive_seed
from metalearn_cli.tasks.base import Params, Tasks
from metalearn_cli.tasks.objectives import REINFORCEMENT, Objective

#: data.baseline: what advantages are measured against
BASELINES = ("linear", "zero")
#: derive_seed codes of the episodes' generators: the part, then the environment's or the policy noise's
_PART_CODES = {"support": 0, "query": 1}
_ENV, _NOISE = 0, 1


@dataclass(frozen=True)
class EpisodeSettings:
    """How losses come out of episodes: discount, GAE's lambda, the baseline, per-task normalisation."""

    gamma: float = 0.99
    gae_lambda: float = 1.0
    baseline: str = "linear"
    normalize_advantages: bool = True


@dataclass
class Collected:
    """A part's episodes for a range of tasks, with what the losses need ([T, B, H] each)."""

    episodes: Episodes
    advantages: Tensor
    log_probs: Tensor  # under the policy that collected them
    params: Tensor  # [T, P]: that policy's parameters, flat (to recognise it)

    def episodes_named(self, index: Tensor) -> "Collected":
        """Each task's episodes `index` ([T, b]) names, out of its B."""
        def pick(x: Tensor) -> Tensor:
            return x.gather(1, index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:]))

        ep = self.episodes
        episodes = Episodes(pick(ep.observations), pick(ep.actions), pick(ep.rewards), pick(ep.mask))
        return Collected(episodes, pick(self.advantages), pick(self.log_probs), self.params)

    def rows(self, start: int, stop: int) -> "Collected":
        ep = self.episodes
        episodes = Episodes(ep.observations[start:stop], ep.actions[start:stop], ep.rewards[start:stop], ep.mask[start:stop])
        return Collected(episodes, self.advantages[start:stop], self.log_probs[start:stop], self.params[start:stop])


class _Store:
    """The episodes collected for the tasks of a batch, by part and step, shared by its slices: blocks of
    consecutive tasks (the rows of the batch they were collected for)."""

    def __init__(self) -> None:
        self.blocks: dict[tuple[str, int], list[tuple[int, int, Collected]]] = {}

    def get(self, key: tuple[str, int], start: int, stop: int) -> Collected | None:
        for first, last, collected in self.blocks.get(key, []):
            if first <= start and stop <= last:
                return collected if (first, last) == (start, stop) else collected.rows(start - first, stop - first)
        return None

    def put(self, key: tuple[str, int], start: int, stop: int, collected: Collected) -> None:
        kept = [b for b in self.blocks.get(key, []) if b[1] <= start or stop <= b[0]]
        self.blocks[key] = [*kept, (start, stop, collected)]


@dataclass
class EpisodeTasks(Tasks):
    """T tasks of one environment family, each a goal, answered with episodes.

    env: the family's environment (`rl.env.TaskEnv`); goals: [T, goal_dim].
    trajectories: episodes per task for each adaptation step (`sampler.shots`); query_trajectories:
        episodes per task of the adapted policy in meta-training (`sampler.queries`).
    task_index: [T], each task's place in the batch the sampler drew (slices keep it), which with
        `seed` seeds its episodes; fixed validation and test tasks are seeded by `task_seeds` instead.
    """

    env: TaskEnv
    goals: Tensor
    trajectories: int
    query_trajectories: int
    settings: EpisodeSettings = field(default_factory=EpisodeSettings)
    seed: int = 0
    task_seeds: Tensor | None = None
    task_index: Tensor | None = None
    objective: Objective = REINFORCEMENT
    _store: _Store | None = field(default=None, repr=False)
    _offset: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.task_index is None:
            self.task_index = torch.arange(self.goals.shape[0])
        if self._store is None:
            self._store = _Store()

    # -- the batch ----------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int:
        return self.goals.shape[0]

    @property
    def device(self) -> torch.device:
        return self.goals.device

    @property
    def support_size(self) -> int:
        return self.trajectories

    @property
    def query_size(self) -> int:
        return self.query_trajectories

    def _with(self, goals: Tensor, task_seeds: Tensor | None, task_index: Tensor, store: _Store | None = None,
              offset: int = 0) -> "EpisodeTasks":
        return EpisodeTasks(self.env, goals, self.trajectories, self.query_trajectories, self.settings, self.seed,
                            task_seeds, task_index, self.objective, store, offset)

    def to(self, device: torch.device | str) -> "EpisodeTasks":
        """The same tasks on `device`, without the episodes collected so far."""
        return self._with(self.goals.to(device), self.task_seeds, self.task_index)

    def slice(self, start: int, stop: int) -> "EpisodeTasks":
        task_seeds = None if self.task_seeds is None else self.task_seeds[start:stop]
        return self._with(self.goals[start:stop], task_seeds, self.task_index[start:stop], self._store, self._offset + start)

    @classmethod
    def cat(cls, parts: list["EpisodeTasks"]) -> "EpisodeTasks":
        goals = torch.cat([p.goals for p in parts])
        task_index = torch.cat([p.task_index for p in parts])
        task_seeds = None if any(p.task_seeds is None for p in parts) else torch.cat([p.task_seeds for p in parts])
        return parts[0]._with(goals, task_seeds, task_index)

    # -- what algorithms ask ------------------------------------------------------------------
    def support_loss(self, model, params: Params, step: int, batch: Tensor | None = None) -> Tensor:
        """The surrogate of step `step`'s episodes, or (`batch`, [T, b] indices) of those it names."""
        collected = self._episodes(model, params, "support", step)
        if batch is not None:
            collected = collected.episodes_named(batch.to(self.device))
        return -self._masked_mean(self._log_probs(model, params, collected.episodes, step) * collected.advantages, collected)

    def query_loss(self, model, params: Params, step: int) -> Tensor:
        collected = self._episodes(model, params, "query", step)
        ratio = (self._log_probs(model, params, collected.episodes, step) - collected.log_probs).exp()
        return -self._masked_mean(ratio * collected.advantages, collected)

    def query_metric(self, model, params: Params, step: int) -> Tensor:
        with torch.no_grad():
            return self._episodes(model, params, "support", step, same_policy=True).episodes.returns().mean(1)

    def query_scores(self, model, params: Params, step: int) -> tuple[Tensor, Tensor]:
        """The query surrogate and the average return of the query episodes (by the policy `params`)."""
        loss = self.query_loss(model, params, step)
        returns = self._episodes(model, params, "query", step).episodes.returns().mean(1)
        return loss, returns

    def query_kl(self, model, params_old: Params, params_new: Params, step: int) -> Tensor:
        """[T]: the mean KL(pi_old || pi_new) over the states of the query episodes (collected by
        `params_old` where there are none yet); `params_old` are constants, `params_new` differentiable."""
        params_old = {k: v.detach() for k, v in params_old.items()}
        collected = self._episodes(model, params_old, "query", step)
        observations, mask = collected.episodes.observations, collected.episodes.mask
        flat = observations.flatten(1, 2)
        with torch.no_grad():
            mean_old = model(params_old, flat, step)
        kl = gaussian.kl(mean_old, params_old["log_std"], model(params_new, flat, step), params_new["log_std"])
        return self._masked_mean(kl.view(mask.shape), collected)

    # -- episodes -------------------------------------------------------------------------------
    def _episodes(self, model, params: Params, part: str, step: int, same_policy: bool = False) -> Collected:
        """The `part` episodes of step `step`: those collected before (by the policy `params` itself where
        `same_policy`), else collected now by the policy `params`."""
        key, start, stop = (part, step), self._offset, self._offset + self.num_tasks
        collected = self._store.get(key, start, stop)
        if collected is not None and same_policy and not torch.equal(collected.params, _flat(params)):
            collected = None
        if collected is None:
            collected = self._collect(model, params, part, step)
            self._store.put(key, start, stop, collected)
        return collected

    def _task_seed(self, i: int) -> int:
        if self.task_seeds is not None:
            return int(self.task_seeds[i])
        return derive_seed(self.seed, int(self.task_index[i]))

    def _generators(self, part: str, step: int, which: int) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(derive_seed(self._task_seed(i), _PART_CODES[part], step, which))
                for i in range(self.num_tasks)]

    @torch.no_grad()
    def _collect(self, model, params: Params, part: str, step: int) -> Collected:
        params = {k: v.detach() for k, v in params.items()}
        log_std = params["log_std"]
        per_task = self.trajectories if part == "support" else self.query_trajectories
        dtype = log_std.dtype
        episodes = collect(self.env, lambda obs: (model(params, obs, step), log_std), self.goals.to(dtype), per_task,
                           self._generators(part, step, _ENV), self._generators(part, step, _NOISE))
        return Collected(episodes, self._advantages(episodes), self._log_probs(model, params, episodes, step), _flat(params))

    def _advantages(self, episodes: Episodes) -> Tensor:
        s = self.settings
        rewards, mask = episodes.rewards, episodes.mask
        if s.baseline == "linear":
            values = linear_feature_baseline.linear_baseline(episodes.observations, discounted_cumsum(rewards, s.gamma, mask), mask)
        else:
            values = torch.zeros_like(rewards)
        advantages = gae(rewards, values, mask, s.gamma, s.gae_lambda)
        return normalized(advantages, mask) if s.normalize_advantages else advantages

    @staticmethod
    def _log_probs(model, params: Params, episodes: Episodes, step: int) -> Tensor:
        """[T, B, H]: log pi_params(a_t | s_t) of the episodes' actions (one pass over all their states)."""
        mean = model(params, episodes.observations.flatten(1, 2), step)
        return gaussian.log_prob(episodes.actions.flatten(1, 2), mean, params["log_std"]).view(episodes.mask.shape)

    @staticmethod
    def _masked_mean(values: Tensor, collected: Collected) -> Tensor:
        """[T]: the mean of [T, B, H] values over the steps the task's episodes took."""
        mask = collected.episodes.mask
        return (values * mask).sum((1, 2)) / mask.sum((1, 2))


def _flat(params: Params) -> Tensor:
    """[T, P]: every parameter of each task, flat, in name order (what identifies a policy)."""
    tasks = next(iter(params.values())).shape[0]
    return torch.cat([params[k].detach().reshape(tasks, -1) for k in sorted(params)], dim=1)
