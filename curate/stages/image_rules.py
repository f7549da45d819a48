"""Image rules that need only metadata: original size, file size, and decode failures.

Sources: `image_size` defaults are DataComp's basic-filter image rules (Gadre et al. 2023,
`mlfoundations/datacomp` `baselines/apply_filter.py`: `min(w, h) >= 200` and
`max(w, h) / min(w, h) <= 3.0`). `image_bytes` has no published default; its bounds are off
unless set (tiny files are usually placeholders of dead links or 1x1 trackers; huge ones are
often scans or posters). `decode_failures` drops what has no usable embedding: images the score
stage could not decode, and samples recorded with a bad embedding.
"""

from __future__ import annotations

import math

import polars as pl

from ..errors import UsageError
from .base import Stage, StageInput, StageResult, register_stage
from .filters_datacomp import (Rule, decisions_from, empty_decisions, fails_above, fails_below, first_failure,
                               require_columns, size_rules)

# How the runner marks a `decode_error` that is a bad embedding, not an image that did not decode.
BAD_EMBEDDING_PREFIX = "bad_embedding: "
# A metadata sample without an image in a pool whose other samples have theirs
# (curate/executors/local.py PoolSource).
NO_IMAGE_PREFIX = "no_image: "


@register_stage
class ImageSize(Stage):
    """Original image size rules (metadata only).

    Order: image_size_missing (value NaN), image_too_small (value = min(w, h), threshold = min_side),
    aspect_ratio_too_high (value = max/min, threshold = max_aspect), image_too_large (value =
    max(w, h), threshold = max_side; off unless set). Input columns: `width`, `height`.
    """

    name = "image_size"
    scope = "row"

    def needs_columns(self):
        return ["width", "height"]

    def __init__(self, min_side: float | None = 200, max_aspect: float | None = 3.0, max_side: float | None = None):
        self.min_side = min_side
        self.max_aspect = None if max_aspect is None else float(max_aspect)
        self.max_side = max_side

    def apply(self, inp: StageInput) -> StageResult:
        f = inp.frame
        require_columns(f, self.name, ["uid", "width", "height"])
        if f.height == 0:
            return StageResult(empty_decisions())
        rules = size_rules(self.min_side, self.max_aspect)
        if self.max_side is not None:
            large = pl.max_horizontal(pl.col("width").cast(pl.Float64), pl.col("height").cast(pl.Float64))
            rules.append(Rule("image_too_large", fails_above(large, self.max_side), large, float(self.max_side)))
        d = f.select(first_failure(rules))
        return StageResult(decisions_from(f["uid"], d["reason"], d["value"], d["threshold"], d["detail"]))


@register_stage
class ImageBytes(Stage):
    """Encoded image file size bounds (metadata only).

    Order: image_bytes_missing (value NaN), image_bytes_too_small (threshold = min_bytes),
    image_bytes_too_large (threshold = max_bytes). Each bound is off unless set.
    Input column: `image_bytes`.
    """

    name = "image_bytes"
    scope = "row"

    def needs_columns(self):
        return ["image_bytes"]

    def __init__(self, min_bytes: int | None = None, max_bytes: int | None = None):
        self.min_bytes = min_bytes
        self.max_bytes = max_bytes

    def apply(self, inp: StageInput) -> StageResult:
        f = inp.frame
        require_columns(f, self.name, ["uid", "image_bytes"])
        if f.height == 0:
            return StageResult(empty_decisions())
        b = pl.col("image_bytes").cast(pl.Float64)
        rules = [Rule("image_bytes_missing", b.is_null() | b.is_nan(), pl.lit(math.nan, pl.Float64))]
        if self.min_bytes is not None:
            rules.append(Rule("image_bytes_too_small", fails_below(b, self.min_bytes), b, float(self.min_bytes)))
        if self.max_bytes is not None:
            rules.append(Rule("image_bytes_too_large", fails_above(b, self.max_bytes), b, float(self.max_bytes)))
        d = f.select(first_failure(rules))
        return StageResult(decisions_from(f["uid"], d["reason"], d["value"], d["threshold"], d["detail"]))


@register_stage
class DecodeFailures(Stage):
    """Drop samples that have no usable embedding: images the score stage could not decode,
    samples recorded with a bad embedding (non-finite or zero vector, at ingest or score), and
    DataComp metadata samples without an image in a pool whose other samples have images.

    Input column `decode_error` (str, null when the sample is usable): the recorded error of an
    undecodable image, `bad_embedding: ` followed by what is wrong, or `no_image: ` and why.
    Reasons `no_image` (detail: download_failed / sha256_mismatch and its detail, or that none was
    ingested), `bad_embedding` (detail = what is wrong, e.g. `datacomp-l14 img: non-finite
    values`) and `undecodable` (detail = the recorded error); value NaN.

    Images are decoded by `curate score`: over a pool with images that no score run has covered
    the stage would keep everything (a truncated JPEG included), so the runner stops with one
    line instead; `require_score = false` runs it anyway, with a warning.
    """

    name = "decode_failures"
    scope = "row"
    needs_score_run = True

    def __init__(self, require_score: bool = True):
        if not isinstance(require_score, bool):
            raise UsageError(f"decode_failures require_score must be true or false, got {require_score!r}")
        self.require_score = require_score

    def needs_columns(self):
        return ["decode_error"]

    def apply(self, inp: StageInput) -> StageResult:
        f = inp.frame
        require_columns(f, self.name, ["uid", "decode_error"])
        if f.height == 0:
            return StageResult(empty_decisions())
        err = pl.col("decode_error").cast(pl.Utf8)
        bad_embedding = err.str.starts_with(BAD_EMBEDDING_PREFIX).fill_null(False)
        no_image = err.str.starts_with(NO_IMAGE_PREFIX).fill_null(False)
        rules = [Rule("no_image", no_image, pl.lit(math.nan, pl.Float64), None, err.str.strip_prefix(NO_IMAGE_PREFIX)),
                 Rule("bad_embedding", bad_embedding, pl.lit(math.nan, pl.Float64), None,
                      err.str.strip_prefix(BAD_EMBEDDING_PREFIX)),
                 Rule("undecodable", err.is_not_null(), pl.lit(math.nan, pl.Float64), None, err)]
        d = f.select(first_failure(rules))
        return StageResult(decisions_from(f["uid"], d["reason"], d["value"], d["threshold"], d["detail"]))
