"""The `curate` command. Commands are thin: parse, call the library, print.

Exit codes: 0 ok, 1 the job failed, 2 usage error (bad option, bad path, locked workspace).
Errors print one line; --debug (or CURATE_DEBUG=1) adds the traceback.
"""

from __future__ import annotations

import re
import sys
import traceback

import typer

from .. import __version__, console
from ..errors import CurateError, describe_os_error, disk_full_line, is_disk_full, is_interrupt

app = typer.Typer(
    name="curate",
    help="Curate image-text pools for CLIP training: ingest → score → prune → export → report.\n\n"
         "Every run and every per-sample decision is recorded in WORKSPACE/manifest.duckdb.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode="markdown",
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"curate {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    pass


def _register() -> None:
    # Each module adds its commands to `app`; imported lazily so `curate --help` stays fast.
    from . import commands  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    _register()
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or console.state.debug
    try:
        rv = app(args=args, prog_name="curate", standalone_mode=False)
        if isinstance(rv, int) and not isinstance(rv, bool):  # typer.Exit(code) under standalone_mode=False
            return rv
    except typer.Exit as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except typer.Abort:
        console.error_line("aborted")
        return 130
    except typer.TyperException as exc:  # usage errors from typer's parser (bad option, missing argument)
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        else:
            console.error_line(str(exc))
        code = getattr(exc, "exit_code", 2)
        return code if code else 2
    except CurateError as exc:
        if debug or console.state.debug:
            traceback.print_exc()
        console.error_line(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        console.error_line("interrupted")
        return 130
    except OSError as exc:  # the file system said no: what, where, what to do
        if debug or console.state.debug:
            traceback.print_exc()
        console.error_line(describe_os_error(exc))
        return 1
    except Exception as exc:  # an unexpected failure: one line unless --debug
        if is_interrupt(exc):  # Ctrl-C inside a DuckDB query
            console.error_line("interrupted")
            return 130
        if debug or console.state.debug:
            traceback.print_exc()
        if is_disk_full(exc):  # DuckDB, Arrow and polars say it in their own words
            named = re.search(r'file "([^"]+)"', str(exc))
            console.error_line(disk_full_line(named.group(1) if named else _workspace_arg(args)))
        else:
            console.error_line(f"{type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)")
        return 1
    return 0


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:500] + ("..." if len(text) > 500 else "")


def _workspace_arg(args: list[str]) -> str | None:
    """The workspace the command was given (-w/--workspace or CURATE_WORKSPACE), for messages."""
    import os

    for i, a in enumerate(args):
        if a in ("-w", "--workspace") and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--workspace="):
            return a.split("=", 1)[1]
    return os.environ.get("CURATE_WORKSPACE")


def entrypoint() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entrypoint()
