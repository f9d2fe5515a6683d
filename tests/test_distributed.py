"""Two gloo ranks on the CPU follow the same math as one process (issue: DDP).

The DDP runs are real processes (Lightning starts the second rank by re-running the command); the
single-process runs they are compared with, and the refused configuration, run in the test process."""

import pytest
import torch

from conftest import assert_clean_error

COMMON = ["trainer.val_check_interval=100000", "trainer.enable_progress_bar=false", "eval.num_tasks=4",
          "eval.val_tasks=4", "sampler.meta_batch_size=4"]


@pytest.mark.parametrize("algo", ["maml", "reptile"])
def test_two_ranks_make_the_same_first_meta_update_as_one_process(run_cli, metalearn, tmp_path, algo):
    metalearn("train", *COMMON, f"algo={algo}", "trainer.max_steps=1", "hydra.run.dir=single", check=True)
    proc = run_cli("train", *COMMON, f"algo={algo}", "trainer.max_steps=1", "trainer=ddp_cpu", "hydra.run.dir=ddp",
                   check=True, timeout=600)
    assert "Starting with 2 processes" in proc.stdout + proc.stderr
    single = torch.load(tmp_path / "single/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    ddp = torch.load(tmp_path / "ddp/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    for key, value in single.items():
        torch.testing.assert_close(ddp[key], value, rtol=1e-5, atol=1e-6)
    test_single = (tmp_path / "single/test.json").read_text()
    assert '"num_tasks": 4' in test_single and '"num_tasks": 4' in (tmp_path / "ddp/test.json").read_text()


def test_meta_batch_must_split_evenly_across_ranks(metalearn, tmp_path):
    proc = metalearn("train", *COMMON, "sampler.meta_batch_size=3", "trainer.max_steps=1", "trainer=ddp_cpu")
    assert_clean_error(proc, "sampler.meta_batch_size", "3")
    assert not list(tmp_path.rglob("*.ckpt"))
