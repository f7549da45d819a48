"""What each generated record is, decided before anything is rendered or embedded.

* `World`: the fixed concept clusters of a seed (concept, colour, background, spread, long-tailed
  frequency). Both layouts draw records from it; the DataComp layout also builds embeddings on it.
* `assign_kinds`: exact per-kind quotas (round(rate * n), at least one of each enabled kind once
  n >= 200) spread over the pool by a seeded permutation, so defect counts match the rates.
* `ShardPlan`: one shard's records (uids, kinds, sizes, captions, urls, duplicate sources),
  vectorised with numpy; only captions and duplicate bookkeeping loop in Python.

Duplicates point back to an earlier record whose image is `ok`: either earlier in the same
shard or in the previous shard's reservoir (its first `RESERVOIR` ok records), so the generator
streams shard by shard with flat memory and duplicates still cross shard boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import captions as C
from . import vocab as V

IMAGE_KINDS = ("ok", "small", "wide", "exact_dup", "near_dup", "corrupt", "truncated", "non_image",
               "missing_image", "missing_caption", "bad_utf8", "failed_download")
IK = {k: i for i, k in enumerate(IMAGE_KINDS)}
NEAR_KINDS = ("reencode", "resize", "crop", "flip")
CAPTION_RATE_KEYS = ("mismatched", "non_english", "junk")
IMAGE_RATE_KEYS = IMAGE_KINDS[1:]
# The DataComp layout has no image payloads, so only these image defects exist there.
DATACOMP_IMAGE_KINDS = ("small", "wide", "exact_dup", "near_dup")

DEFAULT_RATES: dict[str, float] = {
    # caption defects
    "mismatched": 0.07, "non_english": 0.06, "junk": 0.06,
    # image / record defects
    "small": 0.03, "wide": 0.02, "exact_dup": 0.02, "near_dup": 0.03,
    "corrupt": 0.005, "truncated": 0.005, "non_image": 0.005,
    "missing_image": 0.003, "missing_caption": 0.003, "bad_utf8": 0.003, "failed_download": 0.02,
}
MIN_N_FOR_EVERY_KIND = 200
RESERVOIR = 256
COPY_CAPTION_P = 0.6     # a duplicate with a clean caption reuses the original's exact caption
RESERVOIR_P = 0.25       # share of duplicates whose original is in the previous shard

_TAG_WORLD, _TAG_KINDS, _TAG_SHARD, _TAG_UID = 0x57, 0x4B, 0x53, 0x55


def rng_for(seed: int, *tags: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(seed), *map(int, tags)])))


@dataclass
class World:
    concept: np.ndarray   # (K,) cluster -> concept index
    colour: np.ndarray
    bg: np.ndarray
    sigma: np.ndarray     # (K,) within-cluster spread (DataComp embeddings)
    prob: np.ndarray      # (K,) long-tailed cluster frequency

    @property
    def k(self) -> int:
        return len(self.prob)


def make_world(seed: int, clusters: int) -> World:
    """`clusters` distinct (concept, colour, background) combinations with Zipf-like frequencies."""
    r = rng_for(seed, _TAG_WORLD)
    nc, ncol, nbg = len(V.CONCEPTS), len(V.COLOURS), len(V.BACKGROUNDS)
    cp = 1.0 / np.arange(1, nc + 1) ** 1.1
    cp = cp[r.permutation(nc)]
    cp /= cp.sum()
    colp = 1.0 / np.arange(1, ncol + 1) ** 0.6
    colp = colp[r.permutation(ncol)]
    colp /= colp.sum()
    seen: set[tuple[int, int, int]] = set()
    rows = []
    while len(rows) < clusters:
        c, col, b = int(r.choice(nc, p=cp)), int(r.choice(ncol, p=colp)), int(r.integers(nbg))
        if (c, col, b) in seen or (V.COLOURS[col], V.BACKGROUNDS[b]) in V.INCOMPATIBLE:
            continue
        seen.add((c, col, b))
        rows.append((c, col, b))
    arr = np.array(rows, dtype=np.int16)
    prob = 1.0 / np.arange(1, clusters + 1) ** 0.8
    prob /= prob.sum()
    sigma = np.clip(np.exp(r.normal(np.log(0.6), 0.45, clusters)), 0.2, 1.6)
    return World(arr[:, 0], arr[:, 1], arr[:, 2], sigma.astype(np.float32), prob)


def max_clusters() -> int:
    total = len(V.CONCEPTS) * len(V.COLOURS) * len(V.BACKGROUNDS)
    bad = sum(len(V.CONCEPTS) for _ in V.INCOMPATIBLE)
    return total - bad


def assign_kinds(n: int, rates: dict[str, float], keys: tuple[str, ...], codes: dict[str, int],
                 r: np.random.Generator) -> np.ndarray:
    """int8 codes (0 = no defect) with exactly round(rate * n) rows per kind, randomly placed."""
    out = np.zeros(n, dtype=np.int8)
    parts = []
    for k in keys:
        rate = float(rates.get(k, 0.0))
        cnt = int(np.floor(rate * n + 0.5))
        if rate > 0 and cnt == 0 and n >= MIN_N_FOR_EVERY_KIND:
            cnt = 1
        parts.append(np.full(cnt, codes[k], dtype=np.int8))
    fill = np.concatenate(parts) if parts else np.zeros(0, np.int8)
    out[: len(fill)] = fill[:n]
    r.shuffle(out)
    return out


def hex_ids(r: np.random.Generator, m: int, nbytes: int = 16) -> list[str]:
    """m random lowercase hex strings of 2*nbytes chars, vectorised through a byte->hex table."""
    table = np.array([f"{i:02x}".encode() for i in range(256)], dtype="S2")
    raw = np.frombuffer(r.bytes(nbytes * m), dtype=np.uint8).reshape(m, nbytes)
    return np.ascontiguousarray(table[raw]).view(f"S{2 * nbytes}").ravel().astype(str).tolist()


def _sizes(r: np.random.Generator, kind: np.ndarray):
    """(orig_w, orig_h, w, h): original (pre-resize) and stored (longer side <= 512) sizes."""
    m = len(kind)
    big = r.random(m) < 0.6
    S = np.where(big, 512, r.integers(256, 513, m)).astype(np.float64)
    O = np.where(big, r.integers(513, 2401, m), S).astype(np.float64)
    rmax = np.minimum(2.5, S / 200.0)
    ratio = np.where(r.random(m) < 0.2, 1.0, 1.0 + r.random(m) * (rmax - 1.0))
    s_short = np.maximum(200, np.floor(S / ratio))
    o_short = np.maximum(s_short, np.round(O / ratio))
    portrait = r.random(m) < 0.35
    # small: min side under 200, not resized (longer side stays under 512)
    sm_short = r.integers(24, 200, m).astype(np.float64)
    sm_long = np.round(sm_short * (1.0 + r.random(m)))
    # wide: aspect ratio 3.2-6; the original's short side is >= 200, the stored one is not
    wr = 3.2 + r.random(m) * 2.8
    w_long = np.maximum(r.integers(900, 3001, m), np.ceil(200 * wr) + 1)
    w_short = np.round(w_long / wr)
    ws_short = np.maximum(1, np.round(512 / wr))
    wportrait = r.random(m) < 0.2
    small, wide = kind == IK["small"], kind == IK["wide"]
    o_long = np.where(small, sm_long, np.where(wide, w_long, O))
    o_sh = np.where(small, sm_short, np.where(wide, w_short, o_short))
    s_long = np.where(small, sm_long, np.where(wide, 512, S))
    s_sh = np.where(small, sm_short, np.where(wide, ws_short, s_short))
    por = np.where(wide, wportrait, portrait)
    ow = np.where(por, o_sh, o_long).astype(np.int32)
    oh = np.where(por, o_long, o_sh).astype(np.int32)
    w = np.where(por, s_sh, s_long).astype(np.int32)
    h = np.where(por, s_long, s_sh).astype(np.int32)
    return ow, oh, w, h


def shard_key(shard: int, i: int, shard_size: int, digits: int) -> str:
    """img2dataset's key: shard index and in-shard index, zero-padded (e.g. 00010023)."""
    oom = len(str(shard_size - 1)) if shard_size > 1 else 0
    return f"{shard * 10 ** oom + i:0{oom + digits}d}"


@dataclass
class Reservoir:
    """Records of the previous shard that later duplicates may copy (metadata + layout payload)."""
    meta: dict[str, Any] = field(default_factory=dict)   # column -> list/array, length R
    payload: Any = None                                   # wds: list of (bytes, ext, quality); datacomp: arrays

    def __len__(self) -> int:
        return len(self.meta.get("uid", ()))


class ShardPlan:
    """One shard's records. Arrays are aligned by row (= position in the shard's table)."""

    def __init__(self, *, layout: str, seed: int, shard: int, start: int, img_kind: np.ndarray,
                 cap_kind: np.ndarray, world: World, shard_size: int, digits: int, shard_name: str,
                 reservoir: Reservoir | None):
        m = len(img_kind)
        self.layout, self.shard, self.start, self.m, self.shard_name = layout, shard, start, m, shard_name
        r = rng_for(seed, _TAG_SHARD, shard)
        self.img_kind = img_kind.copy()
        self.cap_kind = cap_kind.copy()
        self.cluster = r.choice(world.k, size=m, p=world.prob).astype(np.int32)
        self.concept = world.concept[self.cluster].astype(np.int16)
        self.colour = world.colour[self.cluster].astype(np.int16)
        self.bg = world.bg[self.cluster].astype(np.int16)
        self.texture = r.integers(0, len(V.TEXTURES), m).astype(np.int16)
        self.orig_w, self.orig_h, self.w, self.h = _sizes(r, self.img_kind)
        self.quality = r.integers(70, 96, m).astype(np.int16)
        self.progressive = r.random(m) < 0.15
        u = r.random(m)
        ok = self.img_kind == IK["ok"]
        self.ext = np.where(ok & (u < 0.015), "png", np.where(ok & (u >= 0.015) & (u < 0.025), "webp", "jpg")).astype(object)
        self.uid = hex_ids(rng_for(seed, _TAG_UID, shard), m)
        self.key = [shard_key(shard, i, shard_size, digits) for i in range(m)] if layout == "wds" else [None] * m
        # duplicates: source (1 = this shard, 2 = reservoir), index there, near-dup parameters
        self.dup_src = np.zeros(m, np.int8)
        self.dup_idx = np.full(m, -1, np.int64)
        self.near_kind = np.full(m, -1, np.int8)
        self.near_scale = np.ones(m, np.float32)             # resize factor (or crop fraction)
        self.crop_box: dict[int, tuple[int, int, int, int]] = {}
        self.near_eps = np.zeros(m, np.float32)              # DataComp: embedding perturbation
        self.dup_of: list[str | None] = [None] * m
        self.dup_of_shard: list[str | None] = [None] * m
        self.dup_of_key: list[str | None] = [None] * m
        copy_caption = np.zeros(m, bool)
        self.demoted = 0
        self._plan_duplicates(r, reservoir, copy_caption)
        self.captions = C.build(r, self.cap_kind, self.concept, self.colour, self.bg, self.texture)
        self._copy_captions(copy_caption, reservoir)
        self.url = self._urls(r)

    # ---- duplicates --------------------------------------------------------------------
    def _orig(self, src: int, j: int, reservoir: Reservoir | None, col: str):
        if src == 1:
            return getattr(self, col)[j]
        return reservoir.meta[col][j]

    def _plan_duplicates(self, r: np.random.Generator, reservoir: Reservoir | None, copy_caption: np.ndarray):
        dups = np.flatnonzero((self.img_kind == IK["exact_dup"]) | (self.img_kind == IK["near_dup"]))
        if not len(dups):
            return
        ok_local = np.flatnonzero(self.img_kind == IK["ok"])
        n_res = len(reservoir) if reservoir is not None else 0
        use_res = r.random(len(dups)) < RESERVOIR_P
        pick = r.random(len(dups))
        near_pick = r.random(len(dups))
        near_u = r.random((len(dups), 4))
        copy_u = r.random(len(dups))
        for t, j in enumerate(dups):
            n_before = int(np.searchsorted(ok_local, j))
            if n_res and (use_res[t] or n_before == 0):
                src, oi = 2, int(pick[t] * n_res)
            elif n_before:
                src, oi = 1, int(ok_local[int(pick[t] * n_before)])
            else:  # nothing earlier to duplicate: this record becomes an ordinary one
                self.img_kind[j] = IK["ok"]
                self.demoted += 1
                continue
            self.dup_src[j], self.dup_idx[j] = src, oi
            for col in ("cluster", "concept", "colour", "bg", "texture"):
                getattr(self, col)[j] = self._orig(src, oi, reservoir, col)
            self.dup_of[j] = self._orig(src, oi, reservoir, "uid")
            self.dup_of_shard[j] = self.shard_name if src == 1 else reservoir.meta["shard_name"][oi]
            self.dup_of_key[j] = self._orig(src, oi, reservoir, "key")
            ow, oh = int(self._orig(src, oi, reservoir, "orig_w")), int(self._orig(src, oi, reservoir, "orig_h"))
            W, H = int(self._orig(src, oi, reservoir, "w")), int(self._orig(src, oi, reservoir, "h"))
            q = int(self._orig(src, oi, reservoir, "quality"))
            if self.cap_kind[j] == C.CLEAN and self._orig(src, oi, reservoir, "cap_kind") == C.CLEAN \
                    and copy_u[t] < COPY_CAPTION_P:
                copy_caption[j] = True
            if self.img_kind[j] == IK["exact_dup"]:
                self.orig_w[j], self.orig_h[j], self.w[j], self.h[j] = ow, oh, W, H
                self.quality[j] = q
                self.ext[j] = self._orig(src, oi, reservoir, "ext")
                continue
            # near duplicate: a kind that keeps the copy an ordinary image (min side >= 200, aspect <= 3)
            base_w, base_h = (W, H) if self.layout == "wds" else (ow, oh)
            short = min(base_w, base_h)
            feasible = [0, 3] + ([1] if short * 0.85 >= 200 else []) + ([2] if short * 0.92 >= 200 else [])
            feasible.sort()
            nk = feasible[int(near_pick[t] * len(feasible))]
            self.near_kind[j] = nk
            uq = near_u[t]
            self.orig_w[j], self.orig_h[j], self.w[j], self.h[j] = ow, oh, W, H
            if NEAR_KINDS[nk] == "reencode":
                self.quality[j] = int(35 + uq[0] * 25) if q >= 75 else int(88 + uq[0] * 7)
                self.near_eps[j] = 0.06 + 0.06 * uq[1]
            elif NEAR_KINDS[nk] == "flip":
                self.quality[j] = q
                self.near_eps[j] = 0.15 + 0.1 * uq[1]
            elif NEAR_KINDS[nk] == "resize":
                s = float(max(0.55, 200.0 / short) + uq[0] * (0.85 - max(0.55, 200.0 / short)))
                nw, nh = max(1, round(base_w * s)), max(1, round(base_h * s))
                if min(nw, nh) < 200:
                    nw, nh = (max(nw, 200), nh) if nw < nh else (nw, max(nh, 200))
                self.near_scale[j] = s
                self._set_near_size(j, nw, nh)
                self.near_eps[j] = 0.08 + 0.08 * uq[1]
            else:  # crop
                lo_x, lo_y = max(0.8, 200.0 / base_w), max(0.8, 200.0 / base_h)
                fx = lo_x + uq[0] * max(0.0, 0.92 - lo_x)
                fy = lo_y + uq[1] * max(0.0, 0.92 - lo_y)
                cw, ch = max(200, round(base_w * fx)), max(200, round(base_h * fy))
                cw, ch = min(cw, base_w), min(ch, base_h)
                x0 = int(uq[2] * (base_w - cw + 1))
                y0 = int(uq[3] * (base_h - ch + 1))
                self.crop_box[int(j)] = (x0, y0, x0 + cw, y0 + ch)
                self.near_scale[j] = fx * fy
                self._set_near_size(j, cw, ch)
                self.near_eps[j] = 0.18 + 0.1 * uq[1]

    def _set_near_size(self, j: int, nw: int, nh: int) -> None:
        if self.layout == "wds":   # a smaller copy of the stored image: its own original size
            self.w[j], self.h[j] = nw, nh
            self.orig_w[j], self.orig_h[j] = nw, nh
        else:
            self.orig_w[j], self.orig_h[j] = nw, nh

    def _copy_captions(self, copy_caption: np.ndarray, reservoir: Reservoir | None) -> None:
        cap = self.captions
        for j in np.flatnonzero(copy_caption):
            src, oi = int(self.dup_src[j]), int(self.dup_idx[j])
            if src == 1:
                text = cap.text[oi]
                content = (cap.cap_concept[oi], cap.cap_colour[oi], cap.cap_bg[oi])
            else:
                text = reservoir.meta["caption"][oi]
                content = reservoir.meta["cap_content"][oi]
            cap.text[j] = text
            cap.kind[j], cap.lang[j] = "clean", "en"
            cap.cap_concept[j], cap.cap_colour[j], cap.cap_bg[j] = content
            cap.lang_idx[j], cap.junk_idx[j] = 0, -1

    # ---- urls ----------------------------------------------------------------------------
    def _urls(self, r: np.random.Generator) -> list[str]:
        host = r.integers(0, len(V.URL_HOSTS), self.m)
        pat = r.integers(0, 3, self.m)
        num = r.integers(1000, 99999, self.m)
        out = []
        for i in range(self.m):
            uid, ext = self.uid[i], self.ext[i]
            if pat[i] == 0:
                path = f"{V.COLOURS[self.colour[i]]}-{V.CONCEPTS[self.concept[i]]}-{uid[:10]}.{ext}"
            elif pat[i] == 1:
                path = f"{2015 + num[i] % 10}/{1 + num[i] % 12:02d}/IMG_{num[i]}_{uid[:6]}.{ext}"
            else:
                path = f"{uid[:2]}/{uid[2:4]}/{uid[4:20]}.{ext}"
            out.append(f"{V.URL_HOSTS[host[i]]}/{path}")
        return out

    # ---- derived columns -------------------------------------------------------------------
    @property
    def matched(self) -> np.ndarray:
        return (self.cap_kind == C.CLEAN) | (self.cap_kind == C.NON_ENGLISH)

    def image_kind_names(self) -> list[str]:
        out = []
        for k, nk in zip(self.img_kind.tolist(), self.near_kind.tolist()):
            out.append(f"near_dup:{NEAR_KINDS[nk]}" if k == IK["near_dup"] else IMAGE_KINDS[k])
        return out

    def reservoir(self, payload_rows) -> Reservoir:
        """The first RESERVOIR ok records of this shard, for the next shard's duplicates.

        `payload_rows(indices)` returns the layout's payload for those rows."""
        idx = np.flatnonzero(self.img_kind == IK["ok"])[:RESERVOIR]
        cap = self.captions
        meta = {
            "uid": [self.uid[i] for i in idx], "key": [self.key[i] for i in idx],
            "shard_name": [self.shard_name] * len(idx),
            "cluster": self.cluster[idx], "concept": self.concept[idx], "colour": self.colour[idx],
            "bg": self.bg[idx], "texture": self.texture[idx], "orig_w": self.orig_w[idx],
            "orig_h": self.orig_h[idx], "w": self.w[idx], "h": self.h[idx], "quality": self.quality[idx],
            "ext": self.ext[idx],
            "cap_kind": self.cap_kind[idx], "caption": [cap.text[i] for i in idx],
            "cap_content": [(cap.cap_concept[i], cap.cap_colour[i], cap.cap_bg[i]) for i in idx],
        }
        return Reservoir(meta=meta, payload=payload_rows(idx))
