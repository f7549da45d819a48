"""DataComp metadata: `<stem>.parquet` + `<stem>.npz`, row i of the npz = row i of the parquet.

The npz arrays are never loaded whole. `np.savez` stores members uncompressed, so each array
is registered in place (npz path, member, byte offset) and later opened as a read-only
memory map. Compressed members (`np.savez_compressed`) and Fortran-order ones are streamed
out, byte for byte and chunk by chunk, into `.npy` files (same dtype and order) in the workspace.

npz keys map to scorers: `b32_img`/`b32_txt` → `datacomp-b32`, `l14_img`/`l14_txt` →
`datacomp-l14`, any other `<prefix>_<kind>` → `datacomp-<prefix>`, a bare key (`dedup`) →
scorer `datacomp-<key>` kind `img`. The parquet's `clip_b32_similarity_score` and
`clip_l14_similarity_score` become the scores of `datacomp-b32` and `datacomp-l14`.

`scan_rows` finds the rows no stage can use (a non-finite value, or an L2 norm that is zero or
overflows in float32), a chunk at a time through short-lived memory maps.
"""

from __future__ import annotations

import os
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SCORE_COLUMNS = {"clip_b32_similarity_score": "datacomp-b32", "clip_l14_similarity_score": "datacomp-l14"}
# Widths of DataComp's own embeddings (OpenAI CLIP ViT-B/32 and ViT-L/14).
DATACOMP_WIDTHS = {"datacomp-b32": 512, "datacomp-l14": 768}
FLOAT_DTYPES = ("f2", "f4", "f8")
# What is wrong with a row (`scan_rows`), as the issue details name it.
ROW_PROBLEMS = {1: "non-finite values", 2: "zero vector", 3: "norm overflows float32"}
SCAN_BYTES = 16 << 20  # float32 bytes a scan chunk holds


_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


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
            if not _KEY.fullmatch(key):
                # the key names a scorer and a file in the workspace: nothing that could climb out
                raise NpzError(f"{path.name}: member {info.filename[:120]!r} is not a key curate takes "
                               "(letters, digits, '-' and '_' only, e.g. b32_img)")
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


def copy_member_to_npy(npz_path: Path, m: NpzMember, dest_tmp: Path, chunk_bytes: int = 1 << 24) -> None:
    """Stream a (compressed) npz member into a .npy file byte for byte (same dtype, same memory
    order: a Fortran-order member stays one, read back correctly by `np.load`), without holding
    the array in memory."""
    total = int(np.prod(m.shape, dtype=np.int64)) * m.dtype.itemsize
    row_bytes = max(1, int(np.prod(m.shape[1:], dtype=np.int64)) * m.dtype.itemsize)
    header = {"descr": np.lib.format.dtype_to_descr(m.dtype), "fortran_order": m.fortran_order,
              "shape": tuple(m.shape)}
    done = 0
    try:
        with zipfile.ZipFile(npz_path) as zf, zf.open(m.key + ".npy") as fh, open(dest_tmp, "wb") as out:
            _read_npy_header(fh)
            np.lib.format.write_array_header_1_0(out, header)
            while done < total:
                buf = fh.read(min(chunk_bytes, total - done))
                if not buf:
                    raise NpzError(f"{npz_path.name}:{m.key} ends early at row {done // row_bytes}")
                out.write(buf)
                done += len(buf)
            out.flush()
            os.fsync(out.fileno())
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError) as exc:  # a damaged deflate stream, a bad CRC
        raise NpzError(f"{npz_path.name}:{m.key} is damaged near row {done // row_bytes} ({exc})") from None


def npy_location(path: Path) -> tuple[int, tuple[int, ...], np.dtype, bool]:
    """(byte offset of the data, shape, dtype, fortran_order) of a .npy file."""
    with open(path, "rb") as fh:
        shape, dtype, fortran, offset = _read_npy_header(fh)
    return offset, tuple(shape), np.dtype(dtype), fortran


def known_widths(folder: Path) -> dict[str, int]:
    """The widths `datacomp-b32` and `datacomp-l14` embeddings in `folder` must have: DataComp's,
    or the ones a `curate synth --dims B32,L14` pool declares in its `_truth.parquet`."""
    if (folder / "_truth.parquet").is_file():
        try:
            from ..synth import read_params

            params = read_params(folder)
            if params.get("layout") == "datacomp" and params.get("dims"):
                b32, l14 = params["dims"]
                return {"datacomp-b32": int(b32), "datacomp-l14": int(l14)}
        except Exception:  # not a synth pool's truth file: DataComp's widths
            pass
    return dict(DATACOMP_WIDTHS)


def scan_rows(path: Path | str, offset: int, dtype: np.dtype, shape: tuple[int, int], fortran: bool = False,
              chunk_bytes: int = SCAN_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the (n, d) float array at `offset` in `path` that no stage can use, and why:
    (rows ascending, int64; a `ROW_PROBLEMS` code per row, uint8). A row is unusable when a
    value is not finite (in float32, what the stages compute in), or its float32 L2 norm is 0
    (all zeros, or too small to normalise) or overflows. Reads a chunk of rows at a time
    through a memory map dropped after each chunk, so resident memory stays at one chunk."""
    n, d = int(shape[0]), int(shape[1])
    dtype = np.dtype(dtype)
    step = max(1, chunk_bytes // max(1, d * 4))
    rows: list[np.ndarray] = []
    codes: list[np.ndarray] = []
    half = dtype.kind == "f" and dtype.itemsize == 2
    for s in range(0, n, step):
        e = min(n, s + step)
        if half:
            # fp16 converts to float32 exactly, and its squares can neither overflow nor underflow
            # there: the bits say it all. The largest magnitude's bits (sign cleared) of a row are
            # >= 0x7C00 (exponent all ones) when a value is inf or NaN, and 0 when all are zero.
            mm = np.memmap(path, dtype=np.dtype(np.uint16).newbyteorder(dtype.byteorder), mode="r", offset=offset,
                           shape=(n, d), order="F" if fortran else "C")
            top = np.bitwise_and(mm[s:e], 0x7FFF).max(axis=1)
            del mm
            nonfinite = top >= 0x7C00
            zero = top == 0
            over = np.zeros(e - s, dtype=bool)
        else:
            mm = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(n, d), order="F" if fortran else "C")
            with np.errstate(over="ignore", invalid="ignore"):
                x = np.array(mm[s:e], dtype=np.float32)
            del mm
            nonfinite = ~np.isfinite(x).all(axis=1)
            sq = np.einsum("ij,ij->i", x, x)
            del x
            zero = ~nonfinite & (sq == 0)
            over = ~nonfinite & ~np.isfinite(sq)
        bad = nonfinite | zero | over
        if bad.any():
            idx = np.flatnonzero(bad)
            code = np.where(nonfinite[idx], 1, np.where(zero[idx], 2, 3)).astype(np.uint8)
            rows.append(idx.astype(np.int64) + s)
            codes.append(code)
    if not rows:
        return np.empty(0, np.int64), np.empty(0, np.uint8)
    return np.concatenate(rows), np.concatenate(codes)
