"""The diagonal Gaussian policy's distribution: log-likelihood of actions and KL divergence, for T tasks
at once. The mean comes from the policy network ([T, N, act]); the log standard deviation is a
parameter of its own, the same in every state ([T, act]: rllab's GaussianMLPPolicy with learn_std)."""

from __future__ import annotations

import math

from torch import Tensor

#: rllab's min_std (1e-6): the log standard deviation is held at or above its log
MIN_LOG_STD = math.log(1e-6)
_LOG_2PI = math.log(2 * math.pi)


def bounded(log_std: Tensor) -> Tensor:
    """The log standard deviation used, max(log_std, log 1e-6) (as rllab's tf.maximum: no gradient below)."""
    return log_std.clamp(min=MIN_LOG_STD)


def log_prob(actions: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """actions, mean [T, N, act], log_std [T, act] -> [T, N]: log pi(a | s), summed over action dimensions."""
    log_std = bounded(log_std).unsqueeze(1)
    z = (actions - mean) * (-log_std).exp()
    return (-0.5 * z.pow(2) - log_std - 0.5 * _LOG_2PI).sum(-1)


def kl(mean_old: Tensor, log_std_old: Tensor, mean_new: Tensor, log_std_new: Tensor) -> Tensor:
    """[T, N]: KL(pi_old || pi_new) of the two Gaussians in each state (means [T, N, act], log stds [T, act])."""
    log_std_old, log_std_new = bounded(log_std_old).unsqueeze(1), bounded(log_std_new).unsqueeze(1)
    var_old, var_new = (2 * log_std_old).exp(), (2 * log_std_new).exp()
    terms = log_std_new - log_std_old + (var_old + (mean_old - mean_new).pow(2)) / (2 * var_new) - 0.5
    return terms.sum(-1)
