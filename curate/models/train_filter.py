"""Train or fine-tune an open_clip model as a data filtering network (DFN, Fang et al. 2023).

A DFN is a CLIP model used as a filter: what matters is the quality of the data it is trained
on, not its own accuracy. So the input is a trusted, high-quality image-text set (webdataset
shards, or the samples a prune run kept), and the output is a checkpoint that
`curate score --model OUT/filter.pt` loads (the architecture is read from `OUT/params.txt`, in
open_clip_train's format).

The loop is plain contrastive training with open_clip's ClipLoss. Images are decoded and
resized once with the scorer's own preprocessing (`SampleCollator`) and kept in memory as uint8,
so every epoch reuses them; a set too large for `max_memory_gb` is refused with a pointer to
open_clip_train on exported shards. Training stops at `epochs` or `max_minutes`, whichever comes
first, and always leaves a checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .. import console
from ..errors import UsageError
from ..score.preprocess import normalize_batch
from ..score.runner import read_member
from ..workspace import atomic_path


@dataclass
class TrustedSample:
    path: str
    offset: int
    end: int
    ext: str
    caption: str


def samples_from_shards(sources: list[str]) -> list[TrustedSample]:
    from ..sources.detect import expand_sources
    from ..sources.wds import read_wds_shard

    out = []
    for unit in expand_sources(sources, "wds"):
        shard = read_wds_shard(unit.path)
        out.extend(TrustedSample(str(unit.path), r.tar_offset, r.tar_end, r.image_ext, r.caption)
                   for r in shard.records if r.caption and r.caption.strip())
    return out


def samples_from_workspace(manifest, run_id: int | None, stage) -> list[TrustedSample]:
    from ..selection import kept_uids

    sql = ("SELECT sh.path, s.tar_offset, s.tar_end, s.image_ext, s.caption FROM samples s "
           "JOIN shards sh ON sh.shard_id = s.img_shard_id WHERE s.status = 'ok' AND s.image_ext IS NOT NULL "
           "AND s.caption IS NOT NULL AND trim(s.caption) <> ''")
    if run_id is not None or stage is not None:
        _, _, kept = kept_uids(manifest, run_id, stage)
        manifest.con.register("_kept", kept.to_arrow())
        try:
            rows = manifest.execute(sql + " AND s.uid IN (SELECT uid FROM _kept) ORDER BY s.img_shard_id, s.img_row").fetchall()
        finally:
            manifest.con.unregister("_kept")
    else:
        rows = manifest.execute(sql + " ORDER BY s.img_shard_id, s.img_row").fetchall()
    return [TrustedSample(*r) for r in rows]


def _collate_all(samples: list[TrustedSample], collator, batch: int = 256):
    """Decode + preprocess + tokenise every sample once: uint8 images and tokens of the ok rows."""
    imgs, toks = [], []
    from ..export.tario import Source

    handles: dict[str, Source] = {}  # reads compressed shards too (their offsets are in the inflated stream)
    with console.progress() as bar:
        task = bar.add_task("decode trusted set", total=len(samples))
        for start in range(0, len(samples), batch):
            chunk = samples[start:start + batch]
            items = []
            for s in chunk:
                fh = handles.get(s.path) or handles.setdefault(s.path, Source(s.path))
                items.append((None, read_member(fh, s.offset, s.end, s.ext), s.caption))
            pb = collator(items)
            (gkey,) = pb.images.keys()
            (tkey,) = pb.tokens.keys()
            imgs.append(pb.images[gkey])
            toks.append(pb.tokens[tkey][torch.from_numpy(pb.ok)])
            bar.advance(task, len(chunk))
    for fh in handles.values():
        fh.close()
    return torch.cat(imgs), torch.cat(toks)


def train_filter(samples: list[TrustedSample], out_dir: Path, *, arch: str | None, init: str | None,
                 epochs: int, max_minutes: float, batch_size: int, lr: float, weight_decay: float,
                 warmup: int, seed: int, val_fraction: float, cache_dir=None, threads: int | None = None,
                 max_memory_gb: float = 8.0, device: str = "auto") -> dict:
    import contextlib

    import open_clip

    from ..score.device import resolve_device

    from ..models.loader import load_model
    from ..models.specs import ensure_configs_registered, parse_spec
    from ..score.preprocess import PreprocessConfig, SampleCollator

    if len(samples) < 2 * batch_size:
        raise UsageError(f"the trusted set has {len(samples)} usable samples; contrastive training needs at "
                         f"least two batches ({2 * batch_size}); lower --batch-size or add data")
    ensure_configs_registered()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    if init:
        loaded = load_model(parse_spec(init), "cpu", cache_dir=cache_dir)
        model, tokenizer, pp = loaded.model, loaded.tokenizer, loaded.preprocess
        arch_name = loaded.spec.arch
    else:
        if arch not in open_clip.list_models():
            raise UsageError(f"unknown architecture {arch!r}; e.g. curate-tiny-vit, ViT-B-32 (open_clip.list_models())")
        from .loader import _quiet_open_clip

        with _quiet_open_clip():  # "no pretrained weights loaded": training from scratch is the point
            model = open_clip.create_model(arch, pretrained=None)
        tokenizer = open_clip.get_tokenizer(arch)
        pp = PreprocessConfig.from_open_clip(dict(model.visual.preprocess_cfg))
        arch_name = arch
    collator = SampleCollator([pp.geometry], {"tok": tokenizer})
    h, w = pp.geometry.size
    need_gb = len(samples) * h * w * 3 / 2**30
    if need_gb > max_memory_gb:
        raise UsageError(f"the trusted set needs {need_gb:.1f} GB decoded at {h}x{w} (limit {max_memory_gb} GB); "
                         f"export it (`curate export`) and train with open_clip_train, whose checkpoints "
                         f"`curate score --model` loads the same way")
    t0 = time.perf_counter()
    images, tokens = _collate_all(samples, collator)
    n = images.shape[0]
    order = rng.permutation(n)
    n_val = min(max(int(n * val_fraction), batch_size if val_fraction > 0 else 0), n // 4)
    val_idx, train_idx = order[:n_val], order[n_val:]
    decode_s = time.perf_counter() - t0

    # One core stays free for the OS and I/O: oversubscribed BLAS threads are many times slower.
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 2) - 1))
    dev = resolve_device(device)
    model.to(dev)
    # bf16 autocast on GPUs that have it (no loss scaling needed); fp32 elsewhere
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) \
        if dev.type == "cuda" and torch.cuda.is_bf16_supported() else contextlib.nullcontext
    model.train()
    decay = [p for nme, p in model.named_parameters() if p.ndim >= 2 and "logit_scale" not in nme]
    no_decay = [p for nme, p in model.named_parameters() if p.ndim < 2 or "logit_scale" in nme]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98), eps=1e-6)
    steps_per_epoch = max(1, len(train_idx) // batch_size)
    total_steps = steps_per_epoch * epochs
    loss_fn = open_clip.ClipLoss()
    mean, std = pp.mean, pp.std

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        prog = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * lr * (1 + math.cos(math.pi * min(1.0, prog)))

    deadline = time.perf_counter() + max_minutes * 60
    step, history, stopped = 0, [], "epochs"
    train_t0 = time.perf_counter()
    with console.progress() as bar:
        task = bar.add_task("train filter", total=total_steps)
        for epoch in range(epochs):
            perm = train_idx[rng.permutation(len(train_idx))]
            losses = []
            for b in range(steps_per_epoch):
                idx = torch.from_numpy(perm[b * batch_size:(b + 1) * batch_size])
                for g in opt.param_groups:
                    g["lr"] = lr_at(step)
                img = normalize_batch(images[idx].to(dev, non_blocking=True), mean, std)
                with amp():
                    img_f = model.encode_image(img, normalize=True)
                    txt_f = model.encode_text(tokens[idx].to(dev, non_blocking=True), normalize=True)
                    loss = loss_fn(img_f.float(), txt_f.float(), model.logit_scale.exp())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    model.logit_scale.clamp_(0, math.log(100))
                losses.append(loss.item())
                step += 1
                bar.advance(task)
                if time.perf_counter() > deadline:
                    stopped = "time"
                    break
            history.append({"epoch": epoch, "loss": float(np.mean(losses)) if losses else None})
            if stopped == "time":
                break
    train_s = time.perf_counter() - train_t0
    val = _val_accuracy(model, images, tokens, val_idx, mean, std, batch_size, dev) if n_val else None
    model.to("cpu")

    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = out_dir / "filter.pt"
    with atomic_path(ckpt, suffix=".pt") as tmp:
        torch.save({"state_dict": model.state_dict(), "epoch": len(history), "name": "curate-train-filter"}, tmp)
    params = {"model": arch_name, "init": init or "", "epochs_done": len(history), "steps": step,
              "batch_size": batch_size, "lr": lr, "wd": weight_decay, "warmup": warmup, "seed": seed,
              "train_samples": int(len(train_idx)), "val_samples": int(n_val)}
    with atomic_path(out_dir / "params.txt") as tmp:
        tmp.write_text("".join(f"{k}: {v}\n" for k, v in params.items()))
    summary = {"checkpoint": str(ckpt), "arch": arch_name, "device": str(dev), "samples": len(samples),
               "decoded": int(n),
               "train_samples": int(len(train_idx)), "val_samples": int(n_val), "epochs_done": len(history),
               "steps": step, "stopped_by": stopped, "decode_s": round(decode_s, 1), "train_s": round(train_s, 1),
               "samples_per_s": round(step * batch_size / train_s, 1) if train_s else None,
               "first_loss": history[0]["loss"] if history else None,
               "last_loss": history[-1]["loss"] if history else None,
               "val_image_to_text_top1": val,
               "score_with": f"curate score --model {ckpt}"}
    with atomic_path(out_dir / "train_log.json") as tmp:
        tmp.write_text(json.dumps({"summary": summary, "history": history}, indent=2))
    return summary


@torch.no_grad()
def _val_accuracy(model, images, tokens, idx, mean, std, batch_size, dev=torch.device("cpu")) -> float:
    """Image→text top-1 within held-out batches (chance = 1 / batch size)."""
    model.eval()
    hits = total = 0
    for start in range(0, len(idx) - batch_size + 1, batch_size):
        b = torch.from_numpy(idx[start:start + batch_size])
        i = model.encode_image(normalize_batch(images[b].to(dev), mean, std), normalize=True).float()
        t = model.encode_text(tokens[b].to(dev), normalize=True).float()
        pred = (i @ t.T).argmax(1).cpu()
        hits += int((pred == torch.arange(len(b))).sum())
        total += len(b)
    model.train()
    return round(hits / total, 4) if total else None
