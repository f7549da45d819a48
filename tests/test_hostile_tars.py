"""Hostile and broken tar shards, built here from real files: compressed shards through every
command, corrupt headers in the middle of a shard, members over the size limits, inflation
bombs, unsafe member names and links, decompression-bomb images, Pillow's warnings, stray files
in a shard folder, and what export does with an output path that is a dangling link. Each case
asserts the exit code, the reason recorded, and that nothing else was lost."""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import lzma
import resource
import subprocess
import tarfile
from pathlib import Path

from PIL import Image

from conftest import CURATE, ROOT, add_member as _add, jpeg_bytes, manifest_rows as q, run_cli, run_json


def _jpeg(w=64, h=48, color=(200, 30, 30)) -> bytes:
    return jpeg_bytes(w, h, color)


def _records(tf: tarfile.TarFile, prefix: str, n: int) -> dict[str, bytes]:
    """n img2dataset-like records (jpg, txt, json); returns {member name: bytes}."""
    out = {}
    for i in range(n):
        key = f"{prefix}{i:04d}"
        img = _jpeg(64 + i, 48, (i * 37 % 255, 90, 140))
        members = {f"{key}.jpg": img, f"{key}.txt": f"a photo of thing {i} in {prefix}".encode(),
                   f"{key}.json": json.dumps({"url": f"http://example.test/{key}.jpg", "key": key,
                                              "sha256": hashlib.sha256(img).hexdigest()}).encode()}
        for name, data in members.items():
            _add(tf, name, data)
        out.update(members)
    return out


def _plain_tar(path: Path, prefix: str, n: int) -> dict[str, bytes]:
    with tarfile.open(path, "w") as tf:
        return _records(tf, prefix, n)


def _issues(ws: Path) -> dict[str, tuple[str, str, str]]:
    return {k: (r, a, d) for k, r, a, d in q(ws, "SELECT key, reason, action, detail FROM sample_issues "
                                               "WHERE key IS NOT NULL")}


def _exported_members(out: Path) -> dict[str, bytes]:
    got: dict[str, bytes] = {}
    for tar in sorted(out.glob("*.tar")):
        with tarfile.open(tar) as tf:
            for ti in tf:
                assert ti.isreg(), f"{tar.name} holds {ti.name} of type {ti.type!r}"
                got[ti.name] = tf.extractfile(ti).read()
    return got


# ---- compressed shards --------------------------------------------------------------------

def test_compressed_shards_work_in_every_command(tmp_path, tiny_ckpt):
    """gzip, bzip2 and xz shards are ingested, scored (with the default DataLoader workers) and
    exported byte for byte; a zstd shard is refused at ingest with one clear reason."""
    src = tmp_path / "src"
    src.mkdir()
    expected: dict[str, bytes] = {}
    for name, opener in (("plain.tar", None), ("gz.tar.gz", gzip.open), ("bz.tar.bz2", bz2.open),
                         ("xz.tar.xz", lzma.open)):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as tf:
            expected.update(_records(tf, name.split(".")[0], 5))
        if opener is None:
            (src / name).write_bytes(raw.getvalue())
        else:
            with opener(src / name, "wb") as fh:
                fh.write(raw.getvalue())
    (src / "z.tar.zst").write_bytes(b"\x28\xb5\x2f\xfd" + bytes(200))  # a zstd frame header
    ws = tmp_path / "ws"
    proc = run_cli("ingest", src, "-w", ws, "--json", check=False)
    assert proc.returncode == 1, proc.stderr  # the zstd shard failed, the rest is in
    out = json.loads(proc.stdout)
    assert out["shards_ingested"] == 4 and out["shards_failed"] == 1 and out["samples_added"] == 20
    (err,) = q(ws, "SELECT error FROM shards WHERE path LIKE '%z.tar.zst'")[0:1][0]
    assert "zstd" in err and "decompress" in err

    score = run_json("score", "-w", ws, "--model", f"curate-tiny-vit@{tiny_ckpt},name=tiny", "--device", "cpu",
                     "--batch-size", "4")
    assert score["samples_scored"] == 20 and score["undecodable"] == 0
    assert q(ws, "SELECT count(*) FROM scores WHERE scorer = 'tiny' AND score IS NOT NULL")[0][0] == 20
    assert q(ws, "SELECT count(*) FROM sample_issues WHERE action = 'unscored'")[0][0] == 0

    run_json("export", "-w", ws, "--all", "--out", tmp_path / "out", "--shard-size", 7)
    assert _exported_members(tmp_path / "out") == expected


# ---- damage -------------------------------------------------------------------------------

def _corrupt_header(data: bytearray, offset: int) -> None:
    """Break the header checksum at `offset` (one byte of its stored checksum)."""
    data[offset + 150] = ord("7") if data[offset + 150] != ord("7") else ord("6")


def test_corrupt_header_mid_shard_keeps_the_rest_and_records_the_damage(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    good = _plain_tar(tmp_path / "full.tar", "s", 8)
    data = bytearray((tmp_path / "full.tar").read_bytes())
    with tarfile.open(tmp_path / "full.tar") as tf:
        offsets = {ti.name: ti.offset for ti in tf}
    _corrupt_header(data, offsets["s0002.jpg"])  # an image header: record s0002 loses its image
    _corrupt_header(data, offsets["s0005.txt"])  # a caption header: s0005 would lose its caption
    (src / "damaged.tar").write_bytes(bytes(data))
    ws = tmp_path / "ws"
    proc = run_cli("ingest", src, "-w", ws, "--json", check=False)
    assert proc.returncode == 0, proc.stderr  # damaged, not failed: the readable records are in
    out = json.loads(proc.stdout)
    assert out["shards_damaged"] == 1 and out["samples_added"] == 6
    status, error, n_samples, n_rejected = q(ws, "SELECT status, error, n_samples, n_rejected FROM shards")[0]
    assert status == "damaged" and "unreadable tar header" in error and n_samples == 6 and n_rejected == 2
    keys = {k for (k,) in q(ws, "SELECT key FROM samples")}
    assert keys == {f"s{i:04d}" for i in range(8)} - {"s0002", "s0005"}, "records after the damage are kept"
    issues = _issues(ws)
    assert {k: v[:2] for k, v in issues.items()} == {"s0002": ("tar_damaged", "rejected"),
                                                     "s0005": ("tar_damaged", "rejected")}
    assert "missing_image" in issues["s0002"][2]
    # every kept sample has its caption: none silently lost its txt member
    caps = dict(q(ws, "SELECT key, caption FROM samples"))
    assert all(caps[k] == good[f"{k}.txt"].decode() for k in keys)


def test_zero_filled_region_and_truncation_inside_a_header(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _plain_tar(tmp_path / "full.tar", "z", 6)
    data = bytearray((tmp_path / "full.tar").read_bytes())
    with tarfile.open(tmp_path / "full.tar") as tf:
        infos = {ti.name: ti for ti in tf}
    a = infos["z0003.jpg"]
    end = a.offset_data + -(-a.size // 512) * 512
    data[a.offset:end] = bytes(end - a.offset)  # header and data of one member zeroed
    (src / "zeroed.tar").write_bytes(bytes(data))
    cut = infos["z0004.txt"].offset + 100  # ends inside a header
    (src / "cut.tar").write_bytes(bytes((tmp_path / "full.tar").read_bytes()[:cut]))
    ws = tmp_path / "ws"
    out = run_json("ingest", src, "-w", ws)
    assert out["shards_damaged"] == 2
    status = dict(q(ws, "SELECT regexp_extract(path, '[^/]+$'), status FROM shards"))
    assert status == {"zeroed.tar": "damaged", "cut.tar": "damaged"}
    by_shard = {}
    for name, key, reason in q(ws, "SELECT regexp_extract(sh.path, '[^/]+$'), i.key, i.reason FROM sample_issues i "
                                   "JOIN shards sh USING (shard_id)"):
        by_shard.setdefault(name, {})[key] = reason
    assert by_shard["zeroed.tar"] == {"z0003": "tar_damaged"}
    assert by_shard["cut.tar"]["z0004"] == "tar_damaged"
    # every record of the source is a sample or a rejected issue
    for name, n in (("zeroed.tar", 6), ("cut.tar", 5)):
        have = q(ws, "SELECT count(*) FROM samples s JOIN shards sh USING (shard_id) WHERE sh.path LIKE ?",
                 [f"%{name}"])[0][0]
        assert have + len(by_shard[name]) == n


# ---- size limits --------------------------------------------------------------------------

class _Zeros(io.RawIOBase):
    def __init__(self, n: int):
        self.n = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        k = min(len(b), self.n)
        b[:k] = bytes(k)
        self.n -= k
        return k


def _gz_with_big_member(path: Path, big: int) -> None:
    with tarfile.open(path, "w:gz", compresslevel=1) as tf:
        _add(tf, "a.jpg", _jpeg())
        _add(tf, "a.txt", b"before")
        ti = tarfile.TarInfo("big.jpg")
        ti.size = big
        tf.addfile(ti, io.BufferedReader(_Zeros(big)))
        _add(tf, "big.txt", b"the big one")
        _add(tf, "b.jpg", _jpeg(70))
        _add(tf, "b.txt", b"after")


def test_member_size_limit_and_flat_memory_on_an_inflating_member(tmp_path):
    """A 600 MB member inside a 3 MB .tar.gz is never read into memory; its record is rejected
    as image_too_large and the records around it are kept."""
    src = tmp_path / "src"
    src.mkdir()
    _gz_with_big_member(src / "bomb.tar.gz", 600 << 20)
    assert (src / "bomb.tar.gz").stat().st_size < 5 << 20
    with tarfile.open(src / "sizes.tar", "w") as tf:
        _add(tf, "small.jpg", _jpeg())
        _add(tf, "small.txt", b"fine")
        _add(tf, "bigjson.jpg", _jpeg())
        _add(tf, "bigjson.json", b'{"pad": "' + b"x" * 300_000 + b'"}')
    ws = tmp_path / "ws"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run([*CURATE, "ingest", str(src / "bomb.tar.gz"), "-w", str(ws), "--json"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert proc.returncode == 0, proc.stderr
    assert peak_kb < 400_000 or peak_kb == before, f"ingest peaked at {peak_kb / 1024:.0f} MB"
    issues = _issues(ws)
    assert issues["big"][:2] == ("image_too_large", "rejected") and "629,145,600" in issues["big"][2]
    assert {k for (k,) in q(ws, "SELECT key FROM samples")} == {"a", "b"}

    out = run_json("ingest", src / "sizes.tar", "-w", ws, "--max-member-size", "100KB")
    assert out["samples_added"] == 1
    assert _issues(ws)["bigjson"][:2] == ("member_too_large", "rejected")
    bad = run_cli("ingest", src, "-w", ws, "--max-member-size", "lots", check=False)
    assert bad.returncode == 2 and "not a size" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_inflated_size_limit_stops_a_compressed_shard(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _gz_with_big_member(src / "bomb.tar.gz", 40 << 20)
    ws = tmp_path / "ws"
    out = run_json("ingest", src, "-w", ws, "--max-inflated-size", "8MiB", "--max-member-size", "1GiB")
    assert out["shards_damaged"] == 1 and out["samples_added"] == 1
    status, error = q(ws, "SELECT status, error FROM shards")[0]
    assert status == "damaged" and "inflates past the limit of 8,388,608 bytes" in error
    assert _issues(ws)["big"][:2] == ("inflated_too_large", "rejected")


# ---- unsafe members -------------------------------------------------------------------------

def test_unsafe_names_and_links_never_reach_an_export(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(src / "hostile.tar", "w", format=tarfile.PAX_FORMAT) as tf:
        good = _records(tf, "g", 2)
        _add(tf, "../evil.jpg", _jpeg())
        _add(tf, "../evil.txt", b"climbs out")
        _add(tf, "/etc/abs.jpg", _jpeg())
        _add(tf, "/etc/abs.txt", b"absolute")
        ti = tarfile.TarInfo("link.jpg")
        ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(ti)
        _add(tf, "link.txt", b"a link as image")
        _add(tf, "mixed.jpg", _jpeg())
        ti = tarfile.TarInfo("mixed.txt")
        ti.type, ti.linkname = tarfile.LNKTYPE, "g0000.txt"
        tf.addfile(ti)
        ti = tarfile.TarInfo("dev.jpg")
        ti.type = tarfile.CHRTYPE
        tf.addfile(ti)
        _add(tf, "new\nline.jpg", _jpeg())
        _add(tf, "back\\slash.jpg", _jpeg())
        ti = tarfile.TarInfo("somedir")
        ti.type = tarfile.DIRTYPE
        tf.addfile(ti)
        good.update(_records(tf, "h", 2))
    ws = tmp_path / "ws"
    out = run_json("ingest", src, "-w", ws)
    assert out["samples_added"] == 4
    reasons = {k: r for k, (r, a, d) in _issues(ws).items() if a == "rejected"}
    assert reasons == {"../evil": "unsafe_member_name", "/etc/abs": "unsafe_member_name", "link": "unsafe_member",
                       "mixed": "unsafe_member", "dev": "unsafe_member", "new\nline": "unsafe_member_name",
                       "back\\slash": "unsafe_member_name"}
    assert "symbolic link to '/etc/passwd'" in _issues(ws)["link"][2]
    run_json("export", "-w", ws, "--all", "--out", tmp_path / "out")
    assert _exported_members(tmp_path / "out") == good
    for tar in (tmp_path / "out").glob("*.tar"):  # extracts cleanly under tarfile's strictest filter
        with tarfile.open(tar) as tf:
            tf.extractall(tmp_path / "x", filter="data")


def test_export_parses_members_of_unchecked_shards_and_drops_links(tmp_path):
    """A shard ingested before names and types were checked (no `members_checked` in its
    extra) may hold a link inside a sample's byte range: export parses such samples' members
    and never writes the link. Driven through the export writer with a real tar whose sample
    range holds a symlink between its members."""
    from curate.export.writer import write_shard

    src = tmp_path / "old.tar"
    with tarfile.open(src, "w") as tf:
        _add(tf, "o0.jpg", _jpeg())
        ti = tarfile.TarInfo("o0.lnk")
        ti.type, ti.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(ti)
        _add(tf, "o0.txt", b"caption")
    with tarfile.open(src) as tf:
        infos = list(tf)
    end = infos[-1].offset_data + 512
    out = tmp_path / "out"
    out.mkdir()
    row = ("0" * 32, str(src), 0, end, "o0", "o0", False, None)
    stats = write_shard({"out_dir": str(out), "name": "00000000.tar", "rows": [row], "plan": "p",
                         "parse_members": [str(src)]})
    assert stats["unsafe_members_dropped"] == 1
    assert _exported_members(out) == {"o0.jpg": _jpeg(), "o0.txt": b"caption"}
    # the same range copied as it is (a checked shard) would have carried the link
    plain = tmp_path / "plain"
    plain.mkdir()
    write_shard({"out_dir": str(plain), "name": "00000000.tar", "rows": [row], "plan": "p"})
    with tarfile.open(plain / "00000000.tar") as tf:
        assert any(ti.issym() for ti in tf)


# ---- images -------------------------------------------------------------------------------

def _bomb_png() -> bytes:
    b = io.BytesIO()
    Image.new("1", (20000, 20000)).save(b, "PNG")  # 400M pixels in ~50 KB
    return b.getvalue()


def _jpeg_with_corrupt_exif() -> bytes:
    b = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 1
    Image.new("RGB", (40, 30), (10, 200, 10)).save(b, "JPEG", exif=exif.tobytes())
    data = bytearray(b.getvalue())
    i = data.find(b"Exif")
    data[i + 10:i + 14] = b"\xff\xff\xff\xff"
    return bytes(data)


def test_decompression_bombs_and_pillow_warnings_are_recorded(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(src / "imgs.tar", "w") as tf:
        _add(tf, "bomb.png", _bomb_png())
        _add(tf, "bomb.txt", b"huge")
        _add(tf, "exif.jpg", _jpeg_with_corrupt_exif())
        _add(tf, "exif.txt", b"odd exif")
        _add(tf, "fine.jpg", _jpeg())
        _add(tf, "fine.txt", b"fine")
    ws = tmp_path / "ws"
    proc = run_cli("ingest", src, "-w", ws, "--json")
    assert "Warning" not in proc.stderr and "EXIF" not in proc.stderr, proc.stderr
    issues = _issues(ws)
    assert issues["bomb"][:2] == ("decompression_bomb", "rejected")
    assert "20000x20000 = 400,000,000 pixels" in issues["bomb"][2]
    assert issues["exif"][:2] == ("image_warning", "warning") and "Corrupt EXIF" in issues["exif"][2]
    assert {k for (k,) in q(ws, "SELECT key FROM samples")} == {"exif", "fine"}
    ws2 = tmp_path / "ws2"
    run_json("ingest", src, "-w", ws2, "--max-pixels", "500000000")
    assert "bomb" in {k for (k,) in q(ws2, "SELECT key FROM samples")}


# ---- folders and output paths --------------------------------------------------------------

def test_stray_files_in_a_shard_folder_are_reported_and_skipped(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _plain_tar(src / "00000.tar", "a", 3)
    _plain_tar(src / "00001.tar", "b", 3)
    (src / "00000_stats.json").write_text(json.dumps({"successes": 3}))  # img2dataset's: read with its tar
    (src / "notes.json").write_text(json.dumps({"note": "not a url table"}))
    (src / "README.md").write_text("# my shards\n")
    (src / "orphan.npz").write_bytes(b"PK\x03\x04")
    ws = tmp_path / "ws"
    proc = run_cli("ingest", src, "-w", ws, "--json")
    out = json.loads(proc.stdout)
    assert out["shards_ingested"] == 2 and out["samples_added"] == 6 and out["shards_failed"] == 0
    skipped = {Path(d["path"]).name for d in out["files_skipped"]}
    assert skipped == {"notes.json", "README.md", "orphan.npz"}
    assert "notes.json" in proc.stderr
    # named on its own, the same file is a usage error, as before
    bad = run_cli("ingest", src / "notes.json", "-w", ws, check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_export_to_a_dangling_link_is_one_clear_line(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    _plain_tar(src / "00000.tar", "a", 2)
    ws = tmp_path / "ws"
    run_json("ingest", src, "-w", ws)
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "nowhere")
    proc = run_cli("export", "-w", ws, "--all", "--out", link, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "symbolic link" in lines[0] and "nowhere" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


# ---- what a review found -------------------------------------------------------------------

def _infos(path: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(path) as tf:
        return {ti.name: ti for ti in tf}


def test_damage_between_members_of_one_record_never_reaches_an_export(tmp_path):
    """A zeroed member between two members of one record would sit inside that record's byte
    range: the record is rejected, and the export is readable to its end by a stream reader."""
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(tmp_path / "full.tar", "w") as tf:
        for i in range(5):
            _add(tf, f"k{i}.jpg", _jpeg(64 + i))
            _add(tf, f"k{i}.cls", b"3")
            _add(tf, f"k{i}.txt", f"caption {i}".encode())
    data = bytearray((tmp_path / "full.tar").read_bytes())
    ti = _infos(tmp_path / "full.tar")["k2.cls"]
    data[ti.offset:ti.offset_data + 512] = bytes(ti.offset_data + 512 - ti.offset)  # header and data zeroed
    (src / "s.tar").write_bytes(bytes(data))
    ws = tmp_path / "ws"
    run_json("ingest", src, "-w", ws)
    assert _issues(ws)["k2"][:2] == ("tar_damaged", "rejected")
    assert "between its members" in _issues(ws)["k2"][2]
    run_json("export", "-w", ws, "--all", "--out", tmp_path / "out")
    with tarfile.open(tmp_path / "out" / "00000000.tar", mode="r|") as tf:  # how webdataset reads
        keys = {m.name.split(".")[0] for m in tf}
    assert keys == {"k0", "k1", "k3", "k4"}
    assert json.loads((tmp_path / "out" / "sizes.json").read_text()) == {"00000000.tar": 4}


def test_damage_before_a_directory_and_a_file_cut_in_a_header(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    with tarfile.open(tmp_path / "dirs.tar", "w") as tf:
        for d in ("a", "b"):
            ti = tarfile.TarInfo(d)
            ti.type = tarfile.DIRTYPE
            tf.addfile(ti)
            for i in range(3):
                _add(tf, f"{d}/x{i}.jpg", _jpeg(60 + i))
                _add(tf, f"{d}/x{i}.txt", f"{d} caption {i}".encode())
                _add(tf, f"{d}/x{i}.json", json.dumps({"caption": "from json"}).encode())
    data = bytearray((tmp_path / "dirs.tar").read_bytes())
    _corrupt_header(data, _infos(tmp_path / "dirs.tar")["a/x2.json"].offset)  # the member before dir b
    (src / "dirs.tar").write_bytes(bytes(data))
    whole = (tmp_path / "dirs.tar").read_bytes()
    (src / "cut.tar").write_bytes(whole[:_infos(tmp_path / "dirs.tar")["b/x1.jpg"].offset + 200])
    ws = tmp_path / "ws"
    run_json("ingest", src, "-w", ws)
    rows = q(ws, "SELECT regexp_extract(sh.path, '[^/]+$'), i.key, i.reason FROM sample_issues i "
                 "JOIN shards sh USING (shard_id) WHERE i.action = 'rejected' ORDER BY ALL")
    assert ("dirs.tar", "a/x2", "tar_damaged") in rows, rows  # it lost its json to the damage
    assert ("cut.tar", None, "tar_damaged") in rows, rows  # cut inside the header of b/x1's first member
    caps = dict(q(ws, "SELECT key, caption FROM samples s JOIN shards sh USING (shard_id) WHERE sh.path LIKE '%dirs.tar'"))
    assert set(caps) == {"a/x0", "a/x1", "b/x0", "b/x1", "b/x2"} and caps["b/x0"] == "b caption 0"


def test_multi_member_gzip_lzma_alone_and_the_limit_at_the_end(tmp_path):
    """A tar split over two gzip members (bgzip, `gzip >>`) and a legacy .lzma tar are read whole
    by every command; an inflated-size limit exactly at the end of the last member keeps it."""
    import lzma

    src = tmp_path / "src"
    src.mkdir()
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tf:
        expected = _records(tf, "m", 6)
    data = raw.getvalue()
    (src / "two.tar.gz").write_bytes(gzip.compress(data[:len(data) // 2]) + gzip.compress(data[len(data) // 2:]))
    raw2 = io.BytesIO()
    with tarfile.open(fileobj=raw2, mode="w") as tf:
        expected.update(_records(tf, "l", 3))
    (src / "old.tar.lzma").write_bytes(lzma.compress(raw2.getvalue(), format=lzma.FORMAT_ALONE))
    ws = tmp_path / "ws"
    out = run_json("ingest", src, "-w", ws)
    assert out["samples_added"] == 9 and out["shards_damaged"] == 0
    run_json("export", "-w", ws, "--all", "--out", tmp_path / "out")
    assert _exported_members(tmp_path / "out") == expected

    last = _infos(src / "old.tar.lzma")  # tarfile reads .lzma too: where the last member ends
    end = max(ti.offset_data + -(-ti.size // 512) * 512 for ti in last.values())
    ws2 = tmp_path / "ws2"
    run_json("ingest", src / "old.tar.lzma", "-w", ws2, "--max-inflated-size", str(end))
    assert {k for (k,) in q(ws2, "SELECT key FROM samples")} == {"l0000", "l0001", "l0002"}
    bad = run_cli("ingest", src, "-w", ws2, "--max-inflated-size", "infx", check=False)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_hostile_extended_headers(tmp_path):
    """3,000 chained GNU long-name headers (tarfile recurses once per header) and a 300 MB long
    name in a small .tar.gz: the shard is damaged, memory stays bounded, the other shards are in."""
    src = tmp_path / "src"
    src.mkdir()
    _plain_tar(src / "a_good.tar", "a", 2)
    _plain_tar(src / "c_good.tar", "c", 2)
    chain = bytearray()
    for _ in range(3000):
        ti = tarfile.TarInfo("././@LongLink")
        ti.type, ti.size = tarfile.GNUTYPE_LONGNAME, 512
        chain += ti.tobuf(format=tarfile.USTAR_FORMAT) + b"x" * 511 + b"\0"
    _plain_tar(tmp_path / "b.tar", "b", 2)
    members_end = max(ti.offset_data + -(-ti.size // 512) * 512 for ti in _infos(tmp_path / "b.tar").values())
    (src / "b_chain.tar").write_bytes((tmp_path / "b.tar").read_bytes()[:members_end] + bytes(chain) + bytes(1024))
    with gzip.open(src / "d_longname.tar.gz", "wb", compresslevel=1) as fh:
        ti = tarfile.TarInfo("././@LongLink")
        ti.type, ti.size = tarfile.GNUTYPE_LONGNAME, 300 << 20
        fh.write(ti.tobuf(format=tarfile.USTAR_FORMAT))
        for _ in range(300):
            fh.write(b"n" * (1 << 20))
        fh.write(bytes(1024))
    ws = tmp_path / "ws"
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = run_cli("ingest", src, "-w", ws, "--json", check=False)
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert "Traceback" not in proc.stderr
    out = json.loads(proc.stdout)
    assert peak_kb < 500_000 or peak_kb == before, f"ingest peaked at {peak_kb / 1024:.0f} MB"
    status = dict(q(ws, "SELECT regexp_extract(path, '[^/]+$'), status FROM shards"))
    assert status["a_good.tar"] == status["c_good.tar"] == "ok"
    assert status["b_chain.tar"] == "damaged" and status["d_longname.tar.gz"] in ("damaged", "failed")
    assert {k for (k,) in q(ws, "SELECT key FROM samples")} >= {"a0000", "a0001", "b0000", "b0001", "c0000", "c0001"}
    assert out["shards_seen"] == 4
