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
