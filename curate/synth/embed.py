"""Plausible CLIP-like embeddings for the DataComp layout, without a model.

A shared latent space (dim `LATENT`) holds the semantics: one vector per concept, colour,
background, language and junk kind, and one centroid per world cluster
(concept + colour + background + an own offset). Each scorer ("b32", "l14") maps the latent
space into its own dimension with a fixed orthonormal projection and adds:

* image  = normalise(a*mu_img + b*P(s) + c*noise),   s = normalise(centroid + sigma_k * g)
* text   = normalise(a*mu_txt + b*q*P(t) + c*noise(text)),   t = what the caption names

`mu_img`/`mu_txt` are modality directions with a small positive dot product (CLIP's "modality
gap"), so unrelated pairs score ~0.05-0.15 and matched pairs ~0.2-0.4. The text side has no
randomness beyond a hash of the caption: identical captions get identical text embeddings, as
with a real text tower. Cluster spreads sigma_k vary, so cluster "complexity" varies.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import vocab as V
from .plan import World, rng_for

LATENT = 64
TEXT_TABLE = 8192          # text noise rows, indexed by caption hash
_TAG_EMB = 0x45

# per-scorer mixing weights: (a, b, c) image, (a_t, b_t, c_t) text, rho = mu_img . mu_txt
_PARAMS = {
    "b32": dict(a=0.62, b=0.62, c=0.40, at=0.62, bt=0.60, ct=0.42, rho=0.22),
    "l14": dict(a=0.64, b=0.60, c=0.42, at=0.64, bt=0.56, ct=0.45, rho=0.18),
}


def _unit_rows(x: np.ndarray) -> np.ndarray:
    n = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float32))
    return x / np.maximum(n, 1e-12)[:, None]


@dataclass
class TextContent:
    """What each caption says, as integer codes (-1 = not named) plus a hash of its text."""
    concept: np.ndarray
    colour: np.ndarray
    bg: np.ndarray
    lang: np.ndarray      # 0 = en, 1.. = LANGUAGES, -1 = none
    junk: np.ndarray      # JUNK_KINDS index or -1
    hash: np.ndarray      # uint32

    def take(self, sl) -> "TextContent":
        return TextContent(*(getattr(self, f)[sl] for f in ("concept", "colour", "bg", "lang", "junk", "hash")))


class Semantics:
    """The latent vectors shared by all scorers."""

    def __init__(self, seed: int, world: World):
        r = rng_for(seed, _TAG_EMB, 0)
        g = lambda k: _unit_rows(r.standard_normal((k, LATENT), dtype=np.float32))  # noqa: E731
        self.concept = g(len(V.CONCEPTS))
        self.colour = g(len(V.COLOURS))
        self.bg = g(len(V.BACKGROUNDS))
        self.lang = g(1 + len(V.LANGUAGES))
        self.junk = g(len(V.JUNK_KINDS))
        self.own = g(world.k)
        self.text_noise = g(TEXT_TABLE)
        cen = (self.concept[world.concept] + 0.9 * self.colour[world.colour] + 0.4 * self.bg[world.bg]
               + 0.6 * self.own)
        self.centroid = _unit_rows(cen.astype(np.float32))
        self.sigma = world.sigma

    def image_latent(self, cluster: np.ndarray, r: np.random.Generator) -> np.ndarray:
        noise = r.standard_normal((len(cluster), LATENT), dtype=np.float32) / np.float32(np.sqrt(LATENT))
        return _unit_rows(self.centroid[cluster] + self.sigma[cluster, None] * noise)

    def text_latent(self, tc: TextContent) -> np.ndarray:
        m = len(tc.hash)
        has = tc.concept >= 0
        cc, ccol, cb = np.maximum(tc.concept, 0), np.maximum(tc.colour, 0), np.maximum(tc.bg, 0)
        sem = self.concept[cc] + 0.9 * self.colour[ccol] * (tc.colour >= 0)[:, None] \
            + 0.4 * self.bg[cb] * (tc.bg >= 0)[:, None]
        sem = _unit_rows(sem.astype(np.float32))
        hn = self.text_noise[tc.hash % TEXT_TABLE]
        english = has & (tc.lang == 0)
        foreign = has & (tc.lang > 0)
        out = np.empty((m, LATENT), np.float32)
        out[:] = self.junk[np.maximum(tc.junk, 0)] + 0.6 * hn
        out[english] = sem[english] + 0.75 * hn[english]
        out[foreign] = 0.55 * sem[foreign] + 0.8 * self.lang[tc.lang[foreign]] + 0.6 * hn[foreign]
        return _unit_rows(out)


class Scorer:
    """One embedding space ("b32" or "l14") of dimension `dim`."""

    def __init__(self, name: str, dim: int, seed: int, sem: Semantics):
        self.name, self.dim, self.sem = name, dim, sem
        p = _PARAMS[name]
        self.a, self.b, self.c = p["a"], p["b"], p["c"]
        self.at, self.bt, self.ct = p["at"], p["bt"], p["ct"]
        tag = 1 if name == "b32" else 2
        r = rng_for(seed, _TAG_EMB, tag)
        k = min(LATENT, dim)
        q, _ = np.linalg.qr(r.standard_normal((dim, k)).astype(np.float64))
        self.proj = np.zeros((LATENT, dim), np.float32)
        self.proj[:k] = q.T.astype(np.float32)       # orthonormal rows: keeps latent cosines
        mu_img = r.standard_normal(dim)
        mu_img /= np.linalg.norm(mu_img)
        other = r.standard_normal(dim)
        other -= other.dot(mu_img) * mu_img
        other /= np.linalg.norm(other)
        rho = p["rho"]
        self.mu_img = mu_img.astype(np.float32)
        self.mu_txt = (rho * mu_img + np.sqrt(1 - rho * rho) * other).astype(np.float32)
        self.text_noise = (r.standard_normal((TEXT_TABLE, dim), dtype=np.float32) / np.float32(np.sqrt(dim)))

    def image(self, s: np.ndarray, noise: np.ndarray, weak: np.ndarray | None = None) -> np.ndarray:
        """fp32 unit image embeddings from latents s and unit-ish noise; `weak` rows (tiny
        images) carry less semantics."""
        b = np.float32(self.b) if weak is None else np.where(weak, self.b * 0.8, self.b).astype(np.float32)[:, None]
        x = self.a * self.mu_img[None, :] + b * (s @ self.proj) + np.float32(self.c) * noise
        return _unit_rows(x.astype(np.float32, copy=False))

    def image_noise(self, r: np.random.Generator, m: int) -> np.ndarray:
        return r.standard_normal((m, self.dim), dtype=np.float32) / np.float32(np.sqrt(self.dim))

    def text(self, tc: TextContent) -> np.ndarray:
        t = self.sem.text_latent(tc)
        q = (0.8 + 0.4 * ((tc.hash.astype(np.uint64) * np.uint64(2654435761)) % np.uint64(1000)) / 1000.0)
        x = self.at * self.mu_txt[None, :] + (self.bt * q.astype(np.float32))[:, None] * (t @ self.proj) \
            + np.float32(self.ct) * self.text_noise[tc.hash % TEXT_TABLE]
        return _unit_rows(x.astype(np.float32, copy=False))
