"""Raw image bytes → RGB PIL image, or a short stable failure reason. Never raises for bad data.

Reasons (recorded per sample, never crashes):

    missing_image        no bytes at all (the sample has no image member)
    not_an_image         empty, HTML, text, or a format PIL does not recognise
    truncated            the file ends early (PIL's LOAD_TRUNCATED_IMAGES is left off)
    decompression_bomb   the header announces more than `max_pixels` pixels
    decode_error         anything else the decoder rejects

What is normalised: EXIF orientation is applied; CMYK, YCbCr, 1-bit, L and palette images become
RGB; transparency (RGBA, LA, PA, palette or L/RGB with a transparent colour) is composited on
white, as img2dataset does; 16-bit greyscale (I;16*, I) is scaled to 8 bits rather than clipped;
animated GIF/WebP/PNG give their first frame.

Reduced-size JPEG decoding: `decode_image(..., draft=f)` lets libjpeg scale by 1/2, 1/4 or 1/8 in
the DCT while decoding. `f(w, h)` returns how far the caller's resize will shrink an image of
oriented size (w, h); the largest power of two not above it is used, so the decoded image is never
smaller than what the resize produces and the resize stays a downscale. docs/models.md gives the
measured difference this makes.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# PIL's own default (Image.MAX_IMAGE_PIXELS); fixed here so other code changing the global cannot
# loosen curate's bound. Images above it get `decompression_bomb`.
DEFAULT_MAX_PIXELS = 89_478_485

REASONS = ("missing_image", "not_an_image", "truncated", "decompression_bomb", "decode_error")

_ORIENTATION_TAG = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}
_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}

DraftFn = Callable[[int, int], float]


@dataclass
class Decoded:
    image: Optional[Image.Image]        # RGB, orientation applied; None on failure
    reason: Optional[str] = None        # one of REASONS on failure
    detail: Optional[str] = None        # the decoder's message, for sample_issues.detail
    source_size: Optional[tuple[int, int]] = None   # (w, h) as displayed, before draft scaling
    draft_scale: int = 1                # 1, 2, 4 or 8
    warnings: tuple[str, ...] = ()      # what the decoder warned about (recorded as decode_warning)

    @property
    def ok(self) -> bool:
        return self.image is not None


def _fail(reason: str, detail: str | None = None, size=None) -> Decoded:
    return Decoded(None, reason, (detail or "")[:300] or None, size)


def _classify(exc: BaseException) -> str:
    msg = str(exc).lower()
    if isinstance(exc, Image.DecompressionBombError):
        return "decompression_bomb"
    if isinstance(exc, EOFError) or "truncat" in msg or "broken data stream" in msg or "premature end" in msg:
        return "truncated"
    return "decode_error"


def _orientation(im: Image.Image) -> int:
    try:
        o = im.getexif().get(_ORIENTATION_TAG, 1)
        return int(o) if isinstance(o, int) and 1 <= o <= 8 else 1
    except Exception:  # corrupt EXIF must not fail the image
        return 1


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in _SIXTEEN_BIT:
        a = np.asarray(im)
        if mode == "I" and a.size and int(a.max()) <= 255 and int(a.min()) >= 0:
            a8 = a.astype(np.uint8)
        else:  # 16-bit range: round(v * 255 / 65535)
            a8 = ((np.clip(a, 0, 65535).astype(np.uint32) + 128) // 257).astype(np.uint8)
        return Image.fromarray(a8, "L").convert("RGB")
    if mode == "F":
        a = np.asarray(im, dtype=np.float32)
        if a.size and float(np.nanmax(a)) <= 1.0:
            a = a * 255.0
        return Image.fromarray(np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8), "L").convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, (0, 0), rgba)  # straight alpha over white
        return out
    return im.convert("RGB")


def _draft_scale(factor: float) -> int:
    for s in (8, 4, 2):
        if factor >= s:
            return s
    return 1


def decode_image(data: bytes | bytearray | memoryview | None, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft: DraftFn | None = None) -> Decoded:
    """Decode one image. Returns Decoded(image=RGB) or Decoded(reason=...); never raises for bad data."""
    if data is None:
        return _fail("missing_image")
    if len(data) == 0:
        return _fail("not_an_image", "empty")
    with warnings.catch_warnings(record=True) as caught:
        # Every warning is caught (none reaches stderr) and returned with the image, to be
        # recorded; PIL's bomb warning is left out: our own bound decides below.
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(io.BytesIO(data))
        except UnidentifiedImageError as exc:
            return _fail("not_an_image", str(exc))
        except Exception as exc:
            return _fail(_classify(exc), f"{type(exc).__name__}: {exc}")
        try:
            w, h = im.size
            if w <= 0 or h <= 0:
                return _fail("decode_error", f"invalid size {w}x{h}")
            if w * h > max_pixels:
                return _fail("decompression_bomb", f"{w}x{h} = {w * h:,} pixels > {max_pixels:,}", (w, h))
            orientation = _orientation(im)
            shown = (h, w) if orientation in _SWAPS_AXES else (w, h)
            scale = 1
            if draft is not None and im.format == "JPEG":
                scale = _draft_scale(draft(*shown))
                if scale > 1:
                    # asking for (w//s, h//s) makes PIL pick exactly 1/s (it takes the largest
                    # power of two with w // req >= s), so the result is >= what the resize needs
                    im.draft("RGB", (max(1, w // scale), max(1, h // scale)))
                    scale = round(w / im.size[0]) if im.size[0] else 1
            im.load()
            if orientation != 1:
                im = ImageOps.exif_transpose(im)  # before mode conversion, which may drop EXIF
            rgb = _to_rgb(im)
            said = tuple(dict.fromkeys(f"{w.category.__name__}: {w.message}"[:200] for w in caught))
            return Decoded(rgb, None, None, shown, scale, said)
        except MemoryError as exc:
            return _fail("decompression_bomb", f"MemoryError: {exc}")
        except Exception as exc:
            return _fail(_classify(exc), f"{type(exc).__name__}: {exc}")
