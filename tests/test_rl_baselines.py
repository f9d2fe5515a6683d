"""The MAML paper's baselines for reinforcement learning and the report of an RL sweep: the "pretrained"
policy (algo=finetune on episodes: TRPO steps on the unadapted surrogate of every training task), the
"random" row (trainer.max_steps=0 scores the initialisation), and `metalearn report`'s return after each
adaptation step, in its table and its plot."""

import csv
import json
from pathlib import Path

import pytest
import torch

from metalearn_cli.algorithms import Finetune, FunctionalModel
from metalearn_cli.algorithms.trpo import hessian_vector_product, trpo_step
from metalearn_cli.batched import expand
from metalearn_cli.data.nav2d import Nav2d
from metalearn_cli.data.sinusoid import Sinusoid
from metalearn_cli.errors import MetalearnError
from metalearn_cli.models import MLP, GaussianMLP
from metalearn_cli.report import adaptation_curve, configurations

MAX_KL = 0.01
#: a short nav2d run: 4 tasks of 4 episodes of 20 steps, 2 meta-iterations, 4 validation and test tasks
NAV2D = ["data=nav2d", "data.horizon=20", "sampler.meta_batch_size=4", "sampler.shots=4", "sampler.queries=4",
         "trainer.max_steps=2", "trainer.val_check_interval=2", "eval.num_tasks=4", "eval.val_tasks=4",
         "checkpoint.every_n_steps=2", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1", "logger=csv"]


def pretrained(**kwargs) -> Finetune:
    settings = dict(inner_lr=0.1, inner_steps=1, eval_inner_steps=3, eval_inner_lr=[0.1, 0.05], outer_lr=1e-3,
                    outer_optimizer="trpo", max_kl=MAX_KL, vectorize="batched")
    return Finetune(**{**settings, **kwargs})


def test_pretrained_policy_takes_trust_region_steps_on_the_unadapted_surrogate():
    """Each meta-iteration is one TRPO step on the mean query surrogate of theta itself: accepted, the
    surrogate lower and the KL of the policies on the query states within the limit (measured here
    again), and the very step a plain TRPO step takes with the KL's own Hessian (no inner loop: the
    Jacobian of the parameters is the identity)."""
    torch.manual_seed(0)
    module = GaussianMLP((2,), 2, hidden=(16,)).double()
    fmodel, source, algo = FunctionalModel(module), Nav2d(horizon=20), pretrained()
    assert algo.extra_modules(module, source, None) == {} and "head" not in algo.eval_protocol()
    model = fmodel.on("batched")
    for iteration in range(2):
        tasks = source.sample("train", torch.Generator().manual_seed(iteration), 4, None, 5, 5)
        theta = {k: v.detach().clone() for k, v in fmodel.params().items()}
        step = algo.meta_step(fmodel, tasks, iteration)
        new = {k: theta[k] - step.direction[k] for k in theta}
        with torch.no_grad():
            kl = tasks.query_kl(model, expand(theta, 4), expand(new, 4), 0).mean()
            before = tasks.query_loss(model, expand(theta, 4), 0).mean()
            after = tasks.query_loss(model, expand(new, 4), 0).mean()
        assert step.metrics["step_accepted"] == 1 and 0 < kl <= MAX_KL and after < before
        torch.testing.assert_close(step.metrics["kl"], kl)
        torch.testing.assert_close(step.metrics["loss"], before)
        torch.testing.assert_close(step.metrics["loss_after"], after)

        # the same step from the pieces: gradient of the surrogate, plain Hessian-vector products of the KL
        leaves = {k: v.clone().requires_grad_(True) for k, v in theta.items()}
        loss = tasks.query_loss(model, expand(leaves, 4), 0).mean()
        gradient = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))

        def kl_from_theta(params):
            return tasks.query_kl(model, expand(theta, 4), expand(params, 4), 0).mean()

        def loss_and_kl(candidate):
            with torch.no_grad():
                return tasks.query_loss(model, expand(candidate, 4), 0).mean().item(), kl_from_theta(candidate).item()

        expected = trpo_step(theta, gradient, hessian_vector_product(kl_from_theta, theta), loss_and_kl, loss.item(),
                             max_kl=MAX_KL)
        for k in theta:
            torch.testing.assert_close(new[k], expected.params[k], rtol=1e-6, atol=1e-9)
        with torch.no_grad():
            for name, parameter in module.named_parameters():
                parameter -= step.direction[name]


def test_pretrained_with_adam_follows_the_policy_gradient_and_trpo_is_refused_on_labelled_data():
    torch.manual_seed(0)
    module = GaussianMLP((2,), 2, hidden=(8,)).double()
    fmodel = FunctionalModel(module)
    tasks = Nav2d(horizon=10).sample("train", torch.Generator().manual_seed(3), 3, None, 4, 4)
    algo = pretrained(outer_optimizer="adam")
    assert isinstance(algo.configure_optimizers(module.parameters(), 10)["optimizer"], torch.optim.Adam)
    step = algo.meta_step(fmodel, tasks)
    # the loss is the query surrogate of theta itself, on the episodes theta collected: its gradient is the
    # policy gradient of the mean return
    theta = fmodel.params()
    expected = tasks.query_loss(fmodel.on("batched"), expand(theta, 3), 0).mean()
    gradient = torch.autograd.grad(step.loss, list(theta.values()))
    for got, want in zip(gradient, torch.autograd.grad(expected, list(theta.values()))):
        torch.testing.assert_close(got, want)
    assert any(g.abs().max() > 1e-4 for g in gradient)
    returns = tasks._store.get(("query", 0), 0, 3).episodes.returns().mean(1).mean()
    torch.testing.assert_close(step.metrics["return"], returns)
    with pytest.raises(MetalearnError, match=r"`algo.outer_optimizer=trpo` trains a policy.*Allowed here: algo.outer_optimizer=adam"):
        pretrained().extra_modules(MLP((1,), 1, hidden=(8,)), Sinusoid(), None)


def test_pretrained_and_untrained_runs_and_the_report_of_their_returns(metalearn, tmp_path):
    """`metalearn train data=nav2d algo=finetune` trains with the shipped TRPO settings; `trainer.max_steps=0`
    scores the untrained policy (the paper's "random" row) and keeps it as a checkpoint `metalearn eval`
    scores again; `metalearn report` of both gives the return after each step and the adaptation plot."""
    metalearn("train", *NAV2D, "algo=finetune", "hydra.run.dir=runs/pretrained", check=True)
    test = json.loads((tmp_path / "runs/pretrained/test.json").read_text())
    assert (test["algo"], test["steps"], test["metric"]) == ("finetune", 2, "return")
    assert [row["step"] for row in test["per_step"]] == [0, 1, 2, 3] and test["eval_inner_lr"] == [0.1, 0.05]
    assert "head" not in test and "eval_momentum" not in test  # no classifier head: plain policy-gradient steps
    with (tmp_path / "runs/pretrained/metrics.csv").open() as handle:
        steps = [row for row in csv.DictReader(handle) if row.get("train/kl")]
    assert len(steps) == 2 and all(0 < float(r["train/kl"]) <= MAX_KL and float(r["train/step_accepted"]) == 1 for r in steps)

    metalearn("train", *NAV2D, "trainer.max_steps=0", "hydra.run.dir=runs/untrained", check=True)
    untrained = json.loads((tmp_path / "runs/untrained/test.json").read_text())
    assert untrained["steps"] == 0 and untrained["best_val"] is None and len(untrained["per_step"]) == 4
    checkpoint = torch.load(tmp_path / "runs/untrained/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 0 and not checkpoint["state_dict"]["model.log_std"].any()  # as initialised
    metalearn("eval", f"ckpt={tmp_path}/runs/untrained/checkpoints/last.ckpt", "eval.num_tasks=4", check=True)
    scored = json.loads((tmp_path / "runs/untrained/eval.json").read_text())
    assert [r["mean"] for r in scored["per_step"]] == [r["mean"] for r in untrained["per_step"]]

    metalearn("report", str(tmp_path / "runs"), check=True)
    with (tmp_path / "runs/report.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    columns = [f"return after {k} step{'' if k == 1 else 's'} ± 95% CI" for k in range(4)]
    assert all(c in rows[0] for c in columns) and "test return ± 95% CI" not in rows[0]
    by_run = {r["run"]: r for r in rows}
    for name, result in (("pretrained", test), ("untrained", untrained)):
        assert [by_run[name][c] for c in columns] == [f"{r['mean']:.2f} ± {r['ci95']:.2f}" for r in result["per_step"]]
    assert rows[0]["run"] == max((test, "pretrained"), (untrained, "untrained"), key=lambda t: t[0]["mean"])[1]
    assert (tmp_path / "runs/report_adaptation.png").stat().st_size > 0


def _run(name, algo, seed, means, cis, steps=100):
    per_step = [{"step": k, "mean": m, "ci95": c} for k, (m, c) in enumerate(zip(means, cis))]
    test = {"metric": "return", "algo": algo, "steps": steps, "per_step": per_step, "mean": means[-1], "ci95": cis[-1]}
    overrides = {"algo": algo, "seed": str(seed)} if steps else {"trainer.max_steps": "0", "seed": str(seed)}
    return {"path": Path(name), "overrides": overrides, "test": test, "metrics": []}


def test_report_draws_one_line_per_algorithm_pooling_seeds():
    runs = [_run("0", "maml", 0, [-40.0, -12.0], [4.0, 2.0]), _run("1", "maml", 1, [-42.0, -10.0], [5.0, 1.0]),
            _run("2", "finetune", 0, [-41.0, -20.0], [4.0, 3.0]), _run("3", "maml", 0, [-80.0, -60.0], [6.0, 5.0], steps=0)]
    groups = configurations(runs)
    assert {label: [r["path"].name for r in g] for label, g in groups.items()} == {
        "maml": ["0", "1"], "finetune": ["2"], "untrained": ["3"]}
    steps, means, cis = adaptation_curve(groups["maml"])  # two seeds: the mean of their means, the CI over them
    assert steps == [0, 1] and means == [-41.0, -11.0]
    assert cis == pytest.approx([1.96, 1.96])  # sample standard deviation sqrt(2), over sqrt(2) runs
    assert adaptation_curve(groups["finetune"]) == ([0, 1], [-41.0, -20.0], [4.0, 3.0])  # one run: its CI over tasks
