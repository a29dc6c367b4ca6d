"""Checking a name against a fixed set of choices, with the nearest valid name suggested."""

from __future__ import annotations

import difflib


def check_choice(owner: str, argument: str, value, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``; otherwise raise a ValueError that names
    ``owner`` and ``argument`` and suggests the closest valid choice (difflib)."""
    if isinstance(value, str) and value in choices:
        return value
    close = difflib.get_close_matches(value.lower(), choices, n=1) if isinstance(value, str) else []
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"{owner}: argument '{argument}' must be one of {choices}, got {value!r}.{hint}")
