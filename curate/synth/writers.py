"""Byte-reproducible writers: tar (fixed headers), npz (fixed zip timestamps), parquet, json.

Every file is written to a temporary name beside its final path and renamed into place
(`curate.workspace.atomic_path`), so a reader never sees a half-written shard.
"""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..workspace import atomic_path

# Fixed tar header fields: webdataset's TarWriter uses user/group "bigdata" and mode 0o444;
# mtime 0 and uid/gid 0 make the archive independent of who wrote it and when.
TAR_USER = "bigdata"
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class TarShard:
    """Append members to a tar with deterministic headers (USTAR, mtime 0)."""

    def __init__(self, final: Path):
        self._ctx = atomic_path(final)
        self._tmp = self._ctx.__enter__()
        self._fh = open(self._tmp, "wb")
        self._tar = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.USTAR_FORMAT)

    def add(self, name: str, data: bytes) -> None:
        ti = tarfile.TarInfo(name)
        ti.size = len(data)
        ti.mtime = 0
        ti.mode = 0o444
        ti.uid = ti.gid = 0
        ti.uname = ti.gname = TAR_USER
        ti.type = tarfile.REGTYPE
        self._tar.addfile(ti, io.BytesIO(data))

    def close(self, ok: bool = True) -> None:
        self._tar.close()
        self._fh.close()
        if ok:
            self._ctx.__exit__(None, None, None)
        else:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)


def write_parquet(final: Path, table: pa.Table) -> None:
    with atomic_path(final, suffix=".parquet") as tmp:
        pq.write_table(table, tmp, compression="zstd")


class ParquetStream:
    """A parquet file written one row group at a time (the truth file of a large pool)."""

    def __init__(self, final: Path, schema: pa.Schema):
        self._ctx = atomic_path(final, suffix=".parquet")
        self._tmp = self._ctx.__enter__()
        self._w = pq.ParquetWriter(self._tmp, schema, compression="zstd")
        self.schema = schema

    def write(self, table: pa.Table) -> None:
        self._w.write_table(table.cast(self.schema))

    def close(self, ok: bool = True) -> None:
        self._w.close()
        if ok:
            self._ctx.__exit__(None, None, None)
        else:
            self._ctx.__exit__(RuntimeError, RuntimeError("aborted"), None)


def write_json(final: Path, obj, indent: int = 4) -> None:
    with atomic_path(final) as tmp:
        tmp.write_text(json.dumps(obj, indent=indent) + "\n")


def write_npz(final: Path, members: Iterable[tuple[str, tuple[int, ...], np.dtype, Iterator[np.ndarray]]],
              compressed: bool = False) -> None:
    """An .npz readable by `np.load`, in the same format `np.savez(_compressed)` writes (a zip of
    .npy files, zip64 forced), streamed chunk by chunk and with fixed zip timestamps so the same
    arrays give the same bytes (`np.savez` stamps the current time into the zip)."""
    comp = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with atomic_path(final, suffix=".npz") as tmp:
        with zipfile.ZipFile(tmp, mode="w", compression=comp, allowZip64=True) as zf:
            for name, shape, dtype, chunks in members:
                info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
                info.compress_type = comp
                info.external_attr = 0o644 << 16
                info.create_system = 3
                with zf.open(info, "w", force_zip64=True) as fh:
                    np.lib.format.write_array_header_1_0(
                        fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                             "shape": tuple(int(s) for s in shape)})
                    written = 0
                    for chunk in chunks:
                        chunk = np.ascontiguousarray(chunk, dtype=dtype)
                        fh.write(chunk.tobytes())
                        written += chunk.shape[0]
                    if written != shape[0]:
                        raise RuntimeError(f"npz member {name}: wrote {written} rows, expected {shape[0]}")
