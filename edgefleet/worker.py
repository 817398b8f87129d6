"""One lifecycle for every long-lived loop of the agent and the server.

A `Worker` runs a step function on a named daemon thread, again and again:
one `interval` after the previous step ended, or sooner when woken (`wake`).
Its state goes NEW -> RUNNING -> STOPPING -> STOPPED, once.

The policy is log-and-continue: a step that raises an `Exception` the step
itself did not handle (an `OSError` from a full disk, a database gone away,
a bug) is logged at ERROR with its traceback, counted in `failures`, handed to
the `on_failure` hook, and the worker goes on: the next step runs one interval
later. The same failure again (same class, same message) is only logged at
DEBUG, so a database that stays unreadable fills no log with one traceback a
second; a different one is logged in full, and the first success after
failures is logged once at INFO. The next step runs one interval later,
however often the worker is woken meanwhile, so a step that keeps failing
never spins. Only what is not an `Exception` (`SystemExit`, `KeyboardInterrupt`)
ends the thread, logged at CRITICAL; `alive` then turns False, which is what
the agent's systemd watchdog watches. `healthy` also says whether the last
step succeeded.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class WorkerState(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class Worker:
    """A step function run repeatedly on a thread of its own. See the module docstring."""

    def __init__(
        self,
        name: str,
        step: Callable[[], object],
        interval: float,
        on_failure: Callable[[Worker, Exception], None] | None = None,
    ) -> None:
        self.name = name
        self.interval = interval
        self.failures = 0
        self.last_failure: Exception | None = None
        self._failing = False  # the last step failed
        self._last_problem = ""  # the failure last logged in full, while failing
        self._step = step
        self._on_failure = on_failure
        self._state = WorkerState.NEW
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    @property
    def state(self) -> WorkerState:
        return self._state

    @property
    def alive(self) -> bool:
        """Whether the worker runs: started, not stopped, and its thread not ended."""
        return self._state is WorkerState.RUNNING and self._thread.is_alive()

    @property
    def healthy(self) -> bool:
        """Alive, and its last step did not fail."""
        return self.alive and not self._failing

    def start(self) -> None:
        """Run the first step at once, then the next ones on schedule.

        Raises:
            RuntimeError: the worker was started before.
        """
        if self._state is not WorkerState.NEW:
            raise RuntimeError(f"worker {self.name} was already started")
        self._state = WorkerState.RUNNING
        self._thread.start()

    def wake(self) -> None:
        """Run the next step now rather than at the end of the interval (any thread)."""
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Let the running step finish, run no further one, and join the thread for up
        to `timeout` seconds. Idempotent; a worker never started just becomes STOPPED."""
        if self._state is WorkerState.NEW:
            self._state = WorkerState.STOPPED
            return
        if self._state is WorkerState.RUNNING:
            self._state = WorkerState.STOPPING
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._wake.clear()
                if self._run_step():
                    self._wake.wait(self.interval)  # a stop wakes it too
                else:
                    self._stop.wait(self.interval)  # a wake does not shorten it
        except BaseException:
            log.critical("%s ended: no further step runs", self.name, exc_info=True)
        finally:
            self._state = WorkerState.STOPPED

    def _run_step(self) -> bool:
        """Run one step; False when it failed (logged, counted and reported)."""
        try:
            self._step()
        except Exception as exc:
            self.failures += 1
            self.last_failure = exc
            self._failing = True
            problem = f"{type(exc).__name__}: {exc}"
            if problem == self._last_problem:
                log.debug("%s failed again: %s", self.name, problem)
            else:
                self._last_problem = problem
                log.exception("%s failed; retrying in %.1f s", self.name, self.interval)
            self._report(exc)
            return False
        if self._failing:
            log.info("%s works again", self.name)
        self._failing = False
        self._last_problem = ""
        return True

    def _report(self, exc: Exception) -> None:
        if self._on_failure is None:
            return
        try:
            self._on_failure(self, exc)
        except Exception:
            log.exception("%s: its failure hook failed", self.name)


__all__ = ["Worker", "WorkerState"]
