"""``environment(NAME=value, ...)``: environment variables set inside a ``with`` block and put back
as they were after it (the A/B rows and sweep variants that force one attention path)."""

from __future__ import annotations

import contextlib
import os


@contextlib.contextmanager
def environment(**values: str):
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
