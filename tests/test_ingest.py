"""Ingest on hand-built real shards: webdataset tars with hostile records, DataComp metadata
(stored and compressed npz), damaged and mismatched inputs, re-ingest and the writer lock."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import add_member as _add, jpeg_bytes as _jpeg, manifest_rows as q, run_cli, run_json
from curate.embeddings import EmbeddingRef
from curate.uids import wds_uid


def make_wds(path: Path, n_good: int = 6, *, with_uid: bool = True, hostile: bool = True) -> list[str]:
    """A real tar as img2dataset writes it, plus hostile records. Returns the good uids."""
    uids = []
    with tarfile.open(path, "w") as tf:
        for i in range(n_good):
            key = f"{path.stem}{i:04d}"
            img = _jpeg(300 + i, 200, (i * 30 % 255, 50, 80))
            meta = {"url": f"http://example.test/{key}.jpg", "caption": f"photo {i}", "key": key,
                    "status": "success", "width": 300 + i, "height": 200, "original_width": 600 + 2 * i,
                    "original_height": 400, "sha256": hashlib.sha256(img).hexdigest()}
            if with_uid:
                meta["uid"] = hashlib.md5(key.encode()).hexdigest()
                uids.append(meta["uid"])
            _add(tf, f"{key}.jpg", img)
            _add(tf, f"{key}.txt", f"a photo of thing {i}".encode())
            _add(tf, f"{key}.json", json.dumps(meta).encode())
        if hostile:
            _add(tf, "html.jpg", b"<!DOCTYPE html><html>404 not found</html>")
            _add(tf, "html.txt", b"dead link")
            _add(tf, "noimage.txt", b"caption without image")
            _add(tf, "nocaption.png", _png())
            _add(tf, "latin1.jpg", _jpeg())
            _add(tf, "latin1.txt", "caf\u00e9 cr\u00e8me".encode("latin-1"))
            _add(tf, "badjson.jpg", _jpeg())
            _add(tf, "badjson.txt", b"fine caption")
            _add(tf, "badjson.json", b"{not json")
            if with_uid:
                _add(tf, "dupuid.jpg", _jpeg())
                _add(tf, "dupuid.txt", b"same uid again")
                _add(tf, "dupuid.json", json.dumps({"uid": uids[0]}).encode())
    return uids


def _png() -> bytes:
    b = io.BytesIO()
    Image.new("LA", (250, 250)).save(b, "PNG")
    return b.getvalue()


def make_datacomp(folder: Path, stem: str, n: int, seed: int, *, compressed=False, npz_rows=None, bad_rows=()):
    rng = np.random.default_rng(seed)
    uids = [f"{x:032x}" for x in rng.integers(0, 2**63, n, dtype=np.int64)]
    for i in bad_rows:
        uids[i] = "not-a-uid"

    def emb(d):
        e = rng.standard_normal((npz_rows or n, d)).astype(np.float32)
        return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float16)

    arrays = dict(b32_img=emb(512), b32_txt=emb(512), l14_img=emb(768), l14_txt=emb(768))
    (np.savez_compressed if compressed else np.savez)(folder / f"{stem}.npz", **arrays)
    pq.write_table(pa.table({
        "uid": uids, "url": [f"http://x.test/{i}" for i in range(n)], "text": [f"caption {i}" for i in range(n)],
        "original_width": rng.integers(50, 2000, n), "original_height": rng.integers(50, 2000, n),
        "sha256": [hashlib.sha256(u.encode()).hexdigest() for u in uids],
        "clip_b32_similarity_score": rng.random(n).astype(np.float32),
        "clip_l14_similarity_score": rng.random(n).astype(np.float32),
    }), folder / f"{stem}.parquet")
    return uids, arrays


def test_wds_every_record_is_a_sample_or_an_issue(tmp_path):
    src = tmp_path / "shards"
    src.mkdir()
    good = make_wds(src / "00000.tar")
    ws = tmp_path / "ws"
    out = run_json("ingest", src, "-w", ws)
    assert out["shards_ingested"] == 1 and out["shards_failed"] == 0

    samples = {r[0]: r for r in q(ws, "SELECT uid, key, caption, width, height, image_ext, status, row_idx FROM samples")}
    keys = {r[1] for r in samples.values()}
    issues = q(ws, "SELECT key, reason, action FROM sample_issues")
    rejected = {k: r for k, r, a in issues if a == "rejected"}
    warned = {k: r for k, r, a in issues if a == "warning"}
    all_keys = {f"00000{i:04d}" for i in range(6)} | {"html", "noimage", "nocaption", "latin1", "badjson", "dupuid"}
    assert keys | set(rejected) == all_keys, "every record is a sample or has a rejection reason"
    assert not keys & set(rejected)
    assert rejected == {"html": "not_an_image", "noimage": "missing_image", "dupuid": "duplicate_uid"}
    assert warned == {"nocaption": "missing_caption", "latin1": "caption_not_utf8", "badjson": "bad_json"}
    for uid in good:
        assert uid in samples
    # original sizes from json are what DataComp's rules use
    s0 = samples[good[0]]
    assert (s0[3], s0[4]) == (600, 400)
    assert sorted(r[7] for r in samples.values()) == list(range(len(samples))), "row_idx dense"
    latin = [r for r in samples.values() if r[1] == "latin1"][0]
    assert "\ufffd" in latin[2]


def test_reingest_adds_nothing_and_derived_uids_are_stable(tmp_path):
    src = tmp_path / "s"
    src.mkdir()
    make_wds(src / "00000.tar", with_uid=False, hostile=False)
    make_wds(src / "00001.tar", with_uid=True, hostile=False)
    ws = tmp_path / "ws"
    run_json("ingest", src, "-w", ws)
    before = q(ws, "SELECT uid, key FROM samples ORDER BY uid")
    again = run_json("ingest", src, "-w", ws)
    assert again["samples_added"] == 0 and again["shards_skipped"] == 2
    # the same bytes under another path are recognised by fingerprint
    other = tmp_path / "copy"
    other.mkdir()
    (other / "x.tar").write_bytes((src / "00000.tar").read_bytes())
    third = run_json("ingest", other, "-w", ws)
    assert third["samples_added"] == 0 and third["shards_skipped"] == 1
    assert q(ws, "SELECT uid, key FROM samples ORDER BY uid") == before
    fp = hashlib.sha256((src / "00000.tar").read_bytes()).hexdigest()
    derived = {k: u for u, k in before if k.startswith("00000")}
    assert all(u == wds_uid(fp, k) for k, u in derived.items())
    assert q(ws, "SELECT fingerprint FROM shards WHERE path LIKE '%00000.tar'")[0][0] == fp


def test_damaged_tars(tmp_path):
    src = tmp_path / "s"
    src.mkdir()
    make_wds(src / "full.tar", n_good=8, hostile=False)
    data = (src / "full.tar").read_bytes()
    (src / "cut.tar").write_bytes(data[: len(data) // 2 + 100])
    (src / "junk.tar").write_bytes(b"this is not a tar archive" * 40)
    ws = tmp_path / "ws"
    proc = run_cli("ingest", src, "-w", ws, "--json", check=False)
    assert proc.returncode == 1, "a failed shard makes the command fail after ingesting the rest"
    out = json.loads(proc.stdout)
    assert out["shards_failed"] == 1 and out["shards_damaged"] == 1
    assert "junk.tar" in proc.stderr
    status = dict(q(ws, "SELECT regexp_extract(path, '[^/]+$'), status FROM shards"))
    assert status == {"full.tar": "ok", "cut.tar": "damaged", "junk.tar": "failed"}
    n_cut = q(ws, "SELECT n_samples FROM shards WHERE path LIKE '%cut.tar'")[0][0]
    assert 0 < n_cut < 8
    assert q(ws, "SELECT count(*) FROM sample_issues i JOIN shards s USING (shard_id) "
                 "WHERE s.path LIKE '%cut.tar' AND i.reason IN ('truncated_record', 'tar_damaged') "
                 "AND i.action = 'rejected'")[0][0] == 1, "the record the file broke off in is named"
    # cut.tar (ingested first: sources go in name order) holds the first records of full.tar under
    # the same uids, so full.tar's copies of them are rejected as duplicates naming cut.tar.
    dups = q(ws, "SELECT i.detail FROM sample_issues i JOIN shards s USING (shard_id) "
                 "WHERE s.path LIKE '%full.tar' AND i.reason = 'duplicate_uid'")
    assert len(dups) == n_cut and all("cut.tar" in d for (d,) in dups)
    assert q(ws, "SELECT n_samples FROM shards WHERE path LIKE '%full.tar'")[0][0] == 8 - n_cut


def test_datacomp_stored_and_compressed(tmp_path):
    src = tmp_path / "meta"
    src.mkdir()
    uids_a, arr_a = make_datacomp(src, "0000000000", 3000, 1, bad_rows=(7,))
    uids_b, arr_b = make_datacomp(src, "0000000001", 2000, 2, compressed=True)
    make_datacomp(src, "0000000002", 500, 3, npz_rows=499)
    ws = tmp_path / "ws"
    proc = run_cli("ingest", src, "-w", ws, "--json", check=False)
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert out["samples_added"] == 2999 + 2000
    assert "row-count mismatch" in out["failures"][0]["error"]
    assert q(ws, "SELECT reason, key FROM sample_issues") == [("bad_uid", "7")]
    assert sorted(r[0] for r in q(ws, "SELECT name FROM scorers")) == ["datacomp-b32", "datacomp-l14"]
    # scores are the parquet's columns, per uid
    table = pq.read_table(src / "0000000000.parquet").to_pandas()
    got = dict(q(ws, "SELECT uid, score FROM scores WHERE scorer = 'datacomp-l14'"))
    for i in (0, 1, 2999):
        assert got[uids_a[i]] == pytest.approx(table.clip_l14_similarity_score[i], abs=1e-7)
    # embeddings: stored members are referenced in place, compressed ones copied out; both row-aligned
    refs = q(ws, "SELECT e.scorer, e.shard_id, e.kind, e.path, e.member, e.byte_offset, e.dtype, e.n_rows, e.dim, "
                 "s.path FROM embeddings e JOIN shards s USING (shard_id)")
    assert len(refs) == 8
    for r in refs:
        ref = EmbeddingRef(*r[:3], str(ws / r[3]), *r[4:9])  # workspace files: relative to it
        arrays = arr_a if r[9].endswith("0000000000.parquet") else arr_b
        key = ("b32_" if ref.scorer.endswith("b32") else "l14_") + ref.kind
        assert np.array_equal(np.asarray(ref.open()), arrays[key])
        assert (ref.member is not None) == r[9].endswith("0000000000.parquet")


def test_second_writer_gets_a_clear_error(tmp_path):
    src = tmp_path / "s"
    src.mkdir()
    make_wds(src / "00000.tar", hostile=False)
    ws = tmp_path / "ws"
    run_json("ingest", src, "-w", ws)
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys,time; from curate.workspace import Workspace; "
                               f"w=Workspace.open({str(ws)!r}, write=True); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_cli("ingest", src, "-w", ws, check=False)
        assert proc.returncode == 2
        lines = [l for l in proc.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and "locked" in lines[0] and str(holder.pid) in lines[0]
        assert "Traceback" not in proc.stderr
    finally:
        holder.kill()
        holder.wait()
    assert run_json("ingest", src, "-w", ws)["samples_added"] == 0


def test_cli_conventions(tmp_path):
    proc = run_cli("ingest", tmp_path / "missing", "-w", tmp_path / "ws", check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("status", "-w", tmp_path / "nope", check=False)
    assert proc.returncode == 2
    proc = run_cli("ingest", "--help")
    assert "Example" in proc.stdout
    proc = run_cli("status", check=False, env={"CURATE_WORKSPACE": ""})
    assert proc.returncode == 2 and "CURATE_WORKSPACE" in proc.stderr


def test_synth_pool_every_record_accounted_for(tmp_path):
    """The issue's check: synth --layout wds then ingest: every record is a sample or has a reason;
    a second ingest adds no rows."""
    import polars as pl

    pool, ws = tmp_path / "pool", tmp_path / "ws"
    run_cli("synth", pool, "--layout", "wds", "--n", "600", "--seed", "3", "--shard-size", "250", "--no-uid")
    first = run_json("ingest", pool, "-w", ws)
    truth = pl.read_parquet(pool / "_truth.parquet")
    con = duckdb.connect(str(ws / "manifest.duckdb"), read_only=True)
    samples = pl.from_arrow(con.sql(
        "SELECT regexp_extract(sh.path, '[^/]+$') AS shard, s.key FROM samples s JOIN shards sh USING (shard_id)"
    ).to_arrow_table())
    rejected = pl.from_arrow(con.sql(
        "SELECT regexp_extract(sh.path, '[^/]+$') AS shard, i.key, i.reason FROM sample_issues i "
        "JOIN shards sh USING (shard_id) WHERE i.action = 'rejected'").to_arrow_table())
    con.close()
    accounted = pl.concat([samples.select("shard", "key"), rejected.select("shard", "key")])
    assert accounted.height == accounted.unique().height, "no record is both a sample and rejected"
    missing = truth.select("shard", "key").join(accounted, on=["shard", "key"], how="anti")
    assert missing.height == 0, f"records neither ingested nor explained: {missing.head()}"
    # the reasons match what was injected
    reasons = truth.join(rejected, on=["shard", "key"]).group_by("image_kind", "reason").len()
    kinds = {(k, r) for k, r, _ in reasons.rows()}
    assert ("failed_download", "download_failed") in kinds and ("missing_image", "missing_image") in kinds
    assert {r for k, r in kinds if k in ("corrupt", "non_image")} <= {"not_an_image"}
    again = run_json("ingest", pool, "-w", ws)
    assert again["samples_added"] == 0 and first["samples_added"] == samples.height


def test_synth_datacomp_pool(tmp_path):
    import polars as pl

    pool, ws = tmp_path / "pool", tmp_path / "ws"
    run_cli("synth", pool, "--layout", "datacomp", "--n", "3000", "--seed", "1", "--shard-size", "1000")
    out = run_json("ingest", pool, "-w", ws)
    assert out["samples_added"] == 3000 and out["shards_ingested"] == 3
    truth = pl.read_parquet(pool / "_truth.parquet")
    got = {r[0] for r in q(ws, "SELECT uid FROM samples")}
    assert got == set(truth["uid"].to_list())
    assert q(ws, "SELECT count(*) FROM embeddings WHERE member IS NOT NULL")[0][0] == 12
