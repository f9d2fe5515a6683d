"""Errors a user can fix, reported as one clear paragraph without a traceback."""

from __future__ import annotations

import functools
import sys
from typing import Any, Callable


class MetalearnError(Exception):
    """A problem with the user's input or environment, with a message that says how to fix it."""


def report(error: BaseException) -> None:
    message = str(error).strip()
    print(f"Error: {message}", file=sys.stderr)


def exits_cleanly(task: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a MetalearnError raised by a command into its message and exit status 2."""

    @functools.wraps(task)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return task(*args, **kwargs)
        except MetalearnError as error:
            report(error)
            sys.exit(2)

    return wrapper
