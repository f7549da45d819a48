import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CURATE = [sys.executable, "-m", "curate"]

# Progress bars off, and no GPU probing surprises, in every test.
os.environ.setdefault("CURATE_NO_PROGRESS", "1")


def run_cli(*args, check=True, env=None, timeout=600):
    """Run the real `curate` command in a subprocess; returns CompletedProcess."""
    proc = subprocess.run([*CURATE, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"curate {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def run_json(*args, **kw):
    proc = run_cli(*args, "--json", **kw)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def cli():
    return run_cli
