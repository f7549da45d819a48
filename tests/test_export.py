"""`curate export` on real synthetic pools: webdataset shards byte-identical to their sources,
contiguous names, seeded shuffles, resume after kill -9, --overwrite that removes only export
files, key collisions across pools, --add-json, compressed and changed sources; the DataComp
submission and `verify-submission`; the parquet export on a metadata pool."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from conftest import manifest_rows as q, run_cli, run_json
from curate.cli.main import main as curate_main
from curate.export.datacomp import verify_submission
from curate.export.parquet import clusters_of, read_export_metadata
from curate.manifest import open_manifest
from curate.uids import pair_to_uid, uid_to_pair
from curate.workspace import Workspace

RECIPE = 'name = "size_only"\n[[stages]]\nstage = "image_size"\nmin_side = 200\n'
RECIPE2 = RECIPE + '[[stages]]\nstage = "image_bytes"\nmin_bytes = 12000\n'


# ---- helpers ------------------------------------------------------------------------------

def cli(*args, check: bool = True) -> tuple[int, dict | None, str]:
    """The real `curate` command run in this process (no interpreter start-up per call):
    (exit code, the --json summary or None, stderr). Crashes are tested in subprocesses."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = curate_main([*map(str, args), "--json"])
    lines = out.getvalue().strip().splitlines()
    summary = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else None
    if check and rc != 0:
        raise AssertionError(f"curate {' '.join(map(str, args))} exited {rc}\n{err.getvalue()}")
    return rc, summary, err.getvalue()


def cj(*args) -> dict:
    return cli(*args)[1]


def kept(ws: Path, run_id: int, stage_idx: int | None = None) -> set[str]:
    if stage_idx is None:
        stage_idx = q(ws, "SELECT max(stage_idx) FROM stage_stats WHERE run_id = ?", [run_id])[0][0]
    return {r[0] for r in q(ws, "SELECT uid FROM decisions WHERE run_id = ? AND stage_idx = ? AND keep",
                            [run_id, stage_idx])}


def source_members(*pools: Path) -> dict[str, dict]:
    """uid -> {'key': tar key, ext: member bytes} for every record of the source tars."""
    out: dict[str, dict] = {}
    for pool in pools:
        for p in sorted(pool.glob("*.tar*")):
            with tarfile.open(p) as tf:
                recs: dict[str, dict] = {}
                for ti in tf:
                    if ti.isfile():
                        key, ext = ti.name.split(".", 1)
                        recs.setdefault(key, {"key": key})[ext] = tf.extractfile(ti).read()
            for key, rec in recs.items():
                if "json" in rec:
                    out[json.loads(rec["json"])["uid"]] = rec
    return out


def exported(out: Path) -> list[dict]:
    """Every sample of an export, read with the webdataset library (as training reads it)."""
    names = sorted(p.name for p in out.glob("*.tar"))
    assert names == [f"{i:08d}.tar" for i in range(len(names))], "shard names are not contiguous"
    pattern = str(out / f"{{00000000..{len(names) - 1:08d}}}.tar")
    return list(wds.WebDataset(pattern, shardshuffle=False))


def uid_of(sample: dict) -> str:
    return json.loads(sample["json"])["uid"]


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


# ---- fixtures -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A 300-record wds pool (3 source shards), ingested and pruned with image_size."""
    d = tmp_path_factory.mktemp("export")
    cli("synth", d / "pool", "--layout", "wds", "--n", 300, "--seed", 0, "--shard-size", 100)
    cli("ingest", d / "pool", "-w", d / "ws")
    (d / "size.toml").write_text(RECIPE)
    run_id = cj("prune", "-w", d / "ws", "--pipeline", d / "size.toml")["run_id"]
    return {"dir": d, "pool": d / "pool", "ws": d / "ws", "run": run_id, "kept": kept(d / "ws", run_id),
            "src": source_members(d / "pool")}


# ---- webdataset -----------------------------------------------------------------------------

def test_wds_export_is_byte_identical_contiguous_and_recorded(pool):
    out = pool["dir"] / "out_basic"
    res = run_json("export", "-w", pool["ws"], "--out", out, "--shard-size", 64, "--workers", 2)
    n_kept = len(pool["kept"])
    n_shards = -(-n_kept // 64)
    assert (res["samples"], res["shards"], res["shards_written"], res["renamed_keys"]) == (n_kept, n_shards, n_shards, 0)

    samples = exported(out)
    uids = [uid_of(s) for s in samples]
    assert len(uids) == len(set(uids)) == n_kept and set(uids) == pool["kept"]
    for s in samples:
        src = pool["src"][uid_of(s)]
        assert s["__key__"] == src["key"]
        assert {k for k in s if not k.startswith("__")} == {k for k in src if k != "key"}
        for ext in src:
            if ext != "key":
                assert s[ext] == src[ext], f"{ext} of {src['key']} differs"

    # Stronger: each shard is exactly the recorded source byte ranges (headers too), then the end blocks.
    rows = q(pool["ws"], "SELECT sh.path, s.tar_offset, s.tar_end FROM decisions d JOIN samples s USING (uid) "
                         "JOIN shards sh USING (shard_id) WHERE d.run_id = ? AND d.keep "
                         "ORDER BY s.shard_id, s.row_idx", [pool["run"]])
    sizes = json.loads((out / "sizes.json").read_text())
    assert list(sizes) == [f"{i:08d}.tar" for i in range(n_shards)] and sum(sizes.values()) == n_kept
    for i in range(n_shards):
        body = b"".join(Path(p).read_bytes()[a:b] for p, a, b in rows[i * 64:(i + 1) * 64])
        data = (out / f"{i:08d}.tar").read_bytes()
        assert data[:len(body)] == body and not data[len(body):].strip(b"\0") and len(data) % 10240 == 0
        stats = json.loads((out / f"{i:08d}_stats.json").read_text())
        assert stats["count"] == sizes[f"{i:08d}.tar"] and stats["bytes"] == len(data)
        # img2dataset's keys: DataComp's resharder sizes a folder without sizes.json by `successes`
        assert stats["successes"] == stats["count"] and stats["failed_to_download"] == stats["failed_to_resize"] == 0
    cmd, status, params = q(pool["ws"], "SELECT command, status, params FROM runs WHERE run_id = ?", [res["run_id"]])[0]
    assert (cmd, status) == ("export", "ok") and json.loads(params)["run"] == pool["run"]


def test_shuffle_is_seeded_and_deterministic(pool):
    d = pool["dir"]
    outs = {}
    for name, seed in (("s3a", 3), ("s3b", 3), ("s4", 4)):
        cj("export", "-w", pool["ws"], "--run", pool["run"], "--out", d / name, "--shard-size", 100, "--shuffle", "--seed", seed,
                 "--workers", 1)
        outs[name] = d / name
    assert files(outs["s3a"]) == files(outs["s3b"])
    order3 = [uid_of(s) for s in exported(outs["s3a"])]
    order4 = [uid_of(s) for s in exported(outs["s4"])]
    canonical = [uid_of(s) for s in exported(d / "out_basic")] if (d / "out_basic").exists() else None
    assert set(order3) == set(order4) == pool["kept"] and order3 != order4
    if canonical:
        assert order3 != canonical


def test_interrupted_export_resumes_to_identical_output(pool):
    d = pool["dir"]
    args = ["export", "-w", pool["ws"], "--run", pool["run"], "--out", d / "killed", "--shard-size", 20, "--workers", 2]
    proc = run_cli(*args, check=False, env={"CURATE_EXPORT_CRASH_AFTER": "2"})
    assert proc.returncode == -9, proc.stderr  # SIGKILL: no cleanup ran
    killed = d / "killed"
    assert (killed / "_export_plan.json").exists() and not (killed / "sizes.json").exists()
    done = {p.name.replace("_stats.json", ".tar") for p in killed.glob("*_stats.json")}
    assert len(done) >= 2
    before = {n: (killed / n).stat().st_ino for n in done}
    (killed / ".00000009.tar.424242.partial").write_bytes(b"half a shard")  # what a kill mid-shard leaves
    status = q(pool["ws"], "SELECT status FROM runs WHERE command = 'export' ORDER BY run_id DESC LIMIT 1")[0][0]
    assert status == "running"  # the killed run is visible as such

    res = cj(*args)
    assert res["resumed"] and res["shards_skipped"] == len(done)
    assert res["shards_written"] == res["shards"] - len(done)
    assert {n: (killed / n).stat().st_ino for n in done} == before  # complete shards were not rewritten
    assert not list(killed.glob(".*partial"))

    cj("export", "-w", pool["ws"], "--run", pool["run"], "--out", d / "straight", "--shard-size", 20, "--workers", 1)
    assert files(killed) == files(d / "straight")
    again = cj(*args)  # a finished export rerun writes nothing
    assert again["shards_written"] == 0 and files(killed) == files(d / "straight")


def test_overwrite_removes_stale_export_files_only(pool):
    d = pool["dir"] / "ow"
    ws = ["-w", pool["ws"], "--run", pool["run"]]
    cj("export", *ws, "--out", d, "--shard-size", 20)
    n_old = len(list(d.glob("*.tar")))
    (d / "notes.txt").write_text("mine")
    (d / "keep").mkdir()
    rc, _, err = cli("export", *ws, "--out", d, "--shard-size", 100, check=False)
    assert rc == 2 and "--overwrite" in err
    res = cj("export", *ws, "--out", d, "--shard-size", 100, "--overwrite")
    assert res["removed_stale_files"] >= 2 * n_old
    assert sorted(p.name for p in d.iterdir()) == sorted(
        ["00000000.tar", "00000000_stats.json", "00000001.tar", "00000001_stats.json", "00000002.tar",
         "00000002_stats.json", "_export_plan.json", "sizes.json", "notes.txt", "keep"])
    assert len(exported(d)) == len(pool["kept"])

    foreign = pool["dir"] / "foreign"
    foreign.mkdir()
    (foreign / "00000000.tar").write_bytes(b"not ours")
    rc, _, err = cli("export", *ws, "--out", foreign, "--overwrite", check=False)
    assert rc == 2 and "not written by `curate export`" in err
    assert (foreign / "00000000.tar").read_bytes() == b"not ours"
    rc, _, err = cli("export", *ws, "--out", pool["pool"], "--overwrite", check=False)
    assert rc == 2 and "source shards" in err


def test_add_json_changes_only_the_json_member(pool):
    out = pool["dir"] / "withjson"
    res = cj("export", "-w", pool["ws"], "--run", pool["run"], "--out", out, "--add-json")
    assert res["json_rewritten"] == len(pool["kept"])
    for s in exported(out):
        meta = json.loads(s["json"])
        src = pool["src"][meta["uid"]]
        for ext in src:
            if ext not in ("key", "json"):
                assert s[ext] == src[ext]
        cur = meta.pop("curate")
        assert meta == json.loads(src["json"])
        assert cur["prune_run"] == pool["run"] and cur["stage"] == "image_size"
        assert [(x["stage"], x["keep"]) for x in cur["decisions"]] == [("image_size", True)]


def test_dry_run_and_stage_selection(pool):
    ws = pool["ws"]
    (pool["dir"] / "two.toml").write_text(RECIPE2)
    run2 = cj("prune", "-w", ws, "--pipeline", pool["dir"] / "two.toml")["run_id"]
    n_runs = q(ws, "SELECT count(*) FROM runs")[0][0]
    out = pool["dir"] / "dry"
    res = cj("export", "-w", ws, "--out", out, "--stage", "image_size", "--shard-size", 50, "--dry-run")
    assert res["samples"] == len(kept(ws, run2, 0)) and res["shards"] == -(-res["samples"] // 50)
    assert res["bytes"] > 0 and res["shards_to_write"] == res["shards"]
    assert not out.exists() and q(ws, "SELECT count(*) FROM runs")[0][0] == n_runs
    res = cj("export", "-w", ws, "--out", out, "--dry-run")  # default: the latest prune run's result
    assert res["prune_run"] == run2 and res["samples"] == len(kept(ws, run2)) < len(kept(ws, run2, 0))
    res = cj("export", "-w", ws, "--run", pool["run"], "--out", out, "--dry-run")
    assert res["samples"] == len(pool["kept"])
    rc, _, err = cli("export", "-w", ws, "--out", out, "--stage", "nope", "--dry-run", check=False)
    assert rc == 2 and "no stage" in err


def test_key_collisions_across_pools_are_renamed(pool, tmp_path):
    cli("synth", tmp_path / "poolb", "--layout", "wds", "--n", 120, "--seed", 1, "--shard-size", 100)
    ws = tmp_path / "ws"
    cli("ingest", pool["pool"], tmp_path / "poolb", "-w", ws)
    res = cj("export", "-w", ws, "--all", "--out", tmp_path / "out", "--shard-size", 150)
    n_ok = q(ws, "SELECT count(*) FROM samples WHERE status = 'ok'")[0][0]
    n_dup = q(ws, "SELECT count(*) - count(DISTINCT key) FROM samples WHERE status = 'ok'")[0][0]
    assert n_dup > 0 and res["renamed_keys"] == n_dup and res["samples"] == n_ok
    src = {**pool["src"], **source_members(tmp_path / "poolb")}
    samples = exported(tmp_path / "out")
    keys = [s["__key__"] for s in samples]
    assert len(samples) == n_ok and len(set(keys)) == n_ok and len({uid_of(s) for s in samples}) == n_ok
    renamed = 0
    for s in samples:
        rec = src[uid_of(s)]
        if s["__key__"] != rec["key"]:
            renamed += 1
            assert s["__key__"] == f"{rec['key']}_{uid_of(s)[:8]}"
        for ext in rec:
            if ext != "key":
                assert s[ext] == rec[ext]
    assert renamed == n_dup


def test_compressed_and_changed_sources(pool, tmp_path):
    gz = tmp_path / "gz"
    gz.mkdir()
    with open(pool["pool"] / "00001.tar", "rb") as src, gzip.open(gz / "00001.tar.gz", "wb") as dst:
        shutil.copyfileobj(src, dst)
    cli("ingest", gz, "-w", tmp_path / "wsgz")
    cj("export", "-w", tmp_path / "wsgz", "--all", "--out", tmp_path / "outgz", "--shuffle", "--seed", 1)
    samples = exported(tmp_path / "outgz")
    assert len(samples) == q(tmp_path / "wsgz", "SELECT count(*) FROM samples")[0][0] > 0
    for s in samples:
        rec = pool["src"][uid_of(s)]
        assert all(s[e] == rec[e] for e in rec if e != "key")

    # A source rewritten in place (same size) after ingest: the export fails loudly.
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(pool["pool"] / "00000.tar", copy / "00000.tar")
    cli("ingest", copy, "-w", tmp_path / "wsc")
    off = q(tmp_path / "wsc", "SELECT tar_offset FROM samples ORDER BY row_idx LIMIT 1 OFFSET 5")[0][0]
    with open(copy / "00000.tar", "r+b") as fh:
        fh.seek(off)
        fh.write(b"garbage!" * 8)
    rc, _, err = cli("export", "-w", tmp_path / "wsc", "--all", "--out", tmp_path / "outc", check=False)
    assert rc == 1 and "changed since ingest" in err
    assert not list((tmp_path / "outc").glob("*.tar"))


def _hostile_tar(path: Path, salt: str) -> dict[str, dict]:
    """A directory entry, a pax long-name key, a record with a repeated txt member, a plain one."""
    img = io.BytesIO()
    Image.new("RGB", (260, 240), (20, 120, 200)).save(img, "JPEG")
    long_key = "deep/" + "k" * 150
    recs = {}
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tf:
        d = tarfile.TarInfo("deep")
        d.type = tarfile.DIRTYPE
        tf.addfile(d)
        for key, extra in ((long_key, []), ("plain", []), ("twice", [("txt", b"second caption, ignored")])):
            uid = hashlib.md5(f"{salt}{key}".encode()).hexdigest()
            members = [("jpg", img.getvalue()), ("json", json.dumps({"uid": uid, "caption": key[:9]}).encode()),
                       ("txt", f"a blue picture {key[:5]}".encode()), *extra]
            for ext, data in members:
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size, ti.mtime, ti.mode = len(data), 1_600_000_000, 0o640
                tf.addfile(ti, io.BytesIO(data))
            recs[uid] = {"key": key, **dict(members[:3])}
    return recs


def test_extended_headers_repeated_members_renames_and_add_json(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    src = {**_hostile_tar(a / "00000.tar", "a"), **_hostile_tar(b / "00000.tar", "b")}
    ws = tmp_path / "ws"
    cli("ingest", a, b, "-w", ws)
    assert q(ws, "SELECT count(*) FROM sample_issues WHERE reason = 'repeated_member'")[0][0] == 2
    res = cj("export", "-w", ws, "--all", "--out", tmp_path / "out", "--add-json")
    assert res["samples"] == 6 and res["renamed_keys"] == 3 and res["repeats_dropped"] == 2
    samples = exported(tmp_path / "out")  # webdataset fails on a repeated member name: none left
    assert len(samples) == 6 and len({s["__key__"] for s in samples}) == 6
    for s in samples:
        meta = json.loads(s["json"])
        rec = src[meta["uid"]]
        assert s["__key__"] in (rec["key"], f"{rec['key']}_{meta['uid'][:8]}")
        assert s["jpg"] == rec["jpg"] and s["txt"] == rec["txt"]
        assert meta.pop("curate")["prune_run"] is None and meta == json.loads(rec["json"])
    with tarfile.open(tmp_path / "out" / "00000000.tar") as tf:  # renamed headers keep their attributes
        infos = [ti for ti in tf if ti.isfile()]
    assert {(ti.mtime, ti.mode) for ti in infos} == {(1_600_000_000, 0o640)}


# ---- DataComp submission --------------------------------------------------------------------

def test_datacomp_submission_and_verify(pool, tmp_path):
    f = tmp_path / "uids.npy"
    res = cj("export", "-w", pool["ws"], "--run", pool["run"], "--format", "datacomp", "--out", f)
    arr = np.load(f)
    assert arr.dtype == np.dtype("u8,u8") and arr.dtype.descr == [("f0", "<u8"), ("f1", "<u8")] and arr.ndim == 1
    assert res["samples"] == len(arr) == len(pool["kept"])
    assert arr.tolist() == sorted(arr.tolist())
    assert {pair_to_uid(h, lo) for h, lo in arr.tolist()} == pool["kept"]
    assert all(uid_to_pair(u) in set(arr.tolist()) for u in list(pool["kept"])[:5])
    rc, _, err = cli("export", "-w", pool["ws"], "--run", pool["run"], "-f", "datacomp", "--out", f, check=False)
    assert rc == 2  # exists: --overwrite needed

    rep = cj("verify-submission", f, "-w", pool["ws"])
    assert rep["ok"] and rep["samples"] == len(arr) and rep["in_pool"] == len(arr) and rep["duplicates"] == 0

    def check(a, *extra):
        p = tmp_path / "bad.npy"
        np.save(p, a)
        rc, rep, _ = cli("verify-submission", p, *extra, check=False)
        return rc, rep

    def report(a, ws=None, strict=False):  # the same checks through the library, without a process each
        p = tmp_path / "bad.npy"
        np.save(p, a)
        if ws is None:
            return verify_submission(p, None, strict=strict)
        with Workspace(ws) as w, open_manifest(w, read_only=True) as m:
            return verify_submission(p, m, strict=strict)

    rc, rep = check(arr[::-1].copy())
    assert rc == 1 and not rep["sorted"] and "not sorted" in rep["errors"][0]
    dup = np.sort(np.concatenate([arr, arr[:3]]))
    rc, rep = check(dup)
    assert rc == 0 and rep["duplicates"] == 3 and rep["unique"] == len(arr) and rep["warnings"]
    assert check(dup, "--strict")[0] == 1
    rep = report(arr.view("<u8").reshape(-1, 2))
    assert not rep["ok"] and "dtype" in rep["errors"][0]
    rep = report(arr.astype(">u8,>u8"))
    assert not rep["ok"] and "byte order" in rep["errors"][0]
    stranger = np.sort(np.concatenate([arr, np.array([uid_to_pair("f" * 32)], dtype="u8,u8")]))
    assert report(stranger)["ok"]
    rep = report(stranger, pool["ws"])
    assert not rep["ok"] and rep["not_in_pool"] == 1 and "f" * 32 in rep["errors"][0]
    rep = report(np.zeros(0, dtype="u8,u8"))
    assert not rep["ok"] and "empty" in rep["errors"][0]

    # DataComp's resharder also reads the records with no header (np.memmap, for any file without
    # the NumPy magic): the same array written raw is valid, in the pool, and so reported
    raw = tmp_path / "uids.raw"
    arr.tofile(raw)
    rep = cj("verify-submission", raw, "-w", pool["ws"])
    assert rep["ok"] and rep["layout"] == "raw" and rep["samples"] == len(arr) and rep["in_pool"] == len(arr)
    np.memmap(raw, np.dtype("u8,u8"), mode="r")  # as the resharder opens it
    rc, rep, _ = cli("verify-submission", raw, check=False)
    assert rc == 0 and rep["layout"] == "raw"
    arr[::-1].tofile(raw)
    rc, rep, _ = cli("verify-submission", raw, check=False)
    assert rc == 1 and "not sorted" in rep["errors"][0]
    (tmp_path / "odd.bin").write_bytes(b"x" * 17)
    rc, rep, _ = cli("verify-submission", tmp_path / "odd.bin", check=False)
    assert rc == 1 and "not a multiple of 16" in rep["errors"][0]
    np.save(tmp_path / "strings.npy", np.array(["a" * 32], dtype=object), allow_pickle=True)
    rc, rep, _ = cli("verify-submission", tmp_path / "strings.npy", check=False)
    assert rc == 1 and "Python objects" in rep["errors"][0] and "pickle" not in rep["errors"][0]


# ---- parquet, metadata-only pools ------------------------------------------------------------

def test_parquet_export_and_metadata_only_pool(tmp_path):
    cli("synth", tmp_path / "meta", "--layout", "datacomp", "--n", 300, "--seed", 0, "--dims", "32,48")
    ws = tmp_path / "ws"
    cli("ingest", tmp_path / "meta", "-w", ws)
    (tmp_path / "size.toml").write_text(RECIPE)
    run_id = cj("prune", "-w", ws, "--pipeline", tmp_path / "size.toml")["run_id"]
    keep = kept(ws, run_id)

    out = tmp_path / "kept.parquet"
    res = cj("export", "-w", ws, "-f", "parquet", "--out", out)
    frame = pl.read_parquet(out)
    assert res["samples"] == frame.height == len(keep) and set(frame["uid"]) == keep
    for c in ("uid", "url", "caption", "width", "height", "sha256", "shard", "key", "score__datacomp-b32",
              "score__datacomp-l14", "cluster", "cluster_stage"):
        assert c in frame.columns
    src = pl.concat([pl.read_parquet(p) for p in sorted((tmp_path / "meta").glob("0*.parquet"))])
    joined = frame.join(src.select("uid", "clip_b32_similarity_score", "text"), on="uid")
    assert joined.height == frame.height and (joined["caption"] == joined["text"]).all()
    assert (joined["score__datacomp-b32"] - joined["clip_b32_similarity_score"]).abs().max() < 1e-6
    meta = read_export_metadata(out)
    assert meta["selection"]["prune_run"] == run_id and meta["recipe"]["name"] == "size_only"
    assert pq.read_metadata(out).num_rows == len(keep)

    uids = tmp_path / "uids.npy"
    cj("export", "-w", ws, "-f", "datacomp", "--out", uids)
    assert {pair_to_uid(h, lo) for h, lo in np.load(uids).tolist()} == keep

    proc = run_cli("export", "-w", ws, "--out", tmp_path / "shards", check=False)
    assert proc.returncode == 2 and "metadata-only" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr


def test_clusters_come_from_the_latest_clustering_stage():
    dec = pl.DataFrame({
        "uid": ["a", "a", "b", "c"], "stage_idx": [1, 2, 1, 0], "stage": ["semdedup", "dbp", "semdedup", "size"],
        "detail": ["cluster=4 rank=2", "cluster=7 quota=3/9", "cluster=12 rank=0", "min_side=180"]})
    got = {r["uid"]: (r["cluster"], r["cluster_stage"]) for r in clusters_of(dec).iter_rows(named=True)}
    assert got == {"a": (7, "dbp"), "b": (12, "semdedup")}
