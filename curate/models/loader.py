"""`ModelSpec` → a loaded open_clip model, its preprocessing and tokenizer.

Weights come from the Hugging Face cache (open_clip downloads its tags and hf-hub models there:
`$HF_HOME/hub`, default ~/.cache/huggingface/hub, or `cache_dir`/--cache-dir), from open_clip's
URL cache (~/.cache/clip) for the few URL-only tags, or from a local file.

Offline behaviour. Before loading, the files a spec needs are looked up in the cache:
- all cached → loaded with the hub in offline mode: no network request at all, so a cached model
  loads the same way with or without a network (and never waits on a timeout);
- something missing and the hub unreachable (HF_HUB_OFFLINE=1, or a 3 s connection probe fails)
  → one UsageError naming the cache directory and the command that pre-fetches the files on a
  connected machine. huggingface_hub alone would retry for ~25 s per file before failing;
- something missing and the hub reachable → open_clip downloads as usual.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional
from urllib.parse import urlparse

import torch

from ..errors import CurateError, UsageError
from ..score.preprocess import PreprocessConfig, tokenizer_key
from .specs import ModelSpec, ensure_configs_registered, parse_spec

HF_WEIGHTS = "open_clip_pytorch_model.bin"
HF_SAFE_WEIGHTS = "open_clip_model.safetensors"
HF_CONFIG = "open_clip_config.json"
PROBE_TIMEOUT_S = 3.0


@dataclass
class LoadedModel:
    spec: ModelSpec
    model: torch.nn.Module              # eval mode, fp32 weights, on `device`
    preprocess: PreprocessConfig
    tokenizer: Any                      # callable: list[str] → LongTensor (n, context_length)
    embed_dim: int
    image_size: tuple[int, int]         # (height, width)
    context_length: int
    device: torch.device
    weights: Optional[str] = None       # the file the weights came from

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def tokenizer_key(self) -> str:
        return tokenizer_key(self.tokenizer)

    def describe(self) -> dict[str, Any]:
        """What the runner stores in scorers.params."""
        return dict(spec=self.spec.canonical, kind=self.spec.kind, arch=self.spec.arch,
                    pretrained=self.spec.pretrained, hub_id=self.spec.hub_id, path=self.spec.path,
                    config=self.spec.config, force_quick_gelu=self.spec.force_quick_gelu,
                    quick_gelu=_uses_quick_gelu(self.model), embed_dim=self.embed_dim,
                    context_length=self.context_length, preprocess=self.preprocess.describe(),
                    weights=self.weights, notes=list(self.spec.notes))


# ---- cache lookup ---------------------------------------------------------------------

@dataclass(frozen=True)
class NeededFile:
    """One file a spec needs. `alternatives` are interchangeable (safetensors or bin weights)."""

    repo: Optional[str]              # hub repo id, or None for a URL
    alternatives: tuple[str, ...]    # file names in the repo, or the URL
    what: str                        # 'weights' | 'config'


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> str:
    if cache_dir:
        return str(cache_dir)
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def url_cache_dir(cache_dir: str | os.PathLike | None = None) -> str:
    return str(cache_dir) if cache_dir else os.path.expanduser("~/.cache/clip")


def _pretrained_cfg(spec: ModelSpec) -> dict:
    from open_clip.pretrained import get_pretrained_cfg

    return get_pretrained_cfg(spec.arch, spec.pretrained) if spec.kind == "open_clip" else {}


def needed_files(spec: ModelSpec) -> list[NeededFile]:
    """The downloadable files behind a spec (empty for local checkpoints and directories)."""
    if spec.kind == "hf_hub":
        return [NeededFile(spec.hub_id, (HF_CONFIG,), "config"),
                NeededFile(spec.hub_id, (HF_SAFE_WEIGHTS, HF_WEIGHTS), "weights")]
    if spec.kind == "open_clip":
        cfg = _pretrained_cfg(spec)
        hub = cfg.get("hf_hub", "")
        if hub:
            # open_clip's convention: 'org/repo/' means the default weights file, else 'org/repo/file'
            repo, filename = os.path.split(hub)
            filename = filename or HF_WEIGHTS
            alts = [filename]
            if filename == HF_WEIGHTS:
                alts.insert(0, HF_SAFE_WEIGHTS)
            elif filename.endswith((".bin", ".pth")):
                alts.insert(0, filename[:-4] + ".safetensors")
            return [NeededFile(repo, tuple(alts), "weights")]
        if cfg.get("url"):
            return [NeededFile(None, (cfg["url"],), "weights")]
    return []


def _cached_path(f: NeededFile, cache_dir) -> Optional[str]:
    if f.repo is None:
        p = os.path.join(url_cache_dir(cache_dir), os.path.basename(urlparse(f.alternatives[0]).path))
        return p if os.path.isfile(p) else None
    from huggingface_hub import try_to_load_from_cache

    for name in f.alternatives:
        p = try_to_load_from_cache(f.repo, name, cache_dir=hub_cache_dir(cache_dir))
        if isinstance(p, str) and os.path.isfile(p):
            return p
    return None


def missing_files(spec: ModelSpec, cache_dir=None) -> list[NeededFile]:
    return [f for f in needed_files(spec) if _cached_path(f, cache_dir) is None]


def prefetch_command(spec: ModelSpec) -> str:
    """A command that fills the cache for `spec` on a machine with network access."""
    if spec.kind == "open_clip":
        qg = ", force_quick_gelu=True" if spec.force_quick_gelu else ""
        return (f"python -c \"import open_clip; open_clip.create_model('{spec.arch}', "
                f"pretrained='{spec.pretrained}'{qg})\"")
    if spec.kind == "hf_hub":
        return f"hf download {spec.hub_id} {HF_CONFIG} {HF_WEIGHTS}"
    return ""


# ---- network --------------------------------------------------------------------------

_probe_cache: dict[str, bool] = {}


def _probe_target() -> tuple[str, int]:
    proxy = next((os.environ[k] for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy") if os.environ.get(k)), None)
    if proxy:
        u = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        return u.hostname or "localhost", u.port or 8080
    from huggingface_hub import constants

    u = urlparse(constants.ENDPOINT)
    return u.hostname or "huggingface.co", u.port or (443 if u.scheme == "https" else 80)


def hub_offline_forced() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Can we open a TCP connection to the hub (or the proxy)? Bounded by `timeout`, DNS included."""
    if hub_offline_forced():
        return False
    host, port = _probe_target()
    key = f"{host}:{port}"
    if key in _probe_cache:
        return _probe_cache[key]
    result = {"ok": False}

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result["ok"] = True
        except OSError:
            pass

    t = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    t.start()
    t.join(timeout + 0.5)
    _probe_cache[key] = result["ok"]
    return result["ok"]


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """huggingface_hub offline mode for the duration: cache hits only, no requests."""
    from huggingface_hub import constants

    old_const, old_env = constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = old_const
        if old_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old_env


def _not_cached_error(spec: ModelSpec, missing: list[NeededFile], cache_dir, reason: str) -> UsageError:
    first = missing[0]
    where = url_cache_dir(cache_dir) if first.repo is None else hub_cache_dir(cache_dir)
    what = ", ".join(f"{f.repo}/{f.alternatives[-1]}" if f.repo else f.alternatives[0] for f in missing)
    cmd = prefetch_command(spec)
    return UsageError(
        f"model {spec.text!r} is not in the cache ({what} missing under {where}) and {reason}; "
        f"on a connected machine run `{cmd}` (with the same HF_HOME, or --cache-dir), then copy the cache "
        f"directory here, or point HF_HOME / --cache-dir at a copy")


# ---- loading --------------------------------------------------------------------------

class _DropRandomInitWarning(logging.Filter):
    # open_clip logs "No pretrained weights loaded ... initialized randomly" on the root logger when
    # we create an architecture to load a local checkpoint into; that message would mislead.
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[list]:
    root = logging.getLogger()
    flt = _DropRandomInitWarning()
    root.addFilter(flt)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield caught
    finally:
        root.removeFilter(flt)


def _raise_on_quickgelu_mismatch(caught: list, spec: ModelSpec) -> None:
    for w in caught:
        # open_clip also warns when a tag merely omits quick_gelu for a QuickGELU architecture;
        # only "QuickGELU weights in a GELU model" is the silent-wrong-scores case
        if "QuickGELU mismatch" in str(w.message) and "(quick_gelu=False) and pretrained" in str(w.message):
            raise CurateError(f"{spec.text}: {w.message} — refusing to score with the wrong activation")


def _uses_quick_gelu(model: torch.nn.Module) -> bool:
    from open_clip.transformer import QuickGELU

    return any(isinstance(m, QuickGELU) for m in model.modules())


def _force_preprocess(spec: ModelSpec, base: dict | None = None) -> dict:
    out = dict(base or {})
    out.update({k: (list(v) if isinstance(v, tuple) else v) for k, v in spec.preprocess})
    return out


_STRIP_PREFIXES = ("module.", "_orig_mod.")


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A checkpoint file → flat state dict. `torch.load(weights_only=True)` (no pickled code);
    unwraps open_clip_train's {"state_dict": ...} and strips DDP "module." / torch.compile
    "_orig_mod." prefixes."""
    path = str(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            obj: Any = load_file(path, device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for pickled objects, RuntimeError for bad zips, ...
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"cannot load checkpoint {path} with weights_only=True: {msg[:300]}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "module"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UsageError(f"{path} does not hold a state dict of tensors (or one under 'state_dict')")
    out = {}
    for k, v in obj.items():
        changed = True
        while changed:
            changed = False
            for p in _STRIP_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p):], True
        out[k] = v
    return out


def _load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], spec: ModelSpec) -> None:
    from open_clip.convert import convert_state_dict
    from open_clip.model import convert_to_custom_text_state_dict

    sd = convert_state_dict(model, sd)
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    for key in ("logit_scale", "logit_bias"):
        cur = getattr(model, key, None)
        if key in sd and isinstance(cur, torch.Tensor) and sd[key].ndim != cur.ndim:
            sd[key] = sd[key].reshape(cur.shape)
    if "logit_bias" not in sd and getattr(model, "logit_bias", None) is not None:
        sd["logit_bias"] = torch.zeros_like(model.logit_bias)
    sd.pop("text.transformer.embeddings.position_ids", None)
    # No resize_pos_embed here (open_clip's loader interpolates position embeddings to a new
    # resolution): a scorer must run at the resolution it was trained at, so a size mismatch errors.
    target = spec.config or spec.arch
    try:
        res = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc).splitlines()[0])
        raise UsageError(f"checkpoint {spec.path} does not fit {target}: {first[:300]}") from None
    if res.missing_keys or res.unexpected_keys:
        parts = []
        if res.missing_keys:
            parts.append(f"{len(res.missing_keys)} missing (e.g. {', '.join(res.missing_keys[:3])})")
        if res.unexpected_keys:
            parts.append(f"{len(res.unexpected_keys)} unexpected (e.g. {', '.join(res.unexpected_keys[:3])})")
        raise UsageError(f"checkpoint {spec.path} does not fit {target}: keys {'; '.join(parts)}")


_custom_configs: dict[str, str] = {}
_custom_dir: Optional[tempfile.TemporaryDirectory] = None


def _register_custom_config(config_path: str) -> str:
    """Register a custom model-config JSON with open_clip under a name that cannot shadow a
    built-in (curate-custom-<hash>), and return that name."""
    import hashlib
    import json

    import open_clip

    from .specs import _load_config_json

    global _custom_dir
    model_cfg, _ = _load_config_json(Path(config_path))
    blob = json.dumps(model_cfg, sort_keys=True)
    name = f"curate-custom-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
    if name not in _custom_configs:
        if _custom_dir is None:
            _custom_dir = tempfile.TemporaryDirectory(prefix="curate-model-configs-")
        (Path(_custom_dir.name) / f"{name}.json").write_text(blob)
        open_clip.add_model_config(Path(_custom_dir.name) / f"{name}.json")
        _custom_configs[name] = config_path
    return name


def _weights_path(spec: ModelSpec, cache_dir) -> Optional[str]:
    for f in needed_files(spec):
        if f.what == "weights":
            return _cached_path(f, cache_dir)
    return None


def _create(spec: ModelSpec, device: torch.device, cache_dir) -> tuple[torch.nn.Module, Any, Optional[str]]:
    import open_clip

    ensure_configs_registered()
    with _quiet_open_clip() as caught:
        if spec.kind == "open_clip":
            model = open_clip.create_model_from_pretrained(
                spec.arch, pretrained=spec.pretrained, device="cpu", precision="fp32",
                force_quick_gelu=spec.force_quick_gelu, cache_dir=cache_dir, return_transform=False,
                **{f"image_{k}": v for k, v in spec.preprocess})
            tokenizer = open_clip.get_tokenizer(spec.arch, cache_dir=cache_dir)
            weights = _weights_path(spec, cache_dir)
        elif spec.kind in ("hf_hub", "local_dir"):
            name = f"hf-hub:{spec.hub_id}" if spec.kind == "hf_hub" else f"local-dir:{spec.path}"
            model = open_clip.create_model_from_pretrained(
                name, device="cpu", precision="fp32", force_quick_gelu=spec.force_quick_gelu,
                cache_dir=cache_dir, return_transform=False,
                **{f"image_{k}": v for k, v in spec.preprocess})
            tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir)
            weights = _weights_path(spec, cache_dir) or spec.path
        else:  # local checkpoint: build the architecture, then load the file ourselves
            arch = _register_custom_config(spec.config) if spec.config else spec.arch
            force_pp = {}
            if spec.config:
                from .specs import _load_config_json

                force_pp = _load_config_json(Path(spec.config))[1]
            model = open_clip.create_model(
                arch, pretrained=None, device="cpu", precision="fp32",
                force_quick_gelu=spec.force_quick_gelu,
                force_preprocess_cfg=_force_preprocess(spec, force_pp) or None)
            _load_into(model, load_state_dict_file(spec.path), spec)
            tokenizer = open_clip.get_tokenizer(arch)
            weights = spec.path
    _raise_on_quickgelu_mismatch(caught, spec)
    model.eval()
    model.to(device)
    return model, tokenizer, weights


def check_available(spec: ModelSpec, cache_dir=None) -> list[NeededFile]:
    """The spec's files missing from the cache; raises the one-line UsageError when they are
    missing and cannot be downloaded (offline). Fast: a cache lookup and at most one 3 s probe."""
    missing = missing_files(spec, cache_dir)
    if missing:
        if hub_offline_forced():
            raise _not_cached_error(spec, missing, cache_dir, "HF_HUB_OFFLINE is set")
        if not hub_reachable():
            host, port = _probe_target()
            raise _not_cached_error(spec, missing, cache_dir, f"there is no network ({host}:{port} unreachable)")
    return missing


def load_model(spec: ModelSpec | str, device: str | torch.device = "cpu", *,
               cache_dir: str | os.PathLike | None = None) -> LoadedModel:
    """Load one scorer. Raises UsageError (one line) when its weights cannot be had."""
    if isinstance(spec, str):
        spec = parse_spec(spec)
    device = torch.device(device)
    cache_dir = str(cache_dir) if cache_dir else None
    missing = check_available(spec, cache_dir)
    offline = bool(needed_files(spec)) and not missing  # all cached: never touch the network
    ctx = hub_offline() if offline else contextlib.nullcontext()
    try:
        with ctx:
            model, tokenizer, weights = _create(spec, device, cache_dir)
    except CurateError:
        raise
    except Exception as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if missing:
            raise UsageError(f"could not download {spec.text!r}: {msg[:300]}; pre-fetch it with "
                             f"`{prefetch_command(spec)}`") from None
        raise CurateError(f"could not load {spec.text!r}: {type(exc).__name__}: {msg[:300]}") from exc
    pp = PreprocessConfig.from_open_clip(getattr(model.visual, "preprocess_cfg", {}) or {})
    size = getattr(model.visual, "image_size", pp.size)
    size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    embed_dim = int(getattr(model, "embed_dim", 0) or _probe_embed_dim(model, size))
    context_length = int(getattr(model, "context_length", 0) or getattr(tokenizer, "context_length", 77))
    return LoadedModel(spec=spec, model=model, preprocess=pp, tokenizer=tokenizer, embed_dim=embed_dim,
                       image_size=size, context_length=context_length, device=device, weights=weights)


def _probe_embed_dim(model: torch.nn.Module, size: tuple[int, int]) -> int:
    with torch.inference_mode():
        p = next(model.parameters())
        return int(model.encode_image(torch.zeros(1, 3, *size, device=p.device)).shape[-1])


def load_models(specs: list[ModelSpec], device: str | torch.device = "cpu", *,
                cache_dir: str | os.PathLike | None = None) -> list[LoadedModel]:
    """Load several scorers, checking every one's cache first so a missing file fails fast."""
    cache = str(cache_dir) if cache_dir else None
    for s in specs:
        check_available(s, cache)
    return [load_model(s, device, cache_dir=cache) for s in specs]
