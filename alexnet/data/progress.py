"""How far a long data step has got (decoding image N of M), told to whoever listens: a
cell's progress events, the command line's bars, or nobody. The data code reports; it
does not know who shows it.

The listener is set per context (``reporting_to``) rather than passed down every call,
because the data that a cell opens is memoized per process and its test split is decoded
lazily, long after it was opened: whoever is running when the work happens hears of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

Report = Callable[[str, int, int], None]  # (what, done, total), e.g. ("decoding train", 512, 50000)

_listener: ContextVar[Report | None] = ContextVar("alexnet_data_progress", default=None)


@contextlib.contextmanager
def reporting_to(listener: Report) -> Iterator[None]:
    """Within the block, data work in this thread reports to ``listener``."""
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)


def report(what: str, done: int, total: int) -> None:
    listener = _listener.get()
    if listener is not None:
        listener(what, done, total)
