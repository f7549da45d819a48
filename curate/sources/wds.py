"""Read one webdataset tar shard (as img2dataset writes them) in a single streaming pass.

Members are grouped by key the webdataset way: the key is the member path up to the first
dot of its file name, the extension is the rest (lower-cased). For every record we keep the
metadata and the tar byte range (so export can copy members byte for byte) but never hold
more than one record's bytes. The shard's SHA-256 fingerprint is computed in the same pass.

Per-record problems become issues: `missing_image`, `not_an_image` (rejected: there is
nothing to train on), `missing_caption`, `caption_not_utf8`, `bad_json`, `bad_uid`
(warnings: the sample is kept and the problem noted). A truncated or corrupt tar keeps the
complete records read before the damage and reports the damage for the shard.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..uids import normalise_uid

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_HEADER_PROBE_BYTES = 1 << 16


class _HashingReader(io.RawIOBase):
    """A read-only stream that hashes and counts what passes through it."""

    def __init__(self, fh):
        self.fh = fh
        self.sha = hashlib.sha256()
        self.pos = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.fh.readinto(b)
        if n:
            self.sha.update(memoryview(b)[:n])
            self.pos += n
        return n or 0

    def drain(self) -> None:
        """Hash the rest of the file (tarfile stops at the end-of-archive marker)."""
        buf = bytearray(1 << 20)
        while self.readinto(buf):
            pass


@dataclass
class WdsRecord:
    key: str
    uid: str | None = None
    url: str | None = None
    caption: str | None = None
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    image_ext: str | None = None
    image_bytes: int | None = None
    members: list[str] = field(default_factory=list)
    tar_offset: int = 0
    tar_end: int = 0


@dataclass
class WdsShard:
    records: list[WdsRecord]
    issues: list[tuple[str, str | None, str, str, str]]  # (key, uid, reason, action, detail)
    fingerprint: str
    nbytes: int
    error: str | None = None  # set when the tar is damaged: records before the damage are kept
    stats: dict | None = None  # img2dataset's NNNNN_stats.json, when present


def _split_name(name: str) -> tuple[str, str]:
    slash = name.rfind("/")
    base = name[slash + 1:]
    dot = base.find(".")
    if dot < 0:
        return name, ""
    return name[: slash + 1] + base[:dot], base[dot + 1:].lower()


def _probe_size(data: bytes) -> tuple[int, int] | None:
    try:
        with Image.open(io.BytesIO(data[:_HEADER_PROBE_BYTES] if len(data) > _HEADER_PROBE_BYTES else data)) as im:
            return im.size
    except Image.DecompressionBombError:
        return None
    except Exception:
        # Some formats need more than the probe window for their header; retry on the whole payload.
        if len(data) > _HEADER_PROBE_BYTES:
            try:
                with Image.open(io.BytesIO(data)) as im:
                    return im.size
            except Exception:
                return None
        return None


def _int_or_none(v) -> int | None:
    try:
        return int(v) if v is not None and v != "" else None
    except (TypeError, ValueError):
        return None


def _finish_record(key: str, members: dict[str, bytes], offset: int, end: int, issues: list) -> WdsRecord | None:
    rec = WdsRecord(key=key, members=sorted(members), tar_offset=offset, tar_end=end)
    meta: dict = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except Exception as exc:
            issues.append((key, None, "bad_json", "warning", f"json member unreadable: {exc}"[:300]))
            meta = {}
    if meta.get("uid") is not None:
        rec.uid = normalise_uid(str(meta["uid"]))
        if rec.uid is None:
            issues.append((key, None, "bad_uid", "warning", f"json uid {str(meta['uid'])[:80]!r} is not 32 hex chars; derived one"))
    url = meta.get("url")
    rec.url = str(url) if url is not None else None

    img_ext = next((e for e in IMAGE_EXTS if e in members), None)
    if img_ext is None:
        issues.append((key, rec.uid, "missing_image", "rejected", f"members: {','.join(sorted(members)) or 'none'}"))
        return None
    data = members[img_ext]
    rec.image_ext, rec.image_bytes = img_ext, len(data)
    size = _probe_size(data)
    if size is None:
        head = data[:16]
        issues.append((key, rec.uid, "not_an_image", "rejected", f"{img_ext} member of {len(data)} bytes starting {head!r}"))
        return None

    if "txt" in members:
        raw = members["txt"]
        try:
            rec.caption = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            rec.caption = raw.decode("utf-8", errors="replace")
            issues.append((key, rec.uid, "caption_not_utf8", "warning",
                           f"invalid UTF-8 at byte {exc.start}; undecodable bytes replaced by U+FFFD"))
    elif isinstance(meta.get("caption"), str):
        rec.caption = meta["caption"]
    else:
        issues.append((key, rec.uid, "missing_caption", "warning", "no txt member and no caption in json"))

    # DataComp's size rules use the original size; img2dataset stores it as original_width/height.
    rec.width = _int_or_none(meta.get("original_width")) or _int_or_none(meta.get("width")) or size[0]
    rec.height = _int_or_none(meta.get("original_height")) or _int_or_none(meta.get("height")) or size[1]
    sha = meta.get("sha256")
    rec.sha256 = str(sha).lower() if isinstance(sha, str) and len(sha) == 64 else hashlib.sha256(data).hexdigest()
    return rec


def read_wds_shard(path: Path) -> WdsShard:
    """Read a shard; raises OSError/tarfile.ReadError only when nothing at all can be read."""
    records: list[WdsRecord] = []
    issues: list = []
    error = None
    with open(path, "rb") as raw:
        reader = _HashingReader(raw)
        buffered = io.BufferedReader(reader, buffer_size=1 << 20)
        try:
            tar = tarfile.open(fileobj=buffered, mode="r|*")
        except tarfile.TarError as exc:
            raise tarfile.ReadError(f"not a readable tar archive ({exc})") from None
        cur_key: str | None = None
        cur: dict[str, bytes] = {}
        cur_offset = cur_end = 0
        try:
            for info in tar:
                if not info.isfile():
                    continue
                key, ext = _split_name(info.name)
                if key != cur_key:
                    if cur_key is not None:
                        rec = _finish_record(cur_key, cur, cur_offset, cur_end, issues)
                        if rec is not None:
                            records.append(rec)
                    cur_key, cur, cur_offset = key, {}, info.offset
                fh = tar.extractfile(info)
                data = fh.read() if fh is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} truncated ({len(data)} of {info.size} bytes)")
                if ext in cur:
                    issues.append((key, None, "repeated_member", "warning", f"second {ext} member ignored"))
                else:
                    cur[ext] = data
                cur_end = info.offset_data + ((info.size + 511) // 512) * 512
        except (tarfile.TarError, EOFError, OSError, ValueError) as exc:
            error = f"tar damaged after {len(records)} complete records: {exc}"
            if cur_key is not None:
                issues.append((cur_key, None, "truncated_record", "rejected", str(exc)[:300]))
            cur_key = None
        if cur_key is not None:
            rec = _finish_record(cur_key, cur, cur_offset, cur_end, issues)
            if rec is not None:
                records.append(rec)
        try:
            tar.close()
        except Exception:
            pass
        reader.drain()
    stats = None
    stats_path = _sidecar(path, "_stats.json")
    if stats_path.exists():
        try:
            stats = json.loads(stats_path.read_text())
        except Exception:
            stats = None
    return WdsShard(records, issues, reader.sha.hexdigest(), reader.pos, error, stats)


def _sidecar(path: Path, suffix: str) -> Path:
    name = path.name
    for s in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(s):
            name = name[: -len(s)]
            break
    return path.with_name(name + suffix)


def read_download_status(path: Path):
    """img2dataset's per-shard table (NNNNN.parquet): one row per URL with status/error_message.

    Returns a polars frame of the rows whose status is not 'success', or None.
    """
    p = _sidecar(path, ".parquet")
    if not p.exists():
        return None
    import polars as pl

    try:
        df = pl.read_parquet(p)
    except Exception:
        return None
    if "status" not in df.columns:
        return None
    return df.filter(pl.col("status") != "success")
