"""The one place where a composed config becomes objects (every `_target_` is instantiated here).

Building happens in two phases so that bad input fails fast: `build_tasks` (the algorithm, the
sampler, the data and the model: everything a user's settings can get wrong, each owner checking
its own, see `metalearn_cli.options`) needs only torch; `build_experiment` and `build_trainer` then
bring in Lightning.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from metalearn_cli import __version__
from metalearn_cli.config_checks import check_against_data, check_config, iterations_per_batch
from metalearn_cli.errors import MetalearnError
from metalearn_cli.options import OptionError

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from torch import nn

    from metalearn_cli.algorithms.base import Algorithm
    from metalearn_cli.data.base import TaskSource
    from metalearn_cli.datamodule import TaskDataModule
    from metalearn_cli.module import MetaLearner
    from metalearn_cli.samplers import EpisodicSampler


@dataclass
class Experiment:
    source: TaskSource
    sampler: EpisodicSampler
    algorithm: Algorithm
    module: MetaLearner
    datamodule: TaskDataModule


def _build(cfg: DictConfig, group: str, **kwargs):
    """instantiate(cfg.<group>), with a user's mistake reported as a MetalearnError, not a traceback."""
    try:
        return instantiate(cfg[group], _convert_="all", **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, OptionError):  # the owner names its key; the group completes it
            raise cause.under(group) from None
        if isinstance(cause, MetalearnError):
            raise cause from None
        if isinstance(cause, (TypeError, ValueError)):
            raise MetalearnError(
                f"the `{group}` config could not be built: {' '.join(str(cause).split())}. "
                f"Check the `{group}.*` keys (metalearn train --cfg job shows them)."
            ) from None
        raise


def build_part(cfg: DictConfig, group: str, **kwargs):
    """One config group alone, checked like the rest: the data and the sampler `metalearn eval` scores with
    where they are not the checkpoint's (another data set, another number of classes)."""
    return _build(cfg, group, **kwargs)


@dataclass
class Parts:
    """What a user's settings can get wrong, built and checked before Lightning is imported."""

    source: TaskSource
    sampler: EpisodicSampler
    algorithm: Algorithm
    model: nn.Module


def build_tasks(cfg: DictConfig) -> Parts:
    """The algorithm, the sampler, the task distribution and the model, each checking its own settings
    as it is built (no Lightning needed). The cheap ones come first, so that a mistyped value is
    reported before the data is read."""
    check_config(cfg)
    algorithm: Algorithm = _build(cfg, "algo")
    sampler: EpisodicSampler = _build(cfg, "sampler", source=None)
    source: TaskSource = _build(cfg, "data")
    sampler.source = source
    check_against_data(cfg, source.objective)
    if cfg.model.get("_target_", "").endswith("Conv4") and len(source.input_shape) != 3:
        fitting = "gaussian_mlp" if hasattr(source, "check_model") else "mlp"  # RL sources need a policy
        raise MetalearnError(
            f"`model=conv4` needs images, but the data gives inputs of shape {tuple(source.input_shape)}. "
            f"Use model={fitting} for this data, or an image data set (data=omniglot, folder, mnist, cifar_fs, miniimagenet)."
        )
    sampler.check_source(source)
    model = _build(cfg, "model", input_shape=source.input_shape, out_features=source.output_dim(sampler.ways))
    if hasattr(source, "check_model"):  # a source whose tasks need more than outputs (RL: a Gaussian policy)
        source.check_model(model)
    return Parts(source, sampler, algorithm, model)


def build_experiment(cfg: DictConfig, choices: dict | None = None, tasks: Parts | None = None) -> Experiment:
    """Everything a run needs but the Trainer; `tasks` reuses the result of build_tasks."""
    from metalearn_cli.datamodule import TaskDataModule
    from metalearn_cli.module import MetaLearner

    parts = tasks if tasks is not None else build_tasks(cfg)
    source, sampler, algorithm, model = parts.source, parts.sampler, parts.algorithm, parts.model
    metadata = {
        "version": __version__,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "choices": dict(choices or {}),
    }
    extras = algorithm.extra_modules(model, source, sampler)
    module = MetaLearner(model, algorithm, source.objective, metadata, extras)
    datamodule = TaskDataModule(
        sampler,
        seed=cfg.seed,
        task_seed=cfg.eval.task_seed,
        val_tasks=cfg.eval.val_tasks,
        test_tasks=cfg.eval.num_tasks,
        eval_batch_tasks=cfg.eval.batch_tasks,
        iterations_per_batch=iterations_per_batch(cfg),
        # an algorithm may choose what it trains on (algo=finetune: pre-training batches of images)
        train_batch=partial(algorithm.train_batch, sampler) if hasattr(algorithm, "train_batch") else None,
    )
    return Experiment(source, sampler, algorithm, module, datamodule)


def build_trainer(cfg: DictConfig, run_dir: Path | None, experiment: Experiment, training: bool) -> "pl.Trainer":
    """A Lightning Trainer from `cfg.trainer`; loggers and checkpoints only when training."""
    import pytorch_lightning as pl
    from pytorch_lightning.utilities.exceptions import MisconfigurationException

    from metalearn_cli.checkpointing import RunCheckpoints

    callbacks: list[pl.Callback] = []
    loggers = False
    if training:
        objective = experiment.source.objective
        callbacks.append(
            RunCheckpoints(
                run_dir / "checkpoints",
                monitor=f"val/{objective.metric_name}",
                mode=objective.mode,
                every_n_steps=cfg.checkpoint.every_n_steps or 0,
                keep_all=bool(cfg.checkpoint.get("keep_all", False)),
            )
        )
        loggers = [instantiate(conf) for conf in cfg.logger.values()] if cfg.get("logger") else False
    overrides = dict(
        logger=loggers,
        callbacks=callbacks,
        enable_checkpointing=False,  # RunCheckpoints writes the checkpoints (atomically)
        inference_mode=False,  # evaluation adapts with gradients
        use_distributed_sampler=False,  # TaskDataModule shards tasks across ranks itself
        default_root_dir=str(run_dir) if run_dir else None,
    )
    if not training:
        overrides["enable_progress_bar"] = False
    per_batch = experiment.datamodule.iterations_per_batch
    if training and per_batch > 1 and isinstance(cfg.trainer.get("val_check_interval"), int):
        # Lightning counts validation in training steps (batches); each runs `per_batch` meta-iterations
        overrides["val_check_interval"] = cfg.trainer.val_check_interval // per_batch
    try:
        trainer = instantiate(cfg.trainer, **overrides)
    except Exception as error:  # Lightning rejects accelerators and device counts this machine lacks
        cause = error.__cause__ or error
        if not isinstance(cause, (MisconfigurationException, ValueError, RuntimeError)):
            raise
        detail = " ".join(str(cause).split())
        raise MetalearnError(
            f"the trainer cannot start with `trainer.accelerator` = {cfg.trainer.get('accelerator')!r}, "
            f"`trainer.devices` = {cfg.trainer.get('devices')!r}: {detail} "
            "Use devices this machine has (e.g. trainer=cpu, or trainer.devices=1)."
        ) from None
    return trainer
