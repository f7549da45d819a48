"""DataComp submissions: the selection's uids as DataComp's resharder reads them.

Format (DataComp, Gadre et al. 2023, `mlfoundations/datacomp`): a 1-D numpy structured array of
dtype `np.dtype("u8,u8")` (fields f0, f1: little-endian uint64), each uid converted as
`divmod(int(uid, 16), 2**64)` → (high, low), sorted ascending, saved with `np.save`.

DataComp's resharder also reads the same records with no header at all (a raw memory map:
`np.memmap(path, np.dtype("u8,u8"))`, used for any file without the NumPy magic); `curate
verify-submission` accepts both layouts and says which it found.

An unsorted file makes the resharder write the wrong samples silently, so the exporter checks
the temporary file with the same code as `curate verify-submission` before renaming it into place.

Repeated uids: DataComp's convention is that a repeated uid means a repeated sample (the
resharder writes it once per occurrence), which is how a submission up-weights samples. A
curate selection never repeats a uid, so `export` writes each once; `verify-submission`
reports repeats as a warning (an error with `--strict`), because they are legal but are far
more often an accident (two concatenated selections) than an intended up-weighting.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from ..errors import CurateError, UsageError
from ..uids import pair_to_uid
from ..workspace import atomic_path
from .select import Selection, query_with

SUBMISSION_DTYPE = np.dtype("u8,u8")
_CHUNK = 1 << 24
# DuckDB: the two 64-bit halves of a 32-hex uid.
_HI = "('0x' || substr(uid, 1, 16))::UBIGINT"
_LO = "('0x' || substr(uid, 17, 16))::UBIGINT"


def selection_pairs(manifest, sel: Selection) -> np.ndarray:
    """The selected uids as a sorted `u8,u8` array."""
    source = "samples WHERE status = 'ok'" if sel.run_id is None else "_export_uids"
    tbl = query_with(manifest, {} if sel.run_id is None else {"_export_uids": sel.uids.select("uid")},
                     f"SELECT DISTINCT {_HI} AS f0, {_LO} AS f1 FROM {source} ORDER BY f0, f1")
    arr = np.empty(tbl.height, dtype=SUBMISSION_DTYPE)
    arr["f0"] = tbl["f0"].to_numpy()
    arr["f1"] = tbl["f1"].to_numpy()
    return arr


def write_submission(manifest, sel: Selection, out: Path, *, overwrite: bool = False, dry_run: bool = False) -> dict:
    out = Path(out).expanduser().absolute()
    if out.is_dir():
        raise UsageError(f"--out {out} is a directory; the DataComp submission is one file (e.g. uids.npy)")
    if out.exists() and not overwrite and not dry_run:
        raise UsageError(f"--out {out} exists; pass --overwrite to replace it")
    arr = selection_pairs(manifest, sel)
    if len(arr) != sel.uids.height:
        raise CurateError(f"{sel.uids.height - len(arr):,} repeated uids in the selection; the manifest is inconsistent")
    if len(arr) == 0:
        raise UsageError(f"the selection ({sel.describe()}) is empty; nothing to export")
    summary = {"format": "datacomp", "out": str(out), **sel.as_dict(), "samples": int(len(arr)),
               "bytes": int(128 + arr.nbytes)}
    if dry_run:
        return summary
    with atomic_path(out, suffix=".npy") as tmp:
        with open(tmp, "wb") as fh:
            np.save(fh, arr, allow_pickle=False)
        report = verify_submission(tmp, manifest, strict=True)
        if not report["ok"]:
            raise CurateError(f"refusing to write an invalid submission: {'; '.join(report['errors'])}")
    summary["bytes"] = out.stat().st_size
    summary["verified"] = True
    return summary


def _load(path: Path) -> tuple[np.ndarray, str]:
    """The array and its layout: `npy` (np.save) or `raw` (the headerless `u8,u8` memory map
    DataComp's README allows and its resharder reads: any file without the .npy magic)."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(6)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a directory, not a submission file") from None
    if magic != b"\x93NUMPY":
        size = path.stat().st_size
        if size == 0:
            raise _Invalid("the file is empty")
        if size % SUBMISSION_DTYPE.itemsize:
            raise _Invalid(f"neither a .npy file (no NumPy header) nor a headerless u8,u8 array: {size:,} bytes "
                           f"is not a multiple of {SUBMISSION_DTYPE.itemsize}")
        return np.memmap(path, SUBMISSION_DTYPE, mode="r"), "raw"
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False), "npy"
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
            raise _Invalid("a .npy of Python objects (e.g. uid strings), not the u8,u8 pairs DataComp reads; "
                           "convert each uid with divmod(int(uid, 16), 2**64)") from None
        raise _Invalid(f"a .npy file whose header cannot be read ({exc})") from None
    except (OSError, EOFError) as exc:
        raise _Invalid(f"a truncated .npy file ({exc})") from None


class _Invalid(Exception):
    pass


def verify_submission(path: str | Path, manifest=None, *, strict: bool = False, examples: int = 5) -> dict:
    """Check a DataComp submission; returns a report whose `ok` says whether it is valid."""
    path = Path(path)
    rep: dict = {"file": str(path), "ok": False, "samples": 0, "errors": [], "warnings": []}
    try:
        arr, rep["layout"] = _load(path)
    except _Invalid as exc:
        rep["errors"].append(str(exc))
        return rep
    rep["dtype"] = str(arr.dtype.descr if arr.dtype.names else arr.dtype)
    rep["samples"] = int(arr.shape[0]) if arr.ndim else 0
    if arr.dtype != SUBMISSION_DTYPE:
        hint = ""
        if arr.dtype.names and len(arr.dtype.names) == 2 and all(arr.dtype[n].kind == "u" and arr.dtype[n].itemsize == 8
                                                                 for n in arr.dtype.names):
            hint = " (right widths, but other field names or byte order)"
        elif arr.ndim == 2 and arr.shape[-1:] == (2,):
            hint = " (a plain (n, 2) array: view it as np.dtype('u8,u8'))"
        rep["errors"].append(f"dtype is {rep['dtype']}, expected [('f0', '<u8'), ('f1', '<u8')]{hint}")
        return rep
    if arr.ndim != 1:
        rep["errors"].append(f"array has shape {arr.shape}; expected one dimension")
        return rep
    n = len(arr)
    if n == 0:
        rep["errors"].append("the submission is empty")
        return rep
    descents, first_descent, repeats = 0, None, 0
    for start in range(0, n, _CHUNK):
        a = np.asarray(arr[max(0, start - 1):start + _CHUNK])  # one row of overlap with the previous chunk
        hi, lo = a["f0"], a["f1"]
        gt = (hi[1:] > hi[:-1]) | ((hi[1:] == hi[:-1]) & (lo[1:] > lo[:-1]))
        eq = (hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1])
        bad = ~(gt | eq)
        if bad.any() and first_descent is None:
            first_descent = int(np.argmax(bad)) + max(0, start - 1) + 1
        descents += int(bad.sum())
        repeats += int(eq.sum())
    rep["sorted"] = descents == 0
    if descents:
        rep["errors"].append(f"not sorted ascending: {descents:,} descents, the first at row {first_descent:,} "
                             "(DataComp's resharder silently picks wrong samples from an unsorted file)")
        # Duplicates must be counted on a sorted copy.
        s = np.sort(np.asarray(arr))
        repeats = int(((s["f0"][1:] == s["f0"][:-1]) & (s["f1"][1:] == s["f1"][:-1])).sum())
    rep["unique"] = n - repeats
    rep["duplicates"] = repeats
    if repeats:
        msg = (f"{repeats:,} repeated uids: DataComp's resharder writes a repeated uid once per occurrence "
               "(up-weighting); curate selections never repeat uids")
        (rep["errors"] if strict else rep["warnings"]).append(msg)
    if manifest is not None:
        missing, shown = 0, []
        absent = (f"SELECT f0, f1 FROM _sub WHERE NOT EXISTS (SELECT 1 FROM samples s WHERE "
                  f"{_HI.replace('uid', 's.uid')} = _sub.f0 AND {_LO.replace('uid', 's.uid')} = _sub.f1)")
        for start in range(0, n, _CHUNK):
            a = np.asarray(arr[start:start + _CHUNK])
            got = query_with(manifest, {"_sub": pa.table({"f0": a["f0"], "f1": a["f1"]})},
                             f"SELECT count(*) AS n, list(struct_pack(f0, f1) ORDER BY f0, f1)[1:{examples}] AS ex "
                             f"FROM ({absent})")
            k = int(got["n"][0])
            if k and len(shown) < examples:
                shown += [pair_to_uid(d["f0"], d["f1"]) for d in got["ex"][0]][: examples - len(shown)]
            missing += k
        rep["in_pool"] = n - missing
        rep["not_in_pool"] = missing
        if missing:
            rep["errors"].append(f"{missing:,} uids are not in the workspace's pool (e.g. {', '.join(shown)})")
    rep["ok"] = not rep["errors"]
    return rep
