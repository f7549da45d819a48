"""A hostile-input corpus generated here (not copied from anywhere): odd, broken and hostile
images and captions in one real webdataset shard, through `ingest`, `score` (default workers)
and `export`. Every record ends as a scored sample, a sample with a recorded reason, or a
rejected record with its reason; nothing else is lost, and every sample is exported byte for
byte."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
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
