"""Image preprocessing for scoring: open_clip's own transform, and a faster equivalent.

open_clip's inference transform (transform.image_transform) is, on a PIL image:
resize (shortest side → S then centre crop; `squash` to S×S; or `longest` side → S then pad),
PIL resampling (bicubic or bilinear, antialiased) to uint8, then ToTensor (/255) and Normalize
(mean/std), one image at a time in float.

The fast path computes the same geometry (the sizes and crop offsets below copy torchvision's and
open_clip's arithmetic, including their rounding), but:

1. decodes JPEGs at 1/2, 1/4 or 1/8 scale in the DCT when the resize would still shrink by
   `draft_margin` (default 2) afterwards (decode.py; only sources >= 4x the model's input are
   affected, never DataComp's 512-px images at 224 or 378 px);
2. resamples with torch's uint8 antialiased kernel (`F.interpolate(..., antialias=True)` on a
   channels-last uint8 tensor), which implements PIL's filters in AVX2: about 4x faster on
   one core here and within 1-2 grey levels of PIL, except at a few strongly clipped edge pixels
   where Pillow runs its two passes in the other order (torch always resamples horizontally
   first; Pillow 13 sometimes vertically first, and bicubic overshoot is clipped in between);
3. hands uint8 HWC pixels over (4x less memory and host→device traffic than float), and
   normalises whole batches on the device in float (`normalize_batch`).

`resize_backend="pil"` keeps PIL's resampling: its uint8 output is identical to open_clip's, so the
only difference from the stock transform is float rounding of the normalisation. docs/models.md
has the measured differences for each step.

Geometry is shared between models: preprocessing is grouped by `Geometry` (size, resize mode,
interpolation, fill), not by mean/std, so e.g. ViT-B/32 and ViT-L/14 at 224 px share one uint8
batch and each normalises it with its own mean/std on the device.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .decode import DEFAULT_MAX_PIXELS, Decoded, decode_image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_PIL_FILTERS = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass(frozen=True)
class Geometry:
    """Everything about preprocessing except the normalisation: equal geometries share pixels."""

    size: tuple[int, int]              # (height, width) fed to the model
    resize_mode: str = "shortest"      # shortest (+ centre crop) | squash | longest (+ pad)
    interpolation: str = "bicubic"     # bicubic | bilinear
    fill_color: int = 0                # padding value for `longest`

    @property
    def key(self) -> str:
        h, w = self.size
        fill = f"-fill{self.fill_color}" if self.resize_mode == "longest" else ""
        return f"{h}x{w}-{self.resize_mode}-{self.interpolation}{fill}"

    # -- arithmetic copied from torchvision.transforms.Resize/CenterCrop and open_clip's
    #    ResizeKeepRatio/CenterCropOrPad, so the fast path lands on the same pixels ----------
    def plan(self, w: int, h: int) -> tuple[tuple[int, int], str, tuple[int, int]]:
        """For a (w, h) source: ((resized_h, resized_w), interpolation, (top, left)).

        top/left >= 0 are crop offsets into the resized image; < 0 are padding offsets (`longest`).
        """
        th, tw = self.size
        interp = self.interpolation
        if self.resize_mode == "squash":
            return (th, tw), interp, (0, 0)
        if self.resize_mode == "longest":
            ratio = max(h / th, w / tw)
            # max(1, .): open_clip itself fails on e.g. a 3x700 strip (width rounds to 0)
            rh, rw = max(1, round(h / ratio)), max(1, round(w / ratio))
            return (rh, rw), interp, (-((th - rh) // 2), -((tw - rw) // 2))
        if th == tw:  # torchvision Resize(int): the shorter side → S, the longer truncated
            short, long = (w, h) if w <= h else (h, w)
            new_long = int(th * long / short)
            rw, rh = (th, new_long) if w <= h else (new_long, th)
        else:  # open_clip ResizeKeepRatio(size), which always resamples bicubic
            ratio = min(h / th, w / tw)
            rh, rw = round(h / ratio), round(w / ratio)
            interp = "bicubic"
        return (rh, rw), interp, (int(round((rh - th) / 2.0)), int(round((rw - tw) / 2.0)))

    def max_reduction(self, w: int, h: int) -> float:
        """How much the resize shrinks a (w, h) source along its least-shrunk axis (for JPEG draft)."""
        (rh, rw), _, _ = self.plan(w, h)
        return min(w / max(rw, 1), h / max(rh, 1))


@dataclass(frozen=True)
class PreprocessConfig:
    """A model's preprocessing: geometry + normalisation (open_clip's PreprocessCfg, validated)."""

    size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    interpolation: str = "bicubic"
    resize_mode: str = "shortest"
    fill_color: int = 0

    @classmethod
    def from_open_clip(cls, cfg: Mapping[str, Any]) -> "PreprocessConfig":
        size = cfg.get("size", 224)
        size = (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))
        def triple(v, default):
            v = default if v is None else v
            v = (v,) * 3 if isinstance(v, (int, float)) else tuple(v)
            return tuple(float(x) for x in v)
        interp = cfg.get("interpolation") or "bicubic"
        return cls(
            size=size,
            mean=triple(cfg.get("mean"), OPENAI_MEAN),
            std=triple(cfg.get("std"), OPENAI_STD),
            # open_clip maps anything but 'bilinear' (e.g. 'random') to bicubic at inference
            interpolation="bilinear" if interp == "bilinear" else "bicubic",
            resize_mode=cfg.get("resize_mode") or "shortest",
            fill_color=int(cfg.get("fill_color") or 0),
        )

    def to_open_clip(self) -> dict[str, Any]:
        return dict(size=self.size if self.size[0] != self.size[1] else self.size[0], mode="RGB",
                    mean=self.mean, std=self.std, interpolation=self.interpolation,
                    resize_mode=self.resize_mode, fill_color=self.fill_color)

    @property
    def geometry(self) -> Geometry:
        return Geometry(self.size, self.resize_mode, self.interpolation, self.fill_color)

    def stock_transform(self):
        """open_clip's own inference transform for this config (PIL image → normalised float CHW)."""
        from open_clip.transform import PreprocessCfg, image_transform_v2

        return image_transform_v2(PreprocessCfg(**self.to_open_clip()), is_train=False)

    def describe(self) -> dict[str, Any]:
        return dict(size=list(self.size), mean=list(self.mean), std=list(self.std),
                    interpolation=self.interpolation, resize_mode=self.resize_mode, fill_color=self.fill_color)


# ---- one image ------------------------------------------------------------------------

def _rgb_tensor(img: Image.Image) -> torch.Tensor:
    """(1, 3, H, W) uint8 view with channels-last strides over one copy of the pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # read-only buffer: interpolate only reads it
        t = torch.frombuffer(img.tobytes(), dtype=torch.uint8)
    return t.view(1, img.height, img.width, 3).permute(0, 3, 1, 2)


def _resize_torch(img: Image.Image, rh: int, rw: int, interp: str) -> np.ndarray:
    x = _rgb_tensor(img)
    if (img.height, img.width) != (rh, rw):
        x = F.interpolate(x, size=(rh, rw), mode=interp, antialias=True)  # stays channels-last
    return x[0].permute(1, 2, 0).numpy()  # contiguous HWC


def resize_to_geometry(img: Image.Image, geom: Geometry, *, backend: str = "torch",
                       out: np.ndarray | None = None) -> np.ndarray:
    """RGB PIL image → uint8 (H, W, 3) with `geom`'s resize, crop or pad applied, written into
    `out` when given (e.g. a row of the batch buffer, saving a copy)."""
    (rh, rw), interp, (top, left) = geom.plan(img.width, img.height)
    th, tw = geom.size
    if out is None:
        out = np.empty((th, tw, 3), dtype=np.uint8)
    if backend == "pil":
        r = img if img.size == (rw, rh) else img.resize((rw, rh), _PIL_FILTERS[interp])
        hwc = np.asarray(r)
    elif backend == "torch":
        hwc = _resize_torch(img, rh, rw, interp)
    else:
        raise ValueError(f"unknown resize backend {backend!r}")
    if top < 0 or left < 0:  # `longest`: pad to the target, image centred
        out[...] = geom.fill_color
        pt, pl = -top, -left
        out[pt:pt + rh, pl:pl + rw] = hwc[:th, :tw]
    elif rh < th or rw < tw:  # torchvision CenterCrop pads smaller images (not reached by `shortest`)
        out[...] = 0
        pt, pl = max(0, (th - rh) // 2), max(0, (tw - rw) // 2)
        src = hwc[max(0, top):max(0, top) + th, max(0, left):max(0, left) + tw]
        out[pt:pt + src.shape[0], pl:pl + src.shape[1]] = src
    else:
        out[...] = hwc[top:top + th, left:left + tw]
    return out


def stock_preprocess(img: Image.Image, cfg: PreprocessConfig) -> torch.Tensor:
    """open_clip's transform applied to an RGB image: normalised float32 (3, H, W)."""
    return cfg.stock_transform()(img)


def normalize_batch(u8: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (B, H, W, 3) → normalised float32 (B, 3, H, W) on u8's device.

    Computes x * (1 / (255 std)) - mean / std: the same as open_clip's (x / 255 - mean) / std up to
    float rounding (< 1e-6), in one conversion pass plus two in-place passes."""
    mean_t = torch.as_tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    scale = (1.0 / (255.0 * std_t)).to(torch.float32).to(u8.device)
    shift = (mean_t / std_t).to(torch.float32).to(u8.device)
    x = u8.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
    return x.mul_(scale).sub_(shift)


def flip_batch(x: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of a (B, C, H, W) batch.

    Flipping the preprocessed pixels equals preprocessing the flipped image, except that a centre
    crop with an odd margin sits one pixel to the other side (torchvision rounds the offset)."""
    return torch.flip(x, dims=[3])


class DraftLimit:
    """decode.py's `draft` callable when one decoded image feeds every geometry: the largest JPEG
    DCT reduction such that each resize still shrinks by at least `margin` afterwards.

    margin=2 (the default): drafting engages only when the source is >= 2 (4, 8, 16)x the resize
    output; DataComp's 512-px images are never drafted for 224/378-px models. Picklable."""

    def __init__(self, geometries: Iterable[Geometry], margin: float = 2.0):
        self.geometries = tuple(geometries)
        self.margin = float(margin)

    def __call__(self, w: int, h: int) -> float:
        return min(g.max_reduction(w, h) for g in self.geometries) / self.margin


# ---- batches --------------------------------------------------------------------------

def tokenizer_key(tok: Any) -> str:
    """Tokenizers with equal keys produce equal tokens, so captions are tokenised once per key."""
    inner = getattr(tok, "tokenizer", None)
    ident = getattr(inner, "name_or_path", "") if inner is not None else ""
    return f"{type(tok).__name__}:{getattr(tok, 'context_length', '')}:{ident}"


@dataclass
class PreparedBatch:
    """What a DataLoader worker hands to the scorer. Row i of the batch is sample i.

    `images[geometry_key]` holds uint8 (n_ok, H, W, 3) for the rows where `ok` is True, in order;
    `tokens[tokenizer_key]` holds (n, context_length) token ids for every row.
    """

    keys: list[Any]
    ok: np.ndarray                           # bool (n,)
    reasons: list[Optional[str]]             # None or a decode reason per row
    details: list[Optional[str]]
    images: dict[str, torch.Tensor]
    tokens: dict[str, torch.Tensor]
    draft_scales: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int8))
    warnings: list[Optional[str]] = field(default_factory=list)  # per row: what the decoder warned, or None

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def n_ok(self) -> int:
        return int(self.ok.sum())

    def pin_memory(self) -> "PreparedBatch":
        # DataLoader(pin_memory=True) calls this in its pinning thread
        self.images = {k: v.pin_memory() for k, v in self.images.items()}
        self.tokens = {k: v.pin_memory() for k, v in self.tokens.items()}
        return self


class SampleCollator:
    """DataLoader `collate_fn`: [(key, image bytes, caption), ...] → PreparedBatch.

    Each image is decoded once (JPEG draft sized for the most demanding geometry) and resized once
    per geometry; captions are tokenised once per distinct tokenizer. Picklable, so it runs in
    DataLoader worker processes. Failed images keep their row (ok=False, reason set); their
    captions are still tokenised.
    """

    def __init__(self, geometries: Sequence[Geometry], tokenizers: Mapping[str, Any], *,
                 max_pixels: int = DEFAULT_MAX_PIXELS, draft: bool = True, draft_margin: float = 2.0,
                 resize_backend: str = "torch"):
        uniq: dict[str, Geometry] = {}
        for g in geometries:
            uniq.setdefault(g.key, g)
        self.geometries = uniq
        self.tokenizers = dict(tokenizers)
        self.max_pixels = max_pixels
        self.draft = draft
        self.draft_margin = draft_margin
        self.resize_backend = resize_backend
        self._draft = DraftLimit(uniq.values(), draft_margin) if draft else None

    def decode(self, data) -> Decoded:
        return decode_image(data, max_pixels=self.max_pixels, draft=self._draft)

    def __call__(self, samples: Sequence[tuple[Any, Any, Optional[str]]]) -> PreparedBatch:
        n = len(samples)
        ok = np.zeros(n, dtype=bool)
        reasons: list[Optional[str]] = [None] * n
        details: list[Optional[str]] = [None] * n
        scales = np.zeros(n, dtype=np.int8)
        said: list[Optional[str]] = [None] * n
        decoded: list[Image.Image] = []
        for i, (_, data, _) in enumerate(samples):
            d = self.decode(data)
            if d.ok:
                ok[i] = True
                scales[i] = d.draft_scale
                decoded.append(d.image)
                if d.warnings:
                    said[i] = "; ".join(d.warnings)[:300]
            else:
                reasons[i], details[i] = d.reason, d.detail
        images: dict[str, torch.Tensor] = {}
        for key, geom in self.geometries.items():
            h, w = geom.size
            buf = torch.empty((len(decoded), h, w, 3), dtype=torch.uint8)
            arr = buf.numpy()
            for j, img in enumerate(decoded):
                resize_to_geometry(img, geom, backend=self.resize_backend, out=arr[j])
            images[key] = buf
        captions = ["" if c is None else str(c) for (_, _, c) in samples]
        tokens = {key: tok(captions) for key, tok in self.tokenizers.items()}
        return PreparedBatch(keys=[s[0] for s in samples], ok=ok, reasons=reasons, details=details,
                             images=images, tokens=tokens, draft_scales=scales, warnings=said)


class _ListDataset(torch.utils.data.Dataset):
    def __init__(self, samples: Sequence):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


def make_loader(samples: Sequence[tuple[Any, Any, Optional[str]]], collator: SampleCollator, *,
                batch_size: int = 256, num_workers: int = 0, pin_memory: bool = False):
    """A DataLoader over in-memory (key, bytes, caption) samples, in order (tests, benchmarks).

    The shard runner uses its own IterableDataset over tar members with the same collator."""
    return torch.utils.data.DataLoader(
        _ListDataset(samples), batch_size=batch_size, shuffle=False, num_workers=num_workers,
        collate_fn=collator, pin_memory=pin_memory, persistent_workers=False)
