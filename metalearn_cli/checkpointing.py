"""Checkpoints of a run: `last.ckpt` every `every_n_steps` meta-iterations and at the end,
`best.ckpt` whenever the validation metric improves. Each file is written to a temporary name
and renamed, so an interrupted write never leaves a corrupt checkpoint behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from metalearn_cli.interrupts import StoppedDuringValidation


class RunCheckpoints(pl.Callback):
    def __init__(
        self, dirpath: str | Path, monitor: str, mode: str, every_n_steps: int, stop: Any = None, keep_all: bool = False
    ) -> None:
        self.dirpath = Path(dirpath)
        #: also keep every periodic checkpoint as step-NNNNNNN.ckpt (for learning curves, or to restart from any of them)
        self.keep_all = keep_all
        #: a StopRequest: when set, save last.ckpt after the current meta-iteration and stop
        self.stop = stop
        self.monitor = monitor
        self.mode = mode
        self.every_n_steps = every_n_steps
        self.best_score: float | None = None
        self.best_step: int | None = None
        self._last_saved_step = -1
        #: True once training stopped on a StopRequest (of this rank or of another)
        self.stopped = False

    @property
    def last_path(self) -> Path:
        return self.dirpath / "last.ckpt"

    @property
    def best_path(self) -> Path:
        return self.dirpath / "best.ckpt"

    def save(self, trainer: pl.Trainer, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            os.replace(tmp, path)

    def save_last(self, trainer: pl.Trainer) -> None:
        self.save(trainer, self.last_path)
        self._last_saved_step = trainer.global_step
        if self.keep_all and trainer.is_global_zero:
            kept = self.dirpath / f"step-{trainer.global_step:07d}.ckpt"
            tmp = kept.with_name(f".{kept.name}.tmp-{os.getpid()}")
            shutil.copyfile(self.last_path, tmp)
            os.replace(tmp, kept)

    def _improved(self, score: float) -> bool:
        if score != score or score in (float("inf"), float("-inf")):
            return False  # a diverged validation is never the best
        if self.best_score is None:
            return True
        return score < self.best_score if self.mode == "min" else score > self.best_score

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.stop is not None:
            self.stop.claim()  # SIGTERM back from Lightning's handler (interrupts.py says why)

    def _stopping(self, trainer: pl.Trainer) -> bool:
        """Whether any rank was asked to stop. Collective: every rank calls it at the same point.
        Every rank stops after the same meta-iteration: saving is collective (a barrier), so a rank that
        saw the signal one meta-iteration later would wait forever in the next step's all-reduce.
        One rank's signal is enough (`kill` of the main process reaches no other rank)."""
        requested = self.stop is not None and self.stop.requested
        return trainer.strategy.reduce_boolean_decision(requested, all=False)

    def _stop(self, trainer: pl.Trainer) -> None:
        if self._last_saved_step != trainer.global_step:
            self.save_last(trainer)
        self.stopped = True
        # Lightning validates when `should_stop` is set (for early stopping); on the way out that is
        # a full validation (600 tasks: ~95 s on a CPU) inside SLURM's grace period, for a number the
        # resumed run measures anyway at its next validation.
        trainer.limit_val_batches = 0
        trainer.should_stop = True

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if self._stopping(trainer):
            self._stop(trainer)
        elif self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0:
            self.save_last(trainer)

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        # A stop asked for during a validation (600 tasks: ~95 s on a CPU) need not wait for its end on
        # one device. Under DDP the ranks score different numbers of chunks, so no collective can run
        # here; they decide together when the validation ends (on_validation_end).
        if (self.stop is not None and self.stop.requested and trainer.world_size == 1
                and trainer.state.fn == "fit" and not trainer.sanity_checking):
            raise StoppedDuringValidation()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # a stop requested during validation: the weights are those of the last finished meta-iteration
        if self.stop is not None and self.stop.requested and self._last_saved_step != trainer.global_step:
            self.save_last(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.state.fn != "fit":
            return
        score = trainer.callback_metrics.get(self.monitor)
        if score is not None and self._improved(float(score)):
            self.best_score, self.best_step = float(score), trainer.global_step
            self.save(trainer, self.best_path)
        if self._stopping(trainer):  # asked during this validation: stop before the next meta-iteration
            self._stop(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last_saved_step != trainer.global_step:
            self.save_last(trainer)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # no meta-iteration ran (trainer.max_steps=0, e.g. the untrained policy of the MAML paper's "random"
        # row): the initialisation is the run's model, saved so that it is tested and can be scored again.
        # Decided from state every rank shares (saving is collective): rank 0 may not have renamed the file yet.
        if self._last_saved_step != trainer.global_step and not self.stopped:
            self.save_last(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_step": self.best_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best_score = state_dict.get("best_score")
        self.best_step = state_dict.get("best_step")

