"""The `metalearn` command: its help and config printing, a training run scored by `metalearn eval`,
sweeps, resume, and every algorithm on the real Omniglot data.

Commands run in the test process (conftest.metalearn_in_process) unless the process is the point:
the installed console script run from a temporary directory, and the -m sweep. (Other real
`metalearn` processes train and evaluate in test_robustness, test_interrupts, test_distributed and
test_sweeps.)"""

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import FAST, run_folders


def test_help_lists_config_groups_and_options(metalearn):
    out = metalearn("train", "--help", check=True).stdout
    assert "algo: anil, finetune, fomaml, maml, mamlpp, metasgd, protonet, reptile" in out
    assert "data: cifar_fs, folder, halfcheetah_dir, halfcheetah_vel, miniimagenet, mnist, nav2d, omniglot, sinusoid" in out
    assert "model: conv4, gaussian_mlp, mlp" in out and "logger: csv, tensorboard" in out
    assert "trainer: cpu, ddp, ddp_cpu, default, gpu" in out and "hparams_search: optuna" in out
    assert "usage: metalearn" in metalearn("--help", check=True).stdout


def test_cfg_job_prints_the_composed_config_and_runs_nothing(metalearn, tmp_path):
    proc = metalearn("train", "algo=reptile", "sampler.shots=3", "--cfg", "job", check=True)
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["algo"]["_target_"].endswith("Reptile") and cfg["sampler"]["shots"] == 3
    assert not (tmp_path / "outputs").exists()


def test_configs_are_found_from_any_directory(run_cli, tmp_path):
    """The installed console script, started from an empty temporary directory."""
    out = run_cli("train", "--info", "searchpath", check=True).stdout
    assert "pkg://metalearn_cli.configs" in out


def test_train_then_eval(metalearn, tmp_path, trained_run):
    """`metalearn train` (conftest's trained_run, shared with the other tests that need a checkpoint),
    then `metalearn eval`."""
    run = trained_run.folder
    assert run.parent.parent.name == "outputs"  # outputs/<date>/<time>
    last_line = trained_run.stdout.strip().splitlines()[-1]
    assert last_line.startswith("test mse after 10 steps") and str(run) in last_line

    assert (run / ".hydra" / "overrides.yaml").exists()
    for name in ("last.ckpt", "best.ckpt"):
        ckpt = torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)
        assert ckpt["metalearn"]["config"]["sampler"]["train_shots"] == 10
        assert ckpt["optimizer_states"], "checkpoints keep the optimizer state (for resume)"
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"train/loss", "val/mse", "val/mse_ci95", "test/mse"} <= set(header)
    test = json.loads((run / "test.json").read_text())
    assert test["num_tasks"] == 8 and len(test["per_step"]) == 11

    run = trained_run.copy_to(tmp_path / "run")  # eval writes into the run folder: the shared run stays as it is
    proc = metalearn("eval", f"ckpt={run}/checkpoints/last.ckpt", "algo.eval_inner_steps=3",
                     "eval.num_tasks=12", "sampler.shots=3", check=True)
    report = json.loads((run / "eval.json").read_text())
    for key in ("metric", "mean", "ci95", "num_tasks", "inner_steps", "per_step", "ckpt", "algo", "data"):
        assert key in report
    assert report["metric"] == "mse" and report["algo"] == "maml" and report["data"] == "sinusoid"
    assert report["num_tasks"] == 12 and report["inner_steps"] == 3 and report["shots"] == 3
    assert [row["step"] for row in report["per_step"]] == [0, 1, 2, 3]
    assert report["mean"] == report["per_step"][-1]["mean"] and report["ci95"] > 0
    assert Path(report["ckpt"]) == run / "checkpoints" / "last.ckpt"
    assert "± " in proc.stdout and "step" in proc.stdout

    # the default eval scores 600 tasks (not the 8 of the short training run); same tasks each time
    metalearn("eval", f"ckpt={run}/checkpoints/best.ckpt", "algo.eval_inner_steps=1", check=True)
    first = json.loads((run / "eval.json").read_text())
    assert first["num_tasks"] == 600
    metalearn("eval", f"ckpt={run}/checkpoints/best.ckpt", "algo.eval_inner_steps=1", check=True)
    assert json.loads((run / "eval.json").read_text())["per_step"] == first["per_step"]
    # eval.json is the latest; evals.jsonl keeps every evaluation, the 5-shot one included
    history = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    assert [(h["shots"], h["num_tasks"], h["inner_steps"]) for h in history] == [(3, 12, 3), (5, 600, 1), (5, 600, 1)]
    assert history[0]["per_step"] == report["per_step"] and history[-1]["per_step"] == first["per_step"]
    assert Path(history[1]["ckpt"]).name == "best.ckpt" and all(h["evaluated_at"] for h in history)
    # the training run's files are untouched by eval
    assert yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text()) == FAST


def test_multirun_writes_one_folder_per_job(run_cli, tmp_path):
    sweep = tmp_path / "sweep"
    run_cli("train", "-m", "algo=maml,reptile", "seed=0,1", *FAST, "eval.num_tasks=4",
            f"hydra.sweep.dir={sweep}", check=True, timeout=600)
    runs = run_folders(sweep)
    assert len(runs) == 4
    seen = set()
    for run in runs:
        overrides = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
        seen.add(tuple(o for o in overrides if o.startswith(("algo=", "seed="))))
        assert (run / "checkpoints" / "last.ckpt").exists() and (run / "test.json").exists()
    assert seen == {("algo=maml", "seed=0"), ("algo=maml", "seed=1"), ("algo=reptile", "seed=0"), ("algo=reptile", "seed=1")}


def test_resume_continues_the_run(metalearn, tmp_path):
    common = ["trainer.val_check_interval=100", "trainer.enable_progress_bar=false", "eval.num_tasks=4",
              "eval.val_tasks=4", "checkpoint.every_n_steps=5"]
    metalearn("train", "trainer.max_steps=10", *common, "hydra.run.dir=full", check=True)
    metalearn("train", "trainer.max_steps=5", *common, "hydra.run.dir=first", check=True)
    proc = metalearn("train", "trainer.max_steps=10", *common, "hydra.run.dir=resumed",
                     f"ckpt_path={tmp_path}/first/checkpoints/last.ckpt", check=True)
    assert "settings that differ from its run's: trainer.max_steps: 5 -> 10." in proc.stderr  # and nothing else
    full = torch.load(tmp_path / "full/checkpoints/last.ckpt", weights_only=True)
    resumed = torch.load(tmp_path / "resumed/checkpoints/last.ckpt", weights_only=True)
    assert resumed["global_step"] == 10
    for key, value in full["state_dict"].items():
        torch.testing.assert_close(resumed["state_dict"][key], value, rtol=0, atol=0)
    # the first run's folder is kept as it was
    assert torch.load(tmp_path / "first/checkpoints/last.ckpt", weights_only=True)["global_step"] == 5


def omniglot_args(cache_dir):
    from conftest import OMNIGLOT

    return ["data=omniglot", f"data.root={OMNIGLOT}", f"data.cache_dir={cache_dir}", "sampler.meta_batch_size=2",
            "trainer.max_steps=4", "trainer.val_check_interval=2", "eval.val_tasks=4", "eval.num_tasks=6",
            "eval.batch_tasks=3", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1"]


@pytest.mark.parametrize("algo", ["maml", "reptile", "finetune"])
def test_omniglot_train_and_eval(metalearn, tmp_path, algo, omniglot_cache):
    args = omniglot_args(omniglot_cache)
    proc = metalearn("train", *args, f"algo={algo}", "algo.eval_inner_steps=2", "hydra.run.dir=run", check=True)
    assert "test acc after 2 steps" in proc.stdout.strip().splitlines()[-1]
    test = json.loads((tmp_path / "run" / "test.json").read_text())
    assert test["metric"] == "acc" and test["ways"] == 5 and test["shots"] == 1 and 0 <= test["mean"] <= 1
    assert Path(test["ckpt"]).name == "best.ckpt" and test["train_on"] == "train"
    # MAML's evaluation may adapt other parameters than its training did (ANIL-style scoring), on record
    extra = ["algo.inner_params=head"] if algo == "maml" else []
    metalearn("eval", f"ckpt={tmp_path}/run/checkpoints/last.ckpt", "sampler.shots=5", "eval.num_tasks=4",
              "algo.eval_inner_steps=1", *extra, check=True)
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert report.get("inner_params") == ("head" if algo == "maml" else None)
    assert report["data"] == "omniglot" and report["shots"] == 5 and report["num_tasks"] == 4
    assert len(report["per_step"]) == 2
    # how the tasks were adapted is on record (tuning/reptile_omniglot adapts with Adam, as the Reptile paper)
    assert report["eval_inner_lr"] > 0 and report["eval_inner_optimizer"] == ("adam" if algo == "reptile" else "sgd")
    if algo == "finetune":  # which of Baseline / Baseline++ the number belongs to
        assert (report["head"], report["finetune_backbone"], report["eval_momentum"]) == ("linear", False, 0.9)
    if algo == "reptile":  # keys only Reptile's config has: eval composes with the checkpoint's algorithm
        metalearn("eval", f"ckpt={tmp_path}/run/checkpoints/last.ckpt", "sampler.shots=5", "eval.num_tasks=4",
                  "algo.eval_inner_steps=1", "algo.eval_inner_optimizer=adam", "algo.eval_inner_batch_size=3", check=True)
        report = json.loads((tmp_path / "run" / "eval.json").read_text())
        assert (report["eval_inner_optimizer"], report["eval_inner_batch_size"]) == ("adam", 3)
        # tuning/reptile_omniglot carries Adam's state out of meta-training into each test task's adaptation
        carried = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True)["state_dict"]
        steps = next(int(v) for k, v in carried.items() if k.endswith("inner_state.t"))
        assert report["eval_adam_start"] == "carried" and report["eval_adam_carried_steps"] == steps > 0


def test_training_on_trainval_scores_the_last_checkpoint(metalearn, tmp_path, omniglot_cache):
    """data.train_on=trainval meta-trains on the validation characters too, so validation no longer
    measures generalisation: the run scores last.ckpt, not the best-validation checkpoint."""
    metalearn("train", *omniglot_args(omniglot_cache), "data.train_on=trainval", "algo.eval_inner_steps=1",
              "hydra.run.dir=run", check=True)
    test = json.loads((tmp_path / "run" / "test.json").read_text())
    assert Path(test["ckpt"]) == tmp_path / "run" / "checkpoints" / "last.ckpt" and test["train_on"] == "trainval"
    assert (tmp_path / "run" / "checkpoints" / "best.ckpt").exists() and test["steps"] == 4
