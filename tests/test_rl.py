"""Reinforcement learning: 2D navigation's dynamics, the linear feature baseline, advantages, the
policy-gradient surrogate's gradient, episodes as functions of seeds, and a short train -> eval -> resume
run of `metalearn train data=nav2d`."""

import json
import math

import numpy as np
import pytest
import torch

from conftest import assert_clean_error
from metalearn_cli.batched import expand
from metalearn_cli.data.nav2d import Nav2d
from metalearn_cli.functional import FunctionalModel
from metalearn_cli.models import GaussianMLP
from metalearn_cli.rl import baseline
from metalearn_cli.rl.advantages import discounted_cumsum, gae, normalized
from metalearn_cli.rl.nav2d import Nav2dEnv
from metalearn_cli.rl.rollouts import collect
from metalearn_cli.tasks.episodes import EpisodeSettings, EpisodeTasks


def generators(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


# -- 2D navigation -------------------------------------------------------------------------------
def test_nav2d_normalized_actions_move_by_a_tenth_clipped_to_the_box():
    env = Nav2dEnv(horizon=100, action_scale=0.1)
    goals = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    obs = env.reset(goals, 1, generators(1))
    assert obs.tolist() == [[[0.0, 0.0]]]
    obs, reward, done = env.step(torch.tensor([[[0.5, -2.0]]], dtype=torch.float64))
    # 0.1 * 0.5 = 0.05; 0.1 * -2 = -0.2, clipped to -0.1
    torch.testing.assert_close(obs, torch.tensor([[[0.05, -0.1]]], dtype=torch.float64))
    torch.testing.assert_close(reward, torch.tensor([[-math.hypot(0.05 - 0.3, -0.1 + 0.2)]], dtype=torch.float64))
    assert not done.item()
    obs, reward, _ = env.step(torch.tensor([[[30.0, 1.0]]], dtype=torch.float64))
    torch.testing.assert_close(obs, torch.tensor([[[0.15, 0.0]]], dtype=torch.float64))
    torch.testing.assert_close(reward, torch.tensor([[-math.hypot(0.15, 0.2)]], dtype=torch.float64))


def test_nav2d_raw_actions_are_the_displacement_clipped_to_the_box():
    env = Nav2dEnv(horizon=100, action_scale=1.0)
    env.reset(torch.tensor([[0.0, 0.5]], dtype=torch.float64), 2, generators(1))
    obs, reward, _ = env.step(torch.tensor([[[0.05, 0.3], [-0.07, -0.5]]], dtype=torch.float64))
    torch.testing.assert_close(obs, torch.tensor([[[0.05, 0.1], [-0.07, -0.1]]], dtype=torch.float64))
    torch.testing.assert_close(reward, -torch.tensor([[math.hypot(0.05, 0.4), math.hypot(0.07, 0.6)]], dtype=torch.float64))


def test_nav2d_ends_when_both_coordinates_are_within_a_hundredth_and_stays_done():
    env = Nav2dEnv(horizon=100, action_scale=0.1)
    env.reset(torch.tensor([[0.1, 0.005], [0.1, 0.02]], dtype=torch.float64), 1, generators(2))
    obs, reward, done = env.step(torch.tensor([[[1.0, 0.0]], [[1.0, 0.0]]], dtype=torch.float64))
    # task 0: (0, -0.005) off the goal, both under 0.01: done; task 1: dy = -0.02: not done
    assert done.tolist() == [[True], [False]]
    torch.testing.assert_close(reward, -torch.tensor([[0.005], [0.02]], dtype=torch.float64))
    _, _, done = env.step(torch.tensor([[[1.0, 0.0]], [[0.0, 0.0]]], dtype=torch.float64))
    assert done.tolist() == [[True], [False]]


def test_collect_masks_the_steps_after_an_episode_ends_and_stops_at_the_horizon():
    env = Nav2dEnv(horizon=6, action_scale=0.1)
    goals = torch.tensor([[0.3, 0.0], [-0.9, 0.0]], dtype=torch.float64)
    # a policy heading +x at full speed (std 1e-6, the least allowed): task 0 reaches its goal at step 3
    policy = lambda obs: (torch.tensor([1.0, 0.0], dtype=torch.float64).expand(*obs.shape[:2], 2),
                          torch.full((2, 2), -30.0, dtype=torch.float64))
    episodes = collect(env, policy, goals, 2, generators(2), generators(2, seed=10))
    assert episodes.mask[0].tolist() == [[1, 1, 1, 0, 0, 0]] * 2
    assert episodes.mask[1].tolist() == [[1] * 6] * 2
    close = dict(rtol=0, atol=1e-5)
    torch.testing.assert_close(episodes.rewards[0, 0], -torch.tensor([0.2, 0.1, 0.0, 0, 0, 0], dtype=torch.float64), **close)
    torch.testing.assert_close(episodes.observations[0, 0, :, 0], torch.tensor([0.0, 0.1, 0.2, 0, 0, 0], dtype=torch.float64), **close)
    torch.testing.assert_close(episodes.returns()[1], -torch.tensor([sum(1.0 + 0.1 * t for t in range(6))] * 2, dtype=torch.float64), **close)


# -- baseline and advantages ---------------------------------------------------------------------
def test_linear_baseline_solves_the_regularised_normal_equations_over_the_steps_taken():
    generator = torch.Generator().manual_seed(0)
    observations = torch.randn(2, 3, 5, 2, generator=generator, dtype=torch.float64) * 4
    returns = torch.randn(2, 3, 5, generator=generator, dtype=torch.float64)
    mask = torch.ones(2, 3, 5, dtype=torch.float64)
    mask[0, 1, 3:] = 0  # an episode that ended at step 2
    feats = baseline.features(observations)
    coeffs = baseline.fit(feats, returns, mask)
    for task in range(2):
        rows = []
        for b in range(3):
            for t in range(5):
                if mask[task, b, t]:
                    o = np.clip(observations[task, b, t].numpy(), -10, 10)
                    rows.append((np.concatenate([o, o**2, [t / 100, (t / 100) ** 2, (t / 100) ** 3, 1.0]]), returns[task, b, t].item()))
        f = np.array([r[0] for r in rows])
        r = np.array([r[1] for r in rows])
        expected = np.linalg.solve(f.T @ f + 1e-5 * np.eye(f.shape[1]), f.T @ r)
        np.testing.assert_allclose(coeffs[task].numpy(), expected, rtol=1e-7, atol=1e-9)
    # what the padding holds does not matter
    changed = returns.clone()
    changed[0, 1, 3:] = 1e6
    torch.testing.assert_close(baseline.fit(feats, changed, mask), coeffs)


def test_gae_and_discounted_sums_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.25, 2.0, 7.0]], dtype=torch.float64)
    g, lam = 0.9, 0.5
    torch.testing.assert_close(discounted_cumsum(rewards, g, mask), torch.tensor([[1 + g * 2 + g * g * 3, 2 + g * 3, 3, 0]], dtype=torch.float64))
    deltas = [1 + g * 0.25 - 0.5, 2 + g * 2.0 - 0.25, 3 + g * 0 - 2.0]  # V = 0 after the last step
    expected = [deltas[0] + g * lam * deltas[1] + (g * lam) ** 2 * deltas[2], deltas[1] + g * lam * deltas[2], deltas[2], 0]
    torch.testing.assert_close(gae(rewards, values, mask, g, lam), torch.tensor([expected], dtype=torch.float64))
    a = normalized(torch.tensor([[[1.0, 3.0, 100.0]]], dtype=torch.float64), torch.tensor([[[1.0, 1.0, 0.0]]], dtype=torch.float64))
    torch.testing.assert_close(a, torch.tensor([[[-1.0, 1.0, 0.0]]], dtype=torch.float64), atol=1e-7, rtol=0)


# -- the policy-gradient surrogate -----------------------------------------------------------------
def tiny_problem(tasks=2, per_task=3, horizon=5):
    torch.manual_seed(0)
    module = GaussianMLP((2,), 2, hidden=(4,)).double()
    fmodel = FunctionalModel(module)
    model = fmodel.on("batched")
    goals = torch.tensor([[0.3, -0.2], [-0.4, 0.1]], dtype=torch.float64)[:tasks]
    episodes = EpisodeTasks(Nav2dEnv(horizon, 1.0), goals, per_task, per_task, EpisodeSettings(gamma=0.9), seed=7)
    # non-zero biases: with zero ones every unit sits at ReLU's kink in the first state, (0, 0)
    theta = {k: v.detach() + 0.1 * torch.randn(v.shape, dtype=v.dtype) for k, v in fmodel.params().items()}
    return model, episodes, theta


def test_support_loss_gradient_matches_finite_differences_of_the_surrogate():
    model, tasks, theta = tiny_problem()
    params = {k: v.clone().requires_grad_(True) for k, v in expand(theta, 2).items()}
    loss = tasks.support_loss(model, params, 0)  # collects the episodes once; later calls reuse them
    grads = torch.autograd.grad(loss.sum(), list(params.values()))
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        direction = {k: torch.randn(v.shape, generator=generator, dtype=v.dtype) for k, v in params.items()}
        eps = 1e-6
        plus = tasks.support_loss(model, {k: v.detach() + eps * direction[k] for k, v in params.items()}, 0).sum()
        minus = tasks.support_loss(model, {k: v.detach() - eps * direction[k] for k, v in params.items()}, 0).sum()
        numeric = (plus - minus) / (2 * eps)
        analytic = sum((g * direction[k]).sum() for g, k in zip(grads, params))
        torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-9)


def test_surrogate_gradient_is_the_mean_of_grad_log_pi_times_the_advantage():
    model, tasks, theta = tiny_problem(tasks=1)
    params = {k: v.clone().requires_grad_(True) for k, v in expand(theta, 1).items()}
    grads = dict(zip(params, torch.autograd.grad(tasks.support_loss(model, params, 0).sum(), list(params.values()))))
    collected = tasks._store.get(("support", 0), 0, 1)
    ep, adv = collected.episodes, collected.advantages
    steps = ep.mask.sum()
    # by hand, for the action mean's bias and the log standard deviation: d log pi / d mu = (a - mu) / sigma^2,
    # d log pi / d log sigma = (a - mu)^2 / sigma^2 - 1
    mean = model(params, ep.observations.flatten(1, 2)).detach().view(*ep.mask.shape, 2)
    var = params["log_std"].detach().exp().pow(2).view(1, 1, 1, 2)
    weight = (adv * ep.mask).unsqueeze(-1)
    by_hand_bias = -((ep.actions - mean) / var * weight).sum((1, 2)) / steps
    by_hand_log_std = -(((ep.actions - mean).pow(2) / var - 1) * weight).sum((1, 2)) / steps
    torch.testing.assert_close(grads["head.bias"], by_hand_bias)
    torch.testing.assert_close(grads["log_std"], by_hand_log_std)
    # every parameter: -sum_t grad log pi(a_t | s_t) A_t / steps, one step at a time
    total = {k: torch.zeros_like(v) for k, v in params.items()}
    for b, t in ep.mask[0].nonzero().tolist():
        obs = ep.observations[:, b, t].unsqueeze(1)
        logp = -0.5 * (((ep.actions[:, b, t].unsqueeze(1) - model(params, obs)) / params["log_std"].exp()).pow(2)).sum() \
            - params["log_std"].sum() - math.log(2 * math.pi)
        for k, g in zip(params, torch.autograd.grad(logp, list(params.values()))):
            total[k] -= g * adv[0, b, t] / steps
    for k in params:
        torch.testing.assert_close(grads[k], total[k])


def test_query_surrogate_is_the_policy_gradient_at_the_collecting_policy():
    model, tasks, theta = tiny_problem()
    params = {k: v.clone().requires_grad_(True) for k, v in expand(theta, 2).items()}
    query = torch.autograd.grad(tasks.query_loss(model, params, 1).sum(), list(params.values()))
    # the same episodes scored by the plain surrogate: the same gradient at the collecting parameters
    tasks._store.put(("support", 1), 0, 2, tasks._store.get(("query", 1), 0, 2))
    plain = torch.autograd.grad(tasks.support_loss(model, params, 1).sum(), list(params.values()))
    for a, b in zip(query, plain):
        torch.testing.assert_close(a, b)
    kl = tasks.query_kl(model, params, {k: v + 0.01 for k, v in params.items()}, 1)
    assert kl.shape == (2,) and (kl > 0).all()
    assert tasks.query_kl(model, params, params, 1).abs().max() < 1e-12


def test_gaussian_policy_runs_the_same_on_every_kernel():
    """The batched kernel (an MLP for the mean, log_std read by the task) against vmap and the loop: the same
    episodes and the same exact MAML meta-gradient through one inner step."""
    _, _, theta = tiny_problem()
    fmodel = FunctionalModel(GaussianMLP((2,), 2, hidden=(4,)).double())
    assert fmodel.on("batched")  # supported: algo.vectorize=auto picks it
    grads = {}
    for kernel in ("batched", "vmap", "loop"):
        model, tasks = fmodel.on(kernel), tiny_problem()[1]
        leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        params = expand(leaves, 2)
        inner = torch.autograd.grad(tasks.support_loss(model, params, 0).sum(), list(params.values()), create_graph=True)
        adapted = {k: v - 0.1 * g for (k, v), g in zip(params.items(), inner)}
        grads[kernel] = torch.autograd.grad(tasks.query_loss(model, adapted, 1).mean(), list(leaves.values()))
    for kernel in ("vmap", "loop"):
        for a, b in zip(grads[kernel], grads["batched"]):
            torch.testing.assert_close(a, b)


def test_reptile_adapts_on_the_episodes_its_mini_batches_name():
    from metalearn_cli.algorithms import Reptile

    model, tasks, theta = tiny_problem()
    params = expand(theta, 2)
    index = torch.tensor([[2, 0], [1, 1]])
    whole = tasks._episodes(model, params, "support", 0)
    named = whole.episodes_named(index)
    torch.testing.assert_close(named.episodes.actions[0, 0], whole.episodes.actions[0, 2])
    torch.testing.assert_close(named.advantages[1, 1], whole.advantages[1, 1])
    algorithm = Reptile(inner_lr=0.1, inner_steps=2, eval_inner_steps=1, outer_lr=0.1, inner_batch_size=2)
    step = algorithm.meta_step(FunctionalModel(GaussianMLP((2,), 2, hidden=(4,)).double()), tiny_problem()[1])
    assert all(torch.isfinite(d).all() and d.abs().sum() > 0 for d in step.direction.values())


def test_episodes_depend_on_each_task_alone_and_the_metric_on_the_policy_that_collected_them():
    model, tasks, theta = tiny_problem()
    params = expand(theta, 2)
    whole = tasks.support_loss(model, params, 0)
    fresh = tiny_problem()[1]  # the same tasks, nothing collected
    parts = torch.cat([fresh.slice(i, i + 1).support_loss(model, expand(theta, 1), 0) for i in range(2)])
    torch.testing.assert_close(parts, whole, rtol=0, atol=0)
    # a slice reads what its batch collected
    assert tasks.slice(1, 2)._store.get(("support", 0), 1, 2) is not None
    returns = tasks.query_metric(model, params, 0)
    torch.testing.assert_close(returns, tasks._store.get(("support", 0), 0, 2).episodes.returns().mean(1))
    # another policy's return is measured on episodes it collects itself
    other = {k: v + 0.5 for k, v in params.items()}
    assert not torch.equal(tasks.query_metric(model, other, 0), returns)
    # another step, another seed: other episodes
    assert not torch.equal(tasks.support_loss(model, params, 1), whole)


# -- runs ----------------------------------------------------------------------------------------
NAV2D = ["data=nav2d", "data.horizon=20", "sampler.meta_batch_size=4", "sampler.shots=4", "sampler.queries=4",
         "trainer.max_steps=4", "trainer.val_check_interval=2", "eval.num_tasks=4", "eval.val_tasks=4",
         "checkpoint.every_n_steps=2", "checkpoint.keep_all=true", "trainer.enable_progress_bar=false",
         "trainer.log_every_n_steps=1", "logger=csv"]


def test_nav2d_train_eval_and_exact_resume(metalearn, tmp_path):
    proc = metalearn("train", *NAV2D, "hydra.run.dir=run", check=True)
    assert "test return after 3 steps" in proc.stdout.strip().splitlines()[-1]
    test = json.loads((tmp_path / "run/test.json").read_text())
    assert test["metric"] == "return" and test["model"] == "gaussian_mlp" and test["horizon"] == 20
    assert test["trajectories_per_step"] == 4 and test["action_scale"] == 0.1 and len(test["per_step"]) == 4
    assert all(-20 * 1.3 <= row["mean"] < 0 for row in test["per_step"])  # the goal is within 0.71 of the start
    metalearn("eval", f"ckpt={tmp_path}/run/checkpoints/best.ckpt", "eval.num_tasks=4", check=True)
    report = json.loads((tmp_path / "run/eval.json").read_text())
    assert report["metric"] == "return" and report["trajectories_per_step"] == 4 and report["num_tasks"] == 4
    assert [row["mean"] for row in report["per_step"]] == [row["mean"] for row in test["per_step"]]  # same tasks, same episodes
    # resumed from meta-iteration 2, the run ends with the weights of the uninterrupted run
    metalearn("train", *NAV2D, "hydra.run.dir=resumed", f"ckpt_path={tmp_path}/run/checkpoints/step-0000002.ckpt", check=True)
    full = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=True)
    assert resumed["global_step"] == 4
    for key, value in full["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0)


@pytest.mark.parametrize("args, needles", [
    (["model=conv4"], ["`model=conv4` needs images", "model=gaussian_mlp"]),
    (["model=mlp"], ["`data=nav2d` needs a Gaussian policy", "model=gaussian_mlp"]),
    (["algo=protonet"], ["`algo=protonet`", "reinforcement learning"]),
    (["data.action_scale=0"], ["data.action_scale"]),
    (["data.baseline=mlp"], ["data.baseline", "linear, zero"]),
])
def test_nav2d_bad_input_is_refused_cleanly(metalearn, args, needles):
    assert_clean_error(metalearn("train", "data=nav2d", *args), *needles, status=2)


def test_nav2d_source_draws_goals_in_the_square():
    source = Nav2d()
    tasks = source.sample("train", torch.Generator().manual_seed(0), 500, None, 20, 20)
    assert tasks.goals.shape == (500, 2) and tasks.goals.min() >= -0.5 and tasks.goals.max() <= 0.5
    assert tasks.goals.min() < -0.45 and tasks.goals.max() > 0.45
    assert source.input_shape == (2,) and source.output_dim(None) == 2 and tasks.support_size == 20
