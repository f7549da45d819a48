"""Turn SOURCE arguments (files, folders, globs) into shard units with a detected format.

Rules: `*.tar` (also .tar.gz/.tgz, .tar.bz2, .tar.xz; .tar.zst is refused by the reader) → wds; `<stem>.parquet` with a sibling `<stem>.npz` → datacomp
(a parquet with DataComp's columns but no npz too); other `*.parquet|csv|tsv|jsonl|json` → urls.
A folder is expanded to the files it holds (not recursively), skipping img2dataset sidecars
(`NNNNN.parquet` beside `NNNNN.tar`, `*_stats.json`) and curate's own `_truth.parquet`; any
other file it holds that is not a shard is reported as skipped (`skipped`), never fatal.
URL lists in other forms (`.txt`, `.csv.gz`, ...) are taken when named explicitly or with `--format urls`.
"""

from __future__ import annotations

import glob
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

FORMATS = ("wds", "datacomp", "urls")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.lzma", ".tar.zst", ".tar.zstd")
TABLE_SUFFIXES = (".parquet", ".csv", ".tsv", ".jsonl", ".json", ".ndjson")
DATACOMP_COLUMNS = {"uid", "text", "original_width", "original_height"}


@dataclass(frozen=True)
class ShardUnit:
    path: Path          # the tar, the DataComp parquet, or the URL table
    format: str
    npz: Path | None = None  # DataComp: the row-aligned embeddings
    in_folder: bool = False  # found by expanding a folder (not named): a misfit is skipped, not fatal


def _is_tar(p: Path) -> bool:
    return p.name.endswith(TAR_SUFFIXES)


def _stem(p: Path) -> str:
    name = p.name
    for suf in TAR_SUFFIXES + TABLE_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)]
    return p.stem


def _parquet_columns(p: Path) -> set[str]:
    import pyarrow.parquet as pq

    try:
        return set(pq.read_schema(p).names)
    except Exception:
        return set()


def _url_table_kind(p: Path) -> str | None:
    from .urls import detect_format

    try:
        return detect_format(p)
    except UsageError:
        return None


def _classify_file(p: Path, forced: str | None, siblings: set[str], explicit: bool = False) -> ShardUnit | None:
    name = p.name
    if _is_tar(p):
        if forced not in (None, "wds"):
            raise UsageError(f"{p} is a tar shard, not --format {forced}")
        return ShardUnit(p, "wds")
    if name.endswith(".npz"):
        return None  # picked up with its parquet
    if not name.endswith(TABLE_SUFFIXES):
        # Compressed tables and plain URL lists (.txt) only when named or forced: a folder's
        # README.txt is not a URL list.
        if (explicit or forced == "urls") and forced in (None, "urls") and _url_table_kind(p) is not None:
            return ShardUnit(p, "urls")
        return None
    stem = _stem(p)
    if name == "_truth.parquet" or name.endswith("_stats.json"):
        return None
    npz = p.with_name(stem + ".npz")
    if name.endswith(".parquet") and any((stem + t) in siblings for t in TAR_SUFFIXES) and forced != "urls":
        return None  # img2dataset's per-shard status table, read with its tar
    if forced == "wds":
        return None
    if forced == "datacomp" or (forced is None and name.endswith(".parquet") and
                                (npz.exists() or DATACOMP_COLUMNS <= _parquet_columns(p))):
        if not name.endswith(".parquet"):
            raise UsageError(f"{p}: DataComp metadata must be a .parquet file")
        return ShardUnit(p, "datacomp", npz if npz.exists() else None)
    return ShardUnit(p, "urls")


def _sidecar_of_folder(p: Path, names: set[str]) -> bool:
    """Files a folder of shards holds beside them that are read with them, not on their own."""
    name = p.name
    if name == "_truth.parquet" or name.endswith("_stats.json"):
        return True
    if name.endswith(".npz"):
        return (_stem(p) + ".parquet") in names
    return name.endswith(".parquet") and any((_stem(p) + s) in names for s in TAR_SUFFIXES)


def expand_sources(sources: list[str | Path], fmt: str | None = None,
                   skipped: list[tuple[str, str]] | None = None) -> list[ShardUnit]:
    """Expand and classify; one clear error for a source that does not exist or holds nothing.
    Files of a folder that are not shards are appended to `skipped` as (path, why)."""
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
    units: list[ShardUnit] = []
    for src in sources:
        s = str(src)
        paths = [Path(x) for x in sorted(glob.glob(s))] if any(c in s for c in "*?[") else [Path(s)]
        if not paths or not all(p.exists() for p in paths):
            raise UsageError(f"source {s} does not exist")
        for p in paths:
            if p.is_dir():
                files = sorted(x for x in p.iterdir() if x.is_file())
                names = {x.name for x in files}
                found = []
                for x in files:
                    try:
                        u = _classify_file(x, fmt, names)
                    except UsageError as exc:  # e.g. a tar in a folder ingested as --format datacomp
                        if skipped is not None:
                            skipped.append((str(x), str(exc)))
                        continue
                    if u is not None:
                        found.append(ShardUnit(u.path, u.format, u.npz, in_folder=True))
                    elif skipped is not None and not _sidecar_of_folder(x, names):
                        skipped.append((str(x), f"not a shard curate ingests{f' as --format {fmt}' if fmt else ''}"))
                if not found:
                    raise UsageError(f"{p} holds no tar shards, DataComp metadata or URL tables")
                units.extend(found)
            else:
                u = _classify_file(p, fmt, {x.name for x in p.parent.iterdir()}, explicit=True)
                if u is None:
                    raise UsageError(f"{p}: not a format curate ingests (.tar, .parquet+.npz, .parquet/.csv/.jsonl)")
                units.append(u)
    seen: set[Path] = set()
    out = []
    for u in units:
        rp = u.path.resolve()
        if rp not in seen:
            seen.add(rp)
            out.append(u)
    return out
