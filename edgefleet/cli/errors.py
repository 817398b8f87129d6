"""How the CLI reports errors: one line naming the reason, never a traceback.

A refusal prints `refused [code]: message` (exit status 1) where code is the
error class in kebab case (tampered-file, unknown-key, ...), the code an API
error answer carries too (`edgefleet.wire.error_code`), so scripts can match
on it; a local problem prints `error [code]: message` (exit status 2),
click's own usage errors included (`error [usage]: ...`).
"""

from __future__ import annotations

import click

from edgefleet.errors import EdgefleetError, LocalError, UntrustedInputError
from edgefleet.wire import error_code

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


def _usage_line(exc: click.UsageError) -> str:
    message = exc.format_message().rstrip(".")
    hint = f" (see '{exc.ctx.command_path} -h')" if exc.ctx is not None else ""
    return f"error [usage]: {message}{hint}"


def run_with_error_handling(command: click.Command, args: list[str] | None = None) -> int:
    """Run `command` (with `args`, else sys.argv) and return its exit status."""
    try:
        # Without standalone mode click returns (not raises) the code of a `ctx.exit(n)`.
        result = command.main(args=args, prog_name="edgefleet", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
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
    except UntrustedInputError as exc:
        click.echo(f"refused [{error_code(exc)}]: {exc}", err=True)
        return EXIT_REFUSED
    except EdgefleetError as exc:
        click.echo(f"error [{error_code(exc)}]: {exc}", err=True)
        return EXIT_USAGE
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"error [{error_code(exc)}]: {where}{exc.strerror or exc}", err=True)
        return EXIT_USAGE
    return result if isinstance(result, int) else 0
