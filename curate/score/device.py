"""Devices for scoring: `--device` parsing, precision, batch-size back-off, GPU fan-out.

- `resolve_device("auto"|"cpu"|"cuda"|"cuda:N"|"mps")` → torch.device, one clear UsageError
  when the device does not exist.
- CUDA runs under autocast (bf16 where supported, else fp16); CPU runs fp32 (CPU autocast is
  slower than fp32 for these models and would change the scores).
- `AdaptiveBatchSize` runs work in chunks and halves the chunk on CUDA out-of-memory, retrying the
  same rows and remembering the smaller size. The OOM exception types are injectable, so the
  logic is tested on CPU with a callable that raises above a size.
- `partition_shards` splits shard ids over devices for one process per visible GPU.
"""

from __future__ import annotations

import contextlib
import gc
import os
from typing import Callable, Iterable, Optional, Sequence, TypeVar

import torch

from ..errors import CurateError, UsageError

T = TypeVar("T")

_OOM_TYPES: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError,)


def cuda_device_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def visible_gpus() -> list[str]:
    """['cuda:0', 'cuda:1', ...] for the GPUs this process sees (after CUDA_VISIBLE_DEVICES)."""
    return [f"cuda:{i}" for i in range(cuda_device_count())]


def _no_cuda_message(asked: str) -> str:
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    why = f"CUDA_VISIBLE_DEVICES={cvd!r}" if cvd is not None else (
        "this torch build has no CUDA" if torch.version.cuda is None else "no NVIDIA GPU/driver is visible")
    return f"--device {asked}: no CUDA GPU is available ({why}); use --device cpu or --device auto"


def resolve_device(text: str | torch.device | None = "auto") -> torch.device:
    """Parse --device. auto → cuda:0 if a GPU is visible, else cpu."""
    if isinstance(text, torch.device):
        text = str(text)
    t = (text or "auto").strip().lower()
    if t == "auto":
        return torch.device("cuda:0") if cuda_device_count() else torch.device("cpu")
    if t == "cpu":
        return torch.device("cpu")
    if t == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UsageError("--device mps: Apple MPS is not available here; use --device cpu")
        return torch.device("mps")
    if t == "cuda" or t.startswith("cuda:"):
        index = 0
        if t.startswith("cuda:"):
            try:
                index = int(t.split(":", 1)[1])
            except ValueError:
                raise UsageError(f"--device {text!r}: expected cuda:N with N a GPU index") from None
        n = cuda_device_count()
        if n == 0:
            raise UsageError(_no_cuda_message(str(text)))
        if not 0 <= index < n:
            raise UsageError(f"--device {text}: only {n} GPU(s) visible (cuda:0..cuda:{n - 1})")
        return torch.device(f"cuda:{index}")
    raise UsageError(f"--device {text!r}: expected auto, cpu, cuda or cuda:N")


def worker_devices(text: str | None = "auto") -> list[torch.device]:
    """Devices to fan out over: every visible GPU for `auto`/`cuda` with several GPUs; each of a
    comma list (`cuda:0,cuda:1`; `cpu,cpu` runs the multi-device path on the CPU); else one."""
    t = (text or "auto").strip().lower()
    if "," in t:
        devs = [resolve_device(x) for x in t.split(",") if x.strip()]
        cuda = [d for d in devs if d.type == "cuda"]
        if len(set(cuda)) != len(cuda):
            raise UsageError(f"--device {text!r}: a GPU is named twice")
        if not devs:
            raise UsageError(f"--device {text!r}: no device named")
        return devs
    if t in ("auto", "cuda") and cuda_device_count() > 1:
        return [torch.device(d) for d in visible_gpus()]
    return [resolve_device(text)]


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """bf16 on GPUs that support it, fp16 on older GPUs, None (fp32) elsewhere."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


def precision_name(device: torch.device) -> str:
    dt = autocast_dtype(device)
    return {torch.bfloat16: "amp_bf16", torch.float16: "amp_fp16"}.get(dt, "fp32")


def autocast(device: torch.device):
    """The autocast context for inference on `device` (a no-op on CPU)."""
    dt = autocast_dtype(device)
    if dt is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dt)


def free_device_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def suggest_batch_size(device: torch.device, *, image_tokens: int, width: int, cap: int = 1024) -> int:
    """A starting chunk size; AdaptiveBatchSize backs off from it on OOM.

    Inference keeps roughly one block's activations alive: tokens × width × (4 MLP + ~4 other)
    values in 2 bytes under autocast; ×2 for allocator slack. CPU: chunks only bound memory."""
    if device.type != "cuda":
        return min(cap, 64)
    free, _total = torch.cuda.mem_get_info(device)
    per_sample = max(1, image_tokens * width * 8 * 2 * 2)
    n = int(free * 0.5 // per_sample)
    return max(1, min(cap, 1 << max(0, n.bit_length() - 1)))  # a power of two


class AdaptiveBatchSize:
    """Run `fn(start, end)` over [0, n) in chunks; on out-of-memory halve the chunk and retry it.

    The reduced size is kept for later calls (the model and inputs do not change shape). Below
    `minimum` the OOM becomes a CurateError naming the size that failed.
    """

    def __init__(self, initial: int, *, minimum: int = 1,
                 oom_types: tuple[type[BaseException], ...] = _OOM_TYPES,
                 on_oom: Callable[[], None] | None = None, label: str = ""):
        if initial < 1:
            raise ValueError("initial batch size must be >= 1")
        self.size = int(initial)
        self.minimum = max(1, int(minimum))
        self.oom_types = oom_types
        self.on_oom = on_oom
        self.label = label
        self.backoffs: list[int] = []   # the sizes that ran out of memory

    def map(self, fn: Callable[[int, int], T], n: int) -> list[T]:
        out: list[T] = []
        start = 0
        while start < n:
            size = min(self.size, n - start)
            oom = False
            try:
                out.append(fn(start, start + size))
            except self.oom_types as exc:
                if size <= self.minimum:
                    raise CurateError(
                        f"out of device memory{' in ' + self.label if self.label else ''} even at batch size "
                        f"{size}: use a smaller model, another GPU, or --device cpu") from exc
                oom = True
            if oom:  # outside the except block, so the exception's frames (and tensors) are freed
                self.backoffs.append(size)
                self.size = max(self.minimum, size // 2)
                if self.on_oom is not None:
                    self.on_oom()
                continue
            start += size
        return out


def partition_shards(shard_ids: Iterable[int], n_parts: int,
                     weights: Optional[Sequence[float]] = None) -> list[list[int]]:
    """Split shard ids into n_parts disjoint lists covering all of them, deterministically.

    With weights (e.g. samples per shard), greedy longest-first onto the lightest part keeps the
    parts' totals within one shard of each other; without, shards are dealt round-robin in id
    order. Each part is returned sorted."""
    ids = list(shard_ids)
    if n_parts < 1:
        raise ValueError("n_parts must be >= 1")
    if len(set(ids)) != len(ids):
        raise ValueError("shard ids must be unique")
    parts: list[list[int]] = [[] for _ in range(n_parts)]
    if weights is None:
        for i, sid in enumerate(sorted(ids)):
            parts[i % n_parts].append(sid)
    else:
        if len(weights) != len(ids):
            raise ValueError("weights must have one value per shard id")
        loads = [0.0] * n_parts
        for sid, w in sorted(zip(ids, weights), key=lambda t: (-float(t[1]), t[0])):
            j = min(range(n_parts), key=lambda k: (loads[k], k))
            parts[j].append(sid)
            loads[j] += float(w)
    return [sorted(p) for p in parts]
