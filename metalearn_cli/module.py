"""The Lightning module: one training step is one meta-iteration; validation and test adapt
to fixed tasks and report the metric after each inner step, and the task's further scores after the
last (classification: macro-F1, mean per-class recall), with 95% confidence intervals."""

from __future__ import annotations

import math
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.plugins.precision import Precision
from torch import nn

from metalearn_cli.algorithms.base import Algorithm, Evaluation
from metalearn_cli.functional import FunctionalModel
from metalearn_cli.distributed import (all_reduce_advance_, all_reduce_weighted_mean_, gather_rows, is_distributed,
                                       weighted_mean_over_ranks)
from metalearn_cli.errors import MetalearnError
from metalearn_cli.masks import MASKS, ParameterMasks
from metalearn_cli.run_folder import CHECKPOINT_KEY
from metalearn_cli.stats import summarize
from metalearn_cli.tasks import Objective, Tasks


class NonFiniteLoss(MetalearnError):
    pass


class MetaLearner(pl.LightningModule):
    def __init__(
        self,
        model: nn.Module,
        algorithm: Algorithm,
        objective: Objective,
        metadata: dict,
        extras: dict[str, nn.Module] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.extras = nn.ModuleDict(extras or {})  # e.g. the pre-training head of Baseline/Baseline++
        self.algorithm = algorithm
        self.objective = objective
        self.fmodel = FunctionalModel(self.model, self.extras[MASKS] if MASKS in self.extras else None)
        self.metadata = metadata
        self.automatic_optimization = False  # Reptile's update is not a loss; MAML's is one backward
        self._evaluations: dict[str, list[Evaluation]] = {"val": [], "test": []}
        self._plain_backward = False
        self._last_log_time: float | None = None
        self.summaries: dict[str, dict] = {}
        #: the last evaluation's [tasks, steps + 1] scores per split, in the order the ranks' shares are gathered
        self.task_scores: dict[str, torch.Tensor] = {}
        trust_region = getattr(algorithm, "trust_region", None)
        if trust_region is not None:
            # a TRPO step's gradient, Fisher products and line search are the whole meta-batch's, and under
            # DDP each rank holds a part: the ranks combine them as they combine any step (by the parts' sizes)
            trust_region.reduce = weighted_mean_over_ranks

    # -- pruning -----------------------------------------------------------------------------
    @property
    def pruning(self) -> ParameterMasks | None:
        return self.fmodel.pruning

    def prune(self, masks: ParameterMasks) -> None:
        """Make the model a pruned one: its masked weights are set to zero now and stay zero through every inner
        step and meta-update that follows; the masks are saved in checkpoints (`extras.masks.*`)."""
        masks = masks.to(next(self.model.parameters()).device)
        self.extras[MASKS] = masks
        self.fmodel.pruning = masks
        masks.zero_(self.model)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """A pruned model's checkpoint brings its masks: they are made (with the right shapes) before loading, so
        `metalearn eval`, a resume and a further compression of it keep them."""
        if self.pruning is None:
            masks = ParameterMasks.in_state_dict(self.model, state_dict, f"extras.{MASKS}.")
            if masks is not None:
                self.prune(masks)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- optimisation ------------------------------------------------------------------------
    def on_train_start(self) -> None:
        precision = self.trainer.precision_plugin
        self._plain_backward = type(precision) is Precision and self.trainer.strategy.model is self

    def configure_optimizers(self) -> Any:
        return self.algorithm.configure_optimizers(self.parameters(), self.trainer.max_steps)

    def training_step(self, batches: list[Tasks], batch_idx: int) -> None:
        """Runs the meta-iterations of one Lightning step (see `iterations_per_batch`): Lightning's
        loop costs ~0.5 ms per step, which a sinusoid meta-iteration of ~2 ms should not pay alone."""
        done = 0
        for batch in batches:
            if self.global_step >= self.trainer.max_steps:
                break
            self._meta_iteration(batch)
            done += 1
        if done > 1:
            # Lightning numbers logged points by its count of stepped batches: keep it at meta-iterations
            self.trainer.fit_loop.epoch_loop._batches_that_stepped += done - 1

    def _meta_iteration(self, batch: Tasks) -> None:
        optimizer = self.optimizers()
        # step counts; pruning masks (boolean) are fixed, the same in every rank
        counters = [b for b in self.buffers() if not b.is_floating_point() and b.dtype != torch.bool] if is_distributed() else []
        before = [c.clone() for c in counters]
        step = self.algorithm.meta_step(self.fmodel, batch, iteration=self.global_step)
        optimizer.zero_grad(set_to_none=True)
        if step.loss is not None:
            self._check_finite(step.loss)
            if self._plain_backward:  # full precision, no wrapper: skip Lightning's hooks (~10% of a sinusoid step)
                step.loss.backward()
            else:
                self.manual_backward(step.loss)
        else:
            for name, parameter in self.model.named_parameters():
                parameter.grad = step.direction[name].to(parameter.dtype)
            self._check_finite(step.metrics["loss"])
        # each rank's step is a mean over its part of the meta-batch: weighted by the parts' sizes, the
        # ranks' gradients (and logged metrics) combine into the mean over the whole meta-batch
        weight = step.weight_on(batch)
        metrics = {k: v.detach().clone() for k, v in step.metrics.items()}
        all_reduce_weighted_mean_([p.grad for p in self.parameters()] + list(metrics.values()), weight)
        if self.pruning is not None:
            self.pruning.zero_grads_(self.model)
        optimizer.step()  # Lightning counts this call as one global step
        if self.pruning is not None:  # whatever the optimizer's update (a direction, momentum, weight decay)
            self.pruning.zero_(self.model)
        self.algorithm.record_statistics(self.fmodel, batch)
        # Running statistics (batch norm's, Reptile's carried Adam moments) are moving averages that one
        # process updates task after task, which no mean of the ranks' reproduces exactly. Weighted, each
        # rank's estimate counts as the tasks it saw, and a pre-training batch's running mean is exact
        # (the update is linear in the batch mean, the share-weighted mean of the parts' means).
        all_reduce_weighted_mean_([b for b in self.buffers() if b.is_floating_point()], weight)
        all_reduce_advance_(counters, before)  # step counts: one process counts every rank's steps
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        every = self.trainer.log_every_n_steps
        if self.global_step % every == 0:  # Lightning writes logs only then
            now = time.perf_counter()
            values = {f"train/{k}": v for k, v in metrics.items()}
            values["train/lr"] = optimizer.param_groups[0]["lr"]
            if self._last_log_time is not None:
                values["train/seconds_per_iteration"] = (now - self._last_log_time) / every
            self._last_log_time = now
            self.log_dict(values, prog_bar=True, batch_size=batch.num_tasks)

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        if isinstance(batch, Tasks):  # a direct move: Lightning's generic one deep-copies the dataclass
            return batch.to(device)
        if isinstance(batch, list) and all(isinstance(b, Tasks) for b in batch):
            return [b.to(device) for b in batch]
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def _check_finite(self, loss: torch.Tensor) -> None:
        if not math.isfinite(loss.item()):
            raise NonFiniteLoss(
                f"the meta-training loss became {loss.item()} at meta-iteration {self.global_step}. "
                f"This usually means a learning rate is too large (algo.inner_lr={self.algorithm.inner_lr}, "
                f"algo.outer_lr={self.algorithm.outer_lr}); lower it and train again. "
                "The checkpoints already written in the run folder are kept."
            )

    # -- evaluation -------------------------------------------------------------------------
    def _eval_step(self, split: str, batch: Tasks) -> None:
        self._evaluations[split].append(self.algorithm.evaluation(self.fmodel, batch))

    def _eval_end(self, split: str) -> dict:
        evaluations, self._evaluations[split] = self._evaluations[split], []
        scores = _gathered([e.scores for e in evaluations])
        self.task_scores[split] = scores.cpu()
        # every rank gathers the same names, in the same order, whether or not it scored any task
        report = {name: _gathered([e.report[name] for e in evaluations]).cpu() for name in self.objective.report_names}
        summary = summarize(scores.cpu(), self.objective.metric_name, report)
        self.summaries[split] = summary
        name = self.objective.metric_name
        values = {
            f"{split}/{name}": summary["mean"],
            f"{split}/{name}_ci95": summary["ci95"],
            f"{split}/{name}_step0": summary["per_step"][0]["mean"],
        }
        for reported in report:
            values[f"{split}/{reported}"] = summary[reported]["mean"]
            values[f"{split}/{reported}_ci95"] = summary[reported]["ci95"]
        self.log_dict(values, sync_dist=False, rank_zero_only=True)
        return summary

    def validation_step(self, batch: Tasks, batch_idx: int) -> None:
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val")

    def test_step(self, batch: Tasks, batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test")

    # -- checkpoints ------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[CHECKPOINT_KEY] = self.metadata


def _gathered(rows: list[torch.Tensor]) -> torch.Tensor:
    """The rows every rank holds (each rank scored its own share of the tasks, maybe none), in rank order."""
    mine = torch.cat(rows) if rows else torch.empty(0)
    parts = [p for p in gather_rows(mine) if p.numel()]
    return torch.cat([p.reshape(-1, *parts[0].shape[1:]) for p in parts])
