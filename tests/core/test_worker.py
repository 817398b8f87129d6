"""The worker lifecycle: new -> running -> stopping -> stopped, and log-and-continue."""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Callable

import pytest

from edgefleet.worker import Worker, WorkerState

WAIT = 10.0
LONG = 3600.0  # an interval no test waits out


class Steps:
    """A step function that counts its runs and fails (or blocks) when told to."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)  # raised by the first runs, in order
        self.runs = 0
        self.release: threading.Event | None = None  # when set: each run waits for it
        self._changed = threading.Condition()

    def __call__(self) -> None:
        with self._changed:
            self.runs += 1
            self._changed.notify_all()
        if self.release is not None:
            self.release.wait(WAIT)
        if self.failures:
            raise self.failures.pop(0)

    def wait_for(self, runs: int) -> bool:
        with self._changed:
            return self._changed.wait_for(lambda: self.runs >= runs, WAIT)


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_lifecycle_runs_at_once_and_when_woken_and_stops_by_joining() -> None:
    steps = Steps()
    worker = Worker("edgefleet-test", steps, LONG)
    seen = [(worker.state, worker.alive)]
    worker.start()
    assert steps.wait_for(1)  # the first step at once
    seen.append((worker.state, worker.alive))
    assert worker.healthy
    assert any(t.name == "edgefleet-test" and t.daemon for t in threading.enumerate())
    worker.wake()
    assert steps.wait_for(2)  # long before the interval
    with pytest.raises(RuntimeError, match="already started"):
        worker.start()
    worker.stop()
    seen.append((worker.state, worker.alive))
    assert seen == [
        (WorkerState.NEW, False),
        (WorkerState.RUNNING, True),
        (WorkerState.STOPPED, False),
    ]
    assert not any(t.name == "edgefleet-test" for t in threading.enumerate())
    worker.stop()  # idempotent


def test_stop_lets_the_running_step_finish() -> None:
    steps = Steps()
    steps.release = threading.Event()
    worker = Worker("edgefleet-test", steps, LONG)
    worker.start()
    assert steps.wait_for(1)
    worker.stop(timeout=0.05)  # the step still runs: the join times out
    assert worker.state is WorkerState.STOPPING and not worker.alive
    steps.release.set()
    assert wait_until(lambda: worker.state is WorkerState.STOPPED)
    assert steps.runs == 1  # no step after the stop


def test_a_worker_never_started_stops_at_once() -> None:
    worker = Worker("edgefleet-test", Steps(), LONG)
    worker.stop()
    assert worker.state is WorkerState.STOPPED
    with pytest.raises(RuntimeError):
        worker.start()


def test_a_foreign_error_is_logged_counted_reported_and_survived(
    caplog: pytest.LogCaptureFixture,
) -> None:
    full = OSError(errno.ENOSPC, "No space left on device")
    steps = Steps(full)
    reported: list[tuple[Worker, Exception]] = []
    worker = Worker("edgefleet-test", steps, 0.05, lambda w, exc: reported.append((w, exc)))
    with caplog.at_level(logging.ERROR, logger="edgefleet.worker"):
        worker.start()
        assert steps.wait_for(2)  # the next step runs, one interval later
        assert wait_until(lambda: worker.healthy)
        worker.stop()
    assert worker.failures == 1 and worker.last_failure is full
    assert reported == [(worker, full)]
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.exc_info is not None and record.exc_info[1] is full  # with its traceback
    assert "edgefleet-test failed" in record.getMessage()


def test_the_same_failure_again_is_logged_in_full_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A database that stays unreadable: one traceback, not one per step.
    unreadable = [OSError("database disk image is malformed") for _ in range(5)]
    failing_disk = [OSError("disk I/O error") for _ in range(2)]
    steps = Steps(*unreadable, *failing_disk)
    worker = Worker("edgefleet-test", steps, 0.01)
    with caplog.at_level(logging.INFO, logger="edgefleet.worker"):
        worker.start()
        assert steps.wait_for(8)
        assert wait_until(lambda: worker.healthy)
        worker.stop()
    assert worker.failures == 7
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.exc_info[1] for r in errors if r.exc_info] == [unreadable[0], failing_disk[0]]
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.INFO] == [
        "edgefleet-test works again"
    ]


def test_a_failing_step_is_not_run_again_before_its_interval_however_often_woken() -> None:
    steps = Steps(*[OSError("broken")] * 100)
    worker = Worker("edgefleet-test", steps, LONG)
    worker.start()
    assert steps.wait_for(1)
    assert wait_until(lambda: worker.failures == 1)
    assert not worker.healthy and worker.alive
    for _ in range(50):
        worker.wake()
    time.sleep(0.3)
    assert steps.runs == 1  # the failure's back-off holds; it does not spin
    worker.stop()
    assert worker.state is WorkerState.STOPPED  # a stop is not held by the back-off


def test_a_failing_hook_does_not_end_the_worker(caplog: pytest.LogCaptureFixture) -> None:
    def broken_hook(worker: Worker, exc: Exception) -> None:
        raise ValueError("the hook is broken too")

    steps = Steps(OSError("once"))
    worker = Worker("edgefleet-test", steps, 0.05, broken_hook)
    worker.start()
    assert steps.wait_for(2)
    assert worker.alive
    worker.stop()
    assert any("its failure hook failed" in r.getMessage() for r in caplog.records)


def test_what_is_not_an_exception_ends_the_worker_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    steps = Steps(SystemExit(3))
    worker = Worker("edgefleet-test", steps, 0.05)
    worker.start()
    assert wait_until(lambda: worker.state is WorkerState.STOPPED)
    assert not worker.alive and not worker.healthy and steps.runs == 1
    [record] = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert "edgefleet-test ended" in record.getMessage()
