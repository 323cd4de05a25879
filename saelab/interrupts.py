"""Interrupts held over a C library's section: Ctrl-C (SIGINT) and SIGTERM kept, then delivered where it is safe.

Python runs a signal handler between two bytecodes, so a KeyboardInterrupt can be raised inside a Python
function that a C library called back (h5py building a file): the library then reports an error of its own
(a ``TypeError: Operation not defined for data type class`` from h5py's type conversion) or loses the
interrupt. Inside ``held()`` a SIGINT or SIGTERM does not raise: it is kept, the section polls
``Held.check()`` where raising is safe (h5py's file callbacks keep the exception they raise), and a signal
that arrived and was not raised there is delivered to the handler that was in place when the section ends.

One of the bottom modules (it imports nothing of saelab). Outside the main thread a signal handler cannot
be installed, and nothing is held.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator

#: the signals a section holds: Ctrl-C, and SIGTERM, which the CLI turns into a Ctrl-C
HELD = (signal.SIGINT, signal.SIGTERM)


class Held:
    """The signals that arrived during a ``held()`` section, in order, and whether one was raised already."""

    def __init__(self) -> None:
        self.arrived: list[int] = []
        self.raised = False

    def _keep(self, signum, frame) -> None:
        self.arrived.append(signum)

    def check(self) -> None:
        """Raise the KeyboardInterrupt of a signal that arrived (once): where the caller can stop safely."""
        if self.arrived and not self.raised:
            self.raised = True
            raise KeyboardInterrupt


@contextlib.contextmanager
def held() -> Iterator[Held]:
    """Hold SIGINT and SIGTERM over the section; the first one that arrived and was not raised by ``check()`` goes
    to the previous handler when the section ends (a Python handler is called; the default action is taken by
    sending the signal again once the default handler is back; an ignored signal stays ignored)."""
    h = Held()
    if threading.current_thread() is not threading.main_thread():
        yield h
        return
    previous = {s: signal.signal(s, h._keep) for s in HELD}
    try:
        yield h
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if h.arrived and not h.raised:  # delivered now, as if it came now (an error of the section is its context)
            _deliver(h.arrived[0], previous[h.arrived[0]])


def _deliver(signum: int, handler) -> None:
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        os.kill(os.getpid(), signum)
