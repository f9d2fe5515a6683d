"""Stopping a run on SIGINT (Ctrl-C) or SIGTERM (what SLURM sends before a time limit) without
losing it: the current meta-iteration finishes, `last.ckpt` is written, and the command exits with
a message saying how to resume. A second Ctrl-C stops at once."""

from __future__ import annotations

import signal
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

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
