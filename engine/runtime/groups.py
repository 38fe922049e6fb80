"""Exception groups at the edge of our ``open_*`` context managers.

Runtime layer. trio's nurseries wrap every exception raised inside them in an
``ExceptionGroup``. For our context managers, which run helper tasks beside
the caller's body, a single error (``BatchRejected`` from the caller's own
``ingest``, say) should reach the caller as itself so ``except BatchRejected``
works. Groups of several errors stay groups.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def unwrap_single() -> Iterator[None]:
    try:
        yield
    except BaseExceptionGroup as group:
        if len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
