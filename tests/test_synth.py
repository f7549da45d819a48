"""`curate synth`: determinism, img2dataset/DataComp layouts, injected defects and the truth file.

Every test reads real files the generator wrote; nothing is mocked."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from PIL import Image

from curate.errors import UsageError
from curate.synth import DEFAULT_RATES, TRUTH_NAME, generate, read_params

WDS = dict(layout="wds", n=400, seed=3, shard_size=150, show_progress=False)
DC = dict(layout="datacomp", n=600, seed=5, shard_size=250, show_progress=False)
DECODABLE = {"ok", "small", "wide", "exact_dup", "missing_caption", "bad_utf8"}
UNDECODABLE = {"corrupt", "truncated", "non_image"}


def _files(root: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(root.iterdir()) if p.is_file()}


def _decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def _tar_members(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = defaultdict(dict)
    with tarfile.open(path) as tf:
        for m in tf.getmembers():
            key, ext = m.name.split(".", 1)
            out[key][ext] = tf.extractfile(m).read()
    return out


@pytest.fixture(scope="module")
def wds_pool(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("wds") / "pool"
    return out, generate(out, **WDS)


@pytest.fixture(scope="module")
def wds_members(wds_pool) -> dict[str, dict[str, dict[str, bytes]]]:
    out, _ = wds_pool
    return {p.name: _tar_members(p) for p in sorted(out.glob("*.tar"))}


@pytest.fixture(scope="module")
def truth(wds_pool) -> pl.DataFrame:
    return pl.read_parquet(wds_pool[0] / TRUTH_NAME)


@pytest.fixture(scope="module")
def dc_pool(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("dc") / "pool"
    return out, generate(out, **DC)


# ---- webdataset layout ------------------------------------------------------------------

def test_wds_is_byte_identical_across_runs(wds_pool, tmp_path):
    out, _ = wds_pool
    again = generate(tmp_path / "again", **WDS)
    a, b = _files(out), _files(tmp_path / "again")
    assert sorted(a) == sorted(b)
    assert [name for name in a if a[name] != b[name]] == []
    assert again["records"] == WDS["n"]
    other = generate(tmp_path / "other", **{**WDS, "seed": 4})
    assert other["records"] == WDS["n"]
    assert (tmp_path / "other" / "00000.tar").read_bytes() != a["00000.tar"]


def test_wds_file_layout(wds_pool):
    out, summary = wds_pool
    names = sorted(p.name for p in out.iterdir())
    assert names == ["00000.parquet", "00000.tar", "00000_stats.json", "00001.parquet", "00001.tar",
                     "00001_stats.json", "00002.parquet", "00002.tar", "00002_stats.json", TRUTH_NAME]
    assert summary["shards"] == 3
    with tarfile.open(out / "00000.tar") as tf:
        for m in tf.getmembers():
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "bigdata", "bigdata", 0o444)
    params = read_params(out)
    assert (params["n"], params["seed"], params["shard_size"]) == (WDS["n"], WDS["seed"], WDS["shard_size"])
    assert params["rates"] == DEFAULT_RATES


def test_keys_follow_img2dataset(truth):
    # shard_size 150 -> 3 in-shard digits, 5 shard digits: shard 1, row 7 -> "00001007"
    row = truth.filter((pl.col("shard") == "00001.tar") & (pl.col("row") == 7)).row(0, named=True)
    assert row["key"] == "00001007"
    assert truth["key"].str.len_chars().unique().to_list() == [8]


def test_members_json_and_images(wds_members, truth):
    seen = 0
    for r in truth.iter_rows(named=True):
        ik = r["image_kind"].split(":")[0]
        members = wds_members[r["shard"]].get(r["key"], {})
        if ik == "failed_download":
            assert members == {}
            continue
        assert "json" in members
        js = json.loads(members["json"])
        for field in ("uid", "url", "caption", "key", "status", "width", "height", "original_width",
                      "original_height", "sha256"):
            assert field in js
        assert js["uid"] == r["uid"] and len(js["uid"]) == 32 and int(js["uid"], 16) >= 0
        assert js["key"] == r["key"] and js["status"] == "success"
        assert js["url"].startswith(("http://", "https://")) and ".test/" in js["url"]
        assert ("txt" in members) == (ik != "missing_caption")
        img_ext = [e for e in members if e not in ("json", "txt")]
        if ik == "missing_image":
            assert img_ext == []
            continue
        assert img_ext == [r["ext"]]
        data = members[r["ext"]]
        assert js["sha256"] == hashlib.sha256(data).hexdigest()
        if ik in UNDECODABLE:
            with pytest.raises(Exception):
                _decode(data)
            continue
        img = _decode(data)
        seen += 1
        assert img.size == (js["width"], js["height"])
        assert max(img.size) <= 512
        w, h, ow, oh = js["width"], js["height"], js["original_width"], js["original_height"]
        if ik == "small":
            assert min(ow, oh) < 200
        elif ik == "wide":
            assert max(ow, oh) / min(ow, oh) > 3 and min(ow, oh) >= 200
        else:
            assert min(ow, oh) >= 200 and max(ow, oh) / min(ow, oh) <= 3
            assert min(w, h) >= 200 and max(w, h) / min(w, h) <= 3
    assert seen > 300


def test_non_jpeg_and_broken_payloads_are_realistic(wds_members, truth):
    exts = set(truth["ext"].drop_nulls().to_list())
    assert "jpg" in exts and exts <= {"jpg", "png", "webp"}
    for r in truth.filter(pl.col("image_kind").is_in(["non_image", "truncated", "corrupt"])).iter_rows(named=True):
        data = wds_members[r["shard"]][r["key"]]["jpg"]
        if r["image_kind"] == "non_image":
            assert data.lstrip()[:1] in (b"<", b"{")
        if r["image_kind"] == "truncated":
            assert data[:2] == b"\xff\xd8" and not data.endswith(b"\xff\xd9")
            Image.open(io.BytesIO(data))  # the header parses; the pixels do not (checked above)


def test_bad_utf8_caption(wds_members, truth):
    rows = truth.filter(pl.col("image_kind") == "bad_utf8")
    assert rows.height >= 1
    for r in rows.iter_rows(named=True):
        m = wds_members[r["shard"]][r["key"]]
        with pytest.raises(UnicodeDecodeError):
            m["txt"].decode("utf-8")
        caption = json.loads(m["json"])["caption"]
        assert m["txt"] == caption.encode("cp1252", errors="replace")


def test_webdataset_library_reads_the_shards(wds_pool, wds_members):
    import webdataset as wds

    out, _ = wds_pool
    urls = [str(p) for p in sorted(out.glob("*.tar"))]
    keys = []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        keys.append(sample["__key__"])
        assert "json" in sample
    expected = sorted(k for shard in wds_members.values() for k in shard)
    assert sorted(keys) == expected


def test_sidecars_match_tar_contents(wds_pool, wds_members, truth):
    out, _ = wds_pool
    for tar_name, members in wds_members.items():
        stem = tar_name[:-4]
        stats = json.loads((out / f"{stem}_stats.json").read_text())
        side = pl.read_parquet(out / f"{stem}.parquet")
        t = truth.filter(pl.col("shard") == tar_name)
        assert stats["count"] == side.height == t.height
        assert stats["successes"] == len(members) == side.filter(pl.col("status") == "success").height
        assert stats["failed_to_download"] == side.filter(pl.col("status") == "failed_to_download").height
        assert stats["successes"] + stats["failed_to_download"] + stats["failed_to_resize"] == stats["count"]
        assert sum(stats["status_dict"].values()) == stats["count"]
        assert side.columns == ["uid", "url", "caption", "key", "status", "error_message", "width", "height",
                                "original_width", "original_height", "sha256"]
        assert side["key"].to_list() == t["key"].to_list() and side["uid"].to_list() == t["uid"].to_list()
        failed = side.filter(pl.col("status") == "failed_to_download")
        assert failed["error_message"].null_count() == 0 and failed["sha256"].null_count() == failed.height
        assert not set(failed["key"].to_list()) & set(members)
        for r in side.filter(pl.col("status") == "success").iter_rows(named=True):
            js = json.loads(members[r["key"]]["json"])
            assert (r["sha256"], r["width"], r["caption"]) == (js["sha256"], js["width"], js["caption"])


def test_truth_counts_follow_rates(wds_pool, truth):
    _, summary = wds_pool
    n = WDS["n"]
    assert truth.height == n and truth["uid"].n_unique() == n
    ik = truth["image_kind"].str.split(":").list.first()
    ck = truth["caption_kind"].str.split(":").list.first()
    for kind in ("small", "wide", "corrupt", "truncated", "non_image", "missing_image", "missing_caption",
                 "bad_utf8", "failed_download"):
        assert (ik == kind).sum() == max(1, round(DEFAULT_RATES[kind] * n)), kind
    for kind in ("exact_dup", "near_dup"):   # a duplicate with no earlier original becomes ok
        assert max(1, round(DEFAULT_RATES[kind] * n)) - 2 <= (ik == kind).sum() <= round(DEFAULT_RATES[kind] * n)
    for kind in ("mismatched", "non_english", "junk"):
        assert (ck == kind).sum() == round(DEFAULT_RATES[kind] * n), kind
    defect = 1 - truth["clean"].mean()
    assert 0.25 <= defect <= 0.35
    assert truth["clean"].to_list() == ((ik == "ok") & (ck == "clean")).to_list()
    assert truth["matched"].to_list() == ck.is_in(["clean", "non_english"]).to_list()
    assert summary["clean"] == truth["clean"].sum()
    assert summary["image_kinds"]["failed_download"] == (ik == "failed_download").sum()
    langs = truth.filter(ck == "non_english")
    assert (langs["caption_kind"].str.split(":").list.last() == langs["lang"]).all()
    assert truth.filter(ck == "clean")["lang"].unique().to_list() == ["en"]
    # long-tailed concepts: the most frequent concept is several times the median one
    freq = truth["concept"].value_counts()["count"].sort(descending=True).to_numpy()
    assert len(freq) >= 10 and freq[0] >= 3 * np.median(freq)
    assert truth["colour"].n_unique() >= 8


def test_duplicates_point_to_their_originals(wds_members, truth):
    by_uid = {r["uid"]: r for r in truth.iter_rows(named=True)}
    dups = truth.filter(pl.col("dup_of").is_not_null())
    assert dups.height >= 10
    assert set(dups["image_kind"].str.split(":").list.first().unique().to_list()) == {"exact_dup", "near_dup"}
    for r in dups.iter_rows(named=True):
        o = by_uid[r["dup_of"]]
        assert o["image_kind"] == "ok" and (o["shard"], o["key"]) == (r["dup_of_shard"], r["dup_of_key"])
        assert (o["concept"], o["colour"]) == (r["concept"], r["colour"])
        orig = wds_members[o["shard"]][o["key"]][o["ext"]]
        copy = wds_members[r["shard"]][r["key"]][r["ext"]]
        if r["image_kind"] == "exact_dup":
            assert copy == orig and r["uid"] != o["uid"]
            continue
        assert copy != orig
        a, b = _decode(orig).convert("L"), _decode(copy).convert("L")
        if r["image_kind"] == "near_dup:flip":
            b = b.transpose(Image.FLIP_LEFT_RIGHT)
        b = b.resize(a.size)
        if r["image_kind"] != "near_dup:crop":
            diff = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean()
            assert diff < 12, (r["image_kind"], diff)
    # some duplicates cross a shard boundary
    assert (dups["dup_of_shard"] != dups["shard"]).any()


def test_captions_name_colour_and_object(truth, wds_pool):
    out, _ = wds_pool
    side = pl.concat([pl.read_parquet(p) for p in sorted(out.glob("0*.parquet"))])
    t = truth.with_columns(side["caption"].alias("caption"))
    clean = t.filter(pl.col("caption_kind") == "clean")
    assert clean.height > 250
    for r in clean.iter_rows(named=True):
        low = r["caption"].lower()
        assert r["colour"] in low and r["concept"] in low, r["caption"]
    mism = t.filter(pl.col("caption_kind") == "mismatched")
    assert all(not (r["colour"] in r["caption"].lower() and r["concept"] in r["caption"].lower())
               for r in mism.iter_rows(named=True))
    junk = t.filter(pl.col("caption_kind").str.starts_with("junk:"))
    assert junk["caption_kind"].n_unique() >= 4


def test_no_uid_option(tmp_path):
    out = tmp_path / "nouid"
    generate(out, layout="wds", n=40, seed=1, no_uid=True, show_progress=False, name_digits=8)
    assert (out / "00000000.tar").exists()
    side = pl.read_parquet(out / "00000000.parquet")
    assert "uid" not in side.columns
    for k, m in _tar_members(out / "00000000.tar").items():
        assert "uid" not in json.loads(m["json"])


def test_refuses_non_empty_out_and_bad_options(tmp_path, wds_pool):
    out, _ = wds_pool
    with pytest.raises(UsageError):
        generate(out, **WDS)
    with pytest.raises(UsageError):
        generate(tmp_path / "x", layout="tiff", n=5)
    with pytest.raises(UsageError):
        generate(tmp_path / "x", layout="datacomp", n=5, rates={"corrupt": 0.1})
    with pytest.raises(UsageError):
        generate(tmp_path / "x", layout="wds", n=5, rates={"nonsense": 0.1})
    assert not (tmp_path / "x").exists()


def test_overwrite_removes_stale_shards(tmp_path):
    out = tmp_path / "ow"
    generate(out, layout="wds", n=30, seed=0, shard_size=10, show_progress=False)
    (out / "notes.md").write_text("mine")
    generate(out, layout="wds", n=12, seed=0, shard_size=10, overwrite=True, show_progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == ["00000.tar", "00001.tar"]
    assert (out / "notes.md").read_text() == "mine"
    assert pl.read_parquet(out / TRUTH_NAME).height == 12


def test_cli_synth(tmp_path, capsys):
    from curate.cli.main import main

    out = tmp_path / "cli"
    rc = main(["synth", str(out), "--n", "25", "--seed", "2", "--shard-size", "10", "--rate", "junk=0.2",
               "--json", "--quiet"])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["records"] == 25 and summary["shards"] == 3 and summary["rates"]["junk"] == 0.2
    assert main(["synth", str(out), "--n", "25"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["synth", str(tmp_path / "bad"), "--rate", "junk"]) == 2


# ---- DataComp layout --------------------------------------------------------------------

def _dc_arrays(out: Path):
    parts, arrays = [], defaultdict(list)
    for pq_path in sorted(out.glob("0*.parquet")):
        df = pl.read_parquet(pq_path)
        with np.load(pq_path.with_suffix(".npz")) as z:
            assert sorted(z.files) == ["b32_img", "b32_txt", "l14_img", "l14_txt"]
            for k in z.files:
                assert z[k].dtype == np.float16 and z[k].shape[0] == df.height
                arrays[k].append(z[k])
        parts.append(df)
    return pl.concat(parts), {k: np.concatenate(v) for k, v in arrays.items()}


def test_datacomp_layout_and_embeddings(dc_pool):
    out, summary = dc_pool
    assert sorted(p.name for p in out.iterdir()) == [
        "0000000000.npz", "0000000000.parquet", "0000000001.npz", "0000000001.parquet",
        "0000000002.npz", "0000000002.parquet", TRUTH_NAME]
    df, arr = _dc_arrays(out)
    assert df.columns == ["uid", "url", "text", "original_width", "original_height", "sha256",
                          "clip_b32_similarity_score", "clip_l14_similarity_score", "face_bboxes"]
    assert df.schema["face_bboxes"] == pl.List(pl.List(pl.Float64))
    assert df["uid"].str.contains(r"^[0-9a-f]{32}$").all() and df["uid"].n_unique() == DC["n"]
    assert df["sha256"].str.contains(r"^[0-9a-f]{64}$").all()
    assert arr["b32_img"].shape == (DC["n"], 512) and arr["l14_txt"].shape == (DC["n"], 768)
    for k, a in arr.items():
        norms = np.linalg.norm(a.astype(np.float32), axis=1)
        assert np.abs(norms - 1).max() < 1e-2, k
    for m in ("b32", "l14"):
        cos = np.einsum("ij,ij->i", arr[f"{m}_img"].astype(np.float32), arr[f"{m}_txt"].astype(np.float32))
        assert np.abs(cos - df[f"clip_{m}_similarity_score"].to_numpy()).max() < 1e-2
    n_faces = df["face_bboxes"].list.len()
    assert 0 < (n_faces > 0).sum() < 0.2 * DC["n"]


def test_datacomp_scores_and_duplicates_follow_truth(dc_pool):
    out, _ = dc_pool
    df, arr = _dc_arrays(out)
    t = pl.read_parquet(out / TRUTH_NAME)
    assert t["uid"].to_list() == df["uid"].to_list()
    score = df["clip_b32_similarity_score"].to_numpy()
    ck = t["caption_kind"].str.split(":").list.first().to_numpy()
    clean, mism, junk = score[ck == "clean"], score[ck == "mismatched"], score[ck == "junk"]
    assert 0.2 < np.median(clean) < 0.4
    assert np.median(mism) < 0.15 and np.median(junk) < 0.15
    assert np.median(clean) - np.median(mism) > 0.1
    row_of = {u: i for i, u in enumerate(df["uid"].to_list())}
    n_exact = n_near = 0
    for r in t.filter(pl.col("dup_of").is_not_null()).iter_rows(named=True):
        i, j = row_of[r["uid"]], row_of[r["dup_of"]]
        assert t["image_kind"][j] == "ok"
        if r["image_kind"] == "exact_dup":
            n_exact += 1
            assert df["sha256"][i] == df["sha256"][j]
            for m in ("b32", "l14"):
                assert np.array_equal(arr[f"{m}_img"][i], arr[f"{m}_img"][j])
        else:
            n_near += 1
            assert df["sha256"][i] != df["sha256"][j]
            for m in ("b32", "l14"):
                a, b = arr[f"{m}_img"][i].astype(np.float32), arr[f"{m}_img"][j].astype(np.float32)
                assert 0.95 < float(a @ b) / (np.linalg.norm(a) * np.linalg.norm(b)) < 0.9999
    assert n_exact >= 10 and n_near >= 15
    # sizes carry the same defects as the wds layout
    ik = t["image_kind"].to_numpy()
    w, h = df["original_width"].to_numpy(), df["original_height"].to_numpy()
    assert (np.minimum(w, h)[ik == "small"] < 200).all()
    assert (np.maximum(w, h)[ik == "wide"] / np.minimum(w, h)[ik == "wide"] > 3).all()
    okm = ik == "ok"
    assert (np.minimum(w, h)[okm] >= 200).all() and (np.maximum(w, h)[okm] / np.minimum(w, h)[okm] <= 3).all()
    # clusters: same-cluster images are closer than different-cluster ones
    cl = t["cluster"].to_numpy()
    img = arr["b32_img"][:300].astype(np.float32)
    g = img @ img.T
    same = (cl[:300, None] == cl[None, :300]) & ~np.eye(300, dtype=bool)
    assert g[same].mean() > g[~same].mean() + 0.1


def test_datacomp_deterministic_and_compressed(dc_pool, tmp_path):
    out, _ = dc_pool
    generate(tmp_path / "again", **DC)
    assert _files(out) == _files(tmp_path / "again")
    generate(tmp_path / "z", **{**DC, "n": 300, "compressed": True, "dims": (32, 48)})
    generate(tmp_path / "u", **{**DC, "n": 300, "dims": (32, 48)})
    with np.load(tmp_path / "z" / "0000000000.npz") as z, np.load(tmp_path / "u" / "0000000000.npz") as u:
        assert z["b32_img"].shape == (250, 32) and z["l14_img"].shape == (250, 48)
        for k in u.files:
            assert np.array_equal(z[k], u[k])
    assert (tmp_path / "z" / "0000000000.npz").stat().st_size < (tmp_path / "u" / "0000000000.npz").stat().st_size
