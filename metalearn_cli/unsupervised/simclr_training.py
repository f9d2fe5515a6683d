"""The SimCLR encoder's Lightning run: a stream of random batches of the pool, a module that augments each
batch twice on the run's device and minimises NT-Xent, and a quiet Trainer logging the loss of each step.

Every draw is a function of (seed, step): which images a batch holds, both views' augmentations, and (from
the seed) the networks' initialisation, so a rerun on the CPU trains the same encoder. Nothing here touches
the process's global random generators, which the caller's own run has seeded.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path
from typing import Iterator

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import CSVLogger
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from metalearn_cli.models import Conv4
from metalearn_cli.samplers import derive_seed
from metalearn_cli.unsupervised.augment import Augmentation
from metalearn_cli.unsupervised.simclr import build_networks, nt_xent

# the second part of each derived seed, so that no two draws of a run share one
_INIT, _BATCH, _VIEW_1, _VIEW_2 = 0, 1, 2, 3


class RandomBatches(IterableDataset):
    """Endless (step, images) batches: `batch_size` distinct images of the pool for each step, drawn with a
    generator seeded by (seed, step)."""

    def __init__(self, images: Tensor, batch_size: int, seed: int) -> None:
        self.images = images
        self.batch_size = batch_size
        self.seed = seed

    def indices(self, step: int) -> Tensor:
        generator = torch.Generator().manual_seed(derive_seed(self.seed, _BATCH, step))
        return torch.randperm(self.images.shape[0], generator=generator)[: self.batch_size]

    def __iter__(self) -> Iterator[tuple[int, Tensor]]:
        step = 0
        while True:
            yield step, self.images[self.indices(step).to(self.images.device)]
            step += 1


class SimCLRModule(pl.LightningModule):
    def __init__(self, encoder: Conv4, projection: torch.nn.Module, augment: Augmentation, seed: int,
                 temperature: float, lr: float) -> None:
        super().__init__()
        self.encoder = encoder
        self.projection = projection
        self.augment = augment
        self.seed = seed
        self.temperature = temperature
        self.lr = lr

    def training_step(self, batch: tuple[int, Tensor], batch_index: int) -> Tensor:
        step, images = batch
        step = int(step)
        images = images.float()
        views = torch.cat([self.augment(images, derive_seed(self.seed, _VIEW_1, step)),
                           self.augment(images, derive_seed(self.seed, _VIEW_2, step))])
        # both views in one pass: batch norm normalises them with the same statistics
        z = self.projection(self.encoder(views, features_only=True))
        loss = nt_xent(z[: images.shape[0]], z[images.shape[0]:], self.temperature)
        self.log("loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(list(self.encoder.parameters()) + list(self.projection.parameters()), lr=self.lr)


def _accelerator(device: torch.device) -> tuple[str, int | list[int]]:
    if device.type == "cuda":
        return "gpu", [device.index if device.index is not None else torch.cuda.current_device()]
    return device.type, 1


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's notices (devices found, max_steps reached) say nothing about the outer run: hide them."""
    loggers = [logging.getLogger(name) for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric",
                                                    "lightning.fabric")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            # one batch per step made in the main process on purpose; no validation in this run
            warnings.filterwarnings("ignore", message=r".*does not have many workers")
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
            warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def train_encoder(images: Tensor, augment: Augmentation, settings: dict, folder: Path, device: torch.device,
                  progress: bool) -> tuple[Conv4, torch.nn.Module]:
    """Train the encoder and projection head for `settings["steps"]` steps, logging to `folder`/metrics.csv."""
    seed = settings["seed"]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(derive_seed(seed, _INIT))
        encoder, projection = build_networks(tuple(images.shape[1:]), settings["projection_dim"])
        module = SimCLRModule(encoder, projection, augment, seed, settings["temperature"], settings["lr"])
        accelerator, device_ids = _accelerator(device)
        loader = DataLoader(RandomBatches(images, settings["batch_size"], seed), batch_size=None, num_workers=0)
        with _quiet_lightning():
            trainer = pl.Trainer(
                max_steps=settings["steps"], accelerator=accelerator, devices=device_ids,
                logger=CSVLogger(str(folder), name="", version=""), log_every_n_steps=1,
                enable_checkpointing=False, enable_progress_bar=progress, enable_model_summary=False,
                num_sanity_val_steps=0, limit_val_batches=0, default_root_dir=str(folder),
            )
            trainer.fit(module, train_dataloaders=loader)
    return encoder.to(device), projection
