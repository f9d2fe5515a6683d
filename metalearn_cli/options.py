"""How an owner checks its own settings: each class validates the arguments its config gives it, in
its constructor, with these helpers. They raise `OptionError`, which names the key relative to the
owner ("inner_lr"); `build.py` adds the config group ("algo.inner_lr") when it builds the owner, so
the user reads one paragraph with the full key, the value and what is allowed, and exit status 2.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from metalearn_cli.errors import MetalearnError


class OptionError(MetalearnError, ValueError):
    """A bad setting. `template` holds `{p}` before each key, the owner's config group once known."""

    def __init__(self, template: str, prefix: str = "") -> None:
        self.template = template
        super().__init__(template.format(p=prefix))

    def under(self, group: str) -> "OptionError":
        return OptionError(self.template, f"{group}.")


def _literal(text: str) -> str:
    """`text` kept as it is by the template's str.format (values and hints may hold braces: dicts, configs)."""
    return text.replace("{", "{{").replace("}", "}}")


def invalid(key: str, value: Any, allowed: str) -> OptionError:
    return OptionError(f"invalid value for `{{p}}{key}`: {_literal(repr(value))}. Allowed: {_literal(allowed)}. "
                       f"Set it on the command line, e.g. `{{p}}{key}=...`.")


def choice(key: str, value: Any, choices: Sequence[str]) -> Any:
    if value not in choices:
        raise invalid(key, value, "one of " + ", ".join(choices))
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(key: str, value: Any, meaning: str, minimum: int = 1, optional: bool = False) -> int | None:
    """An integer >= minimum (None allowed where optional)."""
    if value is None and optional:
        return None
    if not _is_int(value) or value < minimum:
        raise invalid(key, value, f"an integer >= {minimum} ({meaning})")
    return int(value)


def number(key: str, value: Any, meaning: str, minimum: float = 0.0, strict: bool = True, optional: bool = False) -> float | None:
    """A finite number > minimum (>= minimum unless strict; None allowed where optional)."""
    if value is None and optional:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= minimum if strict else value < minimum):
        raise invalid(key, value, f"a finite number {'>' if strict else '>='} {minimum:g} ({meaning})")
    return float(value)
