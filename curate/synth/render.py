"""Pixels and payloads for the webdataset layout.

`render` draws one coloured, textured shape on a background with PIL + numpy and encodes it
with fixed encoder settings, so the same parameters always give the same bytes. The other
functions make the defective payloads: near-duplicates of an encoded image, corrupt bytes,
truncated JPEGs and non-image files saved under an image extension.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from . import vocab as V

_SUPERSAMPLE = 2  # the mask is drawn at 2x and downsampled, for anti-aliased edges


def _lum(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _bg_colours(r: np.random.Generator, colour: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Two low-saturation background colours whose brightness keeps the object visible."""
    obj = _lum(V.COLOUR_RGB[colour])
    levels = [v for v in range(30, 246, 5) if abs(v - obj) >= 70]
    out = []
    for _ in range(2):
        base = levels[int(r.integers(0, len(levels)))]
        tint = r.integers(-12, 13, 3)
        out.append(tuple(int(np.clip(base + t, 0, 255)) for t in tint))
    return out[0], out[1]


def _solid(c, w, h) -> Image.Image:
    return Image.new("RGB", (w, h), tuple(int(v) for v in c))


def _two_tone(sel: np.ndarray, c1, c2, w, h) -> Image.Image:
    """c1 where sel is true, else c2 (sel: uint8/bool array of shape (h, w))."""
    mask = Image.fromarray(np.ascontiguousarray(sel, dtype=np.uint8) * np.uint8(255), "L")
    return Image.composite(_solid(c1, w, h), _solid(c2, w, h), mask)


def _grain(r: np.random.Generator, c, amp: int, w: int, h: int) -> Image.Image:
    """Colour c plus grey noise (generated at half resolution, like sensor/JPEG grain)."""
    small = r.integers(128 - amp, 129 + amp, (max(1, (h + 1) // 2), max(1, (w + 1) // 2)), dtype=np.uint8)
    noise = Image.fromarray(small, "L").resize((w, h), Image.NEAREST)
    bands = [noise.point([min(255, max(0, v - 128 + int(c[i]))) for v in range(256)]) for i in range(3)]
    return Image.merge("RGB", bands)


def _ramp(c1, c2, w: int, h: int, horizontal: bool) -> Image.Image:
    k = w if horizontal else h
    t = np.linspace(0.0, 1.0, k, dtype=np.float32)[:, None]
    line = (np.asarray(c1, np.float32) * (1 - t) + np.asarray(c2, np.float32) * t).astype(np.uint8)
    strip = Image.fromarray(line[None, :, :] if horizontal else line[:, None, :], "RGB")
    return strip.resize((w, h), Image.NEAREST)


def _background(r: np.random.Generator, kind: str, colour: str, w: int, h: int) -> Image.Image:
    c1, c2 = _bg_colours(r, colour)
    if kind == "white":
        v = int(r.integers(232, 256))
        return _solid(np.clip(v + r.integers(-6, 7, 3), 0, 255), w, h)
    if kind == "dark":
        v = int(r.integers(12, 60))
        return _solid(np.clip(v + r.integers(-8, 9, 3), 0, 255), w, h)
    if kind == "striped":
        width = int(r.integers(max(3, min(w, h) // 24), max(5, min(w, h) // 8)))
        orient = int(r.integers(0, 3))
        if orient == 0:
            sel = np.broadcast_to(((np.arange(w) // width) % 2 == 0)[None, :], (h, w))
        elif orient == 1:
            sel = np.broadcast_to(((np.arange(h) // width) % 2 == 0)[:, None], (h, w))
        else:  # diagonal: sel[y, x] = p[x + y], a strided view of one 1-D pattern
            p = ((np.arange(w + h) // width) % 2 == 0).astype(np.uint8)
            sel = np.lib.stride_tricks.as_strided(p, shape=(h, w), strides=(1, 1))
        return _two_tone(sel, c1, c2, w, h)
    if kind == "checkered":
        cell = int(r.integers(max(3, min(w, h) // 20), max(5, min(w, h) // 6)))
        sel = ((np.arange(h) // cell) % 2).astype(np.uint8)[:, None] ^ ((np.arange(w) // cell) % 2).astype(np.uint8)[None, :]
        return _two_tone(sel, c1, c2, w, h)
    if kind == "dotted":
        sp = int(r.integers(max(6, min(w, h) // 16), max(9, min(w, h) // 7)))
        rad = max(1.5, sp * float(r.uniform(0.18, 0.32)))
        d = (np.arange(sp, dtype=np.float32) - sp / 2) ** 2
        tile = (d[:, None] + d[None, :]) >= rad * rad
        sel = np.tile(tile, (h // sp + 1, w // sp + 1))[:h, :w]
        return _two_tone(sel, c1, c2, w, h)
    if kind == "gradient":
        return _ramp(c1, c2, w, h, horizontal=bool(r.random() < 0.5))
    if kind == "grainy":
        return _grain(r, c1, 28, w, h)
    raise ValueError(kind)


def _regular_polygon(cx, cy, rad, k, rot, inner=None):
    pts = []
    n = k * 2 if inner else k
    for i in range(n):
        a = rot + math.pi * 2 * i / n - math.pi / 2
        rr = rad if (inner is None or i % 2 == 0) else rad * inner
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def _rotate(pts, cx, cy, rot):
    c, s = math.cos(rot), math.sin(rot)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in pts]


def _draw_mask(concept: str, w: int, h: int, r: np.random.Generator) -> Image.Image:
    ss = _SUPERSAMPLE
    W, H = w * ss, h * ss
    m = Image.new("L", (W, H), 0)
    d = ImageDraw.Draw(m)
    side = min(W, H)
    rad = side * float(r.uniform(0.24, 0.42))
    cx = W / 2 + float(r.uniform(-1, 1)) * max(0.0, W / 2 - rad * 1.05)
    cy = H / 2 + float(r.uniform(-1, 1)) * max(0.0, H / 2 - rad * 1.05)
    rot = float(r.uniform(-0.35, 0.35))
    lw = max(2, int(rad * 0.28))
    if concept == "circle":
        d.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), fill=255)
    elif concept == "oval":
        pts = [(cx + rad * math.cos(t), cy + rad * 0.58 * math.sin(t)) for t in np.linspace(0, 2 * math.pi, 72)]
        d.polygon(_rotate(pts, cx, cy, rot), fill=255)
    elif concept == "ring":
        d.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), fill=255)
        ri = rad * 0.62
        d.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
    elif concept == "square":
        a = rad * 0.85
        d.polygon(_rotate([(cx - a, cy - a), (cx + a, cy - a), (cx + a, cy + a), (cx - a, cy + a)], cx, cy, rot * 0.4),
                  fill=255)
    elif concept == "diamond":
        d.polygon(_rotate([(cx, cy - rad), (cx + rad * 0.62, cy), (cx, cy + rad), (cx - rad * 0.62, cy)], cx, cy,
                          rot * 0.3), fill=255)
    elif concept == "triangle":
        d.polygon(_regular_polygon(cx, cy + rad * 0.15, rad * 1.1, 3, rot), fill=255)
    elif concept == "pentagon":
        d.polygon(_regular_polygon(cx, cy, rad, 5, rot), fill=255)
    elif concept == "hexagon":
        d.polygon(_regular_polygon(cx, cy, rad, 6, rot), fill=255)
    elif concept == "star":
        d.polygon(_regular_polygon(cx, cy, rad * 1.1, 5, rot, inner=0.42), fill=255)
    elif concept == "cross":
        a, b = rad, rad * 0.3
        arm1 = [(cx - a, cy - b), (cx + a, cy - b), (cx + a, cy + b), (cx - a, cy + b)]
        arm2 = [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy + a), (cx - b, cy + a)]
        d.polygon(_rotate(arm1, cx, cy, rot * 0.3), fill=255)
        d.polygon(_rotate(arm2, cx, cy, rot * 0.3), fill=255)
    elif concept == "heart":
        pts = []
        for t in np.linspace(0, 2 * math.pi, 90):
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + x * rad / 16, cy - y * rad / 16))
        d.polygon(_rotate(pts, cx, cy, rot * 0.5), fill=255)
    elif concept == "arrow":
        a, b = rad, rad * 0.22
        pts = [(cx - a, cy - b), (cx + a * 0.15, cy - b), (cx + a * 0.15, cy - b * 2.6), (cx + a, cy),
               (cx + a * 0.15, cy + b * 2.6), (cx + a * 0.15, cy + b), (cx - a, cy + b)]
        turn = [0, math.pi / 2, math.pi, -math.pi / 2][int(r.integers(0, 4))]
        d.polygon(_rotate(pts, cx, cy, turn + rot * 0.5), fill=255)
    elif concept == "crescent":
        d.ellipse((cx - rad, cy - rad, cx + rad, cy + rad), fill=255)
        off = rad * 0.45
        d.ellipse((cx - rad + off, cy - rad - off * 0.3, cx + rad + off, cy + rad - off * 0.3), fill=0)
    elif concept == "zigzag":
        k = 5
        pts = [(cx - rad + 2 * rad * i / (k - 1), cy + (rad * 0.45 if i % 2 else -rad * 0.45)) for i in range(k)]
        d.line(_rotate(pts, cx, cy, rot), fill=255, width=lw, joint="curve")
    elif concept == "spiral":
        pts = []
        for t in np.linspace(0, 5.2 * math.pi, 120):
            rr = rad * t / (5.2 * math.pi)
            pts.append((cx + rr * math.cos(t + rot), cy + rr * math.sin(t + rot)))
        d.line(pts, fill=255, width=max(2, lw // 2), joint="curve")
    else:
        raise ValueError(concept)
    return m.reduce(ss)


def _foreground(r: np.random.Generator, colour: str, texture: str, w: int, h: int) -> Image.Image:
    base = tuple(int(v) for v in np.clip(np.array(V.COLOUR_RGB[colour]) + r.integers(-14, 15, 3), 0, 255))
    dark = tuple(int(v * 0.6) for v in base) if colour != "black" else (70, 70, 70)
    if texture == "solid":
        return _solid(base, w, h)
    if texture == "noise":
        return _grain(r, base, 38, w, h)
    if texture == "gradient":
        hi = tuple(int(min(255, v * 1.15 + 20)) for v in base)
        return _ramp(dark, hi, w, h, horizontal=False)
    if texture == "checker":
        cell = max(3, min(w, h) // int(r.integers(10, 18)))
        sel = ((np.arange(h) // cell) % 2).astype(np.uint8)[:, None] ^ ((np.arange(w) // cell) % 2).astype(np.uint8)[None, :]
        return _two_tone(sel == 0, base, dark, w, h)
    raise ValueError(texture)


def render(*, concept: int, colour: int, bg: int, texture: int, w: int, h: int, seed: tuple[int, ...]) -> Image.Image:
    """The RGB image of one record at its stored size; `seed` fixes every random detail."""
    r = np.random.default_rng(list(seed))
    cname, colname = V.CONCEPTS[concept], V.COLOURS[colour]
    back = _background(r, V.BACKGROUNDS[bg], colname, w, h)
    fore = _foreground(r, colname, V.TEXTURES[texture], w, h)
    return Image.composite(fore, back, _draw_mask(cname, w, h, r))


def encode(img: Image.Image, ext: str, quality: int = 90, progressive: bool = False) -> bytes:
    """Encode with fixed settings (no EXIF, no timestamps): same pixels -> same bytes."""
    buf = io.BytesIO()
    if ext == "jpg":
        img.save(buf, "JPEG", quality=int(quality), subsampling=2, optimize=False, progressive=progressive)
    elif ext == "png":
        img.save(buf, "PNG", compress_level=6)
    elif ext == "webp":
        img.save(buf, "WEBP", quality=int(quality), method=4)
    else:
        raise ValueError(ext)
    return buf.getvalue()


def decode(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.convert("RGB")


def near_duplicate(data: bytes, kind: str, *, quality: int, new_size: tuple[int, int] | None,
                   crop_box: tuple[int, int, int, int] | None) -> bytes:
    """A near-duplicate of an encoded image: re-encoded, resized, cropped or mirrored; always JPEG."""
    img = decode(data)
    if kind == "flip":
        img = ImageOps.mirror(img)
    elif kind == "resize":
        img = img.resize(new_size, Image.BICUBIC)
    elif kind == "crop":
        img = img.crop(crop_box)
    elif kind != "reencode":
        raise ValueError(kind)
    return encode(img, "jpg", quality=quality)


_JPEG_HEAD = bytes.fromhex("ffd8ffe000104a46494600010100000100010000")


def corrupt_payload(r: np.random.Generator) -> bytes:
    """Random bytes; half of them start with a JPEG/JFIF header so a magic-number sniff says "jpeg"."""
    n = int(r.integers(2_000, 40_000))
    body = r.bytes(n)
    return _JPEG_HEAD + body if r.random() < 0.5 else body


def truncate_jpeg(data: bytes, r: np.random.Generator) -> bytes:
    """Cut a baseline JPEG inside its entropy-coded data (after the SOS header, before EOI)."""
    sos = data.find(b"\xff\xda")
    lo = sos + 64 if sos >= 0 else len(data) // 4
    hi = max(lo + 1, len(data) - 64)
    cut = int(lo + (hi - lo) * float(r.uniform(0.25, 0.75)))
    return data[:cut]


def non_image_payload(r: np.random.Generator) -> bytes:
    tpl = V.NON_IMAGE_PAYLOADS[int(r.integers(0, len(V.NON_IMAGE_PAYLOADS)))]
    rid = r.bytes(8).hex().upper()
    hid = r.bytes(24).hex()
    return tpl.format(rid=rid, hid=hid).encode("utf-8")
