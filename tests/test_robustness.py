"""Runs that survive: exact resume, kills mid-write, numerical faults, concurrency, random bad input.

Commands run in the test process (conftest.metalearn_in_process) unless the process is the point:
SIGKILL at random moments, and runs or evaluations started together as separate processes."""

import json
import os
import random
import signal
import subprocess
import time

import pytest
import torch
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from conftest import FAST, assert_clean_error, metalearn_executable, metalearn_in_process
from metalearn_cli.run_folder import RunFolderGuard

COMMON = ["trainer.val_check_interval=4", "trainer.enable_progress_bar=false", "eval.num_tasks=4", "eval.val_tasks=4"]


def _env():
    return dict(os.environ, PYTHONWARNINGS="ignore")


@pytest.mark.parametrize("inner", [[], ["algo.inner_optimizer=adam", "algo.eval_inner_optimizer=adam", "algo.inner_state=carry"]], ids=["reset", "carry"])
def test_reptile_resume_is_bit_identical(metalearn, tmp_path, inner):
    """Reptile: a run resumed from its step-3 checkpoint ends exactly as the uninterrupted one, with
    the annealed meta step size, the inner mini-batches and (inner_state=carry) the carried Adam
    moments continuing where they were."""
    args = ["algo=reptile", "algo.inner_batch_size=4", "checkpoint.every_n_steps=3", "trainer.max_steps=8", *inner, *COMMON]
    metalearn("train", *args, "checkpoint.keep_all=true", "hydra.run.dir=full", check=True)
    assert sorted(p.name for p in (tmp_path / "full/checkpoints").glob("step-*")) == ["step-0000003.ckpt", "step-0000006.ckpt", "step-0000008.ckpt"]
    metalearn("train", *args, "hydra.run.dir=resumed", f"ckpt_path={tmp_path}/full/checkpoints/step-0000003.ckpt", check=True)
    full = torch.load(tmp_path / "full/checkpoints/last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=True)
    for key, value in full["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    carried = {k: v for k, v in full["state_dict"].items() if k.startswith("extras.inner_state.")}
    if inner:  # the state is in the checkpoint and moved (t counts every inner step of every task)
        assert carried["extras.inner_state.t"] > 8 and any(v.abs().sum() > 0 for k, v in carried.items() if "v__" in k)
    else:
        assert not carried
    assert resumed["lr_schedulers"][0]["last_epoch"] == full["lr_schedulers"][0]["last_epoch"] == 8
    assert json.loads((tmp_path / "full/test.json").read_text())["per_step"] == json.loads((tmp_path / "resumed/test.json").read_text())["per_step"]


def test_maml_cosine_schedule_resumes_where_it_was(metalearn, tmp_path):
    """MAML with algo.outer_lr_schedule=cosine logs a falling train/lr and, resumed from its step-4
    checkpoint, continues the schedule: the same weights and schedule state as the uninterrupted run."""
    args = ["algo.outer_lr_schedule=cosine", "trainer.max_steps=8", "trainer.log_every_n_steps=2", "checkpoint.every_n_steps=4", *COMMON]
    metalearn("train", *args, "checkpoint.keep_all=true", "hydra.run.dir=full", check=True)
    metalearn("train", *args, "hydra.run.dir=resumed", f"ckpt_path={tmp_path}/full/checkpoints/step-0000004.ckpt", check=True)
    full = torch.load(tmp_path / "full/checkpoints/last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=True)
    for key, value in full["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    assert resumed["lr_schedulers"][0]["last_epoch"] == full["lr_schedulers"][0]["last_epoch"] == 8
    rows = (tmp_path / "full/metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    lrs = [float(r.split(",")[header.index("train/lr")]) for r in rows[1:] if r.split(",")[header.index("train/lr")]]
    assert len(lrs) == 4 and all(a > b for a, b in zip(lrs, lrs[1:])) and lrs[0] < 1e-3, lrs


def test_maml_first_order_steps_switch_at_the_step_and_resume(metalearn, tmp_path):
    """algo.first_order_steps=4 trains its first 4 meta-iterations exactly as FO-MAML (bit-identical
    step-4 checkpoint), then second order (different from FO-MAML by step 8); a run resumed from its
    step-2 checkpoint, before the switch, ends bit-identical to the uninterrupted one."""
    args = ["trainer.max_steps=8", "checkpoint.every_n_steps=2", "checkpoint.keep_all=true", *COMMON]
    metalearn("train", *args, "algo.first_order_steps=4", "hydra.run.dir=annealed", check=True)
    metalearn("train", *args, "algo=fomaml", "hydra.run.dir=fomaml", check=True)
    metalearn("train", *args, "algo.first_order_steps=4", "hydra.run.dir=resumed",
              f"ckpt_path={tmp_path}/annealed/checkpoints/step-0000002.ckpt", check=True)

    def weights(run, name):
        return torch.load(tmp_path / f"{run}/checkpoints/{name}", weights_only=True)["state_dict"]

    at_switch, fo_at_switch = weights("annealed", "step-0000004.ckpt"), weights("fomaml", "step-0000004.ckpt")
    assert all(torch.equal(at_switch[k], v) for k, v in fo_at_switch.items())
    end, fo_end, resumed = weights("annealed", "last.ckpt"), weights("fomaml", "last.ckpt"), weights("resumed", "last.ckpt")
    assert any(not torch.equal(end[k], v) for k, v in fo_end.items() if v.is_floating_point())
    for key, value in end.items():
        assert torch.equal(resumed[key], value), key


def test_meta_iterations_per_lightning_step_change_nothing_but_speed(metalearn, tmp_path):
    """MAML with 4 meta-iterations per Lightning step trains, validates, logs and checkpoints at the
    same meta-iterations, to bit-identical weights, as one per step; and a run resumed from its
    step-4 checkpoint ends the same too."""
    args = ["trainer.max_steps=12", "trainer.log_every_n_steps=4", "checkpoint.every_n_steps=4", *COMMON]
    metalearn("train", *args, "iterations_per_batch=1", "hydra.run.dir=one", check=True)
    metalearn("train", *args, "iterations_per_batch=4", "checkpoint.keep_all=true", "hydra.run.dir=four", check=True)
    metalearn("train", *args, "iterations_per_batch=4", "hydra.run.dir=resumed",
              f"ckpt_path={tmp_path}/four/checkpoints/step-0000004.ckpt", check=True)
    one = torch.load(tmp_path / "one/checkpoints/last.ckpt", weights_only=True)
    assert one["global_step"] == 12
    for run in ("four", "resumed"):
        other = torch.load(tmp_path / f"{run}/checkpoints/last.ckpt", weights_only=True)
        assert other["global_step"] == 12
        for key, value in one["state_dict"].items():
            assert torch.equal(other["state_dict"][key], value), (run, key)
        assert json.loads((tmp_path / f"{run}/test.json").read_text())["per_step"] == json.loads((tmp_path / "one/test.json").read_text())["per_step"]
    assert sorted(p.name for p in (tmp_path / "four/checkpoints").glob("step-*")) == ["step-0000004.ckpt", "step-0000008.ckpt", "step-0000012.ckpt"]

    def logged(run):
        rows = (tmp_path / f"{run}/metrics.csv").read_text().splitlines()
        header = rows[0].split(",")
        return sorted((r.split(",")[header.index("step")], name) for r in rows[1:] for name, v in zip(header, r.split(",")) if v and name not in ("epoch", "step") and "seconds" not in name)

    assert logged("one") == logged("four")
    assert ("3", "train/loss") in logged("four") and ("7", "val/mse") in logged("four")


def test_sigkill_never_leaves_a_corrupt_checkpoint(tmp_path):
    """Kill runs that write last.ckpt every meta-iteration at random moments: every last.ckpt loads.
    The three runs go at once (their start-ups overlap), each killed at its own random moment after
    its first last.ckpt."""
    rng = random.Random(0)
    runs = [tmp_path / f"run{attempt}" for attempt in range(3)]
    delays = [rng.uniform(0.2, 1.5) for _ in runs]
    procs = [subprocess.Popen([metalearn_executable(), "train", *COMMON, "trainer.max_steps=100000",
                               "checkpoint.every_n_steps=1", f"hydra.run.dir={run}"],
                              env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for run in runs]
    kill_at: list[float | None] = [None] * len(runs)
    killed = [False] * len(runs)
    deadline = time.time() + 180
    try:
        while not all(killed) and time.time() < deadline:
            for i, (run, proc) in enumerate(zip(runs, procs)):
                if kill_at[i] is None and ((run / "checkpoints" / "last.ckpt").exists() or proc.poll() is not None):
                    kill_at[i] = time.time() + delays[i]
                if not killed[i] and kill_at[i] is not None and time.time() >= kill_at[i]:
                    proc.send_signal(signal.SIGKILL)
                    killed[i] = True
            time.sleep(0.05)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=60)
    for run, proc in zip(runs, procs):
        assert proc.returncode == -signal.SIGKILL, f"{run.name} ended before it was killed ({proc.returncode})"
        checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
        assert checkpoint["global_step"] >= 1 and "metalearn" in checkpoint


def test_a_nan_loss_stops_with_the_step_and_the_cause(metalearn, tmp_path):
    proc = metalearn("train", *COMMON, "trainer.max_steps=50", "checkpoint.every_n_steps=1", "algo.outer_lr=1e6",
                     "algo.inner_lr=1000", "hydra.run.dir=run")
    err = assert_clean_error(proc, status=2)
    assert "meta-iteration" in err and "learning rate" in err and "algo.inner_lr=1000" in err
    checkpoint = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values()), "the last good weights are kept"


def test_runs_started_together_get_their_own_folders(tmp_path):
    procs = [subprocess.Popen([metalearn_executable(), "train", *FAST], cwd=tmp_path, env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    runs = sorted(p.parent.parent for p in (tmp_path / "outputs").rglob(".hydra/config.yaml"))
    assert len(runs) == 3 and all((r / "test.json").exists() for r in runs)


def test_a_taken_dated_folder_gets_a_suffix_and_an_explicit_one_is_refused(tmp_path):
    guard = RunFolderGuard()

    def config(run_dir, explicit):
        overrides = [f"hydra.run.dir={run_dir}"] if explicit else []
        return OmegaConf.create({"hydra": {"run": {"dir": str(run_dir)}, "overrides": {"hydra": overrides}}})

    first, second = config(tmp_path / "12-00-00", False), config(tmp_path / "12-00-00", False)
    guard.on_run_start(first)
    guard.on_run_start(second)
    assert first.hydra.run.dir == str(tmp_path / "12-00-00") and second.hydra.run.dir == str(tmp_path / "12-00-00-1")
    with pytest.raises(SystemExit):
        guard.on_run_start(config(tmp_path / "12-00-00", True))


def test_concurrent_evals_of_one_checkpoint(tmp_path, trained_run):
    trained_run.copy_to(tmp_path / "run")  # conftest's short training run (FAST), whose folder eval writes into
    ckpt = f"ckpt={tmp_path}/run/checkpoints/last.ckpt"
    procs = [subprocess.Popen([metalearn_executable(), "eval", ckpt, f"eval.num_tasks={n}", "algo.eval_inner_steps=2"],
                              cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in (20, 30)]
    for proc in procs:
        proc.communicate(timeout=300)
        assert proc.returncode == 0
    report = json.loads((tmp_path / "run" / "eval.json").read_text())  # whole, from one of the two
    assert report["num_tasks"] in (20, 30) and len(report["per_step"]) == 3
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.startswith(".eval.json")]
    history = [json.loads(line) for line in (tmp_path / "run" / "evals.jsonl").read_text().splitlines()]
    assert sorted(h["num_tasks"] for h in history) == [20, 30]  # both kept, neither line torn


# -- random overrides from the real config groups -----------------------------------------------
OVERRIDES = st.fixed_dictionaries(
    {},
    optional={
        "algo": st.sampled_from(["maml", "fomaml", "reptile", "finetune", "protonet"]),
        "model": st.sampled_from(["mlp", "conv4", "resnet"]),
        "sampler.shots": st.sampled_from(["-1", "0", "1", "3", "abc"]),
        "sampler.queries": st.sampled_from(["0", "2", "null"]),
        "sampler.ways": st.sampled_from(["null", "1", "3"]),
        "sampler.meta_batch_size": st.sampled_from(["0", "1", "2"]),
        "algo.inner_lr": st.sampled_from(["-0.5", "0", "0.01", "1e12", "fast"]),
        "algo.inner_steps": st.sampled_from(["-1", "0", "1", "2"]),
        "algo.eval_inner_steps": st.sampled_from(["0", "1", "2"]),
        "algo.vectorize": st.sampled_from(["auto", "batched", "vmap", "loop", "gpu"]),
        "trainer.max_steps": st.sampled_from(["0", "1", "2"]),
        "seed": st.sampled_from(["-3", "0", "7"]),
    },
)


#: derandomize=True seeds Hypothesis with a hash of the test's source, so editing the test draws other
#: examples; this is that seed of the test as it was when its 12 examples ran as subprocesses, so the
#: same 12 override sets are tried (one of them, algo=protonet alone, failed with a traceback then).
SEED_OF_THE_SUBPROCESS_VERSION = 2727887639828013632520915787894269922042871077236295778019739455567376178561850724841141287263981687280470153980991


@seed(SEED_OF_THE_SUBPROCESS_VERSION)
@settings(max_examples=12, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(OVERRIDES)
def test_random_overrides_train_or_fail_cleanly(tmp_path_factory, overrides):
    cwd = tmp_path_factory.mktemp("random")
    args = [f"{k}={v}" for k, v in overrides.items()]
    proc = metalearn_in_process("train", "trainer.val_check_interval=1", "eval.num_tasks=3", "eval.val_tasks=3",
                                "trainer.enable_progress_bar=false", "trainer.max_steps=1", *args, cwd=cwd)
    err = proc.stderr
    if proc.returncode == 0:
        assert list(cwd.rglob("test.json")), "a run that succeeds leaves its result"
        return
    assert "Traceback" not in err, f"{args}\n{err}"
    named = [k for k in overrides if k in err or k.split(".")[0] in err]
    assert named, f"the error names none of the keys {args}:\n{err}"
