"""Sample identifiers.

DataComp uids (32 lowercase hex characters, 128 bits) are kept as they are. Every other
sample gets a 128-bit uid derived with SHA-256 from what identifies it in its source, so
the same source always yields the same uids (docs/workspace.md, "uids"):

* webdataset shard without a uid in its json:  sha256("curate-wds\\0" + shard fingerprint + "\\0" + key)[:32]
* URL table row without a uid:                 sha256("curate-url\\0" + url + "\\0" + caption + "\\0" + k)[:32]
  where k counts earlier rows of the same table with the same (url, caption), so exact repeats
  stay distinct samples (deduplication is a pruning decision, not an ingest accident).
"""

from __future__ import annotations

import hashlib
import re

_UID_RE = re.compile(r"[0-9a-f]{32}")
# What "surrounding space" means for a uid in every source (Python's str.strip() would also take
# U+001C..U+001F, polars' strip_chars() would not): ASCII whitespace only.
UID_SPACE = " \t\n\r\f\v"


def is_uid(value: object) -> bool:
    """True for a DataComp-style uid: 32 lowercase hex characters."""
    return isinstance(value, str) and bool(_UID_RE.fullmatch(value))


def normalise_uid(value: object) -> str | None:
    """Accept a uid in any case with surrounding space; None when it is not 128-bit hex."""
    if not isinstance(value, str):
        return None
    v = value.strip(UID_SPACE).lower()
    return v if _UID_RE.fullmatch(v) else None


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for i, part in enumerate(parts):
        if i:
            h.update(b"\0")
        h.update(part.encode("utf-8", "surrogatepass"))
    return h.hexdigest()[:32]


def wds_uid(shard_fingerprint: str, key: str) -> str:
    return _digest("curate-wds", shard_fingerprint, key)


def url_uid(url: str, caption: str, occurrence: int) -> str:
    return _digest("curate-url", url, caption, str(occurrence))


def uid_to_pair(uid: str) -> tuple[int, int]:
    """DataComp submission form: divmod(int(uid, 16), 2**64) -> (high, low)."""
    return divmod(int(uid, 16), 2**64)


def pair_to_uid(high: int, low: int) -> str:
    return f"{(int(high) << 64) | int(low):032x}"
