"""Small classifier/regressor heads on stored CLIP embeddings (aesthetics, NSFW, watermark, ...).

A head is a stack of linear layers whose sizes the recipe declares (`layers = [768, 1024, 128, 64,
16, 1]`), an activation between them (none for LAION's aesthetic MLP), and optionally a sigmoid on
the output. Weights come from a user file: safetensors, or a torch state dict (`.pt`/`.pth`,
loaded with `weights_only=True`). The linear weights are found by shape, in key order (numbers in
keys compared as numbers, so `layers.10` follows `layers.7`); dropout layers have no weights and
change nothing at inference. A pair of 1-D buffers named `*.mean` and `*.variance` (or `*.std`) of
the input size is applied first as `(x - mean) / (sqrt(variance) + 1e-10)`, which is how LAION's
ported Keras NSFW heads standardise their input.

Sources:
- LAION-5B (Schuhmann et al. 2022) published per-sample NSFW and watermark probabilities and
  aesthetic scores predicted by small heads on CLIP ViT-L/14 image embeddings.
- LAION "improved aesthetic predictor" (github christophschuhmann/improved-aesthetic-predictor):
  MLP 768→1024→128→64→16→1 on L2-normalised ViT-L/14 image embeddings, dropout between the first
  layers and no activation, regression output on a 1–10 scale.
- LAION CLIP-based-NSFW-Detector: Keras (AutoKeras) heads; the repo's PyTorch port has
  Normalization(768) → 768→64→512→256→1 with ReLU and a sigmoid output for ViT-L/14, and
  Normalization(512) → 512→32→32→1 for ViT-B/32 (see docs/filters.md).

Reasons: `<label>_too_low` (direction keep_above: dropped when the head's output < threshold) and
`<label>_too_high` (keep_below: dropped when output > threshold), value = the output;
`missing_embedding` when an embedding row is not finite.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import polars as pl

from ..errors import UsageError
from .base import Stage, StageInput, StageResult, decisions_frame, register_stage
from .filters_datacomp import empty_decisions, require_columns

ACTIVATIONS = ("none", "relu", "gelu", "tanh", "sigmoid", "silu")


def _natural_key(name: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def load_state(path: str | Path) -> dict[str, np.ndarray]:
    """Tensors of a safetensors file or a torch state dict, as float32 numpy arrays."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UsageError(f"head weights {p} not found")
    if p.suffix == ".safetensors":
        from safetensors.numpy import load_file

        try:
            raw = load_file(str(p))
        except Exception as exc:  # noqa: BLE001 - a corrupt or non-safetensors file is a user error
            raise UsageError(f"cannot read safetensors file {p}: {exc}") from None
        return {k: np.asarray(v, dtype=np.float32) for k, v in raw.items()}
    import torch

    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot read torch weights {p}: {exc}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise UsageError(f"{p} holds a {type(obj).__name__}, not a state dict")
    return {k: v.detach().to(torch.float32).cpu().numpy() for k, v in obj.items() if hasattr(v, "detach")}


def match_layers(state: dict[str, np.ndarray], layers: Sequence[int]) -> tuple[list, tuple | None]:
    """[(W (out, in), b or None)] for each declared layer, plus an optional (mean, scale) input norm."""
    keys = sorted(state, key=_natural_key)
    weights = [k for k in keys if state[k].ndim == 2 and k.endswith("weight")]
    if not weights:  # unnamed layout: every 2-D tensor that is not a normalisation buffer
        weights = [k for k in keys if state[k].ndim == 2 and not k.endswith(("mean", "variance", "std"))]
    want = [(layers[i + 1], layers[i]) for i in range(len(layers) - 1)]
    if len(weights) != len(want):
        shapes = {k: tuple(state[k].shape) for k in weights}
        raise UsageError(f"head declares {len(want)} linear layers {want} but the weights hold {len(weights)}: {shapes}")
    out = []
    for key, shape in zip(weights, want):
        w = state[key]
        if tuple(w.shape) != shape:
            raise UsageError(f"weight {key!r} has shape {tuple(w.shape)}, expected {shape} from layers={list(layers)}")
        bkey = key[: -len("weight")] + "bias" if key.endswith("weight") else None
        b = state.get(bkey) if bkey else None
        if b is not None and b.shape != (shape[0],):
            raise UsageError(f"bias {bkey!r} has shape {b.shape}, expected {(shape[0],)}")
        out.append((w, b))
    norm = None
    mean_keys = [k for k in keys if k.endswith("mean") and state[k].reshape(-1).shape == (layers[0],)]
    if mean_keys:
        prefix = mean_keys[0][: -len("mean")]
        if prefix + "variance" in state:
            scale = np.sqrt(state[prefix + "variance"].reshape(-1)) + 1e-10
        elif prefix + "std" in state:
            scale = state[prefix + "std"].reshape(-1)
        else:
            scale = None
        if scale is not None:
            norm = (state[mean_keys[0]].reshape(-1), scale)
    return out, norm


@register_stage
class ClassifierHead(Stage):
    """Apply a small MLP head to stored image (or text) embeddings and threshold its output.

    Params: weights (path), layers (sizes, input first), activation between layers, sigmoid on the
    output, threshold, direction `keep_above` (aesthetics) or `keep_below` (NSFW/watermark
    probability), label (reason prefix), scorer and kind of the embeddings, normalize (L2-normalise
    embeddings first, as both LAION heads expect). Kept rows: value = output, threshold.
    """

    name = "classifier_head"
    scope = "row"

    def needs_columns(self):
        return []

    def __init__(self, weights: str, layers: Sequence[int], threshold: float, direction: str = "keep_above",
                 activation: str | Sequence[str] = "none", sigmoid: bool = False, label: str = "head",
                 scorer: str = "datacomp-l14", kind: str = "img", normalize: bool = True, chunk: int = 65_536):
        if direction not in ("keep_above", "keep_below"):
            raise UsageError(f"classifier_head direction must be keep_above or keep_below, got {direction!r}")
        layers = [int(x) for x in layers]
        if len(layers) < 2 or layers[-1] != 1 or min(layers) < 1:
            raise UsageError(f"classifier_head layers must list >= 2 sizes ending in 1, got {layers}")
        # One activation for every gap between linear layers, or one per gap (len(layers) - 2).
        acts = [activation] * (len(layers) - 2) if isinstance(activation, str) else list(activation)
        if len(acts) != len(layers) - 2 or any(a not in ACTIVATIONS for a in acts):
            raise UsageError(f"classifier_head activation must be one of {ACTIVATIONS} or a list of "
                             f"{len(layers) - 2} of them, got {activation!r}")
        if not re.fullmatch(r"[a-z][a-z0-9_]*", label):
            raise UsageError(f"classifier_head label must be a short lowercase name, got {label!r}")
        self.weights = str(Path(weights).expanduser().absolute())
        self.layers = layers
        self.threshold = float(threshold)
        self.direction = direction
        self.activation = activation if isinstance(activation, str) else list(activation)
        self._acts = acts
        self.sigmoid = bool(sigmoid)
        self.label = label
        self.scorer = scorer
        self.kind = kind
        self.normalize = bool(normalize)
        self.chunk = int(chunk)
        self._layers, self._norm = match_layers(load_state(self.weights), layers)

    def needs_embeddings(self) -> list[tuple[str, str]]:
        return [(self.scorer, self.kind)]

    def predict(self, x: np.ndarray) -> np.ndarray:
        """The head's output for a float32 block of embeddings, shape (n,)."""
        import torch

        with torch.inference_mode():
            h = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
            if self.normalize:
                h = torch.nn.functional.normalize(h, dim=1)
            if self._norm is not None:
                h = (h - torch.from_numpy(self._norm[0])) / torch.from_numpy(self._norm[1])
            fns = {"none": None, "relu": torch.relu, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh,
                   "sigmoid": torch.sigmoid, "silu": torch.nn.functional.silu}
            for i, (w, b) in enumerate(self._layers):
                h = torch.nn.functional.linear(h, torch.from_numpy(w), None if b is None else torch.from_numpy(b))
                act = fns[self._acts[i]] if i < len(self._acts) else None
                if act is not None:
                    h = act(h)
            if self.sigmoid:
                h = torch.sigmoid(h)
            return h[:, 0].numpy().astype(np.float64)

    def apply(self, inp: StageInput) -> StageResult:
        f = inp.frame
        require_columns(f, self.name, ["uid"])
        view = inp.embedding(self.scorer, self.kind)
        if view.n != f.height:
            raise UsageError(f"classifier_head: {view.n} embeddings for {f.height} rows")
        if f.height == 0:
            return StageResult(empty_decisions())
        if view.dim != self.layers[0]:
            raise UsageError(f"head input size {self.layers[0]} != {self.scorer}:{self.kind} embedding dim {view.dim}")
        out = np.empty(f.height, dtype=np.float64)
        for start, block in view.chunks(self.chunk):
            out[start:start + len(block)] = self.predict(block)
        bad = ~np.isfinite(out)
        if self.direction == "keep_above":
            keep = ~bad & (out >= self.threshold)
            fail_reason = f"{self.label}_too_low"
        else:
            keep = ~bad & (out <= self.threshold)
            fail_reason = f"{self.label}_too_high"
        flags = pl.DataFrame({"bad": bad, "keep": keep})
        reason = flags.select(pl.when(pl.col("bad")).then(pl.lit("missing_embedding"))
                              .when(~pl.col("keep")).then(pl.lit(fail_reason))
                              .otherwise(pl.lit(None, pl.Utf8))).to_series()
        value = np.where(bad, math.nan, out)
        stats = {"mean": float(np.nanmean(value)) if (~bad).any() else None, "kept": int(keep.sum())}
        return StageResult(decisions_frame(f["uid"], keep, reason, value, self.threshold), stats=stats)
