"""The manifest's DuckDB memory limits: a working limit for long streaming work, the full one
for whole-pool sorts."""

import pytest

from curate.manifest import Manifest, _bytes, _smaller


def _limit(m: Manifest) -> float:
    return m.con.execute("SELECT value FROM duckdb_settings() WHERE name = 'memory_limit'").fetchall()[0][0]


def test_size_strings():
    assert _bytes("512MB") == 512e6 and _bytes("1GiB") == 2**30 and _bytes(" 64 kb ") == 64e3
    assert _bytes("lots") == float("inf")
    assert _smaller("128MB", "512MB") == "128MB" and _smaller("2GB", "512MB") == "512MB"
    assert _smaller("junk", "512MB") == "512MB"


def test_working_memory_lowers_and_restores(tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_DUCKDB_MEMORY", "400MB")
    monkeypatch.setenv("CURATE_DUCKDB_WORKING_MEMORY", "100MB")
    m = Manifest(tmp_path / "manifest.duckdb")
    full = _limit(m)
    with m.working_memory():
        low = _limit(m)
        m.trim()  # restores the working limit, not the full one
        assert _limit(m) == low
    assert _limit(m) == full and low != full
    with pytest.raises(RuntimeError), m.working_memory():
        raise RuntimeError("boom")
    assert _limit(m) == full
    m.close()


def test_working_limit_never_above_the_full_one(tmp_path, monkeypatch):
    monkeypatch.setenv("CURATE_DUCKDB_MEMORY", "100MB")
    monkeypatch.setenv("CURATE_DUCKDB_WORKING_MEMORY", "1GB")
    m = Manifest(tmp_path / "manifest.duckdb")
    assert m.working_limit == "100MB"
    m.close()


def test_schema_1_manifest_gains_image_locations(tmp_path):
    """A manifest written before image locations existed (schema 1) is brought to schema 2 by
    the next writer: its webdataset samples' images are where the samples are; then score and
    export read them there."""
    import tarfile

    import duckdb

    from conftest import add_member, jpeg_bytes, run_cli

    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(src / "00000.tar", "w") as tf:
        for i in range(3):
            add_member(tf, f"k{i}.jpg", jpeg_bytes(64 + i, 48))
            add_member(tf, f"k{i}.txt", f"caption {i}".encode())
    ws = tmp_path / "ws"
    run_cli("ingest", src, "-w", ws)
    con = duckdb.connect(str(ws / "manifest.duckdb"))
    for col in ("img_shard_id", "img_key", "img_row", "img_width", "img_height", "img_sha256"):
        con.execute(f"ALTER TABLE samples DROP COLUMN {col}")
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    con.close()
    out = tmp_path / "out"
    # a reader cannot upgrade the file: one line says what to do
    proc = run_cli("export", "-w", ws, "--all", "--format", "wds", "--out", out, "--dry-run", check=False)
    assert proc.returncode == 2 and "schema 1 (written by an older curate)" in proc.stderr
    run_cli("export", "-w", ws, "--all", "--format", "wds", "--out", out)  # a writer: migrates first
    con = duckdb.connect(str(ws / "manifest.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall() == [("2",)]
        rows = con.execute("SELECT img_shard_id = shard_id, img_key = key, img_row = row_idx FROM samples").fetchall()
    finally:
        con.close()
    assert rows == [(True, True, True)] * 3
    with tarfile.open(next(out.glob("*.tar"))) as tf:
        assert len(tf.getnames()) == 6
