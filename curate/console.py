"""Terminal output shared by every command: rich progress bars on stderr (quiet when stderr
is not a terminal or with --quiet), and the end-of-command summary (a table, or JSON)."""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

stderr = Console(stderr=True, highlight=False)
stdout = Console(highlight=False)


class _State:
    quiet = False
    json = False
    debug = False


state = _State()


def configure(*, quiet: bool = False, json_output: bool = False, debug: bool = False) -> None:
    state.quiet = quiet or json_output and not sys.stderr.isatty()
    state.json = json_output
    state.debug = debug or os.environ.get("CURATE_DEBUG") == "1"


def progress_enabled() -> bool:
    return not state.quiet and sys.stderr.isatty() and os.environ.get("CURATE_NO_PROGRESS") != "1"


class _NullProgress:
    def add_task(self, *a, **k):
        return 0

    def update(self, *a, **k):
        pass

    def advance(self, *a, **k):
        pass


@contextmanager
def progress(transient: bool = False) -> Iterator[Any]:
    """A rich Progress on stderr, or a do-nothing stand-in when progress is off."""
    if not progress_enabled():
        yield _NullProgress()
        return
    bar = Progress(
        SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=stderr, transient=transient,
    )
    with bar:
        yield bar


def info(msg: str) -> None:
    if not state.quiet:
        stderr.print(msg)


def warn(msg: str) -> None:
    stderr.print(f"[yellow]warning:[/yellow] {msg}")


def error_line(msg: str) -> None:
    stderr.print(f"[red]error:[/red] {msg}", soft_wrap=True)


def emit(summary: dict, *, title: str | None = None) -> None:
    """Print the command's summary: JSON with --json, else a two-column table."""
    if state.json:
        sys.stdout.write(json.dumps(summary, default=str, sort_keys=False) + "\n")
        sys.stdout.flush()
        return
    table = Table(title=title, show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in summary.items():
        if isinstance(v, bool):
            v = "yes" if v else "no"
        elif isinstance(v, float):
            v = f"{v:,.4g}"
        elif isinstance(v, int):
            v = f"{v:,}"
        elif isinstance(v, (dict, list)):
            v = json.dumps(v, default=str)
        table.add_row(str(k), str(v))
    stdout.print(table)


def print_table(title: str, columns: list[str], rows: list[tuple]) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c)
    for r in rows:
        table.add_row(*["" if v is None else (f"{v:,}" if isinstance(v, int) else str(v)) for v in r])
    stdout.print(table)
