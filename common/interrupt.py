"""An operator's request to stop a run (Ctrl-C, SIGTERM): set where the signal arrives, honoured where the run waits.

Before a run has begun there is nothing to keep, so a request interrupts at once
(:class:`RunInterrupted`, a ``KeyboardInterrupt``). Inside :meth:`StopRequest.graceful` (the
federation) it only sets a flag: the coordinator sees it at its next wait for the sites,
abandons the round in progress (its number is never reused) and ends the run as
"interrupted", resumable from its last completed round.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class RunInterrupted(KeyboardInterrupt):
    """The operator asked the run to stop."""


class StopRequest:
    """A stop flag that a signal handler sets and the run's waits read."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._graceful = 0
        self.reason = ""

    def request(self, reason: str) -> None:
        """Ask the run to stop (from a signal handler, in the main thread): at once unless inside ``graceful()``."""
        self.reason = self.reason or reason
        self._event.set()
        if not self._graceful:
            raise RunInterrupted(self.reason)

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True as soon as a stop is requested."""
        return self._event.wait(seconds)

    def check(self) -> None:
        """Raise :class:`RunInterrupted` if a stop was requested."""
        if self._event.is_set():
            raise RunInterrupted(self.reason)

    @contextmanager
    def graceful(self) -> Iterator[None]:
        """While inside, a request only sets the flag: the code running here stops at its next wait."""
        self._graceful += 1
        try:
            yield
        finally:
            self._graceful -= 1
