"""How the CLI reports errors: one line naming the reason, never a traceback.

A refusal prints `refused [code]: message` where code is the error class in
kebab case (tampered-file, unknown-key, ...), so scripts can match on it.
"""

from __future__ import annotations

import re

import click

from edgefleet.errors import EdgefleetError, LocalError, UntrustedInputError

EXIT_REFUSED = 1
EXIT_USAGE = 2


def error_code(exc: EdgefleetError) -> str:
    """`TamperedFileError` -> `tampered-file`."""
    name = type(exc).__name__.removesuffix("Error")
    return re.sub(r"(?<!^)(?=[A-Z])", "-", name).lower()


def run_with_error_handling(command: click.Command, args: list[str] | None = None) -> int:
    """Run `command` (with `args`, else sys.argv) and return its exit status."""
    try:
        # Without standalone mode click returns (not raises) the code of a `ctx.exit(n)`.
        result = command.main(args=args, prog_name="edgefleet", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except UntrustedInputError as exc:
        click.echo(f"refused [{error_code(exc)}]: {exc}", err=True)
        return EXIT_REFUSED
    except LocalError as exc:
        click.echo(f"error [{error_code(exc)}]: {exc}", err=True)
        return EXIT_USAGE
    except EdgefleetError as exc:
        click.echo(f"error [{error_code(exc)}]: {exc}", err=True)
        return EXIT_USAGE
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        click.echo(f"error:{where}: {exc.strerror or exc}", err=True)
        return EXIT_USAGE
    return result if isinstance(result, int) else 0
