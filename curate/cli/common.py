"""Options every command shares, so `-w`, `--json`, `--quiet` and `--debug` mean the same everywhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from .. import console

WorkspaceOpt = Annotated[
    Optional[Path],
    typer.Option("-w", "--workspace", envvar="CURATE_WORKSPACE", show_envvar=True,
                 help="Workspace directory (one per pool); or set CURATE_WORKSPACE.", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or chatter.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show a traceback on errors.")]


def setup(json_output: bool = False, quiet: bool = False, debug: bool = False) -> None:
    console.configure(quiet=quiet, json_output=json_output, debug=debug)
