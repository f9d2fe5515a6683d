"""Real signals sent to real training and scoring processes: a run stops cleanly and resumes exactly,
and a stopped scoring says so instead of exiting 0.

The process that receives the signal is always a real `metalearn` process (the installed command);
the resume that follows runs in the test process (conftest.metalearn_in_process)."""

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import metalearn_executable

COMMON = ["trainer.val_check_interval=100000", "trainer.enable_progress_bar=false", "eval.num_tasks=4",
          "eval.val_tasks=4", "checkpoint.every_n_steps=1000000"]


def _start(tmp_path, *args, common=COMMON, stdout=subprocess.PIPE, stderr=subprocess.PIPE):
    # FORCE_COLOR: Lightning's Rich progress bar is drawn as it goes (not only at the end) into a file
    env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1", FORCE_COLOR="1")
    # a session of its own: a test that fails can kill every rank the run started (see _finish)
    return subprocess.Popen([metalearn_executable(), "train", *common, *args], cwd=tmp_path, env=env,
                            stdout=stdout, stderr=stderr, text=True, start_new_session=True)


def _finish(proc, timeout: float) -> tuple[str, str]:
    """The run's output once every process writing to its pipes has exited; on a timeout, kill them all."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise AssertionError(f"the run did not exit within {timeout} s of the signal")


def _wait_for_training(proc, tmp_path, run: str, timeout: float = 120) -> None:
    """Until the CSV logger has written a training row (the run is inside fit)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        metrics = tmp_path / run / "metrics.csv"
        if metrics.exists() and "train/loss" in metrics.read_text():
            return
        time.sleep(0.2)
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"training did not start: {proc.communicate()[1][-2000:]}")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_last_ckpt_and_the_run_resumes(tmp_path, metalearn, signum):
    proc = _start(tmp_path, "trainer.max_steps=1000000", "trainer.log_every_n_steps=5", "hydra.run.dir=run")
    _wait_for_training(proc, tmp_path, "run")
    proc.send_signal(signum)
    out, err = _finish(proc, timeout=120)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    # the command to resume names the run's own overrides (not its run folder, which a resume may not reuse)
    command = err.split("Resume with: ")[1].strip().splitlines()[0]
    assert command.startswith("metalearn train ") and "trainer.max_steps=1000000" in command
    assert "trainer.log_every_n_steps=5" in command and "hydra.run.dir" not in command
    assert command.endswith(f"ckpt_path={tmp_path / 'run' / 'checkpoints' / 'last.ckpt'}")
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    stopped_at = checkpoint["global_step"]
    assert stopped_at >= 5
    assert not list((tmp_path / "run" / "checkpoints").glob(".*tmp*")), "no temporary files left behind"
    # no validation on the way out (Lightning validates when asked to stop early; val_check_interval is far away)
    assert "val/" not in (tmp_path / "run" / "metrics.csv").read_text()
    # it resumes and continues counting
    metalearn("train", *COMMON, f"trainer.max_steps={stopped_at + 3}", f"ckpt_path={last}", "hydra.run.dir=resumed",
              check=True)
    assert torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=True)["global_step"] == stopped_at + 3


def _signal_during_the_first_validation(tmp_path, signum, *args, every_rank=False, val_tasks=300,
                                       phase="Validation") -> str:
    """Start a run that validates after meta-iteration 3 for seconds (tasks one at a time, 50 steps
    each; `args` override these settings), send `signum` once that validation (or the `phase`
    Lightning's progress bar names) has started, and return the run's stderr."""
    common = [c for c in COMMON if not c.startswith(("trainer.val_check_interval", "trainer.enable_progress_bar",
                                                         "eval.val_tasks"))]
    stdout_path, stderr_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with stdout_path.open("w") as stdout, stderr_path.open("w") as stderr:
        defaults = ["trainer.val_check_interval=3", "trainer.enable_progress_bar=true", f"eval.val_tasks={val_tasks}",
                    "eval.batch_tasks=1", "algo.eval_inner_steps=50", "trainer.max_steps=1000000",
                    "trainer.log_every_n_steps=1", "hydra.run.dir=run"]
        named = {a.partition("=")[0] for a in args}
        proc = _start(tmp_path, *[d for d in defaults if d.partition("=")[0] not in named], *args,
                      common=common, stdout=stdout, stderr=stderr)
        deadline = time.time() + 300
        while phase not in stdout_path.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)  # Lightning's progress bar (on stdout) says when the first validation starts
        if proc.poll() is not None or phase not in stdout_path.read_text():
            _finish(proc, timeout=1)
            raise AssertionError(f"no {phase} started: {stderr_path.read_text()[-2000:]}")
        if every_rank:
            os.killpg(proc.pid, signum)
        else:
            proc.send_signal(signum)
        _finish(proc, timeout=180)
    err = stderr_path.read_text()
    assert proc.returncode == 128 + signum, err[-2000:]
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_during_a_validation_stops_there_without_another_meta_iteration(tmp_path, signum):
    """A validation of 600 Omniglot tasks takes ~95 s on a CPU, longer than SLURM's grace period: a stop
    asked for in the middle of one ends it there, saves the weights it was scoring (those of the last
    meta-iteration), and runs no further meta-iteration."""
    err = _signal_during_the_first_validation(tmp_path, signum)
    assert "after meta-iteration 3;" in err
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3
    # the interrupted validation logged nothing (finishing it would log val/ at 3, then train a 4th time)
    assert "val/" not in (tmp_path / "run" / "metrics.csv").read_text()


def test_sigterm_while_scoring_the_test_tasks_after_training_says_what_is_kept(tmp_path):
    """The time limit can fall while `metalearn train` scores its test tasks: the training is finished
    and saved, the message says so and how to score it, and the exit status says SIGTERM."""
    err = _signal_during_the_first_validation(tmp_path, signal.SIGTERM, "trainer.max_steps=2", "eval.num_tasks=300",
                                              phase="Testing")
    best = tmp_path / "run" / "checkpoints" / "last.ckpt"  # no validation ran: the best is the last
    assert f"score it with: metalearn eval ckpt={best}" in err
    assert torch.load(best, weights_only=True)["global_step"] == 2
    assert not (tmp_path / "run" / "test.json").exists()


def test_sigterm_to_every_ddp_rank_during_a_validation_stops_before_the_next_meta_iteration(tmp_path):
    """Under DDP the ranks score different numbers of validation chunks (301 tasks: 151 and 150), so
    they finish the validation and decide together at its end; none trains a 4th meta-iteration."""
    err = _signal_during_the_first_validation(tmp_path, signal.SIGTERM, "trainer=ddp_cpu", "sampler.meta_batch_size=4",
                                              every_rank=True, val_tasks=301)
    assert err.count("Resume with: ") == 1 and "after meta-iteration 3;" in err
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 3


@pytest.mark.parametrize("signum, every_rank", [(signal.SIGINT, False), (signal.SIGTERM, True)],
                         ids=["sigint-to-rank-0", "sigterm-to-every-rank"])
def test_a_signal_under_ddp_stops_every_rank_after_the_same_meta_iteration(tmp_path, signum, every_rank):
    """`kill <pid>` reaches the main process (rank 0) only; the other rank must stop with it rather than
    wait forever in the next meta-iteration's all-reduce while rank 0 saves. SLURM's scancel (and a
    preemption) sends SIGTERM to every process of the job at once, which Lightning also forwards from rank 0."""
    proc = _start(tmp_path, "trainer=ddp_cpu", "sampler.meta_batch_size=4", "trainer.max_steps=1000000",
                  "trainer.log_every_n_steps=1", "hydra.run.dir=run")
    _wait_for_training(proc, tmp_path, "run", timeout=300)
    if every_rank:
        os.killpg(proc.pid, signum)  # the run's own session: rank 0 and the rank it launched
    else:
        proc.send_signal(signum)
    # both ranks write to these pipes: this returns once every rank has exited
    out, err = _finish(proc, timeout=180)
    assert proc.returncode == 128 + signum, err
    assert "Traceback" not in err
    assert err.count("Resume with: ") == 1, "one message, from rank 0"
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] >= 1
    assert f"after meta-iteration {checkpoint['global_step']};" in err


def _catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler installed for `signum` (Linux's /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux's /proc to see when scoring starts")
def test_sigterm_during_metalearn_eval_exits_143_and_writes_nothing(tmp_path, trained_run):
    """Lightning's SIGTERM exception is a SystemExit without a code: uncaught, `metalearn eval` stopped by
    a time limit exited 0, wrote nothing and said nothing, so a job script took it for a success."""
    trained_run.copy_to(tmp_path / "run")  # conftest's short training run, never evaluated
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    before = (tmp_path / "run" / "evals.jsonl").exists()
    assert not before and not (tmp_path / "run" / "eval.json").exists()
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([metalearn_executable(), "eval", f"ckpt={ckpt}", "eval.num_tasks=3000", "eval.batch_tasks=1",
                             "algo.eval_inner_steps=50"], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not _catches(proc.pid, signal.SIGTERM):
        time.sleep(0.05)  # nothing in metalearn eval handles SIGTERM before Lightning's scoring loop does
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGTERM)
    out, err = _finish(proc, timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and "Stopped by SIGTERM while scoring" in err and f"score {ckpt}" in err
    assert not (tmp_path / "run" / "eval.json").exists()
    assert (tmp_path / "run" / "evals.jsonl").exists() == before
