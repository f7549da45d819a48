"""Google's CLD3 language identifier, as DataComp's `laion2b` baseline runs it.

DataComp (`baselines/apply_filter.py`, gcld3 3.0.13): one
`gcld3.NNetLanguageIdentifier(min_num_bytes=0, max_num_bytes=1000)` per worker, and a caption is
English when `FindLanguage(text=text.replace("\\n", " ")).language == "en"`. Each distinct caption
is identified once (`langid.map_distinct`, over every core for large pools); the identifier is
built once per process.

gcld3 is in the `datacomp` extra (`pip install 'curate[datacomp]'`); it builds from source and
needs a C++ compiler, `protobuf-compiler` and `libprotobuf-dev` (`make install` installs them on
Debian when run as root).
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
import polars as pl

from ..errors import UsageError
from .langid import LANG, LANG_CONF, PARALLEL_MIN, map_distinct

MIN_NUM_BYTES = 0
MAX_NUM_BYTES = 1000


def require_gcld3(stage: str) -> None:
    try:
        import gcld3  # noqa: F401
    except ImportError:
        raise UsageError(f"{stage}: lang_model 'gcld3' needs the gcld3 package (pip install 'curate[datacomp]'; "
                         "it builds from source with protobuf-compiler and libprotobuf-dev), or use "
                         f"--set {stage}.lang_model=fasttext") from None


@functools.lru_cache(maxsize=1)
def _identifier():
    import gcld3

    return gcld3.NNetLanguageIdentifier(min_num_bytes=MIN_NUM_BYTES, max_num_bytes=MAX_NUM_BYTES)


def _gcld3_chunk(args: tuple[object, list[str]]) -> tuple[list[str], np.ndarray]:
    """(language, probability) of each text, as DataComp asks gcld3 (a module-level function so
    worker processes can run it)."""
    _, texts = args
    find = _identifier().FindLanguage
    langs: list[str] = [""] * len(texts)
    probs = np.zeros(len(texts), dtype=np.float64)
    for i, text in enumerate(texts):
        res = find(text=text.replace("\n", " "))
        langs[i] = res.language
        probs[i] = res.probability
    return langs, probs


def identify_gcld3(texts: pl.Series | Sequence[str], *, processes: int | None = None,
                   parallel_min: int = PARALLEL_MIN) -> pl.DataFrame:
    """`lang`, `lang_conf` for each text (nulls as the empty string), aligned with the input."""
    require_gcld3("gcld3")
    if not isinstance(texts, pl.Series):
        texts = pl.Series("text", list(texts), dtype=pl.Utf8)
    if len(texts) == 0:
        return pl.DataFrame({LANG: [], LANG_CONF: []}, schema={LANG: pl.Utf8, LANG_CONF: pl.Float64})
    return map_distinct(texts, _gcld3_chunk, None, {LANG: pl.Utf8, LANG_CONF: pl.Float64},
                        processes=processes, parallel_min=parallel_min, description="language id (gcld3)")
