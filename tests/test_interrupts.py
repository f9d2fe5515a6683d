"""Real signals sent to a real training process: the run stops cleanly and resumes exactly."""

import os
import signal
import subprocess
import time

import pytest
import torch

from conftest import metalearn_executable

COMMON = ["trainer.val_check_interval=100000", "trainer.enable_progress_bar=false", "eval.num_tasks=4",
          "eval.val_tasks=4", "checkpoint.every_n_steps=1000000"]


def _start(tmp_path, *args):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    # a session of its own: a test that fails can kill every rank the run started (see _finish)
    return subprocess.Popen([metalearn_executable(), "train", *COMMON, *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


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
def test_a_signal_saves_last_ckpt_and_the_run_resumes(tmp_path, run_cli, signum):
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
    run_cli("train", *COMMON, f"trainer.max_steps={stopped_at + 3}", f"ckpt_path={last}", "hydra.run.dir=resumed",
            check=True)
    assert torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=True)["global_step"] == stopped_at + 3


def test_a_signal_to_rank_zero_alone_stops_every_rank_after_the_same_meta_iteration(tmp_path):
    """`kill <pid>` reaches the main process (rank 0) only; the other rank must stop with it rather than
    wait forever in the next meta-iteration's all-reduce while rank 0 saves."""
    proc = _start(tmp_path, "trainer=ddp_cpu", "sampler.meta_batch_size=4", "trainer.max_steps=1000000",
                  "trainer.log_every_n_steps=1", "hydra.run.dir=run")
    _wait_for_training(proc, tmp_path, "run", timeout=300)
    proc.send_signal(signal.SIGINT)
    # both ranks write to these pipes: this returns once every rank has exited
    out, err = _finish(proc, timeout=180)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err
    assert err.count("Resume with: ") == 1, "one message, from rank 0"
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] >= 1
    assert f"after meta-iteration {checkpoint['global_step']};" in err
