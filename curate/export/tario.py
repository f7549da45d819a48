"""Raw tar blocks: check a recorded member header, re-emit headers for renamed or rewritten
members, and read byte ranges of (possibly compressed) source shards.

A sample's byte range in its source tar (`samples.tar_offset`/`tar_end`) is a run of whole
512-byte blocks: header (with any GNU long-name or pax extended header before it), data,
zero padding, for each of its members. Export copies such ranges as they are; only a member
that must change (a renamed key, a rewritten json) gets a new header.
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import mmap
import os
import re
import tarfile

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile/GNU tar pad archives to whole 10 KiB records
END_OF_ARCHIVE = bytes(2 * BLOCK)
_ENC = ("utf-8", "surrogateescape")
_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f\\]")
_EXTENDED = (b"L", b"K", b"x", b"g", b"X")  # GNU long name/link, pax (local, global, old Solaris)


def padded(size: int) -> int:
    return (size + BLOCK - 1) // BLOCK * BLOCK


def check_header(buf, pos: int, key: bytes, *, checksum: bool = True) -> str | None:
    """None if `buf[pos:pos+512]` is a tar header that starts member `key.*` (or an extended
    header, whose name is elsewhere); else a short description of the mismatch. Without
    `checksum` only the name is compared (that alone rules out a shifted or rewritten shard)."""
    if not checksum and buf[pos:pos + 100].startswith(key + b".") and len(buf) >= pos + BLOCK:
        return None  # the common case, kept cheap: one slice per sample
    hdr = bytes(buf[pos:pos + BLOCK])
    if len(hdr) < BLOCK:
        return "range ends before a full header"
    typeflag = hdr[156:157]
    if checksum or typeflag in _EXTENDED:
        try:
            stored = int(hdr[148:156].split(b"\0", 1)[0].strip() or b"-1", 8)
        except ValueError:
            return "no tar header at the recorded offset (checksum field is not octal)"
        if stored != sum(hdr[:148]) + 256 + sum(hdr[156:]) and stored not in tarfile.calc_chksums(hdr):
            return "no tar header at the recorded offset (checksum mismatch)"  # signed sums: some old tars
    if typeflag in _EXTENDED:
        return None  # the real name follows in an extended header's data
    name = hdr[:100].split(b"\0", 1)[0]
    if hdr[257:263] == b"ustar\0":  # POSIX ustar: a prefix may hold the leading directories
        prefix = hdr[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    if not name.startswith(key + b"."):
        return f"member {name[:80].decode(*_ENC)!r} at the recorded offset is not of key {key.decode(*_ENC)!r}"
    return None


class Member:
    """One tar member inside a sample's byte range: its name, whether it is a regular file, its
    data size and block offsets (header start, data start, end of padding). `info()` parses the
    full header only when a member must be re-emitted."""

    __slots__ = ("name", "isreg", "size", "h0", "d0", "end", "_buf", "_ti")

    def __init__(self, name, isreg, size, h0, d0, end, buf, ti=None):
        self.name, self.isreg, self.size, self.h0, self.d0, self.end = name, isreg, size, h0, d0, end
        self._buf, self._ti = buf, ti

    def info(self) -> tarfile.TarInfo:
        if self._ti is None:
            self._ti = tarfile.TarInfo.frombuf(bytes(self._buf[self.h0:self.h0 + BLOCK]), *_ENC)
        return self._ti


_REGULAR = (b"0", b"\0", b"7")


def members_of(buf) -> list[Member]:
    """The members in a sample's byte range. Plain ustar/GNU headers are read directly (the common
    case, fast); a range with GNU long-name or pax extended headers is handed to tarfile."""
    out: list[Member] = []
    pos, n = 0, len(buf)
    while pos < n:
        hdr = bytes(buf[pos:pos + BLOCK])
        if len(hdr) < BLOCK or not hdr.strip(b"\0"):
            raise ValueError(f"no member header at byte {pos} of a {n}-byte range")
        typeflag = hdr[156:157]
        if typeflag in _EXTENDED:
            return _members_by_tarfile(buf)
        try:
            size = tarfile.nti(hdr[124:136])
        except tarfile.InvalidHeaderError as exc:
            raise ValueError(f"bad size field at byte {pos}: {exc}") from None
        name = hdr[:100].split(b"\0", 1)[0]
        if hdr[257:263] == b"ustar\0":
            prefix = hdr[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        end = pos + BLOCK + (padded(size) if typeflag not in (b"1", b"2", b"3", b"4", b"5", b"6") else 0)
        out.append(Member(name.decode(*_ENC), typeflag in _REGULAR, size, pos, pos + BLOCK, end, buf))
        pos = end
    if pos != n:
        raise ValueError(f"members end at byte {pos} of a {n}-byte range")
    return out


def _members_by_tarfile(buf) -> list[Member]:
    tf = tarfile.open(fileobj=io.BytesIO(bytes(buf) + END_OF_ARCHIVE), mode="r:", encoding="utf-8",
                      errors="surrogateescape")
    out = [Member(ti.name, ti.isreg(), ti.size, ti.offset, ti.offset_data, ti.offset_data + padded(ti.size), buf, ti)
           for ti in tf]
    if out and out[-1].end != len(buf):
        raise ValueError(f"members end at byte {out[-1].end} of a {len(buf)}-byte range")
    return out


def unsafe_name(name: str) -> str | None:
    """Why a member name must not be passed on to an exported shard (None: it is safe).
    Extracting a shard with such a member could write outside the target directory, or the
    name cannot be written back as it was read."""
    if not name or name.startswith("/"):
        return "absolute path" if name else "empty name"
    if ".." in name.split("/"):
        return "'..' in the path"
    if _UNSAFE_CHARS.search(name):
        return "control character or backslash in the name"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "name is not valid UTF-8"
    return None


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) the webdataset way, the rule ingest used: the key runs to the first dot
    of the file name; the extension is the rest, lower-cased."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1:].lower()


def header_for(ti: tarfile.TarInfo, name: str, size: int) -> bytes:
    """A fresh header for `ti` under a new name and size; every other attribute is kept."""
    new = tarfile.TarInfo(name)
    new.size = size
    new.mtime = ti.mtime
    new.mode = ti.mode
    new.type = ti.type
    new.uid, new.gid = ti.uid, ti.gid
    new.uname, new.gname = ti.uname, ti.gname
    new.linkname = ti.linkname
    # tobuf keeps pax records it finds, so drop the ones this header restates.
    new.pax_headers = {k: v for k, v in ti.pax_headers.items() if k not in ("path", "linkpath", "size")}
    return new.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")


def member_bytes(header: bytes, data: bytes) -> bytes:
    return header + data + bytes(padded(len(data)) - len(data))


# ---- sources ------------------------------------------------------------------------------

# How a compressed shard starts, and what reads it: multi-member gzip and multi-stream bzip2 / xz
# are read whole (ingest decompresses with the same openers, so its offsets agree with these).
# b"]\0\0" is a legacy .lzma ("lzma-alone") header, which lzma.open's FORMAT_AUTO reads.
COMPRESSED = ((b"\x1f\x8b", gzip.open, "gzip"), (b"BZh", bz2.open, "bzip2"), (b"\xfd7zXZ\x00", lzma.open, "xz"),
              (b"\x5d\x00\x00", lzma.open, "lzma"))
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def compression_of(head: bytes):
    """(opener, name) for a file starting with `head`, or None for a plain file."""
    for magic, opener, name in COMPRESSED:
        if head.startswith(magic):
            return opener, name
    return None


class Source:
    """Random reads of a source shard. Plain tars use pread; compressed ones (whose recorded
    offsets are in the decompressed stream) seek their decompressing reader, which is cheap
    forwards and restarts the stream backwards: exports read each shard's ranges in order
    unless shuffled."""

    def __init__(self, path: str):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)
        head = os.pread(self.fd, 6, 0)
        self.stream = None
        self._mm = None
        found = compression_of(head)
        if found is not None:
            self.stream = found[0](path, "rb")

    def map(self):
        """The plain file as a read-only map, to check many headers without a syscall each."""
        if self._mm is None:
            self._mm = mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ)
        return self._mm

    def pread(self, offset: int, n: int) -> bytes:
        return os.pread(self.fd, n, offset)

    @property
    def compressed(self) -> bool:
        return self.stream is not None

    def read(self, offset: int, n: int) -> bytearray:
        """The n bytes at `offset`; raises EOFError if the shard ends first."""
        buf = bytearray(n)
        self.read_into(memoryview(buf), offset)
        return buf

    def read_into(self, buf: memoryview, offset: int) -> None:
        """Fill `buf` with the bytes at `offset`; raise if the shard ends first."""
        n = len(buf)
        if self.stream is not None:
            self.stream.seek(offset)
            got = self.stream.readinto(buf)
        else:
            got = 0
            while got < n:
                k = os.preadv(self.fd, [buf[got:]], offset + got)
                if k == 0:
                    break
                got += k
        if got != n:
            raise EOFError(f"{self.path} ends at byte {offset + got}, before the recorded range end {offset + n}")

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
        if self._mm is not None:
            self._mm.close()
        os.close(self.fd)
