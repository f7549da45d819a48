"""URL tables and `curate download`: the real img2dataset against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import fcntl
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import duckdb
import polars as pl
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from httpserver import ImageServer  # noqa: E402

from curate.errors import CurateError, UsageError  # noqa: E402
from curate.sources.download import download_urls  # noqa: E402
from curate.sources.urls import read_url_table  # noqa: E402
from curate.uids import url_uid  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# What each test URL is, and what img2dataset 1.47 reports for it (status, words of error_message).
# (path, caption, expected status, error fragment or None, expected stored size or None)
CASES = [
    ("/img/big.jpg?w=1024&h=768", "a wide photo", "success", None, (512, 384)),
    ("/img/tall.png?w=300&h=1200&alpha=1", "a tall png with alpha", "success", None, (128, 512)),
    ("/img/small.jpg?w=200&h=100", "small stays small", "success", None, (200, 100)),
    ("/img/twice.jpg?w=640&h=640", "the same row twice", "success", None, (512, 512)),
    ("/img/twice.jpg?w=640&h=640", "the same row twice", "success", None, (512, 512)),
    ("/missing/gone.jpg", "a dead link", "failed_to_download", "HTTP Error 404: Not Found", None),
    ("/html/page.jpg", "a page, not an image", "failed_to_resize", "Image decoding error", None),
    ("/error/boom.jpg", "a server error", "failed_to_download", "HTTP Error 500: Internal Server Error", None),
    ("/slow/late.jpg?s=4", "too slow", "failed_to_download", "timed out", None),
    ("/broken/cut.jpg", "a truncated jpeg", "failed_to_resize", "Image decoding error", None),
    ("/noai/tagged.jpg", "X-Robots-Tag: noai", "failed_to_download", "X-Robots-Tag", None),
]
PER_SHARD = 4  # 11 URLs -> shards 00000 (4), 00001 (4), 00002 (3)
OPTS = dict(processes=1, threads=8, timeout=2, retries=1, number_sample_per_shard=PER_SHARD)


pytestmark = pytest.mark.usefixtures("local_only")


@pytest.fixture(scope="module")
def server():
    with ImageServer() as srv:
        yield srv


@pytest.fixture(scope="module")
def url_table(server, tmp_path_factory):
    d = tmp_path_factory.mktemp("urls")
    path = d / "urls.parquet"
    pl.DataFrame({"url": [server.url(p) for p, *_ in CASES], "caption": [c for _, c, *_ in CASES]}).write_parquet(path)
    return path


@pytest.fixture(scope="module")
def downloaded(server, url_table, tmp_path_factory):
    out = tmp_path_factory.mktemp("dl") / "shards"
    result = download_urls(url_table, out, **OPTS)
    hits = dict(server.hits)
    return result, hits


def _read_tar(path: Path) -> dict[str, dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, _, ext = m.name.rpartition(".")
            samples.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return samples


def _expected_uids(table_path: Path) -> list[str]:
    t = read_url_table(table_path)
    return t.frame["uid"].to_list()


# ---- download ---------------------------------------------------------------------------------

def test_shards_hold_resized_jpgs_with_captions_and_uids(downloaded, url_table):
    result, _ = downloaded
    assert [p.name for p in result.shards] == ["00000.tar", "00001.tar", "00002.tar"]
    assert result.missing_shards == [] and result.finished_before == []
    uids = _expected_uids(url_table)
    by_uid = dict(zip(uids, CASES))
    seen = {}
    for shard in result.shards:
        assert shard.with_suffix(".parquet").exists()
        assert (shard.parent / (shard.stem + "_stats.json")).exists()
        for key, members in _read_tar(shard).items():
            assert set(members) == {"jpg", "txt", "json"}, key
            meta = json.loads(members["json"])
            uid = meta["uid"]
            path, caption, status, _, size = by_uid[uid]
            assert status == "success"
            assert members["txt"].decode() == caption
            img = Image.open(io.BytesIO(members["jpg"]))
            assert img.format == "JPEG"
            assert img.size == size == (meta["width"], meta["height"])
            ow, oh = meta["original_width"], meta["original_height"]
            assert max(img.size) <= 512
            assert abs(img.size[0] / img.size[1] - ow / oh) < 0.01      # ratio kept
            # sha256 is of the bytes as downloaded (DataComp's meaning), not of the re-encoded jpg.
            assert meta["sha256"] != hashlib.sha256(members["jpg"]).hexdigest()
            seen[uid] = key
    assert set(seen) == {u for u, c in by_uid.items() if c[2] == "success"}
    # The repeated row is two samples with two uids.
    twice = [u for u, c in zip(uids, CASES) if "twice" in c[0]]
    assert len(set(twice)) == 2 and set(twice) <= set(seen)


def test_every_url_has_img2dataset_status_and_error(downloaded, url_table):
    result, _ = downloaded
    status = result.url_status()
    assert status.height == len(CASES)
    uids = _expected_uids(url_table)
    rows = {r["uid"]: r for r in status.iter_rows(named=True)}
    for uid, (path, caption, want, err, _) in zip(uids, CASES):
        row = rows[uid]
        assert row["status"] == want, (path, row)
        assert row["caption"] == caption
        if err is None:
            assert row["error_message"] is None
        else:
            assert err in row["error_message"], (path, row["error_message"])
    n_ok = sum(c[2] == "success" for c in CASES)
    assert result.by_status() == {
        "success": n_ok,
        "failed_to_download": sum(c[2] == "failed_to_download" for c in CASES),
        "failed_to_resize": sum(c[2] == "failed_to_resize" for c in CASES),
    }
    s = result.summary()
    assert s["urls"] == len(CASES) and s["downloaded"] == n_ok and s["not_attempted"] == 0
    assert s["top_errors"]["Image decoding error"] == 2


def test_failed_urls_are_retried(downloaded):
    _, hits = downloaded
    assert hits["/error/boom.jpg"] == OPTS["retries"] + 1
    assert hits["/missing/gone.jpg"] == OPTS["retries"] + 1
    assert hits["/img/big.jpg"] == 1


def test_rerun_skips_finished_shards_and_redoes_an_unfinished_one(downloaded, server, url_table, tmp_path):
    result, _ = downloaded
    out = tmp_path / "shards"
    shutil.copytree(result.out_dir, out)

    before = dict(server.hits)
    again = download_urls(url_table, out, **OPTS)
    assert dict(server.hits) == before                       # nothing fetched
    assert again.finished_before == [0, 1, 2] and len(again.shards) == 3
    assert again.by_status() == result.by_status()

    # A crash inside shard 0: its stats file (written last) is missing, its tar half-written.
    (out / "00000_stats.json").unlink()
    (out / "00000.tar").write_bytes(b"partial")
    resumed = download_urls(url_table, out, **OPTS)
    assert resumed.finished_before == [1, 2]
    assert resumed.by_status() == result.by_status()
    assert len(_read_tar(out / "00000.tar")) == 4
    delta = {k: v - before.get(k, 0) for k, v in server.hits.items() if v != before.get(k, 0)}
    assert delta == {"/img/big.jpg": 1, "/img/tall.png": 1, "/img/small.jpg": 1, "/img/twice.jpg": 1}


def test_rerun_with_another_table_or_options_is_refused(downloaded, server, tmp_path):
    result, _ = downloaded
    out = tmp_path / "shards"
    shutil.copytree(result.out_dir, out)
    other = tmp_path / "other.csv"
    other.write_text(f"url,caption\n{server.url('/img/x.jpg')},x\n")
    with pytest.raises(UsageError, match="different URL table"):
        download_urls(other, out, **OPTS)
    table = result.out_dir / ".curate" / "urls.parquet"   # the same rows
    with pytest.raises(UsageError, match="image_size 512 -> 256"):
        download_urls(table, out, **{**OPTS, "image_size": 256})
    with pytest.raises(UsageError, match="no option"):
        download_urls(table, tmp_path / "new", extra={"not_an_option": 1}, **OPTS)
    with pytest.raises(UsageError, match="resize mode"):
        download_urls(table, tmp_path / "new", resize_mode="stretch", **OPTS)


def test_unfinished_shards_leave_their_urls_not_attempted(downloaded, url_table):
    result, _ = downloaded
    gave_up = dataclasses.replace(result, missing_shards=[2], shards=result.shards[:2])
    rows = gave_up.not_attempted()
    assert rows["uid"].to_list() == _expected_uids(url_table)[8:]
    assert gave_up.summary()["not_attempted"] == 3 and gave_up.url_status().height == 8


def test_img2dataset_crash_is_one_clear_error(url_table, tmp_path):
    # A bad option type makes img2dataset itself raise (user_agent_token.strip() on an int).
    with pytest.raises(CurateError, match=r"img2dataset exited with code 1 \(AttributeError: .*strip.*\); full log: .*img2dataset.log") as exc:
        download_urls(url_table, tmp_path / "out", extra={"user_agent_token": 123}, **OPTS)
    assert not isinstance(exc.value, UsageError) and "AttributeError" in str(exc.value)


def test_one_download_per_out_dir(url_table, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with open(out / ".curate.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UsageError, match="another download is writing"):
            download_urls(url_table, out, **OPTS)


def test_empty_table_downloads_nothing(tmp_path):
    p = tmp_path / "empty.csv"
    p.write_text("url,caption\n,no url here\n")
    r = download_urls(p, tmp_path / "out", **OPTS)
    assert r.n_urls == 0 and r.shards == [] and r.expected_shards == 0


# ---- URL tables --------------------------------------------------------------------------------

ROWS = [
    ("http://h/a.jpg", "cat"),
    ("http://h/a.jpg", "cat"),       # exact repeat: a distinct sample
    ("  http://h/b.jpg ", None),     # surrounding space stripped; no caption is fine
    ("", "empty url"),
    (None, "null url"),
    ("ftp://h/c.jpg", "not http"),
    ("https://h/a.jpg", "cat"),
]


def _write(path: Path, rows, *, url="url", caption="caption", uids=None) -> Path:
    data = {url: [r[0] for r in rows], caption: [r[1] for r in rows]}
    if uids is not None:
        data["uid"] = uids
    df = pl.DataFrame(data, schema={k: pl.String for k in data})
    suffix = "".join(path.suffixes)
    if suffix == ".parquet":
        df.write_parquet(path)
    elif suffix == ".csv":
        df.write_csv(path)
    elif suffix == ".csv.gz":
        with gzip.open(path, "wb") as fh:
            df.write_csv(fh)
    elif suffix == ".tsv":
        df.write_csv(path, separator="\t", quote_style="never")
    elif suffix in (".jsonl", ".json"):
        df.write_ndjson(path)
    return path


@pytest.mark.parametrize("name", ["t.parquet", "t.csv", "t.csv.gz", "t.tsv", "t.jsonl", "t.json"])
def test_url_table_formats_and_uids(tmp_path, name):
    path = _write(tmp_path / name, ROWS)
    t = read_url_table(path)
    assert t.n_rows == len(ROWS)
    assert t.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()
    f = t.frame
    assert f["key"].to_list() == ["0", "1", "2", "6"]
    assert f["url"].to_list() == ["http://h/a.jpg", "http://h/a.jpg", "http://h/b.jpg", "https://h/a.jpg"]
    assert f["caption"].to_list() == ["cat", "cat", None, "cat"]
    assert f["uid"].to_list() == [url_uid("http://h/a.jpg", "cat", 0), url_uid("http://h/a.jpg", "cat", 1),
                                  url_uid("http://h/b.jpg", "", 0), url_uid("https://h/a.jpg", "cat", 0)]
    assert f["uid"].n_unique() == 4
    issues = {i[0]: i for i in t.issues}
    assert {k: i[2] for k, i in issues.items()} == {"3": "missing_url", "4": "missing_url", "5": "bad_url"}
    assert all(i[3] == "rejected" for i in t.issues)
    assert issues["5"][1] == url_uid("ftp://h/c.jpg", "not http", 0) and "ftp://h/c.jpg" in issues["5"][4]
    # Stable: the same file reads to the same uids.
    assert read_url_table(path).frame["uid"].to_list() == f["uid"].to_list()


def test_url_table_other_column_names(tmp_path):
    t = read_url_table(_write(tmp_path / "t.parquet", ROWS[:3], url="image_url", caption="TEXT"))
    assert (t.url_col, t.caption_col) == ("image_url", "TEXT")
    assert t.frame["caption"].to_list() == ["cat", "cat", None]
    t = read_url_table(_write(tmp_path / "u.csv", ROWS[:1], url="URL", caption="alt"))
    assert t.frame["url"].to_list() == ["http://h/a.jpg"] and t.frame["caption"].to_list() == ["cat"]


def test_url_table_given_uids(tmp_path):
    good = "ABCDEF0123456789ABCDEF0123456789"
    uids = [f" {good} ", good.lower(), "not-a-uid", None, "0" * 32]
    rows = [("http://h/1", "a"), ("http://h/2", "b"), ("http://h/3", "c"), ("http://h/4", "d"), ("http://h/5", "e")]
    t = read_url_table(_write(tmp_path / "t.csv", rows, uids=uids))
    assert t.frame["uid"].to_list() == [good.lower(), url_uid("http://h/4", "d", 0), "0" * 32]
    reasons = {i[0]: (i[2], i[1]) for i in t.issues}
    assert reasons == {"1": ("duplicate_uid", good.lower()), "2": ("bad_uid", None)}
    assert t.issue_counts() == {"bad_uid": 1, "duplicate_uid": 1}


def test_url_table_text_list_and_folder(tmp_path):
    p = tmp_path / "list.txt"
    p.write_text("http://h/a,b.jpg\nhttp://h/c.jpg\n")
    t = read_url_table(p)
    assert t.frame["url"].to_list() == ["http://h/a,b.jpg", "http://h/c.jpg"]
    assert t.frame["caption"].to_list() == [None, None]
    d = tmp_path / "meta"
    d.mkdir()
    _write(d / "0.parquet", [("http://h/a", "x"), ("http://h/a", "x")])
    _write(d / "1.parquet", [("http://h/a", "x"), ("http://h/b", "y")])
    t = read_url_table(d)
    # Each file on its own (as `curate ingest` reads them): a uid repeated in a later file is a duplicate.
    assert t.frame["key"].to_list() == ["0.parquet:0", "0.parquet:1", "1.parquet:1"]
    assert [i[2] for i in t.issues] == ["duplicate_uid"] and t.issues[0][0] == "1.parquet:0"


def test_url_table_errors(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("link,caption\nhttp://h/a,b\n")
    with pytest.raises(UsageError, match=r"no URL column .*'link', 'caption'"):
        read_url_table(p)
    p = tmp_path / "noheader.tsv"
    p.write_text("a cat\thttp://h/a.jpg\n")
    with pytest.raises(UsageError, match="no header row"):
        read_url_table(p)
    p = tmp_path / "bad.jsonl"
    p.write_text('{"url": "http://h/a", "caption": \nnot json\n')
    with pytest.raises(UsageError, match="cannot read it as jsonl"):
        read_url_table(p)
    p = tmp_path / "bad.parquet"
    p.write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(UsageError, match="cannot read it as parquet"):
        read_url_table(p)
    with pytest.raises(UsageError, match="format"):
        read_url_table(_touch(tmp_path / "x.xlsx"))
    with pytest.raises(UsageError, match="no such file"):
        read_url_table(tmp_path / "missing.csv")


def _touch(p: Path) -> Path:
    p.write_bytes(b"")
    return p


# ---- the command -------------------------------------------------------------------------------

def _curate(*args, env=None):
    return subprocess.run([sys.executable, "-m", "curate", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, "CURATE_NO_PROGRESS": "1", **(env or {})})


def test_cli_download_ingests_samples_and_records_failures(server, tmp_path):
    table = tmp_path / "urls.csv"
    rows = [(server.url("/img/cli1.jpg?w=900&h=300"), "one"), (server.url("/img/cli2.png?w=64&h=64"), "two"),
            (server.url("/missing/cli3.jpg"), "three"), (server.url("/html/cli4.jpg"), "four"),
            ("", "no url"), ("file:///etc/passwd", "not http")]
    _write(table, rows)
    ws, out = tmp_path / "ws", tmp_path / "shards"
    args = ["download", table, "-w", ws, "--out", out, "--processes", "1", "--threads", "4", "--timeout", "2",
            "--retries", "0", "--json"]
    proc = _curate(*args)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["urls"] == 4 and summary["downloaded"] == 2 and summary["shards"] == 1
    assert summary["failed_to_download"] == 1 and summary["failed_to_resize"] == 1
    assert summary["rejected_by_reason"] == {"bad_url": 1, "missing_url": 1}
    assert (out / "00000.tar").exists()

    t = read_url_table(table)
    uids = dict(zip(t.frame["caption"].to_list(), t.frame["uid"].to_list()))
    con = duckdb.connect(str(ws / "manifest.duckdb"), read_only=True)
    try:
        samples = {r[0]: r[1:] for r in con.execute(
            "SELECT s.uid, s.status, s.caption, s.image_ext, sh.format, sh.path FROM samples s "
            "JOIN shards sh USING (shard_id)").fetchall()}
        issues = con.execute("SELECT uid, key, reason, detail FROM sample_issues ORDER BY reason, key").fetchall()
        run = con.execute("SELECT command, status FROM runs ORDER BY run_id").fetchall()
    finally:
        con.close()
    assert set(samples) == set(uids.values())
    for cap in ("one", "two"):
        status, caption, ext, fmt, path = samples[uids[cap]]
        assert (status, caption, ext, fmt, path) == ("ok", cap, "jpg", "wds", str(out / "00000.tar"))
    for cap in ("three", "four"):
        assert samples[uids[cap]][0] == "failed"
    failed = {u: d for u, _, r, d in issues if r.startswith("download_failed")}
    assert "404" in failed[uids["three"]] and "failed_to_download" in failed[uids["three"]]
    assert "Image decoding error" in failed[uids["four"]] and "failed_to_resize" in failed[uids["four"]]
    assert sorted(r for _, _, r, _ in issues if not r.startswith("download_failed")) == ["bad_url", "missing_url"]
    assert run == [("download", "ok")]

    # Rerun: nothing downloaded, nothing ingested twice.
    hits = dict(server.hits)
    proc = _curate(*args)
    assert proc.returncode == 0, proc.stderr
    again = json.loads(proc.stdout.strip().splitlines()[-1])
    assert dict(server.hits) == hits
    assert again["shards_resumed"] == 1 and again["samples_added"] == 0 and again["shards_skipped"] == 1
    assert again["samples_in_workspace"] == summary["samples_in_workspace"] == 4
    con = duckdb.connect(str(ws / "manifest.duckdb"), read_only=True)
    try:
        assert con.execute("SELECT count(*) FROM sample_issues").fetchone()[0] == len(issues)
    finally:
        con.close()


def test_cli_download_usage_errors(tmp_path):
    p = tmp_path / "t.csv"
    p.write_text("link\nhttp://h/a\n")
    proc = _curate("download", p, "-w", tmp_path / "ws", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "no URL column" in proc.stderr and "Traceback" not in proc.stderr
    proc = _curate("download", tmp_path / "nope.csv", "-w", tmp_path / "ws", "--out", tmp_path / "o")
    assert proc.returncode == 2 and "no such file" in proc.stderr
