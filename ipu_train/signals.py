"""SIGTERM (how clusters and spot instances stop jobs) and SIGINT (Ctrl-C) during training ask the run to stop at the
end of the current device-iteration group, with a checkpoint; the trainer then exits with 128 + the signal number.
The same signal again, a second or more later, ends the process at once. Within that second it is the same request:
torchrun relays a terminal's Ctrl-C to workers that have already received it from the terminal."""
import logging
import os
import signal
import threading
import time

logger = logging.getLogger("ipu_train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
RELAY_WINDOW_SECONDS = 1.0


class StopRequest:
    """Installed around the training loop (a context manager); `signal_number` is set once a stop is asked for."""

    def __init__(self, then="stopping after the current group of steps, with a checkpoint"):
        self.then = then  # what the run does when asked to stop, for the log
        self.signal_number = None
        self._first_at = None
        self._previous = {}

    def __enter__(self):
        self._pid = os.getpid()  # data-loader workers forked later inherit the handler: only this process logs
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc):
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}
        return False

    @property
    def requested(self):
        return self.signal_number is not None

    def _handle(self, number, frame):
        now = time.monotonic()
        if self.signal_number is None:
            self.signal_number, self._first_at = number, now
            if os.getpid() == self._pid:
                logger.warning("%s received: %s. Send it again to stop at once.", signal.Signals(number).name,
                               self.then)
        elif now - self._first_at > RELAY_WINDOW_SECONDS:
            os._exit(128 + number)
