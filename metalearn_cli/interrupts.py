"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM (what SLURM sends before a time limit, on scancel and
on preemption) without losing it: the current meta-iteration finishes, `last.ckpt` is written, and
the command exits with a message saying how to resume. A second Ctrl-C stops at once.

Lightning installs a SIGTERM handler of its own when fit starts. Under DDP that handler runs a
collective (a broadcast) inside the signal handler and raises on each rank at whichever step that
rank notices, so a SIGTERM that reaches every rank at once (scancel) left the ranks waiting for one
another forever. `StopRequest.claim` takes SIGTERM back once Lightning has installed its handler:
both signals then go through the one decision that every rank takes together (checkpointing.py)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any


class StopRequest:
    """Context manager that turns SIGINT/SIGTERM into a flag checked between meta-iterations."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now
        self.signal = signum

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def __enter__(self) -> "StopRequest":
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def claim(self) -> None:
        """Handle SIGINT and SIGTERM here again, replacing handlers installed since `__enter__`
        (Lightning's, which restores ours when fit ends)."""
        for signum in self._previous:
            signal.signal(signum, self._handle)

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


class StoppedDuringValidation(Exception):
    """Raised on a single device when a stop is requested in the middle of a validation: the weights
    are those of the last finished meta-iteration, saved on the way out (RunCheckpoints.on_exception)."""


@contextmanager
def scoring_ends_on_sigterm(saved: str, speak: bool = True) -> Iterator[None]:
    """Scoring the test tasks (after training, or `metalearn eval`) under Lightning's SIGTERM handler,
    which stops it at the next batch: exit 143 with a message saying what is kept, not a traceback.
    Nothing is lost here; the scoring just has to be run again. (Ctrl-C is Lightning's too: exit 1.)"""
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    try:
        yield
    except SIGTERMException:
        if speak:
            print(f"Stopped by SIGTERM while scoring the test tasks; nothing was written. {saved}", file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
