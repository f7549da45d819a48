"""DataComp metadata: `<stem>.parquet` + `<stem>.npz`, row i of the npz = row i of the parquet.

The npz arrays are never loaded whole. `np.savez` stores members uncompressed, so each array
is registered in place (npz path, member, byte offset) and later opened as a read-only
memory map. Compressed members (`np.savez_compressed`) are streamed out, chunk by chunk, into
fp16 `.npy` files in the workspace.

npz keys map to scorers: `b32_img`/`b32_txt` → `datacomp-b32`, `l14_img`/`l14_txt` →
`datacomp-l14`, any other `<prefix>_<kind>` → `datacomp-<prefix>`, a bare key (`dedup`) →
scorer `datacomp-<key>` kind `img`. The parquet's `clip_b32_similarity_score` and
`clip_l14_similarity_score` become the scores of `datacomp-b32` and `datacomp-l14`.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCORE_COLUMNS = {"clip_b32_similarity_score": "datacomp-b32", "clip_l14_similarity_score": "datacomp-l14"}


def scorer_for_key(key: str) -> tuple[str, str]:
    """npz key → (scorer name, kind)."""
    if "_" in key:
        prefix, kind = key.split("_", 1)
        return f"datacomp-{prefix}", kind
    return f"datacomp-{key}", "img"


@dataclass
class NpzMember:
    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran_order: bool
    stored: bool           # uncompressed: can be memory-mapped in place
    data_offset: int | None  # absolute byte offset of the raw array data in the npz file


class NpzError(ValueError):
    pass


def _read_npy_header(fh) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        hlen = 10
    elif version in ((2, 0), (3, 0)):
        shape, fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        hlen = 12
    else:
        raise NpzError(f"unsupported .npy version {version}")
    return shape, dtype, fortran, fh.tell() if hasattr(fh, "tell") else hlen


def inspect_npz(path: Path) -> dict[str, NpzMember]:
    """Shapes, dtypes and in-file data offsets of an npz's arrays, without reading their data."""
    out: dict[str, NpzMember] = {}
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise NpzError(f"{path.name} is not a readable npz ({exc})") from None
    with zf, open(path, "rb") as raw:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            key = info.filename[:-4]
            with zf.open(info) as fh:
                try:
                    shape, dtype, fortran, header_len = _read_npy_header(fh)
                except Exception as exc:
                    raise NpzError(f"{path.name}:{key} has no valid .npy header ({exc})") from None
            stored = info.compress_type == zipfile.ZIP_STORED
            offset = None
            if stored:
                raw.seek(info.header_offset)
                local = raw.read(30)
                if local[:4] != b"PK\x03\x04":
                    raise NpzError(f"{path.name}:{key} has a bad local zip header")
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                offset = info.header_offset + 30 + name_len + extra_len + header_len
            out[key] = NpzMember(key, tuple(shape), np.dtype(dtype), bool(fortran), stored, offset)
    return out


def open_stored_member(path: Path, m: NpzMember) -> np.memmap:
    return np.memmap(path, dtype=m.dtype, mode="r", offset=m.data_offset, shape=m.shape,
                     order="F" if m.fortran_order else "C")


def copy_member_to_npy(npz_path: Path, m: NpzMember, dest_tmp: Path, chunk_rows: int = 65536) -> None:
    """Stream a (compressed) npz member into a .npy file without holding the array in memory."""
    n = m.shape[0]
    row_bytes = int(np.prod(m.shape[1:], dtype=np.int64)) * m.dtype.itemsize
    out = np.lib.format.open_memmap(dest_tmp, mode="w+", dtype=m.dtype, shape=m.shape)
    with zipfile.ZipFile(npz_path) as zf, zf.open(m.key + ".npy") as fh:
        _read_npy_header(fh)
        start = 0
        while start < n:
            k = min(chunk_rows, n - start)
            buf = fh.read(k * row_bytes)
            if len(buf) != k * row_bytes:
                raise NpzError(f"{npz_path.name}:{m.key} ends early at row {start}")
            out[start:start + k] = np.frombuffer(buf, dtype=m.dtype).reshape((k, *m.shape[1:]))
            start += k
    out.flush()
    del out
