"""DataComp metadata and its downloaded images as one pool (docs/datacomp.md).

A DataComp-layout metadata folder (parquet + npz) whose URLs point at a real HTTP server on
127.0.0.1 is downloaded by the real img2dataset through `curate download`, which ingests the
metadata and attaches each image to its sample by uid. The same shards and metadata ingested
in the other order (shards first), and in the first order by `curate ingest`, give the same
pool. A filtered run then exports byte-exact image shards, listing the samples without images;
`curate score` embeds the attached images and prune finds those embeddings by the image's place.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import manifest_rows as q  # noqa: E402
from conftest import run_cli, run_json  # noqa: E402
from httpserver import ImageServer, make_image  # noqa: E402

# (path on the server, caption, (w, h) of the served image or None, what happens)
ROWS = [
    ("/img/a.jpg", "a red barn in a green field", (1024, 768), "ok"),
    ("/img/b.jpg", "two dogs playing on the beach", (300, 900), "ok"),
    ("/missing/c.jpg", "a dead link to a photo", None, "download_failed"),
    ("/img/d.jpg", "a small icon of a house", (200, 100), "ok"),
    ("/img/e.jpg", "a picture that changed since the crawl", (640, 480), "sha256_mismatch"),
    ("/html/f.jpg", "a page that is not an image", None, "download_failed"),
    ("/img/g.jpg", "a mountain lake at sunrise", (512, 512), "ok"),
    ("/img/h.jpg", "no sha256 in the metadata for this one", (800, 600), "ok_no_sha"),
    ("/error/i.jpg", "the server fails on this one", None, "download_failed"),
    ("/img/j.jpg", "a city street at night with lights", (700, 350), "ok"),
]
PER_SHARD = 4


pytestmark = pytest.mark.usefixtures("local_only")


def served_bytes(path: str, size) -> bytes:
    name = path.rsplit("/", 1)[1].split(".")[0]
    return make_image(name, *size, "JPEG")


def write_metadata(folder: Path, server: ImageServer) -> dict[str, dict]:
    """Two DataComp metadata files (parquet + row-aligned npz, DataComp's columns and keys)."""
    folder.mkdir()
    rng = np.random.default_rng(7)
    truth = {}
    halves = [ROWS[:6], ROWS[6:]]
    for f, rows in enumerate(halves):
        uids = [f"{rng.integers(0, 2**63):016x}{rng.integers(0, 2**63):016x}" for _ in rows]
        urls, shas, widths, heights = [], [], [], []
        for (path, _, size, what), uid in zip(rows, uids):
            w, h = size or (400, 300)
            urls.append(server.url(f"{path}?w={w}&h={h}" if size else path))
            sha = hashlib.sha256(served_bytes(path, size)).hexdigest() if size else "0" * 64
            if what == "sha256_mismatch":
                sha = hashlib.sha256(b"the bytes the crawl saw").hexdigest()
            shas.append(None if what == "ok_no_sha" else sha)
            widths.append(w)
            heights.append(h)
            truth[uid] = {"what": what, "size": size, "file": f, "row": len(truth) - 6 * f if f else len(truth)}
        n = len(rows)
        pl.DataFrame({
            "uid": uids, "url": urls, "text": [c for _, c, _, _ in rows], "original_width": widths,
            "original_height": heights, "sha256": shas,
            "clip_b32_similarity_score": rng.uniform(0.1, 0.4, n).astype(np.float32),
            "clip_l14_similarity_score": rng.uniform(0.1, 0.4, n).astype(np.float32),
            "face_bboxes": [[[0.1, 0.1, 0.3, 0.3]] if i % 2 else [] for i in range(n)],
        }, schema_overrides={"face_bboxes": pl.List(pl.List(pl.Float64))}).write_parquet(folder / f"{f:08d}.parquet")

        def unit(d):
            x = rng.normal(size=(n, d)).astype(np.float32)
            return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)

        np.savez(folder / f"{f:08d}.npz", b32_img=unit(512), b32_txt=unit(512), l14_img=unit(768), l14_txt=unit(768))
    return truth


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """`curate download META` into workspace ws1: metadata first, images attached as downloaded."""
    d = tmp_path_factory.mktemp("attach")
    with ImageServer() as server:
        truth = write_metadata(d / "meta", server)
        out = run_json("download", d / "meta", "-w", d / "ws1", "--out", d / "shards", "--processes", 1,
                       "--threads", 4, "--timeout", 3, "--retries", 0, "--samples-per-shard", PER_SHARD,
                       check=False)
    return d, truth, out


def pool_state(ws: Path) -> list[tuple]:
    """The samples table as paths and values (ids differ between workspaces; img_row, the row of
    an image shard's computed embeddings, may leave a gap where shards-first ingest had an image
    it then detached)."""
    return q(ws, "SELECT s.uid, sp.path, s.key, s.row_idx, s.url, s.caption, s.width, s.height, s.sha256, s.source, "
                 "s.status, ih.path, s.img_key, s.img_width, s.img_height, s.img_sha256, s.image_ext, "
                 "s.image_bytes, s.members, s.tar_offset, s.tar_end FROM samples s "
                 "JOIN shards sp ON sp.shard_id = s.shard_id LEFT JOIN shards ih ON ih.shard_id = s.img_shard_id "
                 "ORDER BY s.uid")


def issue_state(ws: Path) -> list[tuple]:
    return q(ws, "SELECT i.uid, i.reason, i.action, sh.path, i.key FROM sample_issues i "
                 "JOIN shards sh USING (shard_id) ORDER BY ALL")


def test_download_attaches_images_to_metadata_samples(pool):
    d, truth, out = pool
    ws = d / "ws1"
    ok = {u for u, t in truth.items() if t["what"].startswith("ok")}
    failed = {u for u, t in truth.items() if t["what"] == "download_failed"}
    mismatch = {u for u, t in truth.items() if t["what"] == "sha256_mismatch"}
    assert out["images_attached"] == len(ok) and out["images_mismatched"] == 1, out
    assert out["faces_blurred_by"] == "face_bboxes"
    # one sample per metadata row, all DataComp's, at their parquet rows (the npz stays aligned)
    rows = {r[0]: r for r in q(ws, "SELECT s.uid, sh.path, s.row_idx, s.source, s.img_shard_id, s.img_width, "
                                   "s.img_height, s.width, s.height FROM samples s JOIN shards sh USING (shard_id)")}
    assert set(rows) == set(truth)
    for uid, t in truth.items():
        _, path, row, source, img, iw, ih, w, h = rows[uid]
        assert (Path(path).name, row, source) == (f"{t['file']:08d}.parquet", t["row"], "datacomp")
        assert (img is not None) == (uid in ok), (uid, t)
        if uid in ok:  # the stored image's size: longer side at most 512 (DataComp's download)
            sw, sh_ = t["size"]
            k = min(1.0, 512 / max(sw, sh_))
            assert (iw, ih) == (round(sw * k), round(sh_ * k)) or abs(iw - sw * k) <= 1 and abs(ih - sh_ * k) <= 1
            assert (w, h) == t["size"]  # width/height stay the original's (DataComp's filters use them)
    # the image really is the sample's: its tar record carries the uid, its bytes decode to that size
    for uid, path, off, end, ext, iw, ih in q(ws, "SELECT s.uid, sh.path, s.tar_offset, s.tar_end, s.image_ext, "
                                                  "s.img_width, s.img_height FROM samples s JOIN shards sh "
                                                  "ON sh.shard_id = s.img_shard_id"):
        with open(path, "rb") as fh:
            fh.seek(off)
            blob = fh.read(end - off)
        with tarfile.open(fileobj=io.BytesIO(blob + b"\0" * 1024)) as tf:
            members = {m.name.rsplit(".", 1)[1]: tf.extractfile(m).read() for m in tf.getmembers()}
        assert json.loads(members["json"])["uid"] == uid
        assert Image.open(io.BytesIO(members[ext])).size == (iw, ih)
    # faces blurred as DataComp's download does: the face_bboxes box of the stored image differs
    # from the served image (resized alike) where a box was given, and only there
    for tar in sorted((d / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            recs: dict[str, dict] = {}
            for m in tf.getmembers():
                recs.setdefault(m.name.split(".")[0], {})[m.name.split(".", 1)[1]] = tf.extractfile(m).read()
        for r in recs.values():
            meta = json.loads(r["json"])
            t = truth[meta["uid"]]
            im = np.asarray(Image.open(io.BytesIO(r["jpg"])).convert("RGB"), dtype=float)
            hh, ww = im.shape[:2]
            path = next(p for p, _, size, _ in ROWS if size == t["size"] and meta["url"].split("?")[0].endswith(p))
            src = Image.open(io.BytesIO(served_bytes(path, t["size"]))).convert("RGB").resize((ww, hh), Image.BILINEAR)
            diff = np.abs(im - np.asarray(src, dtype=float)).mean(axis=2)
            box = np.zeros((hh, ww), bool)
            box[int(0.1 * hh):int(0.3 * hh), int(0.1 * ww):int(0.3 * ww)] = True
            if meta.get("face_bboxes"):
                assert diff[box].mean() > max(1.0, 2 * diff[~box].mean()), (path, diff[box].mean(), diff[~box].mean())
            else:
                assert diff[box].mean() < 1.0, (path, diff[box].mean())
    # failed downloads stay as metadata-only samples, with img2dataset's status as their reason
    issues = {(u, r): (a, det) for u, r, a, det in q(ws, "SELECT uid, reason, action, detail FROM sample_issues")}
    for uid in failed:
        action, detail = issues[(uid, "download_failed")]
        assert action == "warning" and detail.startswith(("failed_to_download", "failed_to_resize")), detail
    (uid,) = mismatch
    action, detail = issues[(uid, "sha256_mismatch")]
    assert action == "rejected" and "differs from the metadata" in detail
    # metadata scores and embeddings came along
    assert q(ws, "SELECT count(*) FROM scores WHERE scorer = 'datacomp-l14'")[0][0] == len(truth)


def test_either_order_gives_the_same_pool(pool, tmp_path):
    d, truth, _ = pool
    meta_first = pool_state(d / "ws1")
    # shards first, then the metadata
    ws2 = tmp_path / "ws2"
    run_cli("ingest", d / "shards", "-w", ws2)
    mid = q(ws2, "SELECT count(*), count(*) FILTER (WHERE source = 'wds') FROM samples")[0]
    assert mid[0] == mid[1] == sum(t["what"] != "download_failed" for t in truth.values())
    out = run_json("ingest", d / "meta", "-w", ws2)
    assert out["images_attached"] == sum(t["what"].startswith("ok") for t in truth.values())
    assert out["images_mismatched"] == 1 and out["rejected"] == 0
    # metadata first with `curate ingest` (no download)
    ws3 = tmp_path / "ws3"
    run_cli("ingest", d / "meta", "-w", ws3)
    run_cli("ingest", d / "shards", "-w", ws3)
    assert pool_state(ws2) == meta_first
    assert pool_state(ws3) == meta_first
    assert issue_state(ws2) == issue_state(d / "ws1") == issue_state(ws3)
    # the image record whose sha256 differs is kept by no sample: the metadata sample has no image
    mism = [u for u, t in truth.items() if t["what"] == "sha256_mismatch"]
    assert q(ws2, "SELECT img_shard_id, source FROM samples WHERE uid = ?", mism) == [(None, "datacomp")]
    # shard counts agree too (a shard's own samples; its rejected records)
    counts = "SELECT path, n_samples, n_rejected FROM shards ORDER BY path"
    assert q(ws2, counts) == q(ws3, counts)
    # re-ingesting a changed metadata file (--replace) keeps the images attached, in both orders
    for ws in (ws2, ws3):
        for f in (d / "meta").glob("*.parquet"):
            os.utime(f)
        run_cli("ingest", d / "meta", "-w", ws, "--replace")
        assert pool_state(ws) == meta_first, ws


def test_filtered_export_writes_byte_exact_image_shards(pool, tmp_path):
    d, truth, _ = pool
    ws = d / "ws1"
    run_cli("prune", "-w", ws, "--pipeline", "datacomp_no_filter")
    out = run_json("export", "-w", ws, "--format", "wds", "--out", tmp_path / "wds", "--shard-size", 3)
    with_image = {u for u, t in truth.items() if t["what"].startswith("ok")}
    assert out["samples"] == len(with_image) and out["samples_without_image"] == len(truth) - len(with_image)
    got = {}
    for tar in sorted((tmp_path / "wds").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for m in tf.getmembers():
                got[m.name] = tf.extractfile(m).read()
    # every member of every exported sample, byte for byte as in the downloaded shards
    want = {}
    for tar in sorted((d / "shards").glob("*.tar")):
        with tarfile.open(tar) as tf:
            recs = {}
            for m in tf.getmembers():
                recs.setdefault(m.name.split(".", 1)[0], {})[m.name] = tf.extractfile(m).read()
        for members in recs.values():
            js = next(v for k, v in members.items() if k.endswith(".json"))
            if json.loads(js)["uid"] in with_image:
                want.update(members)
    assert got == want
    listed = pl.read_parquet(tmp_path / "wds" / "without_image.parquet")
    assert set(listed["uid"]) == set(truth) - with_image
    why = dict(zip(listed["uid"], listed["why"]))
    assert all(why[u].startswith("download_failed") for u, t in truth.items() if t["what"] == "download_failed")
    assert all(why[u].startswith("sha256_mismatch") for u, t in truth.items() if t["what"] == "sha256_mismatch")
    sizes = json.loads((tmp_path / "wds" / "sizes.json").read_text())
    assert sum(sizes.values()) == len(with_image)


def test_score_embeds_attached_images_and_prune_finds_them(pool, tmp_path, tiny_ckpt):
    d, truth, _ = pool
    ws = tmp_path / "ws"
    run_cli("ingest", d / "meta", "-w", ws)
    run_cli("ingest", d / "shards", "-w", ws)
    # the defaults a user runs (DataLoader workers included)
    run_cli("score", "-w", ws, "--model", f"curate-tiny-vit@{tiny_ckpt},name=tiny", "--device", "cpu")
    with_image = {u for u, t in truth.items() if t["what"].startswith("ok")}
    assert {u for (u,) in q(ws, "SELECT uid FROM scores WHERE scorer = 'tiny' AND score IS NOT NULL")} == with_image
    recipe = tmp_path / "r.toml"
    recipe.write_text('name = "r"\n[[stages]]\nstage = "decode_failures"\n'
                      '[[stages]]\nstage = "semdedup"\nscorer = "tiny"\neps = 0.0001\nk = 2\n')
    out = run_json("prune", "-w", ws, "--pipeline", recipe)
    assert out["kept"] == len(with_image)
    dropped = dict(q(ws, "SELECT uid, reason FROM decisions WHERE NOT keep"))
    assert dropped == {u: "no_image" for u in set(truth) - with_image}
    # the pool's own embeddings are usable for every sample, with or without an image
    recipe.write_text('name = "r2"\n[[stages]]\nstage = "semdedup"\nscorer = "datacomp-l14"\neps = 0.0001\nk = 2\n')
    assert run_json("prune", "-w", ws, "--pipeline", recipe)["kept"] == len(truth)
    # the embeddings semdedup read are the attached images' own: the same as scoring a
    # webdataset pool of the same shards
    ws_w = tmp_path / "ws_w"
    run_cli("ingest", d / "shards", "-w", ws_w)
    run_cli("score", "-w", ws_w, "--model", f"curate-tiny-vit@{tiny_ckpt},name=tiny", "--device", "cpu")
    a = dict(q(ws, "SELECT uid, score FROM scores WHERE scorer = 'tiny' AND score IS NOT NULL"))
    b = dict(q(ws_w, "SELECT uid, score FROM scores WHERE scorer = 'tiny' AND score IS NOT NULL"))
    assert a.keys() <= b.keys() and all(abs(a[u] - b[u]) < 1e-6 for u in a)
    # an image shard re-ingested (--replace) detaches its images and what was computed from them;
    # they attach again, and the next score run embeds that shard again, to the same scores
    tar = sorted((d / "shards").glob("*.tar"))[0]
    os.utime(tar)
    run_cli("ingest", tar, "-w", ws, "--replace")
    again = dict(q(ws, "SELECT uid, score FROM scores WHERE scorer = 'tiny' AND score IS NOT NULL"))
    assert len(again) < len(a)
    out = run_json("score", "-w", ws, "--model", f"curate-tiny-vit@{tiny_ckpt},name=tiny", "--device", "cpu")
    assert out["shards_scored"] == 1
    assert dict(q(ws, "SELECT uid, score FROM scores WHERE scorer = 'tiny' AND score IS NOT NULL")) == a
