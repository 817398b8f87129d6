"""How the CLI reports errors: one line naming the reason, never a traceback.

A refusal of the input prints `refused [code]: message` (exit status 1) where
code is the error class in kebab case (tampered-file, unknown-key, ...), the
code an API error answer carries too (`edgefleet.wire.error_code`), so scripts
can match on it. The input is refused when a check here refuses it (a core
UntrustedInputError) or when the fleet server does (an answer of
`edgefleet.wire.REFUSALS`: not-found, conflict, bundle-exists, rollout-state,
invalid-request, auth, forbidden, enrollment). Anything else prints `error
[code]: message` (exit status 2): a local problem, click's own usage errors
(`error [usage]: ...`), a server that cannot be reached, is rate limiting, or
failed (storage, an answer that is not the API's).
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import click

from edgefleet.errors import EdgefleetError, LocalError
from edgefleet.wire import error_code, is_refusal

EXIT_REFUSED = 1
EXIT_USAGE = 2

# click >= 8.2 raises it for a group run without a command: it shows the group's help.
_SHOWS_HELP: tuple[type[click.UsageError], ...] = tuple(
    getattr(click.exceptions, name)
    for name in ("NoArgsIsHelpError",)
    if hasattr(click.exceptions, name)
)


class MissingExtraError(LocalError):
    """A command needs a pip extra (agent, server, client, converter) that is not installed."""


class TerminatedError(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised where the command was, so it unwinds as Ctrl-C does."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def abort_on_termination() -> Iterator[None]:
    """Within it, SIGTERM and SIGHUP end the command as SIGINT does: every temporary
    directory and half-written file is removed on the way out, `aborted` is printed and
    the exit status is 128 + the signal (143, 129). For commands that write files (convert,
    bundle build); `server run` and `agent run` handle signals their own way."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def terminate(signum: int, _frame: Any) -> None:
        raise TerminatedError(signum)

    signals = (signal.SIGTERM, signal.SIGHUP)
    previous = {signum: signal.signal(signum, terminate) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


_F = TypeVar("_F", bound=Callable[..., Any])


def aborts_on_termination(command: _F) -> _F:
    """A command callback run within `abort_on_termination`."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with abort_on_termination():
            return command(*args, **kwargs)

    return cast(_F, wrapper)


def _usage_line(exc: click.UsageError) -> str:
    message = exc.format_message().rstrip(".")
    hint = f" (see '{exc.ctx.command_path} -h')" if exc.ctx is not None else ""
    return f"error [usage]: {message}{hint}"


def run_with_error_handling(command: click.Command, args: list[str] | None = None) -> int:
    """Run `command` (with `args`, else sys.argv) and return its exit status."""
    try:
        # Without standalone mode click returns (not raises) the code of a `ctx.exit(n)`.
        result = command.main(args=args, prog_name="edgefleet", standalone_mode=False)
    except click.exceptions.Abort as exc:
        click.echo("aborted", err=True)
        cause = exc.__cause__ or exc.__context__
        return 128 + cause.signum if isinstance(cause, TerminatedError) else 130
    except click.UsageError as exc:
        if isinstance(exc, _SHOWS_HELP):
            exc.show()
        else:
            click.echo(_usage_line(exc), err=True)
        return EXIT_USAGE
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except EdgefleetError as exc:
        if is_refusal(exc):
            click.echo(f"refused [{error_code(exc)}]: {exc}", err=True)
            return EXIT_REFUSED
        click.echo(f"error [{error_code(exc)}]: {exc}", err=True)
        return EXIT_USAGE
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"error [{error_code(exc)}]: {where}{exc.strerror or exc}", err=True)
        return EXIT_USAGE
    return result if isinstance(result, int) else 0
