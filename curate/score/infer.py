"""Batched inference for one or several scorers in one pass over the data.

Images are decoded once per sample and resized once per geometry (preprocess.SampleCollator, in
DataLoader workers); here each model gets its geometry's uint8 batch, normalised on the device with
its own mean/std (shared when two models agree), and its tokenizer's tokens.

On CUDA: host→device copies are non_blocking (the DataLoader pins the batch), the models run
under autocast (bf16, or fp16 on GPUs without bf16). On CPU: fp32. Always torch.inference_mode.
Embeddings are L2-normalised in fp32; the score is their cosine computed in fp32 from the fp32
normalised embeddings; embeddings are returned as float16 for storage (DataComp's npz convention).
Rows whose image failed to decode get NaN image embeddings and NaN scores; their text embeddings
are computed as usual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..models.loader import LoadedModel
from .device import AdaptiveBatchSize, autocast, free_device_memory, suggest_batch_size
from .preprocess import Geometry, PreparedBatch, SampleCollator, flip_batch, normalize_batch


@dataclass
class ScorerOutput:
    img: np.ndarray                       # (n, d) float16, NaN rows where the image failed
    txt: np.ndarray                       # (n, d) float16
    score: np.ndarray                     # (n,) float32 cosine(img, txt), NaN where the image failed
    img_flip: Optional[np.ndarray] = None     # (n, d) float16, with flip=True
    score_flip: Optional[np.ndarray] = None   # (n,) float32, with flip=True


class MultiScorer:
    """Several loaded models scoring the same batches. All models must sit on one device.

    Usage::

        scorer = MultiScorer(load_models(specs, device), flip=False)
        loader = DataLoader(dataset, batch_size=256, num_workers=8, collate_fn=scorer.collator(),
                            pin_memory=device.type == "cuda")
        for batch in loader:
            outputs = scorer.score(batch)   # {model name: ScorerOutput}
    """

    def __init__(self, models: Sequence[LoadedModel], *, flip: bool = False, chunk_size: int | None = None):
        if not models:
            raise ValueError("MultiScorer needs at least one model")
        devices = {str(m.device) for m in models}
        if len(devices) != 1:
            raise ValueError(f"all models must be on one device, got {sorted(devices)}")
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError(f"scorer names must be unique, got {names}")
        self.models = list(models)
        self.device = models[0].device
        self.flip = flip
        self.geometries: dict[str, Geometry] = {}
        self.tokenizers: dict[str, object] = {}
        for m in self.models:
            self.geometries.setdefault(m.preprocess.geometry.key, m.preprocess.geometry)
            self.tokenizers.setdefault(m.tokenizer_key, m.tokenizer)
        self.sizers: dict[str, AdaptiveBatchSize] = {}
        for m in self.models:
            if chunk_size is None:
                visual = m.model.visual
                grid = getattr(visual, "grid_size", (m.image_size[0] // 14, m.image_size[1] // 14))
                width = getattr(getattr(visual, "transformer", None), "width", 1024)
                initial = suggest_batch_size(self.device, image_tokens=int(np.prod(grid)) + 1, width=int(width))
            else:
                initial = chunk_size
            self.sizers[m.name] = AdaptiveBatchSize(
                initial, on_oom=lambda: free_device_memory(self.device), label=m.name)

    def collator(self, **kwargs) -> SampleCollator:
        """The DataLoader collate_fn producing batches for these models (kwargs: max_pixels,
        draft, draft_margin, resize_backend)."""
        return SampleCollator(list(self.geometries.values()), self.tokenizers, **kwargs)

    # ---- encoding ---------------------------------------------------------------------
    def _encode(self, m: LoadedModel, fn, x: torch.Tensor) -> torch.Tensor:
        """fp32 L2-normalised embeddings of x, chunked with OOM back-off."""
        def run(a: int, b: int) -> torch.Tensor:
            with autocast(self.device):
                e = fn(x[a:b])
            return F.normalize(e.float(), dim=-1)

        parts = self.sizers[m.name].map(run, x.shape[0])
        return torch.cat(parts) if parts else torch.empty(0, m.embed_dim, device=self.device)

    def encode_images(self, m: LoadedModel, pixels: torch.Tensor) -> torch.Tensor:
        """Normalised float (n, 3, H, W) pixels → fp32 unit embeddings (n, d)."""
        return self._encode(m, m.model.encode_image, pixels)

    def encode_texts(self, m: LoadedModel, tokens: torch.Tensor) -> torch.Tensor:
        return self._encode(m, m.model.encode_text, tokens)

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return t
        return t.to(self.device, non_blocking=t.is_pinned())

    def score(self, batch: PreparedBatch) -> dict[str, ScorerOutput]:
        n = len(batch)
        ok_idx = torch.from_numpy(np.flatnonzero(batch.ok))
        out: dict[str, ScorerOutput] = {}
        with torch.inference_mode():
            images = {k: self._to_device(v) for k, v in batch.images.items()}
            tokens = {k: self._to_device(v) for k, v in batch.tokens.items()}
            normalised: dict[tuple, torch.Tensor] = {}
            for m in self.models:
                pp = m.preprocess
                key = (pp.geometry.key, pp.mean, pp.std)
                if key not in normalised:
                    normalised[key] = normalize_batch(images[pp.geometry.key], pp.mean, pp.std)
                x = normalised[key]
                txt = self.encode_texts(m, tokens[m.tokenizer_key])
                txt_ok = txt[ok_idx.to(txt.device)] if len(ok_idx) < n else txt
                img = self.encode_images(m, x) if x.shape[0] else txt[:0]
                res = ScorerOutput(
                    img=_scatter(img, batch.ok, n, m.embed_dim, np.float16),
                    txt=txt.half().cpu().numpy(),
                    score=_scatter((img * txt_ok).sum(-1), batch.ok, n, None, np.float32))
                if self.flip:
                    img_f = self.encode_images(m, flip_batch(x)) if x.shape[0] else txt[:0]
                    res.img_flip = _scatter(img_f, batch.ok, n, m.embed_dim, np.float16)
                    res.score_flip = _scatter((img_f * txt_ok).sum(-1), batch.ok, n, None, np.float32)
                out[m.name] = res
        return out


def _scatter(rows: torch.Tensor, ok: np.ndarray, n: int, dim: Optional[int], dtype) -> np.ndarray:
    """Put the ok rows' values back at their positions in a length-n array, NaN elsewhere."""
    vals = (rows.half() if dtype == np.float16 else rows.float()).cpu().numpy()
    if vals.shape[0] == n:
        return vals
    shape = (n,) if dim is None else (n, dim)
    full = np.full(shape, np.nan, dtype=dtype)
    full[ok] = vals
    return full
