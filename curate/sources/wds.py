"""Read one webdataset tar shard (as img2dataset writes them) in a single streaming pass.

Members are grouped by key the webdataset way: the key is the member path up to the first
dot of its file name, the extension is the rest (lower-cased). For every record we keep the
metadata and the tar byte range (so export can copy members byte for byte) but never hold
more than one record's bytes, and never a member over `ReadLimits.max_member_bytes`. The
shard's SHA-256 fingerprint is computed in the same pass. Plain, gzip, bzip2 and xz tars are
read; zstd is refused with a clear error.

Per-record problems become issues. Rejected (nothing to train on, or unsafe to pass on):
`missing_image`, `not_an_image`, `decompression_bomb`, `image_too_large`, `member_too_large`,
`unsafe_member_name`, `unsafe_member`, `truncated_record`, `tar_damaged`, `inflated_too_large`. Warnings (the sample
is kept and the problem noted): `missing_caption`, `caption_not_utf8`, `bad_json`, `bad_uid`,
`image_warning` (what Pillow warned about the image's header).

Damage. tarfile stops silently at a header whose checksum is wrong, so headers are watched
(`_HeaderWatch`) and reading resynchronises at the next valid header, as GNU tar does. The
damaged region goes into the shard's `error`; a record that may have lost a member to it (the
one being read when the damage began, the first one after it) is kept only if it has the
members the shard's other records have, else rejected as `tar_damaged`; anything else that
vanished in the damage cannot be named and is recorded as one key-less `tar_damaged` issue.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import json
import re
import tarfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..export.tario import ZSTD_MAGIC, compression_of, unsafe_name
from ..uids import UID_SPACE, normalise_uid

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_HEADER_PROBE_BYTES = 1 << 16
# GNU long names and pax records are read whole by tarfile: a bound keeps a hostile one from
# filling memory (real ones are a few hundred bytes).
MAX_EXTENDED_HEADER = 1 << 20
_EXTENDED_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                   tarfile.SOLARIS_XHDTYPE)
# Pillow's default bound (Image.MAX_IMAGE_PIXELS), as `curate score` uses (score/decode.py).
DEFAULT_MAX_PIXELS = 89_478_485


@dataclass(frozen=True)
class ReadLimits:
    """Bounds on what one shard may make ingest hold or do (docs/ingest.md, "Limits")."""

    max_member_bytes: int = 64 << 20
    # A compressed shard may inflate to at most this many bytes: an int, or a factor of its
    # compressed size ("100x", at least 1 GiB then).
    max_inflated: int | str = "100x"
    max_pixels: int = DEFAULT_MAX_PIXELS

    def inflated_limit(self, compressed_bytes: int) -> int:
        v = self.max_inflated
        if isinstance(v, str) and v.lower().endswith("x"):
            return max(1 << 30, int(float(v[:-1]) * compressed_bytes))
        return int(v)


_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
               "g": 1024**3, "gb": 1000**3, "gib": 1024**3, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}


def parse_size(text: str, *, allow_factor: bool = False) -> int | str:
    """'64MiB', '500MB', '2G', '1048576' -> bytes; with `allow_factor`, '100x' stays a factor.
    Raises ValueError with a message fit for the user."""
    t = str(text).strip().lower().replace(" ", "")
    if allow_factor and t.endswith("x"):
        try:
            f = float(t[:-1])
        except ValueError:
            f = -1.0
        if 1 <= f < 1e12:
            return t
        raise ValueError(f"{text!r}: a factor is a number >= 1 followed by x (e.g. 100x)")
    m = re.fullmatch(r"([0-9]+(?:\.[0-9]*)?)([a-z]*)", t)
    if not m or m.group(2) not in _SIZE_UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. 64MiB, 500MB, 2GiB{', 100x' if allow_factor else ''})")
    n = int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])
    if n <= 0 or n >= 1 << 62:
        raise ValueError(f"{text!r}: a size must be positive")
    return n


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
        """Hash the rest of the file (reading may stop before its end)."""
        buf = bytearray(1 << 20)
        while self.readinto(buf):
            pass


class _InflatedTooFar(Exception):
    def __init__(self, offset: int):
        self.offset = offset


class _ExtendedTooLarge(Exception):
    pass


class _Inflated(io.RawIOBase):
    """A compressed shard's inflated stream, stopped where it passes `limit` bytes (a bomb is
    never inflated further than that)."""

    def __init__(self, fh, limit: int):
        self.fh, self.limit, self.pos = fh, limit, 0
        self.over = False  # the stream went on past the limit (it reads as ending there)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        view = memoryview(b)
        if self.pos >= self.limit:  # the stream ends here for tarfile; say whether it went on
            if not self.over and self.fh.readinto(view[:1]):
                self.over = True
            return 0
        n = self.fh.readinto(view[:min(len(view), self.limit - self.pos)])  # read-ahead stops at the limit
        self.pos += n
        return n


class _HeaderWatch(tarfile.TarInfo):
    """Records the header problems tarfile passes over (with `ignore_zeros` it skips zero and
    invalid blocks; without, it would stop at the first bad checksum and say nothing), resyncs
    after a bad header that follows a long name or pax record (tarfile would stop there), and
    refuses extended headers too large to be real."""

    events: list = []  # set on a per-shard subclass (`watching`)

    @classmethod
    def watching(cls) -> type:
        """A subclass for one shard: tarfile reads the first header inside open(), so the event
        list must be in place before it."""
        return type("_ShardHeaderWatch", (cls,), {"events": []})

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            cls._note(tf.offset, "zero", "")
            raise
        except tarfile.InvalidHeaderError as exc:
            cls._note(tf.offset, "invalid", str(exc))
            raise
        except tarfile.SubsequentHeaderError as exc:
            # the header after a long name / pax record is bad: skip on from here, as for any
            # bad header (tarfile would end the archive)
            cls._note(tf.offset, "invalid", str(exc))
            raise tarfile.InvalidHeaderError(str(exc)) from None
        except tarfile.TruncatedHeaderError as exc:
            cls._note(tf.offset, "truncated", str(exc))
            raise

    def _proc_member(self, tf):
        if self.type in _EXTENDED_TYPES and self.size > MAX_EXTENDED_HEADER:
            raise _ExtendedTooLarge(f"an extended header (long name or pax record) of {self.size:,} bytes at byte "
                                    f"{self.offset:,}, over the bound of {MAX_EXTENDED_HEADER:,}")
        return super()._proc_member(tf)

    @classmethod
    def _note(cls, offset: int, kind: str, msg: str) -> None:
        """One event per run of skipped blocks of a kind (a damaged 1 GB member is 2M blocks)."""
        ev = cls.events
        if ev and ev[-1][1] == kind and ev[-1][3] == offset - tarfile.BLOCKSIZE:
            ev[-1] = (ev[-1][0], kind, ev[-1][2], offset)
        else:
            ev.append((offset, kind, msg, offset))


@dataclass
class WdsRecord:
    key: str
    uid: str | None = None
    url: str | None = None
    caption: str | None = None
    width: int | None = None
    height: int | None = None
    sha256: str | None = None
    given_sha256: str | None = None  # the json's `sha256` (img2dataset: of the downloaded bytes)
    img_width: int | None = None     # the stored image's own size (width/height: the original's)
    img_height: int | None = None
    image_ext: str | None = None
    image_bytes: int | None = None
    members: list[str] = field(default_factory=list)
    tar_offset: int = 0
    tar_end: int = 0


@dataclass
class WdsShard:
    records: list[WdsRecord]
    issues: list[tuple[str | None, str | None, str, str, str]]  # (key, uid, reason, action, detail)
    fingerprint: str
    nbytes: int
    error: str | None = None  # set when the tar is damaged; see the module docstring
    stats: dict | None = None  # img2dataset's NNNNN_stats.json, when present
    compressed: bool = False


def _split_name(name: str) -> tuple[str, str]:
    slash = name.rfind("/")
    base = name[slash + 1:]
    dot = base.find(".")
    if dot < 0:
        return name, ""
    return name[: slash + 1] + base[:dot], base[dot + 1:].lower()


def _kind(info: tarfile.TarInfo) -> str:
    if info.issym():
        return f"symbolic link to {info.linkname[:120]!r}"
    if info.islnk():
        return f"hard link to {info.linkname[:120]!r}"
    if info.ischr() or info.isblk():
        return "device file"
    if info.isfifo():
        return "FIFO"
    if info.issparse():
        return "sparse file"
    return f"tar member of type {info.type!r}"


@contextlib.contextmanager
def _header_only():
    """Pillow's own bomb check off while only the header is read (nothing is decoded here, and
    `max_pixels` is checked on the size the header announces); ingest is single-threaded."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _probe(data: bytes, max_pixels: int) -> tuple[tuple[int, int] | None, str | None, str | None, list[str]]:
    """(size, reason, detail, warnings) from the image header; no full decode."""
    caught: list[str] = []

    def open_size(b: bytes):
        with Image.open(io.BytesIO(b)) as im:
            return im.size

    with warnings.catch_warnings(record=True) as rec, _header_only():
        warnings.simplefilter("always")
        try:
            try:
                size = open_size(data[:_HEADER_PROBE_BYTES] if len(data) > _HEADER_PROBE_BYTES else data)
            except Image.DecompressionBombError:
                raise
            except Exception:
                # Some formats need more than the probe window for their header: the whole payload.
                if len(data) <= _HEADER_PROBE_BYTES:
                    raise
                size = open_size(data)
        except Image.DecompressionBombError as exc:
            return None, "decompression_bomb", str(exc)[:300], caught
        except Exception:
            return None, "not_an_image", None, caught
        for w in rec:
            if issubclass(w.category, Image.DecompressionBombWarning):
                continue  # decided below, by our own bound
            msg = f"{w.category.__name__}: {w.message}"[:300]
            if msg not in caught:
                caught.append(msg)
    w, h = size
    if w <= 0 or h <= 0:
        return None, "not_an_image", f"invalid size {w}x{h}", caught
    if w * h > max_pixels:
        return size, "decompression_bomb", f"{w}x{h} = {w * h:,} pixels > the limit of {max_pixels:,}", caught
    return size, None, None, caught


def _int_or_none(v) -> int | None:
    try:
        return int(v) if v is not None and v != "" else None
    except (TypeError, ValueError, OverflowError):
        return None


@dataclass
class _Group:
    """The members of one key being read."""

    key: str
    offset: int
    end: int = 0
    data: dict[str, bytes] = field(default_factory=dict)
    exts: list[str] = field(default_factory=list)  # every member's extension, in order
    unsafe: list[tuple[str, str]] = field(default_factory=list)  # (reason, detail)
    too_large: list[tuple[str, int]] = field(default_factory=list)  # (ext, size)
    near_damage: str | None = None
    damaged_inside: str | None = None  # damage between two of its own members: its range holds it


def _finish_record(g: _Group, issues: list, limits: ReadLimits) -> WdsRecord | None:
    key, members = g.key, g.data
    rec = WdsRecord(key=key, members=sorted(set(g.exts)), tar_offset=g.offset, tar_end=g.end)
    meta: dict = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"].decode("utf-8"))
            if not isinstance(meta, dict):
                raise ValueError("not a JSON object")
        except Exception as exc:
            issues.append((key, None, "bad_json", "warning", f"json member unreadable: {exc}"[:300]))
            meta = {}
    # A blank uid (nothing but white space) counts as no uid, as in a URL table's empty cell.
    if meta.get("uid") is not None and str(meta["uid"]).strip(UID_SPACE):
        rec.uid = normalise_uid(str(meta["uid"]))
        if rec.uid is None:
            issues.append((key, None, "bad_uid", "warning", f"json uid {str(meta['uid'])[:80]!r} is not 32 hex chars; derived one"))
    url = meta.get("url")
    rec.url = str(url) if url is not None else None

    def reject(reason: str, detail: str) -> None:
        issues.append((key, rec.uid, reason, "rejected", detail[:300]))

    if g.unsafe:
        reject(*g.unsafe[0])
        return None
    big = [(e, n) for e, n in g.too_large]
    img_ext = next((e for e in IMAGE_EXTS if e in members or any(e == b for b, _ in big)), None)
    if big:
        ext, n = big[0]
        reason = "image_too_large" if any(e == img_ext for e, _ in big) else "member_too_large"
        if reason == "image_too_large":
            ext, n = next((e, s) for e, s in big if e == img_ext)
        reject(reason, f"{ext} member of {n:,} bytes is over the limit of {limits.max_member_bytes:,} "
                       "(ingest --max-member-size)")
        return None
    if img_ext is None:
        reject("missing_image", f"members: {','.join(rec.members) or 'none'}")
        return None
    data = members[img_ext]
    rec.image_ext, rec.image_bytes = img_ext, len(data)
    size, reason, detail, warned = _probe(data, limits.max_pixels)
    if reason is not None:
        reject(reason, detail or f"{img_ext} member of {len(data)} bytes starting {data[:16]!r}")
        return None
    for msg in warned:
        issues.append((key, rec.uid, "image_warning", "warning", msg))

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
    if rec.width is not None and not -2**31 <= rec.width < 2**31:
        rec.width = size[0]
    if rec.height is not None and not -2**31 <= rec.height < 2**31:
        rec.height = size[1]
    if size is not None:
        rec.img_width, rec.img_height = (v if v is not None and 0 <= v < 2**31 else None for v in size)
    sha = meta.get("sha256")
    if isinstance(sha, str) and len(sha) == 64:
        rec.given_sha256 = sha.lower()
    rec.sha256 = rec.given_sha256 or hashlib.sha256(data).hexdigest()
    return rec


class _Damage:
    """Regions of the stream where reading had to skip (`_HeaderWatch` events between members)."""

    def __init__(self):
        self.regions: list[str] = []

    @staticmethod
    def kind_of(events: list, start: int, end: int | None) -> tuple[str | None, str | None]:
        """('invalid' | 'truncated' | 'zero', description) of [start, end), or (None, None)."""
        ev = [e for e in events if e[0] >= start and (end is None or e[0] < end)]
        if not ev:
            return None, None
        invalid = [e for e in ev if e[1] == "invalid"]
        truncated = [e for e in ev if e[1] == "truncated"]
        stop = f"byte {end:,}" if end is not None else "the end"
        if invalid:
            return "invalid", (f"unreadable tar header at byte {invalid[0][0]:,} ({invalid[0][2]}); "
                               f"skipped to the next valid header at {stop}")
        if truncated:
            return "truncated", f"the archive ends inside a header at byte {truncated[0][0]:,}"
        if end is not None:
            return "zero", (f"zero blocks at bytes {ev[0][0]:,}..{end:,} inside the archive (an end-of-archive "
                            "marker followed by more members, or a zeroed region); the members after it were read")
        return None, None  # zeros to the end: the end-of-archive marker and padding


def _not_a_tar(events: list, exc: BaseException | None) -> tarfile.ReadError:
    why = next((e[2] for e in events if e[1] == "invalid"), None) or (str(exc) if exc else "no tar header")
    return tarfile.ReadError(f"not a readable tar archive ({why})")


def read_wds_shard(path: Path, limits: ReadLimits | None = None) -> WdsShard:
    """Read a shard; raises OSError/tarfile.ReadError only when nothing at all can be read."""
    limits = limits or ReadLimits()
    records: list[WdsRecord] = []
    issues: list = []
    fatal: str | None = None
    damage = _Damage()
    with open(path, "rb") as raw:
        head = raw.read(8)
        if head.startswith(ZSTD_MAGIC):
            raise tarfile.ReadError("zstd-compressed shard: curate reads plain, gzip, bzip2, xz and lzma tars; "
                                    "decompress it (`zstd -d`) or recompress it with gzip")
        codec = compression_of(head)
        file_bytes = raw.seek(0, io.SEEK_END)
        raw.seek(0)
        reader = _HashingReader(raw)
        stream = io.BufferedReader(reader, buffer_size=1 << 20)
        limit = inflated = None
        if codec is not None:
            # decompressed here, with the openers export and score read the shard with (every
            # gzip member, every bzip2/xz stream), and stopped at the inflated-size limit
            limit = limits.inflated_limit(file_bytes)
            inflated = _Inflated(codec[0](stream, "rb"), limit)
            stream = io.BufferedReader(inflated, buffer_size=1 << 20)
        watch = _HeaderWatch.watching()
        events = watch.events
        try:
            tar = tarfile.open(fileobj=stream, mode="r|", tarinfo=watch, ignore_zeros=True)
        except _InflatedTooFar:
            raise tarfile.ReadError(f"inflates past the limit of {limit:,} bytes before its first member "
                                    f"({file_bytes:,} bytes compressed; ingest --max-inflated-size)") from None
        except Exception as exc:  # tarfile, the decompressors, a hostile header's recursion
            raise _not_a_tar(events, exc) from None
        cur: _Group | None = None
        expected = 0          # where the next header should start
        flagged: list[tuple[WdsRecord | None, _Group, list]] = []  # records next to damage, their issues
        n_members = 0
        reading = "header"    # what was being read when reading failed

        def flush(g: _Group | None) -> None:
            if g is None:
                return
            n_before = len(issues)
            rec = _finish_record(g, issues, limits)
            if g.near_damage is not None or g.damaged_inside is not None:
                flagged.append((rec, g, issues[n_before:]))
            elif rec is not None:
                records.append(rec)

        def keyless(gap_kind: str | None, gap: str) -> None:
            # what lay wholly inside the damage cannot be named (removed again if a record next to
            # it turns out to be what was lost: _settle_flagged); a run of zeros names nothing
            if gap_kind in ("invalid", "truncated"):
                issues.append((None, None, "tar_damaged", "rejected", gap[:300]))

        try:
            while True:
                reading = "header"
                info = tar.next()
                if info is None:
                    break
                n_members += 1
                if n_members % 4096 == 0:
                    tar.members.clear()  # stream mode keeps every TarInfo; we need none of them
                gap_kind, gap = (_Damage.kind_of(events, expected, info.offset) if info.offset != expected
                                 else (None, None))
                if gap:
                    damage.regions.append(gap)
                expected = info.offset_data + (((info.size + 511) // 512) * 512 if info.isreg() else 0)
                if info.isdir():
                    if gap and cur is not None:
                        cur.near_damage = gap
                    flush(cur)  # a directory ends a record: it is never inside a sample's byte range
                    cur = None
                    if gap:
                        keyless(gap_kind, gap)
                    continue
                key, ext = _split_name(info.name)
                if gap:
                    if cur is not None and key == cur.key:
                        cur.damaged_inside = gap  # its byte range would hold the damage: never kept
                    else:
                        if cur is not None:
                            cur.near_damage = gap
                            flush(cur)
                            cur = None
                        keyless(gap_kind, gap)
                if cur is None or key != cur.key:
                    flush(cur)
                    cur = _Group(key, info.offset, near_damage=gap)
                cur.exts.append(ext)
                cur.end = expected
                why = unsafe_name(info.name)
                if why:
                    cur.unsafe.append(("unsafe_member_name", f"member {info.name[:200]!r}: {why}"))
                if not info.isreg() or info.issparse():
                    cur.unsafe.append(("unsafe_member", f"member {info.name[:200]!r} is a {_kind(info)}"))
                    continue
                reading = "data"
                if limit is not None and info.offset_data + info.size > limit:
                    raise _InflatedTooFar(limit)  # it ends past the limit: not inflated at all
                if info.size > limits.max_member_bytes:
                    cur.too_large.append((ext, info.size))
                    continue  # not read: tarfile skips its data when asked for the next member
                if ext in cur.data:
                    issues.append((key, None, "repeated_member", "warning", f"second {ext} member ignored"))
                    continue
                fh = tar.extractfile(info)
                data = fh.read() if fh is not None else b""
                if len(data) != info.size:
                    raise tarfile.ReadError(f"member {info.name} truncated ({len(data)} of {info.size} bytes)")
                cur.data[ext] = data
        except _InflatedTooFar as exc:  # a member that would end past the limit
            fatal = (f"inflates past the limit of {limit:,} bytes ({file_bytes:,} bytes compressed; "
                     "ingest --max-inflated-size); the rest was not read")
            failed = exc
        except Exception as exc:  # tarfile, the decompressors, MemoryError, a hostile header's recursion
            fatal = f"tar damaged at byte {expected:,}: {type(exc).__name__}: {exc}"[:500]
            failed = exc
        if inflated is not None and inflated.over:  # tarfile saw the limit as the end of the file
            fatal = (f"inflates past the limit of {limit:,} bytes ({file_bytes:,} bytes compressed; "
                     "ingest --max-inflated-size); the rest was not read")
            failed = _InflatedTooFar(limit)
        if fatal is not None and n_members == 0:
            if isinstance(failed, _InflatedTooFar):
                raise tarfile.ReadError(f"inflates past the limit of {limit:,} bytes before its first member "
                                        f"({file_bytes:,} bytes compressed; ingest --max-inflated-size)")
            raise _not_a_tar(events, failed)
        end_kind, end = _Damage.kind_of(events, expected, None)
        tail = [e for e in events if e[0] >= expected]
        if fatal is not None and reading == "header" and tail and all(e[1] == "zero" for e in tail):
            # past the end-of-archive marker: what follows it in the file (trailing garbage after a
            # compressed stream, a tail of zeros past the inflated-size limit) is not the archive's
            fatal = None
        if fatal is not None:
            if cur is not None and reading == "data":
                reason = "inflated_too_large" if isinstance(failed, _InflatedTooFar) else "truncated_record"
                issues.append((cur.key, None, reason, "rejected", fatal[:300]))
                cur = None
            elif cur is not None:  # it failed between members: the one read may be whole
                cur.near_damage = fatal
        elif end is not None:
            damage.regions.append(end)
            if cur is not None:
                cur.near_damage = end
            keyless(end_kind, end)
        flush(cur)
        try:
            tar.close()
        except Exception:
            pass
        if n_members == 0 and any(e[1] == "invalid" for e in events):
            raise _not_a_tar(events, None)
        reader.drain()
    _settle_flagged(flagged, records, issues)
    errors = damage.regions + ([fatal] if fatal else [])
    error = None
    if errors:
        error = f"tar damaged ({len(records)} records read): " + "; ".join(errors[:3])
        if len(errors) > 3:
            error += f"; and {len(errors) - 3} more damaged regions"
    stats = None
    stats_path = _sidecar(path, "_stats.json")
    if stats_path.exists():
        try:
            stats = json.loads(stats_path.read_text())
        except Exception:
            stats = None
    records.sort(key=lambda r: r.tar_offset)
    return WdsShard(records, issues, reader.sha.hexdigest(), reader.pos, error, stats, codec is not None)


def _settle_flagged(flagged, records: list[WdsRecord], issues: list) -> None:
    """Records next to damage: kept when they have the members the shard's other records have
    (then nothing of theirs was lost); else rejected as `tar_damaged`, naming why. A record with
    damage between its own members is never kept: its byte range holds the damage."""
    if not flagged:
        return
    usual = collections.Counter(tuple(r.members) for r in records).most_common(1)
    usual_members = list(usual[0][0]) if usual else None
    for rec, g, own in flagged:
        if (rec is not None and g.damaged_inside is None and usual_members is not None
                and rec.members == usual_members):
            records.append(rec)
            continue
        # drop what finishing it recorded, and say why it is rejected instead
        own = [i for i in own if i[0] == g.key]
        was = next((i[2] for i in own if i[3] == "rejected"), None)
        why = g.damaged_inside or g.near_damage
        # the damage is accounted for by this record: no key-less row for it
        keyless = (None, None, "tar_damaged", "rejected", (g.near_damage or "")[:300])
        for i in own + ([keyless] if keyless in issues else []):
            issues.remove(i)
        uid = rec.uid if rec is not None else None
        where = "with tar damage between its members" if g.damaged_inside else "next to tar damage"
        detail = (f"members {','.join(sorted(set(g.exts))) or 'none'} {where}" + (f" ({was})" if was else "")
                  + f": {why}")
        issues.append((g.key, uid, "tar_damaged", "rejected", detail[:300]))


def _sidecar(path: Path, suffix: str) -> Path:
    name = path.name
    for s in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.lzma", ".tar.zst", ".tar"):
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
