"""Keep the console readable: drop third-party notices that do not concern a metalearn user."""

from __future__ import annotations

import logging
import warnings

_NOTICES = (
    "Tip: For seamless",  # Lightning advertising its cloud logger
    "`weights_only` was not set",
)


class _DropNotices(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(notice in message for notice in _NOTICES)


def quiet_third_party() -> None:
    for name in ("pytorch_lightning", "lightning.pytorch", "pytorch_lightning.utilities.rank_zero",
                 "pytorch_lightning.trainer.connectors.checkpoint_connector"):
        logging.getLogger(name).addFilter(_DropNotices())
    # The run folder already holds .hydra/ and train.log when the CSV logger starts: expected.
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)")
    # One meta-batch per step, produced in the main process on purpose (see samplers.py).
    warnings.filterwarnings("ignore", message=r".*does not have many workers")
    warnings.filterwarnings("ignore", message=r".*IterableDataset.*has `__len__` defined")
    # Validation/test summaries are gathered from every rank before logging: already in sync.
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")
    warnings.filterwarnings("ignore", message=r"You have overridden `transfer_batch_to_device`.*")
