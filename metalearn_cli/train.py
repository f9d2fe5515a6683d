"""`metalearn train`: compose the config, meta-train, checkpoint, and score the best model on the
fixed test tasks. Returns the best validation metric (what Hydra sweepers optimise)."""

from __future__ import annotations

import shlex
import signal
import sys
import time
from pathlib import Path

from typing import TYPE_CHECKING

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from metalearn_cli.config_checks import check_config, check_resume, check_tuning_override, tuning_options
from metalearn_cli.errors import MetalearnError, exits_cleanly

if TYPE_CHECKING:
    import pytorch_lightning as pl


def group_choices() -> dict:
    choices = HydraConfig.get().runtime.choices
    return {k: v for k, v in choices.items() if not k.startswith("hydra")}


def seed_everything(seed: int) -> None:
    """What pytorch_lightning.seed_everything(seed, workers=True) does, without importing Lightning."""
    import os
    import random

    import numpy as np
    import torch

    os.environ["PL_GLOBAL_SEED"] = str(seed)
    os.environ["PL_SEED_WORKERS"] = "1"
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    check_config(cfg)  # first, and before torch and Lightning are imported: bad input fails in a second
    check_tuning_override(list(HydraConfig.get().overrides.task), tuning_options())
    from metalearn_cli.build import build_tasks
    from metalearn_cli.run_folder import CHECKPOINT_KEY, read_checkpoint, run_dir_of_checkpoint

    choices = group_choices()
    if cfg.ckpt_path is not None:
        record = read_checkpoint(cfg.ckpt_path, "ckpt_path")[CHECKPOINT_KEY]
        changed = check_resume(record["config"], record.get("choices", {}), cfg, choices, str(cfg.ckpt_path),
                               run_dirs=(str(run_dir_of_checkpoint(cfg.ckpt_path)), str(run_dir)))
        if changed:
            print(f"Resuming {cfg.ckpt_path} with settings that differ from its run's: {'; '.join(changed)}.", file=sys.stderr)
    seed_everything(int(cfg.seed))  # before build_tasks builds the model, whose initialisation it fixes
    tasks = build_tasks(cfg)  # every owner's checks, before Lightning is imported
    from metalearn_cli.build import build_experiment, build_trainer
    from metalearn_cli.console import quiet_third_party
    from metalearn_cli.interrupts import scoring_ends_on_sigterm
    from metalearn_cli.run_folder import write_json_atomic
    from metalearn_cli.stats import format_table
    from metalearn_cli.summary import describe_result, run_summary

    quiet_third_party()
    experiment = build_experiment(cfg, choices, tasks)
    # before the run's Trainer exists: CACTUs's SimCLR encoder is a Lightning run of its own
    experiment.sampler.prepare_training()
    trainer = build_trainer(cfg, run_dir, experiment, training=True)
    stop, checkpoints, train_seconds = fit_until_done_or_stopped(trainer, experiment, cfg.ckpt_path)
    if stop.requested or checkpoints.stopped:
        last = checkpoints.last_path
        overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
        by = stop.name or "a signal to another rank"
        message = (
            f"Stopped by {by} after meta-iteration {trainer.global_step}; saved {last}. "
            f"Resume with: metalearn train {' '.join(shlex.quote(o) for o in [*overrides, f'ckpt_path={last}'])}"
        )
        if trainer.is_global_zero:
            print(message, file=sys.stderr)
        sys.exit(128 + (stop.signal or signal.SIGTERM))
    # the best-validation checkpoint, unless meta-training saw the validation classes (data.train_on=trainval)
    held_out = experiment.source.validation_held_out
    best = checkpoints.best_path if held_out and checkpoints.best_path.exists() else checkpoints.last_path
    with scoring_ends_on_sigterm(f"Training finished and {best} is saved; score it with: metalearn eval ckpt={best}",
                                 speak=trainer.is_global_zero):
        trainer.test(experiment.module, datamodule=experiment.datamodule, ckpt_path=str(best), verbose=False, weights_only=True)
    if not trainer.is_global_zero:
        return checkpoints.best_score
    summary = run_summary(experiment, cfg, choices, ckpt=best, split="test")
    summary.update(steps=int(trainer.global_step), train_seconds=round(train_seconds, 1),
                   best_val=checkpoints.best_score, best_step=checkpoints.best_step)
    write_json_atomic(run_dir / "test.json", summary)
    log_hyperparameters(trainer, cfg, choices, summary)
    print(format_table(summary))
    print(f"{describe_result(summary)} | run folder: {run_dir}")
    return objective_value(checkpoints.best_score, experiment.source.objective.mode)


def objective_value(best_val: float | None, mode: str) -> float | None:
    """What sweepers minimise: the best validation metric, negated where larger is better (accuracy)."""
    if best_val is None:
        return None
    return best_val if mode == "min" else -best_val


def fit_until_done_or_stopped(trainer: pl.Trainer, experiment, ckpt_path: str | None):
    """Trainer.fit of `experiment` from `ckpt_path` (None: from the start), ended by its last meta-iteration or
    by a signal (Ctrl-C, SIGTERM: last.ckpt is written). Returns (the StopRequest, which says whether a signal
    came, the RunCheckpoints callback, the seconds fit took)."""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from metalearn_cli.checkpointing import RunCheckpoints
    from metalearn_cli.interrupts import StoppedDuringValidation, StopRequest

    refuse_relaunch_in_a_sweep(trainer)
    checkpoints = next(cb for cb in trainer.callbacks if isinstance(cb, RunCheckpoints))
    started = time.time()
    with StopRequest() as stop:
        checkpoints.stop = stop
        try:
            trainer.fit(experiment.module, datamodule=experiment.datamodule, ckpt_path=ckpt_path, weights_only=True)
        except (SIGTERMException, StoppedDuringValidation):
            pass  # a stop in the middle of a validation (or Lightning's own SIGTERM); last.ckpt is written
    return stop, checkpoints, time.time() - started


def refuse_relaunch_in_a_sweep(trainer: pl.Trainer) -> None:
    """Lightning starts DDP ranks by re-running the command line; inside a local -m sweep every rank
    would start the sweep again (Lightning issue 11300, Hydra issue 2070)."""
    from hydra.types import RunMode
    from pytorch_lightning.strategies.launchers.subprocess_script import _SubprocessScriptLauncher

    if HydraConfig.get().mode == RunMode.MULTIRUN and isinstance(trainer.strategy.launcher, _SubprocessScriptLauncher):
        raise MetalearnError(
            f"a multi-process trainer (trainer.devices={trainer.num_devices}, trainer.num_nodes={trainer.num_nodes}) "
            "cannot run inside a local -m sweep: Lightning starts the other ranks by re-running the command line, "
            "which would start the sweep again in every rank. Run the configurations one by one without -m, or "
            "sweep with hydra/launcher=submitit_slurm, where SLURM starts the ranks of each job."
        )


def log_hyperparameters(trainer: pl.Trainer, cfg: DictConfig, choices: dict, summary: dict) -> None:
    """The run's settings and final metrics in TensorBoard's HParams tab (compare a sweep there)."""
    from pytorch_lightning.loggers import TensorBoardLogger

    flat = {f"group/{k}": v for k, v in choices.items() if v is not None}
    for section in ("algo", "sampler", "model", "trainer", "data"):
        for key, value in (cfg.get(section) or {}).items():
            if not str(key).startswith("_") and isinstance(value, (int, float, str, bool)):
                flat[f"{section}.{key}"] = value
    flat["seed"] = int(cfg.seed)
    metric = summary["metric"]
    metrics = {f"hp/test_{metric}": summary["mean"], f"hp/test_{metric}_ci95": summary["ci95"]}
    if summary.get("best_val") is not None:
        metrics[f"hp/best_val_{metric}"] = summary["best_val"]
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(flat, metrics)
            # written now, not by the writer's background flush after the command has returned (in-process callers)
            logger.finalize("success")


@hydra.main(version_base="1.3", config_path="pkg://metalearn_cli.configs", config_name="train")
@exits_cleanly
def main(cfg: DictConfig) -> float | None:
    return train(cfg)


if __name__ == "__main__":  # DDP's other ranks start here, not through the `metalearn` dispatcher
    from metalearn_cli.allocator import keep_freed_memory

    keep_freed_memory()
    main()
