"""Clean stops: SIGINT/SIGTERM set a flag the loops check, instead of killing them mid-write.

The first signal asks the run to stop: the loop abandons the candidates still running (every
finished one is already in the fitness cache), keeps its last checkpoint and returns, so
``evo resume`` continues exactly. A second SIGINT raises ``KeyboardInterrupt`` at once, for a
user who does not want to wait. Handlers are installed only in the main thread (Python allows
no other) and the previous ones are restored on exit.
"""
from __future__ import annotations

import signal
import threading
import time


class StopSignals:
    def __init__(self, signals=(signal.SIGINT, signal.SIGTERM)):
        self.signals = tuple(signals)
        self.received: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum
        print(f"\n{signal.Signals(signum).name} received: stopping after checkpointing "
              "(press Ctrl-C again to abort at once)", flush=True)

    def requested(self) -> bool:
        return self.received is not None

    def sleep(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, waking early on a stop request; returns whether one came."""
        end = time.monotonic() + seconds
        while not self.requested() and time.monotonic() < end:
            time.sleep(min(0.2, max(end - time.monotonic(), 0.0)))
        return self.requested()
