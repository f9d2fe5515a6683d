"""`metalearn bench` runs as a user would run it and reports what it promises (timings are never asserted)."""

import importlib.util
import json
import sys

import numpy as np
import pytest
import torch


def test_bench_reports_agreeing_meta_gradients_and_memory(run_cli, tmp_path):
    proc = run_cli("bench", "sinusoid", "--repeats", "2", "--warmup", "1", "--memory", "--task-chunk", "auto,4",
                   "--memory-workload", "sinusoid", "--memory-steps", "1,2", "--json", "bench.json", check=True)
    assert "vs per-task" in proc.stdout and "machine:" in proc.stdout and "batched/4" in proc.stdout
    report = json.loads((tmp_path / "bench.json").read_text())
    rows = report["results"]
    assert [(r["workload"], r["resolved"], r["task_chunk"]) for r in rows] == [("sinusoid", "batched", 25), ("sinusoid", "batched", 4)]
    for reference in ("per_task_backward", "one_backward"):  # each reference timed once, interleaved with both of ours
        assert rows[0][f"{reference}_ms"] == rows[1][f"{reference}_ms"] > 0
    for row in rows:
        assert row["grad_rel_error"] < 1e-4
        assert row["ours_ms"] > 0
        assert row["speedup_vs_per_task_backward"] == pytest.approx(row["per_task_backward_ms"] / row["ours_ms"])
        for impl in ("per_task_backward_peak_mib", "one_backward_peak_mib", "ours_peak_mib"):
            assert set(row[impl]) == {"rss", "heap"} and row[impl]["heap"] >= 0
    assert [r["inner_steps"] for r in report["memory_sweep"]] == [1, 2]
    assert set(report["memory_sweep"][0]) == {"workload", "inner_steps", "per_task_backward_peak_mib", "one_backward_peak_mib", "ours_peak_mib"}


def test_both_references_compute_the_exact_meta_gradient():
    """The per-task-backward loop and the one-backward loop give the same meta-gradient as an independent
    computation: the query loss after one SGD step written out by hand for a linear model (float64)."""
    from metalearn_cli.bench import REFERENCES, reference_step
    from metalearn_cli.tasks import REGRESSION

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1, bias=False).double()
    xs, xq = torch.randn(4, 5, 3, dtype=torch.float64), torch.randn(4, 6, 3, dtype=torch.float64)
    ys, yq = torch.randn(4, 5, 1, dtype=torch.float64), torch.randn(4, 6, 1, dtype=torch.float64)
    from metalearn_cli.tasks import TaskBatch

    tasks = TaskBatch(xs, ys, xq, yq)
    w = model.weight.detach().clone().requires_grad_(True)
    total = 0.0
    for i in range(4):  # mse: (2/n) X^T (X w - y); the adapted w is linear in w, so the meta-gradient is exact
        grad = 2.0 / 5 * (xs[i].T @ (xs[i] @ w.T - ys[i])).T
        fast = w - 0.1 * grad
        total = total + ((xq[i] @ fast.T - yq[i]) ** 2).mean() / 4
    expected = torch.autograd.grad(total, w)[0]
    for reference in REFERENCES:
        model.zero_grad()
        reference_step(model, REGRESSION, tasks, steps=1, lr=0.1, first_order=False, reference=reference)
        torch.testing.assert_close(model.weight.grad, expected, rtol=1e-12, atol=1e-12)


def test_bench_rejects_an_unknown_workload(run_cli):
    proc = run_cli("bench", "imagenet")
    assert proc.returncode == 2 and "imagenet" in proc.stderr and "sinusoid" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bench_rejects_a_bad_task_chunk(run_cli):
    proc = run_cli("bench", "sinusoid", "--task-chunk", "8,0")
    assert proc.returncode == 2 and "--task-chunk" in proc.stderr and "'8,0'" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- reinforcement learning: nav2d and halfcheetah -----------------------------------------------------
HAVE_MUJOCO = all(importlib.util.find_spec(name) is not None for name in ("gymnasium", "mujoco"))


def test_rl_bench_reports_steps_per_second_and_a_meta_iteration_by_phase(metalearn, tmp_path):
    proc = metalearn("bench", "nav2d", "halfcheetah", "--tasks", "2", "--episodes", "2", "--horizon", "3",
                     "--rl-repeats", "1", "--json", "bench.json", check=True)
    assert "machine:" in proc.stdout and "steps per second" in proc.stdout and "meta-iteration" in proc.stdout
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["results"] == []  # no supervised workload was asked for
    rl = report["rl"]
    ran = ["nav2d", "halfcheetah"] if HAVE_MUJOCO else ["nav2d"]
    if not HAVE_MUJOCO:
        print("halfcheetah part skipped: Gymnasium or MuJoCo is not installed (pip install 'metalearn[rl]')")
        assert [s["workload"] for s in rl["skipped"]] == ["halfcheetah"] and "halfcheetah: skipped" in proc.stdout
    assert sorted({(r["workload"], r["actions"]) for r in rl["steps"]}) == sorted(
        (w, a) for w in ran for a in ("random", "Gaussian policy 2x100"))
    for row in rl["steps"]:
        assert (row["tasks"], row["episodes"], row["horizon"]) == (2, 2, 3)
        assert row["reference_steps_per_s"] > 0 and row["ours_steps_per_s"] > 0 and row["speedup"] > 0
        if row["actions"] == "random":  # the same actions: the same episodes, as many steps
            assert row["reference_steps"] == row["ours_steps"] > 0
    assert [r["workload"] for r in rl["meta_iterations"]] == ran
    for r in rl["meta_iterations"]:
        assert r["algorithm"] == "maml, outer_optimizer=trpo" and (r["tasks"], r["episodes"], r["horizon"]) == (2, 2, 3)
        phases = r["phases_s"]
        for phase in ("collection", "inner step", "Fisher graphs", "Fisher-vector products", "line search"):
            assert phases[phase] > 0, phase  # each phase was seen: the timing wrappers reach the code training runs
        assert sum(phases.values()) == pytest.approx(r["median_s"]) and r["median_s"] in r["seconds"]
        assert r["fisher_products"] >= 2 and r["line_search_tries"] == r["metrics"]["line_search_tries"] >= 1


@pytest.mark.parametrize("action_scale", [0.1, 1.0])
def test_reference_nav2d_loop_follows_the_vectorised_environment(action_scale):
    """The benchmark's NumPy reference, stepped one episode at a time, against Nav2dEnv stepping every episode
    at once, with the same actions: the same positions, rewards and ends (so both do the same work)."""
    from metalearn_cli.bench_rl import ReferenceNav2d
    from metalearn_cli.rl.nav2d import Nav2dEnv

    horizon, per_task = 30, 4
    goals = torch.tensor([[0.3, -0.2], [-0.45, 0.05], [0.1, 0.0]], dtype=torch.float64)
    actions = torch.randn(3, per_task, horizon, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    actions[2, 0, 0] = torch.tensor([5.0, 0.0])  # clipped to a move of (0.1, 0): onto the goal (0.1, 0), ended at once
    # moves of (0.1, 0.05): x on the goal, y 0.05 off; (0, -0.035): 0.015 off, not ended; (0, -0.01): within 0.01, ended
    actions[2, 1, :3] = torch.tensor([[0.1, 0.05], [0.0, -0.035], [0.0, -0.01]]) / action_scale
    actions[2, 2, 0] = torch.tensor([-7.0, 9.0])  # clipped to (-0.1, 0.1)
    env = Nav2dEnv(horizon, action_scale)
    env.reset(goals, per_task, [torch.Generator() for _ in range(3)])
    positions, rewards, dones = zip(*(env.step(actions[:, :, t]) for t in range(horizon)))
    positions, rewards, dones = torch.stack(positions), torch.stack(rewards), torch.stack(dones)
    reference = ReferenceNav2d(goals.numpy(), action_scale)
    lengths = {}
    for i in range(3):
        for b in range(per_task):
            assert reference.start(i, b).tolist() == [0.0, 0.0]
            for t in range(horizon):
                position, reward, done = reference.step(actions[i, b, t].numpy())
                np.testing.assert_allclose(position, positions[t, i, b].numpy(), rtol=0, atol=1e-12)
                assert reward == pytest.approx(float(rewards[t, i, b]), abs=1e-12)
                assert done == bool(dones[t, i, b])
                if done:
                    break
            lengths[i, b] = t + 1
    assert lengths[2, 0] == 1 and lengths[2, 1] == 3
    np.testing.assert_allclose(positions[0, 2, 2].numpy(), [-0.1, 0.1], rtol=0, atol=1e-15)


def test_halfcheetah_bench_is_skipped_with_the_reason_where_mujoco_is_absent(metalearn, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "mujoco", None)  # `import mujoco` now raises ImportError
    proc = metalearn("bench", "halfcheetah", "--json", "bench.json", check=True)
    assert "halfcheetah: skipped:" in proc.stdout and "pip install 'metalearn[rl]'" in proc.stdout
    rl = json.loads((tmp_path / "bench.json").read_text())["rl"]
    assert rl["steps"] == rl["meta_iterations"] == [] and [s["workload"] for s in rl["skipped"]] == ["halfcheetah"]
