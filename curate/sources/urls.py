"""URL tables: parquet / CSV / TSV / JSON lines / plain text lists of image URLs and captions.

`read_url_table(path)` returns a `UrlTable`: the rows that can become samples (uid, key, url,
caption) and, separately, the rows that cannot, each with a short stable reason:

    missing_url     no url, or an empty one
    bad_url         not an absolute http(s) URL
    bad_uid         a `uid` value that is not 128-bit hex (docs/workspace.md#uids)
    duplicate_uid   a uid already used by an earlier row (the first occurrence stays)

A row gets one reason, the first that applies in that order. A missing caption is allowed
(null); whether a sample needs one is a filter's decision, not the reader's.

uids: a valid given uid is kept (lower-cased); otherwise `curate.uids.url_uid(url, caption,
occurrence)` where occurrence counts earlier rows with the same (url, caption), so repeated rows
stay distinct samples and the same file always yields the same uids. The url is stripped of
surrounding white space first; a null caption counts as "".

Memory: the table is read into one in-memory polars frame, projected to the url, caption and
uid columns only (about 200 bytes a row: a few million rows is a few hundred MB). That is
needed anyway: occurrence counts and duplicate uids are whole-table properties, and
img2dataset's own reader loads the whole input file too.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from ..errors import UsageError
from ..uids import UID_SPACE, url_uid

URL_COLUMNS = ("url", "URL", "image_url")
CAPTION_COLUMNS = ("caption", "text", "TEXT", "alt")
UID_COLUMNS = ("uid",)

# suffix (without compression suffix) -> reader kind
_FORMATS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "tsv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".txt": "txt",
}

ISSUE_SCHEMA = {"key": pl.String, "uid": pl.String, "reason": pl.String, "detail": pl.String}
SAMPLE_SCHEMA = {"uid": pl.String, "key": pl.String, "url": pl.String, "caption": pl.String}


@dataclass
class UrlTable:
    """A URL table read by `read_url_table`.

    frame:  polars frame (uid, key, url, caption), one row per usable input row, in file order;
            key is the 0-based row number in the file as a string ("<file name>:<row>" for a folder).
    issues: rows that cannot be samples, as (key, uid, reason, action, detail) tuples, action
            always "rejected" (the shape of `sample_issues`); `issues_frame()` has them as a frame.
    """

    path: Path
    format: str
    fingerprint: str                     # sha256 of the file's bytes (of the sorted files' digests for a folder)
    frame: pl.DataFrame
    issues_df: pl.DataFrame
    n_rows: int
    columns: list[str] = field(default_factory=list)   # columns the file has
    url_col: str = "url"
    caption_col: str | None = None
    uid_col: str | None = None

    @property
    def n_samples(self) -> int:
        return self.frame.height

    @property
    def issues(self) -> list[tuple]:
        return self.issues_df.select("key", "uid", "reason", pl.lit("rejected").alias("action"), "detail").rows()

    def issues_frame(self) -> pl.DataFrame:
        """(key, uid, reason, detail) of the rejected rows."""
        return self.issues_df

    def issue_counts(self) -> dict[str, int]:
        if self.issues_df.height == 0:
            return {}
        counts = self.issues_df.group_by("reason").len().sort("reason")
        return dict(zip(counts["reason"].to_list(), counts["len"].to_list()))


# ---- fingerprint ----------------------------------------------------------------------

def file_sha256(path: str | Path, *, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fingerprint(files: list[Path], folder: bool) -> str:
    if not folder:
        return file_sha256(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()


# ---- reading --------------------------------------------------------------------------

def detect_format(path: Path) -> str:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in (".gz", ".zst", ".zstd"):
        suffixes = suffixes[:-1]
    kind = _FORMATS.get(suffixes[-1]) if suffixes else None
    if kind is None:
        raise UsageError(f"{path}: cannot tell the URL table's format from its name; "
                         f"use one of {', '.join(sorted(_FORMATS))} (optionally .gz)")
    return kind


def _pick(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str, path: Path) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise UsageError(f"{path}: no {what} column {wanted!r}; it has {_show(columns)}")
        return wanted
    for name in candidates:
        if name in columns:
            return name
    return None


def _show(columns: list[str]) -> str:
    if not columns:
        return "no columns"
    shown = ", ".join(repr(c) for c in columns[:20])
    return shown + (f", ... ({len(columns)} in all)" if len(columns) > 20 else "")


def _no_url_error(path: Path, columns: list[str]) -> UsageError:
    hint = ""
    if any(c.lower().startswith(("http://", "https://")) for c in columns):
        hint = " (the file seems to have no header row; add one, e.g. `url<TAB>caption`)"
    return UsageError(f"{path}: no URL column (looked for {', '.join(URL_COLUMNS)}); it has {_show(columns)}{hint}")


def _read_columns(path: Path, kind: str) -> list[str]:
    """The file's column names, without reading its rows."""
    if kind == "parquet":
        return list(pl.read_parquet_schema(path).keys())
    if kind in ("csv", "tsv"):
        sep = "\t" if kind == "tsv" else ","
        return pl.read_csv(path, separator=sep, n_rows=0, infer_schema=False, quote_char=_quote(kind)).columns
    if kind == "txt":
        return ["url"]
    if kind == "json" and _is_json_array(path):
        return pl.read_json(path).columns
    return list(pl.scan_ndjson(path, infer_schema_length=10_000).collect_schema().keys())


def _quote(kind: str) -> str | None:
    # TSV url lists (CC3M/CC12M style) are not quoted; a caption that starts with '"' must not
    # swallow the following lines.
    return None if kind == "tsv" else '"'


def _is_json_array(path: Path) -> bool:
    if path.suffix.lower() != ".json":
        return False
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip()
    return head.startswith(b"[")


def _read_frame(path: Path, kind: str, cols: list[str]) -> pl.DataFrame:
    if kind == "parquet":
        df = pl.read_parquet(path, columns=cols)
    elif kind in ("csv", "tsv"):
        sep = "\t" if kind == "tsv" else ","
        df = pl.read_csv(path, separator=sep, columns=cols, infer_schema=False, quote_char=_quote(kind),
                         truncate_ragged_lines=False)
    elif kind == "txt":
        df = pl.read_csv(path, has_header=False, new_columns=["url"], separator="\x1f", infer_schema=False,
                         quote_char=None)
    elif kind == "json" and _is_json_array(path):
        df = pl.read_json(path).select(cols)
    else:
        df = pl.scan_ndjson(path, infer_schema_length=10_000).select(cols).collect()
    return df.with_columns(pl.col(c).cast(pl.String, strict=False) for c in df.columns if df[c].dtype != pl.String)


def _list_files(path: Path) -> tuple[list[Path], bool]:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(".parquet")
                       and not p.name.startswith("."))
        if not files:
            raise UsageError(f"{path}: a folder of URL tables must hold .parquet files; found none")
        return files, True
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    return [path], False


def read_url_table(path: str | Path, *, url_col: str | None = None, caption_col: str | None = None,
                   uid_col: str | None = None) -> UrlTable:
    """Read a URL table (see the module docstring). Raises UsageError when it cannot be used.

    PATH may also be a folder of .parquet tables (DataComp metadata): each file is read as its
    own table, as `curate ingest` does file by file, so uids agree with it; keys become
    "<file name>:<row>" and a uid repeated in a later file is a duplicate_uid there.
    """
    path = Path(path).expanduser()
    files, folder = _list_files(path)
    kind = "parquet" if folder else detect_format(path)
    try:
        columns = _read_columns(files[0], kind)
    except Exception as exc:  # polars/arrow parse errors: one line for the user
        raise UsageError(f"{files[0]}: cannot read it as {kind}: {_one_line(exc)}") from None

    ucol = _pick(columns, url_col, URL_COLUMNS, "url", files[0])
    if ucol is None:
        raise _no_url_error(files[0], columns)
    ccol = _pick(columns, caption_col, CAPTION_COLUMNS, "caption", files[0])
    idcol = _pick(columns, uid_col, UID_COLUMNS, "uid", files[0])
    cols = [c for c in (ucol, ccol, idcol) if c is not None]

    frames, issue_frames, n_rows = [], [], 0
    for f in files:
        try:
            raw = _read_frame(f, kind, cols)
        except Exception as exc:
            raise UsageError(f"{f}: cannot read it as {kind}: {_one_line(exc)}") from None
        n_rows += raw.height
        samples, issues = _normalise(raw, ucol, ccol, idcol, key_prefix=f"{f.name}:" if folder else "")
        frames.append(samples)
        issue_frames.append(issues)
    samples = pl.concat(frames) if len(frames) > 1 else frames[0]
    issues = pl.concat(issue_frames) if len(issue_frames) > 1 else issue_frames[0]
    if len(files) > 1:
        first = samples.select(pl.col("uid").is_first_distinct()).to_series()
        if not first.all():
            dups = samples.filter(~first).select("key", "uid", pl.lit("duplicate_uid").alias("reason"),
                                                 pl.lit("uid already used by an earlier file").alias("detail"))
            issues = pl.concat([issues, dups.cast(ISSUE_SCHEMA)])
            samples = samples.filter(first)

    return UrlTable(path=path.absolute(), format=kind, fingerprint=_fingerprint(files, folder), frame=samples,
                    issues_df=issues, n_rows=n_rows, columns=columns, url_col=ucol, caption_col=ccol, uid_col=idcol)


def _one_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


# ---- normalising ----------------------------------------------------------------------

_HTTP_URL = r"(?i)^https?://[^/?#\s]+"
_HEX_UID = r"^[0-9a-f]{32}$"


def _normalise(raw: pl.DataFrame, ucol: str, ccol: str | None, idcol: str | None,
               key_prefix: str = "") -> tuple[pl.DataFrame, pl.DataFrame]:
    n = raw.height
    url = pl.col(ucol).str.strip_chars()
    df = raw.select(
        key=pl.lit(key_prefix) + pl.int_range(n, dtype=pl.UInt64).cast(pl.String),
        url=pl.when(url.str.len_bytes() > 0).then(url),
        caption=pl.col(ccol) if ccol else pl.lit(None, dtype=pl.String),
        given=pl.col(idcol).str.strip_chars(UID_SPACE) if idcol else pl.lit(None, dtype=pl.String),
    )
    df = df.with_columns(
        given_norm=pl.col("given").str.to_lowercase(),
        # Occurrence of this (url, caption) pair so far: exact repeats get distinct uids.
        occurrence=pl.int_range(pl.len(), dtype=pl.UInt32).over(["url", pl.col("caption").fill_null("")]),
    )
    given_ok = pl.col("given_norm").str.contains(_HEX_UID).fill_null(False)
    given_missing = pl.col("given").is_null() | (pl.col("given") == "")
    df = df.with_columns(
        given_ok=given_ok,
        bad_uid=~given_ok & ~given_missing,
    )

    # Derived uids: sha256 per row is Python-level work (about 1 µs a row), done only for rows
    # without a valid given uid and with a url to derive from.
    need = df.select(pl.col("url").is_not_null() & ~pl.col("given_ok")).to_series()
    derived: list[str | None] = [None] * n
    if need.any():
        sub = df.filter(need).select("url", pl.col("caption").fill_null(""), "occurrence")
        idx = need.arg_true().to_list()
        for i, u, c, o in zip(idx, sub["url"].to_list(), sub["caption"].to_list(), sub["occurrence"].to_list()):
            derived[i] = url_uid(u, c, o)
    df = df.with_columns(derived=pl.Series("derived", derived, dtype=pl.String))
    df = df.with_columns(
        uid=pl.when(pl.col("given_ok")).then(pl.col("given_norm")).otherwise(pl.col("derived")),
    )

    reason = (
        pl.when(pl.col("url").is_null()).then(pl.lit("missing_url"))
        .when(~pl.col("url").str.contains(_HTTP_URL)).then(pl.lit("bad_url"))
        .when(pl.col("bad_uid")).then(pl.lit("bad_uid"))
        .otherwise(pl.lit(None, dtype=pl.String))
    )
    df = df.with_columns(reason=reason)
    # Duplicates among the rows that survived the other checks: the first occurrence stays.
    df = df.with_columns(
        reason=pl.when(pl.col("reason").is_null() & ~pl.col("uid").is_first_distinct().over(pl.col("reason").is_null()))
        .then(pl.lit("duplicate_uid")).otherwise(pl.col("reason")),
    )
    detail = (
        pl.when(pl.col("reason") == "missing_url").then(pl.lit("no url"))
        .when(pl.col("reason") == "bad_url").then(pl.lit("not an http(s) url: ") + pl.col("url").str.slice(0, 200))
        .when(pl.col("reason") == "bad_uid").then(pl.lit("uid is not 32 hex characters: ")
                                                  + pl.col("given").str.slice(0, 80))
        .when(pl.col("reason") == "duplicate_uid").then(pl.lit("uid already used by an earlier row"))
    )
    issues = (df.filter(pl.col("reason").is_not_null())
              .select("key", pl.when(pl.col("reason") == "bad_uid").then(None).otherwise(pl.col("uid")).alias("uid"),
                      "reason", detail.alias("detail"))
              .cast(ISSUE_SCHEMA))
    samples = df.filter(pl.col("reason").is_null()).select("uid", "key", "url", "caption").cast(SAMPLE_SCHEMA)
    return samples, issues
