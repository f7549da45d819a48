"""A hostile-input corpus generated here (not copied from anywhere): odd, broken and hostile
images and captions in one real webdataset shard, through `ingest`, `score` (default workers)
and `export`. Every record ends as a scored sample, a sample with a recorded reason, or a
rejected record with its reason; nothing else is lost, and every sample is exported byte for
byte."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import add_member as _add, manifest_rows as q, run_cli, run_json


def scene(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    a = np.zeros((h, w, 3), dtype=np.uint8)
    a[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    a[..., 1] = np.linspace(255, 0, h, dtype=np.uint8)[:, None]
    a[..., 2] = rng.integers(0, 255, (h, w), dtype=np.uint8)
    return Image.fromarray(a, "RGB")


def enc(im: Image.Image, fmt: str, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, fmt, **kw)
    return b.getvalue()


def corpus() -> list[tuple[str, dict[str, bytes], str]]:
    """(key, members, expected outcome). Outcomes: 'scored'; 'unscored:<detail prefix>';
    'rejected:<reason>'; a '+warning:<reason>' suffix adds a warning that must be recorded."""
    im = scene(96, 64, 1)
    jpg = enc(im, "JPEG", quality=90)
    png = enc(im, "PNG")
    webp = enc(im, "WEBP", lossless=True)
    cmyk = enc(im.convert("CMYK"), "JPEG")
    i16 = enc(Image.fromarray(np.arange(96 * 64, dtype=np.uint16).reshape(64, 96) * 7), "PNG")
    pal = im.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    pal_png = enc(pal, "PNG", transparency=0)
    frames = [scene(64, 48, s) for s in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    awebp = io.BytesIO()
    frames[0].save(awebp, "WEBP", save_all=True, append_images=frames[1:], duration=50)
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = enc(scene(80, 40, 2), "JPEG", exif=exif.tobytes())
    exif_bad = bytearray(enc(scene(40, 30, 3), "JPEG", exif=exif.tobytes()))
    at = exif_bad.find(b"Exif")
    exif_bad[at + 10:at + 14] = b"\xff\xff\xff\xff"  # an IFD offset past the end: Pillow warns
    bad_webp = bytearray(webp)
    bad_webp[40:] = bytes(len(bad_webp) - 40)
    cap = lambda s: s.encode()  # noqa: E731
    out = [
        ("jpeg", {"jpg": jpg, "txt": cap("a plain jpeg")}, "scored"),
        ("png", {"png": png, "txt": cap("a plain png")}, "scored"),
        ("webp", {"webp": webp, "txt": cap("a lossless webp")}, "scored"),
        ("bmp", {"bmp": enc(im, "BMP"), "txt": cap("a bitmap")}, "scored"),
        ("tiff", {"tiff": enc(im, "TIFF"), "txt": cap("a tiff")}, "scored"),
        ("cmyk", {"jpg": cmyk, "txt": cap("a cmyk jpeg")}, "scored"),
        ("sixteen", {"png": i16, "txt": cap("a 16-bit greyscale png")}, "scored"),
        ("palette", {"png": pal_png, "txt": cap("a palette png with transparency")}, "scored"),
        ("agif", {"gif": gif.getvalue(), "txt": cap("an animated gif")}, "scored"),
        ("awebp", {"webp": awebp.getvalue(), "txt": cap("an animated webp")}, "scored"),
        ("rotated", {"jpg": rotated, "txt": cap("an exif-rotated jpeg")}, "scored"),
        ("trunc_jpg", {"jpg": jpg[: len(jpg) // 2], "txt": cap("half a jpeg")}, "unscored:truncated"),
        ("trunc_png", {"png": png[: len(png) // 2], "txt": cap("half a png")}, "unscored:"),
        ("bad_webp", {"webp": bytes(bad_webp), "txt": cap("a webp with zeroed data")}, "unscored:"),
        ("empty", {"jpg": b"", "txt": cap("no bytes")}, "rejected:not_an_image"),
        ("html", {"jpg": b"<!DOCTYPE html><title>404</title>", "txt": cap("an error page")}, "rejected:not_an_image"),
        ("noimage", {"txt": cap("a caption alone")}, "rejected:missing_image"),
        ("megacap", {"jpg": jpg, "txt": ("word " * 250_000).encode()}, "scored"),
        ("badutf8", {"jpg": jpg, "txt": b"caf\xe9 \xff\xfe cr\xe8me"}, "scored+warning:caption_not_utf8"),
        ("badjson", {"jpg": jpg, "txt": cap("json is a list"), "json": b"[1, 2]"}, "scored+warning:bad_json"),
        ("baduid", {"jpg": jpg, "txt": cap("uid is junk"), "json": json.dumps({"uid": "nothex"}).encode()},
         "scored+warning:bad_uid"),
        ("blankuid", {"jpg": jpg, "txt": cap("uid is blank"), "json": json.dumps({"uid": " \t"}).encode()}, "scored"),
        ("hugeint", {"jpg": jpg, "txt": cap("width overflows"),
                     "json": json.dumps({"original_width": 10**30, "original_height": -5}).encode()}, "scored"),
        ("nocaption", {"jpg": jpg}, "unscored:+warning:missing_caption"),
        ("exifwarn", {"jpg": bytes(exif_bad), "txt": cap("corrupt exif")}, "scored+warning:image_warning"),
    ]
    return out


def test_hostile_corpus_through_ingest_score_export(tmp_path, tiny_ckpt):
    src = tmp_path / "src"
    src.mkdir()
    cases = corpus()
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(src / "00000.tar", "w") as tf:
        for key, mem, _ in cases:
            for ext, data in mem.items():
                _add(tf, f"{key}.{ext}", data)
            members[key] = dict(mem)
        # a repeated member and a key that comes back after another key
        _add(tf, "repeat.jpg", members["jpeg"]["jpg"])
        _add(tf, "repeat.txt", b"first caption")
        _add(tf, "repeat.txt", b"second caption")
        members["repeat"] = {"jpg": members["jpeg"]["jpg"], "txt": b"first caption"}
        _add(tf, "again.jpg", members["png"]["png"][:0] + members["jpeg"]["jpg"])
        _add(tf, "again.txt", b"first time")
        _add(tf, "between.jpg", members["jpeg"]["jpg"])
        _add(tf, "between.txt", b"between")
        _add(tf, "again.jpg", members["jpeg"]["jpg"])
        _add(tf, "again.txt", b"second time")
        members["between"] = {"jpg": members["jpeg"]["jpg"], "txt": b"between"}
    ws = tmp_path / "ws"
    proc = run_cli("ingest", src, "-w", ws, "--json")
    assert proc.returncode == 0 and "Warning" not in proc.stderr, proc.stderr

    score = run_cli("score", "-w", ws, "--model", f"curate-tiny-vit@{tiny_ckpt},name=tiny", "--device", "cpu",
                    "--batch-size", "8", "--json")
    assert "Traceback" not in score.stderr and "Warning:" not in score.stderr, score.stderr

    samples = dict(q(ws, "SELECT key, uid FROM samples"))
    issues: dict[str, list[tuple[str, str, str]]] = {}
    for key, reason, action, detail in q(ws, "SELECT key, reason, action, detail FROM sample_issues"):
        issues.setdefault(key, []).append((reason, action, detail or ""))
    scores = dict(q(ws, "SELECT p.key, s.score FROM scores s JOIN samples p USING (uid) WHERE s.scorer = 'tiny'"))
    for key, _, expected in cases:
        outcome, _, warning = expected.partition("+warning:")
        got = issues.get(key, [])
        if warning:
            assert (warning, "warning") in [(r, a) for r, a, _ in got], (key, got)
        if outcome.startswith("rejected:"):
            assert key not in samples, key
            assert [(r, a) for r, a, _ in got if a == "rejected"] == [(outcome.split(":")[1], "rejected")], (key, got)
            continue
        assert key in samples, (key, got)
        if outcome == "scored":
            assert scores[key] is not None and np.isfinite(scores[key]), (key, got)
            assert not [g for g in got if g[1] == "unscored"], (key, got)
        else:
            assert scores[key] is None, key
            unscored = [g for g in got if g[1] == "unscored"]
            assert len(unscored) == 1 and unscored[0][2].startswith(outcome.split(":", 1)[1]), (key, got)
    assert ("repeated_member", "warning") in [(r, a) for r, a, _ in issues["repeat"]]
    # what Pillow warned while decoding is recorded by score too, not printed
    assert [d for r, a, d in issues["exifwarn"] if r == "decode_warning"][0].startswith("UserWarning: Corrupt EXIF")
    assert [r for r, a, _ in issues["again"] if a == "rejected"] == ["duplicate_uid"]
    expected_keys = {k for k, _, e in cases if not e.startswith("rejected")} | {"repeat", "again", "between"}
    assert set(samples) == expected_keys, "every record is a sample or a rejected issue"

    run_json("export", "-w", ws, "--all", "--out", tmp_path / "out", "--shard-size", "7")
    got: dict[str, dict[str, bytes]] = {}
    for tar in sorted((tmp_path / "out").glob("*.tar")):
        with tarfile.open(tar) as tf:
            for ti in tf:
                key, ext = ti.name.split(".", 1)
                got.setdefault(key, {})[ext] = tf.extractfile(ti).read()
    assert set(got) == expected_keys
    for key in expected_keys - {"again"}:
        assert got[key] == members[key], key
    assert got["again"] == {"jpg": members["jpeg"]["jpg"], "txt": b"first time"}


def _emb(rng, n: int, d: int) -> np.ndarray:
    e = rng.standard_normal((n, d)).astype(np.float32)
    return (e / np.linalg.norm(e, axis=1, keepdims=True)).astype(np.float16)


def test_hostile_datacomp_metadata(tmp_path):
    """Mistyped and missing parquet columns, malformed and repeated uids, and a parquet/npz row
    mismatch: each pair is ingested with a reason for every row it leaves out, or fails whole
    with one line; nothing else is lost."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    src = tmp_path / "meta"
    src.mkdir()
    n = 6
    uids = [f"{x:032x}" for x in rng.integers(0, 2**63, 3 * n)]

    def pair(stem: str, table: dict, rows: int = n) -> None:
        pq.write_table(pa.table(table), src / f"{stem}.parquet")
        np.savez(src / f"{stem}.npz", b32_img=_emb(rng, rows, 512), b32_txt=_emb(rng, rows, 512))

    pair("a_repeats", {"uid": [uids[0], uids[0], "ZZ", "  " + uids[1].upper() + "\t", None, "0" * 31],
                       "text": ["first", "again", "bad", "padded", "none", "short"]})
    pair("b_mistyped", {"uid": uids[n:2 * n], "text": [1, 2, 3, 4, 5, 6],
                        "original_width": ["10", "abc", None, "300", "400", "-1"],
                        "original_height": [1.5, 2.0, None, 4.0, 5.0, 6.0],
                        "clip_b32_similarity_score": ["0.3", "x", None, "0.1", "inf", "0.2"]})
    pair("c_int_uids", {"uid": list(range(n)), "text": ["t"] * n})
    pair("d_no_text", {"uid": uids[2 * n:], "url": ["u"] * n})
    pair("e_rows", {"uid": uids[2 * n:], "text": ["t"] * n}, rows=n + 1)
    ws = tmp_path / "ws"
    proc = run_cli("ingest", src, "-w", ws, "--json", check=False)
    assert proc.returncode == 1, proc.stderr  # two pairs failed; the rest is in
    out = json.loads(proc.stdout)
    assert out["shards_failed"] == 2 and out["shards_ingested"] == 3
    errors = {Path(f["path"]).name: f["error"] for f in out["failures"]}
    assert "needs uid and text columns" in errors["d_no_text.parquet"]
    assert "row-count mismatch" in errors["e_rows.parquet"]
    by_file: dict[str, dict[str, str]] = {}
    for name, key, reason in q(ws, "SELECT regexp_extract(sh.path, '[^/]+$'), i.key, i.reason FROM sample_issues i "
                                   "JOIN shards sh USING (shard_id) WHERE i.action = 'rejected'"):
        by_file.setdefault(name, {})[key] = reason
    assert by_file["a_repeats.parquet"] == {"1": "duplicate_uid", "2": "bad_uid", "4": "bad_uid", "5": "bad_uid"}
    assert by_file["c_int_uids.parquet"] == {str(i): "bad_uid" for i in range(n)}
    samples = {(f, k): (c, w, h) for f, k, c, w, h in q(
        ws, "SELECT regexp_extract(sh.path, '[^/]+$'), s.key, s.caption, s.width, s.height FROM samples s "
            "JOIN shards sh USING (shard_id)")}
    assert set(samples) == {("a_repeats.parquet", "0"), ("a_repeats.parquet", "3")} | {
        ("b_mistyped.parquet", str(i)) for i in range(n)}, "every row is a sample or a rejected issue"
    assert samples[("b_mistyped.parquet", "0")] == ("1", 10, 1)
    assert q(ws, "SELECT uid FROM samples WHERE key = '3' AND caption = 'padded'")[0][0] == uids[1]
    bad_scores = dict(q(ws, "SELECT key, detail FROM sample_issues WHERE reason = 'bad_score'"))
    assert set(bad_scores) == {"1", "4"}
    kept_scores = dict(q(ws, "SELECT p.key, s.score FROM scores s JOIN samples p USING (uid) "
                             "JOIN shards sh ON sh.shard_id = p.shard_id WHERE sh.path LIKE '%b_mistyped%'"))
    assert kept_scores["0"] == pytest.approx(0.3) and kept_scores["1"] is None and kept_scores["4"] is None


def test_hostile_npz_and_bytes_columns(tmp_path):
    """An npz member named to climb out of the workspace, a compressed npz whose deflate stream
    is damaged, and uid/text columns of bytes that are not UTF-8: each pair fails with one line or
    keeps every row it can, and nothing is written outside the workspace."""
    import zipfile

    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(3)
    src = tmp_path / "meta"
    src.mkdir()
    n = 5
    uids = [f"{x:032x}" for x in rng.integers(0, 2**63, 3 * n)]
    e = _emb(rng, n, 512)
    pq.write_table(pa.table({"uid": uids[:n], "text": ["t"] * n}), src / "a_climb.parquet")
    np.savez_compressed(src / "a_climb.npz", **{"x/../../../../escaped_img": e})
    pq.write_table(pa.table({"uid": uids[n:2 * n], "text": ["t"] * n}), src / "b_crc.parquet")
    np.savez_compressed(src / "b_crc.npz", b32_img=_emb(rng, n, 512), b32_txt=_emb(rng, n, 512))
    with zipfile.ZipFile(src / "b_crc.npz") as zf:
        info = zf.getinfo("b32_txt.npy")
        start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    damaged = bytearray((src / "b_crc.npz").read_bytes())
    damaged[start + info.compress_size // 2] ^= 0xFF
    (src / "b_crc.npz").write_bytes(bytes(damaged))
    raw_uids = [u.encode() for u in uids[2 * n:]]
    raw_uids[1] = b"\xff" * 32
    texts = [b"plain", b"lost with its uid", None, b"caf\xe9", b"fine"]
    pq.write_table(pa.table({"uid": pa.array(raw_uids, pa.binary()), "text": pa.array(texts, pa.binary())}),
                   src / "c_bytes.parquet")
    np.savez(src / "c_bytes.npz", b32_img=_emb(rng, n, 512), b32_txt=_emb(rng, n, 512))
    ws = tmp_path / "ws"
    proc = run_cli("ingest", src, "-w", ws, "--json", check=False)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    out = json.loads(proc.stdout)
    errors = {Path(f["path"]).name: f["error"] for f in out["failures"]}
    assert set(errors) == {"a_climb.parquet", "b_crc.parquet"}
    assert "not a key curate takes" in errors["a_climb.parquet"] and "\n" not in errors["b_crc.parquet"]
    assert not list(tmp_path.rglob("escaped*")), "nothing was written outside the workspace"
    assert not list((ws / "embeddings").rglob("*partial*"))
    caps = dict(q(ws, "SELECT key, caption FROM samples"))
    assert caps == {"0": "plain", "2": None, "3": "caf\ufffd", "4": "fine"}
    issues = {(k, r) for k, r in q(ws, "SELECT key, reason FROM sample_issues")}
    assert issues == {("1", "bad_uid"), ("2", "missing_caption"), ("3", "caption_not_utf8")}
