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


# ---- shared builders: real files, made here ---------------------------------------------------

def jpeg_bytes(w: int = 300, h: int = 200, color=(200, 30, 30)) -> bytes:
    """A real JPEG of one colour."""
    import io

    from PIL import Image

    b = io.BytesIO()
    Image.new("RGB", (w, h), color).save(b, "JPEG", quality=90)
    return b.getvalue()


def add_member(tf, name: str, data: bytes) -> None:
    """Append a regular member to an open tarfile."""
    import io
    import tarfile

    ti = tarfile.TarInfo(name)
    ti.size = len(data)
    tf.addfile(ti, io.BytesIO(data))


def manifest_rows(ws: Path, sql: str, params=None) -> list[tuple]:
    """Rows of a query on a workspace's manifest, opened read-only."""
    import duckdb

    con = duckdb.connect(str(Path(ws) / "manifest.duckdb"), read_only=True)
    try:
        return con.execute(sql, params).fetchall() if params else con.execute(sql).fetchall()
    finally:
        con.close()


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A tiny open_clip checkpoint (random weights, seed 0) saved locally: `curate-tiny-vit@PATH`."""
    import open_clip
    import torch

    from curate.models.specs import ensure_configs_registered

    ensure_configs_registered()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    torch.save(open_clip.create_model("curate-tiny-vit").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def local_only():
    """Requests go to 127.0.0.1 directly even when a proxy is configured (download tests:
    `pytestmark = pytest.mark.usefixtures("local_only")`)."""
    old = {k: os.environ.get(k) for k in ("no_proxy", "NO_PROXY")}
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"
    yield
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
