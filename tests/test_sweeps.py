"""Launchers, sweepers and reports: Hydra's joblib, submitit and Optuna plugins, `metalearn report`.

Every sweep (-m, or the Optuna sweeper) is a real `metalearn` process, as launchers start jobs in
processes of their own; printing a config, reports and the errors raised before anything runs are
run in the test process (conftest.metalearn_in_process)."""

import csv
import json
from pathlib import Path

import pytest
import yaml

from conftest import assert_clean_error
from metalearn_cli.cli import missing_plugin

QUICK = ["trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.enable_progress_bar=false",
         "eval.num_tasks=4", "eval.val_tasks=4", "trainer.log_every_n_steps=1"]


def runs_in(folder: Path) -> list[Path]:
    return sorted(p.parent.parent for p in folder.rglob(".hydra/config.yaml"))


def test_joblib_sweep_and_its_report(run_cli, metalearn, tmp_path):
    sweep = tmp_path / "sweep"
    run_cli("train", "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "algo.inner_lr=0.01,0.02",
            *QUICK, f"hydra.sweep.dir={sweep}", check=True, timeout=600)
    runs = runs_in(sweep)
    assert len(runs) == 2 and all((r / "test.json").exists() for r in runs)
    # the HParams tab: hyperparameters and final metrics are in the TensorBoard events
    events = b"".join(p.read_bytes() for p in (runs[0] / "tensorboard").glob("events.*"))
    assert b"hparams" in events and b"hp/test_mse" in events

    proc = metalearn("report", str(sweep), check=True)
    for name in ("report.md", "report.csv", "report_val_curves.png", "report_algo_inner_lr.png", "report_sinusoid.png"):
        assert (sweep / name).stat().st_size > 0, name
    with (sweep / "report.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["algo.inner_lr"] for r in rows] != [] and len(rows) == 2
    means = [float(r["test mse ± 95% CI"].split(" ± ")[0]) for r in rows]
    assert means == sorted(means), "best (lowest MSE) first"
    assert rows[0]["steps"] == "4" and float(rows[0]["wall time (s)"]) >= 0
    assert "algo.inner_lr" in proc.stdout


def test_submitit_local_job(run_cli, tmp_path):
    sweep = tmp_path / "sweep"
    run_cli("train", "-m", "hydra/launcher=submitit_local", "seed=3", *QUICK, f"hydra.sweep.dir={sweep}",
            check=True, timeout=600)
    [run] = runs_in(sweep)
    assert json.loads((run / "test.json").read_text())["seed"] == 3
    assert (sweep / ".submitit").is_dir()


def test_slurm_launcher_asks_one_task_per_device(metalearn):
    out = metalearn("train", "hydra/launcher=submitit_slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2",
                    "--cfg", "all", "--resolve", check=True).stdout
    launcher = yaml.safe_load(out)["hydra"]["launcher"]
    assert launcher["tasks_per_node"] == 4 and launcher["gpus_per_node"] == 4 and launcher["nodes"] == 2


def test_optuna_search_minimises_the_validation_metric(run_cli, tmp_path):
    sweep = tmp_path / "search"
    run_cli("train", "hparams_search=optuna", "hydra.sweeper.n_trials=2", *QUICK, f"hydra.sweep.dir={sweep}",
            check=True, timeout=600)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"algo.inner_lr", "algo.outer_lr"}
    best_vals = [json.loads((r / "test.json").read_text())["best_val"] for r in runs_in(sweep)]
    assert results["best_value"] == pytest.approx(min(best_vals))


def test_a_local_sweep_of_multi_process_runs_is_refused(run_cli, tmp_path):
    """Also the end-to-end proof that a MetalearnError raised after Lightning has built a Trainer ends the
    installed command with exit status 2 and a message, no traceback."""
    proc = run_cli("train", "-m", "trainer=ddp_cpu", "seed=0,1", "sampler.meta_batch_size=4", *QUICK,
                   f"hydra.sweep.dir={tmp_path}/sweep", timeout=300)
    assert_clean_error(proc, "-m sweep", "submitit_slurm", status=2)
    assert not list(tmp_path.rglob("*.ckpt")) and not (tmp_path / "multirun").exists()


def test_missing_plugins_name_the_package(metalearn):
    assert "hydra-joblib-launcher" in missing_plugin(["hydra/launcher=joblib"], importable=lambda m: False)
    assert "hydra-optuna-sweeper" in missing_plugin(["hparams_search=optuna"], importable=lambda m: False)
    assert missing_plugin(["hydra/launcher=joblib", "algo=maml"], importable=lambda m: True) is None
    proc = metalearn("train", "-m", "hydra/launcher=ray")
    assert proc.returncode == 2 and "pip install hydra-ray-launcher" in proc.stderr and "Traceback" not in proc.stderr


def test_report_of_a_folder_without_runs(metalearn, tmp_path):
    proc = metalearn("report", str(tmp_path))
    assert proc.returncode == 2 and "no runs found" in proc.stderr and "Traceback" not in proc.stderr
