"""A workspace and its pool moved elsewhere (another mount, another machine): the workspace's own
files are recorded relative to it and need nothing; `curate relocate` rewrites the source paths.
Afterwards prune keeps the same samples and export writes the same bytes."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import manifest_rows as q
from conftest import run_cli, run_json


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _kept(ws: Path, run_id: int) -> list[str]:
    return sorted(u for (u,) in q(ws, "SELECT uid FROM decisions WHERE run_id = ? AND keep AND stage_idx = "
                                      "(SELECT max(stage_idx) FROM decisions WHERE run_id = ?)", [run_id, run_id]))


@pytest.mark.parametrize("compressed", [False, True])
def test_moved_datacomp_pool_and_workspace(tmp_path, compressed):
    a = tmp_path / "a"
    a.mkdir()
    pool, ws = a / "pool", a / "ws"
    run_cli("synth", pool, "--layout", "datacomp", "--n", "1500", "--seed", "4", "--shard-size", "500",
            *(["--compressed"] if compressed else []))
    run_cli("ingest", pool, "-w", ws)
    # compressed npz members are copied into the workspace: recorded relative to it
    own = q(ws, "SELECT path FROM embeddings WHERE member IS NULL")
    assert bool(own) == compressed and all(not p.startswith("/") for (p,) in own)
    before = run_json("prune", "-w", ws, "-p", "semdedup", "--set", "semdedup.k=8")
    b = tmp_path / "b"
    shutil.move(a, b)  # both move; mtimes kept
    pool2, ws2 = b / "pool", b / "ws"
    out = run_json("relocate", str(pool), str(pool2), "-w", ws2, "--dry-run")
    assert out["shards"] == 3 and out["missing"] == 0 and out["dry_run"]
    proc = run_cli("relocate", str(pool), str(tmp_path / "nowhere"), "-w", ws2, check=False)
    assert proc.returncode == 2 and "would not exist" in proc.stderr
    out = run_json("relocate", str(pool), str(pool2), "-w", ws2)
    assert out["shards"] == 3 and out["embedding_files"] == (0 if compressed else 3)  # the npz files read in place
    assert all(p.startswith(str(pool2)) for (p,) in q(ws2, "SELECT path FROM shards"))
    after = run_json("prune", "-w", ws2, "-p", "semdedup", "--set", "semdedup.k=8")
    assert after["kept"] == before["kept"] and _kept(ws2, after["run_id"]) == _kept(ws2, before["run_id"])
    # ingest of the new path finds it in already
    assert run_json("ingest", pool2, "-w", ws2)["shards_skipped"] == 3


def test_moved_webdataset_pool_exports_the_same_bytes(tmp_path):
    a = tmp_path / "a"
    a.mkdir()
    pool, ws = a / "pool", a / "ws"
    run_cli("synth", pool, "--layout", "wds", "--n", "60", "--seed", "2", "--shard-size", "20")
    run_cli("ingest", pool, "-w", ws)
    run_cli("export", "-w", ws, "--all", "--format", "wds", "--out", tmp_path / "x1", "--shard-size", "25")
    b = tmp_path / "b"
    shutil.move(a, b)
    run_cli("relocate", str(pool), str(b / "pool"), "-w", b / "ws")
    run_cli("export", "-w", b / "ws", "--all", "--format", "wds", "--out", tmp_path / "x2", "--shard-size", "25")
    one, two = _files(tmp_path / "x1"), _files(tmp_path / "x2")
    assert one.keys() == two.keys() and all(one[k] == two[k] for k in one if k.endswith(".tar"))
