"""`--model SPEC` strings → `ModelSpec`.

Spec syntax (docs/models.md has the full table)::

    ARCH:TAG                open_clip built-in weights     ViT-L-14:datacomp_xl_s13b_b90k
    hf-hub:ORG/REPO         open_clip model on the HF hub  hf-hub:apple/DFN2B-CLIP-ViT-L-14
    local-dir:DIR           open_clip_config.json + weights in a directory
    ARCH@CKPT               built-in (or registered) architecture + local checkpoint
    CONFIG.json@CKPT        custom model-config JSON + local checkpoint
    CKPT                    local checkpoint; the architecture comes from `arch=`/--arch or
                            from the open_clip_train `params.txt` beside the checkpoint
    ALIAS                   dfn, dfn5b, dfn5b-378, dfn-b16, dfn-public, l14, l14-datacomp, b32, b16

Any spec may end in comma-separated options: `,name=NAME`, `,arch=ARCH`, `,resize_mode=squash`,
`,interpolation=bilinear`, `,mean=0.5:0.5:0.5`, `,std=0.5:0.5:0.5`, `,quick_gelu=true`
(checkpoints only). Example: `b32,name=b32-squash,resize_mode=squash`.

QuickGELU pinning. open_clip trains some weights (OpenAI, MetaCLIP, DFN) with QuickGELU; loading
them into a GELU model only warns and yields wrong embeddings. Tags are checked against
open_clip's own pretrained table: `ViT-L-14:dfn2b` is rewritten to `ViT-L-14-quickgelu:dfn2b`
(and `ViT-L-14-quickgelu:dfn2b_s39b` to `ViT-L-14:dfn2b_s39b`), with a note in `spec.notes`.
Local checkpoints are checked against open_clip_train's `params.txt` when one is found.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import UsageError

CONFIG_DIR = Path(__file__).with_name("configs")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
QUICKGELU_SUFFIX = "-quickgelu"
RESIZE_MODES = ("shortest", "squash", "longest")
INTERPOLATIONS = ("bicubic", "bilinear")
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,99}$")
_OPTION_KEYS = ("name", "arch", "resize_mode", "interpolation", "mean", "std", "quick_gelu")

# Friendly names. `dfn` is the DFN-2B ViT-L/14 (the files of hf-hub:apple/DFN2B-CLIP-ViT-L-14,
# loaded through open_clip's pinned built-in config): the H/14 dfn5b costs ~2x (378 px: ~6x) the
# FLOPs per image, and DFN's finding is that a filter's quality comes from its training data, not
# its size. `l14`/`b32` are the OpenAI models behind DataComp's clip_l14/clip_b32 scores.
ALIASES: dict[str, str] = {
    "dfn": "ViT-L-14-quickgelu:dfn2b",
    "dfn2b": "ViT-L-14-quickgelu:dfn2b",
    "dfn-l14": "ViT-L-14-quickgelu:dfn2b",
    "dfn-l14-39b": "ViT-L-14:dfn2b_s39b",
    "dfn-b16": "ViT-B-16-quickgelu:dfn2b",
    "dfn5b": "ViT-H-14-quickgelu:dfn5b",
    "dfn5b-378": "ViT-H-14-378-quickgelu:dfn5b",
    "dfn-public": "hf-hub:apple/DFN-public",
    "l14": "ViT-L-14-quickgelu:openai",
    "l14-datacomp": "ViT-L-14:datacomp_xl_s13b_b90k",
    "b32": "ViT-B-32-quickgelu:openai",
    "b32-datacomp": "ViT-B-32:datacomp_xl_s13b_b90k",
    "b16": "ViT-B-16-quickgelu:openai",
}


@dataclass(frozen=True)
class ModelSpec:
    """A resolved scorer spec. `kind` is open_clip (built-in ARCH:TAG), hf_hub, local_dir or checkpoint."""

    text: str                                # what the user wrote
    kind: str
    name: str                                # scorer name: file-name safe, used for embedding dirs
    arch: str | None = None                  # open_clip model name (pinned quickgelu variant)
    pretrained: str | None = None            # open_clip tag (kind open_clip)
    hub_id: str | None = None                # ORG/REPO (kind hf_hub)
    path: str | None = None                  # checkpoint file or local-dir directory (absolute)
    config: str | None = None                # custom model-config JSON (absolute)
    force_quick_gelu: bool = False
    preprocess: tuple[tuple[str, Any], ...] = ()   # overrides: resize_mode, interpolation, mean, std
    notes: tuple[str, ...] = field(default=(), compare=False)  # corrections made while resolving
    default_name: str = field(default="", compare=False)       # the name derived from the spec itself

    @property
    def preprocess_overrides(self) -> dict[str, Any]:
        return dict(self.preprocess)

    @property
    def canonical(self) -> str:
        """A spec string that parses back to this spec (stored in the manifest's scorers.spec)."""
        if self.kind == "open_clip":
            head = f"{self.arch}:{self.pretrained}"
        elif self.kind == "hf_hub":
            head = f"hf-hub:{self.hub_id}"
        elif self.kind == "local_dir":
            head = f"local-dir:{self.path}"
        elif self.config:
            head = f"{self.config}@{self.path}"
        else:
            head = f"{self.arch}@{self.path}"
        opts = [f"name={self.name}"] if self.name != self.default_name else []
        if self.force_quick_gelu and self.kind in ("checkpoint", "local_dir"):
            opts.append("quick_gelu=true")
        for k, v in self.preprocess:
            opts.append(f"{k}={':'.join(map(str, v)) if isinstance(v, tuple) else v}")
        return ",".join([head, *opts])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["preprocess"] = self.preprocess_overrides
        d["notes"] = list(self.notes)
        d["canonical"] = self.canonical
        return d


# ---- open_clip registry views ---------------------------------------------------------

_registered = False


def ensure_configs_registered() -> None:
    """Register curate's own model configs (tiny test/demo models) with open_clip, once."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def _models() -> list[str]:
    import open_clip

    ensure_configs_registered()
    return open_clip.list_models()


def _model_cfg(arch: str) -> dict | None:
    import open_clip

    ensure_configs_registered()
    return open_clip.get_model_config(arch)


@lru_cache(maxsize=None)
def _pretrained_table() -> dict[str, dict[str, dict]]:
    """{arch: {tag: pretrained cfg}} from open_clip's installed pretrained.py."""
    import open_clip
    from open_clip.pretrained import get_pretrained_cfg

    table: dict[str, dict[str, dict]] = {}
    for arch, tag in open_clip.list_pretrained():
        table.setdefault(arch, {})[tag] = get_pretrained_cfg(arch, tag)
    return table


@lru_cache(maxsize=None)
def known_hub_quick_gelu() -> dict[str, bool]:
    """{ORG/REPO: trained with QuickGELU} for every hub repo open_clip's pretrained table names."""
    out: dict[str, bool] = {}
    for tags in _pretrained_table().values():
        for cfg in tags.values():
            hub = (cfg.get("hf_hub") or "").strip("/")
            if hub:
                repo = "/".join(hub.split("/")[:2])
                out[repo] = out.get(repo, False) or bool(cfg.get("quick_gelu", False))
    return out


def _canonical_arch(arch: str) -> str | None:
    models = _models()
    if arch in models:
        return arch
    cleaned = arch.replace("/", "-")
    if cleaned in models:
        return cleaned
    lower = {m.lower(): m for m in models}
    return lower.get(cleaned.lower())


def _base_arch(arch: str) -> str:
    return arch[: -len(QUICKGELU_SUFFIX)] if arch.endswith(QUICKGELU_SUFFIX) else arch


def _sibling_arch(arch: str) -> str:
    return _base_arch(arch) if arch.endswith(QUICKGELU_SUFFIX) else arch + QUICKGELU_SUFFIX


def _clean_tag(tag: str) -> str:
    return tag.lower().replace("-", "_")


def _arch_quick_gelu(arch: str) -> bool:
    return bool((_model_cfg(arch) or {}).get("quick_gelu", False))


# ---- names ----------------------------------------------------------------------------

def safe_name(text: str) -> str:
    """Lowercase, file-name safe: [a-z0-9._-], at most 100 characters."""
    s = re.sub(r"[^a-z0-9._-]+", "-", text.lower())
    s = re.sub(r"-{2,}", "-", s).strip("-._")
    return s[:100].rstrip("-._") or "model"


def validate_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise UsageError(
            f"scorer name {name!r} is not file-name safe: use lowercase letters, digits, '.', '_' and '-' "
            f"(at most 100 characters, starting with a letter or digit), e.g. {safe_name(name)!r}")
    return name


# ---- parsing --------------------------------------------------------------------------

def _split_options(text: str) -> tuple[str, dict[str, str]]:
    head, *rest = [p.strip() for p in text.split(",")]
    opts: dict[str, str] = {}
    for part in rest:
        if not part:
            continue
        key, eq, value = part.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not eq or key not in _OPTION_KEYS:
            raise UsageError(f"bad model option {part!r} in {text!r}: expected key=value with key one of "
                             f"{', '.join(_OPTION_KEYS)}")
        if key in opts:
            raise UsageError(f"model option {key!r} given twice in {text!r}")
        opts[key] = value.strip()
    return head, opts


def _parse_bool(value: str, what: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise UsageError(f"{what}: expected true or false, got {value!r}")


def _parse_triple(value: str, what: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in re.split(r"[:/ ]+", value.strip()) if x)
    except ValueError:
        parts = ()
    if len(parts) == 1:
        parts = parts * 3
    if len(parts) != 3:
        raise UsageError(f"{what}: expected three numbers like 0.5:0.5:0.5, got {value!r}")
    if what == "std" and any(p <= 0 for p in parts):
        raise UsageError(f"std must be positive, got {value!r}")
    return parts  # type: ignore[return-value]


def _preprocess_options(opts: dict[str, str]) -> tuple[tuple[str, Any], ...]:
    out: list[tuple[str, Any]] = []
    if "resize_mode" in opts:
        v = opts["resize_mode"].lower()
        if v not in RESIZE_MODES:
            raise UsageError(f"resize_mode must be one of {', '.join(RESIZE_MODES)}, got {v!r}")
        out.append(("resize_mode", v))
    if "interpolation" in opts:
        v = opts["interpolation"].lower()
        if v not in INTERPOLATIONS:
            raise UsageError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {v!r}")
        out.append(("interpolation", v))
    for key in ("mean", "std"):
        if key in opts:
            out.append((key, _parse_triple(opts[key], key)))
    return tuple(out)


def _suggest(word: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=3, cutoff=0.6)
    if not close:
        lower = {c.lower(): c for c in candidates}
        close = [lower[c] for c in difflib.get_close_matches(word.lower(), list(lower), n=3, cutoff=0.6)]
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _resolve_tag(arch_text: str, tag_text: str) -> tuple[str, str, bool, list[str]]:
    """(arch, tag, force_quick_gelu, notes) for a built-in ARCH:TAG, quickgelu pinned."""
    arch = _canonical_arch(arch_text)
    if arch is None:
        raise UsageError(f"unknown open_clip architecture {arch_text!r}{_suggest(arch_text, _models())}; "
                         f"`python -c 'import open_clip; print(open_clip.list_pretrained())'` lists them")
    tag = _clean_tag(tag_text)
    table = _pretrained_table()
    notes: list[str] = []
    sibling = _sibling_arch(arch)
    if tag not in table.get(arch, {}):
        if tag in table.get(sibling, {}) and _canonical_arch(sibling):
            notes.append(f"{arch}:{tag} is not an open_clip pretrained pair; using {sibling}:{tag}")
            arch = sibling
        else:
            tags = sorted(table.get(arch, {}))
            hint = f"; tags for {arch}: {', '.join(tags)}" if tags else f"; {arch} has no pretrained weights in open_clip"
            raise UsageError(f"unknown pretrained tag {tag_text!r} for {arch}{_suggest(tag, tags)}{hint}")
    cfg = table[arch][tag]
    # A tag without a quick_gelu entry was trained with its architecture's own config (e.g.
    # roberta-ViT-B-32, whose config has QuickGELU); only an explicit entry can disagree.
    tag_qg = bool(cfg.get("quick_gelu", _arch_quick_gelu(arch)))
    model_qg = _arch_quick_gelu(arch)
    force = False
    if tag_qg != model_qg:
        if tag in table.get(sibling, {}) and _canonical_arch(sibling) and _arch_quick_gelu(sibling) == tag_qg:
            notes.append(f"{arch}:{tag} weights were trained with {'QuickGELU' if tag_qg else 'GELU'}; "
                         f"pinned to {sibling}:{tag} (the other activation only warns and gives wrong scores)")
            arch = sibling
        elif tag_qg:
            force = True
            notes.append(f"{arch}:{tag} weights were trained with QuickGELU; forcing QuickGELU")
        else:
            raise UsageError(f"{arch}:{tag} weights were trained with GELU but {arch} uses QuickGELU; "
                             f"use {_base_arch(arch)}:{tag}")
    return arch, tag, force, notes


def _read_params_txt(ckpt: Path) -> dict[str, str]:
    """open_clip_train writes LOGS/NAME/params.txt ('key: value' lines) beside checkpoints/."""
    for d in (ckpt.parent, ckpt.parent.parent):
        p = d / "params.txt"
        if p.is_file():
            out = {}
            try:
                for line in p.read_text(errors="replace").splitlines():
                    k, sep, v = line.partition(": ")
                    if sep:
                        out[k.strip()] = v.strip()
            except OSError:
                return {}
            return out
    return {}


def _load_config_json(path: Path) -> tuple[dict, dict]:
    """(model_cfg, preprocess_cfg) from a bare model config or an open_clip_config.json."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read model config {path}: {exc}") from None
    model_cfg = data.get("model_cfg", data) if isinstance(data, dict) else None
    if not isinstance(model_cfg, dict) or not all(k in model_cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        raise UsageError(f"{path} is not an open_clip model config (needs embed_dim, vision_cfg and text_cfg, "
                         f"at the top level or under model_cfg)")
    pp = data.get("preprocess_cfg", {}) if isinstance(data, dict) else {}
    return model_cfg, pp if isinstance(pp, dict) else {}


def _checkpoint_path(text: str, spec_text: str) -> Path:
    p = Path(os.path.expanduser(text))
    if not p.is_file():
        raise UsageError(f"checkpoint {text!r} (from --model {spec_text!r}) does not exist or is not a file")
    return p.absolute()


def _checkpoint_name(prefix: str, ckpt: Path) -> str:
    # open_clip_train layout LOGS/RUN/checkpoints/epoch_N.pt: keep RUN so epochs of runs differ
    parts = [prefix]
    if ckpt.parent.name == "checkpoints" and ckpt.parent.parent.name:
        parts.append(ckpt.parent.parent.name)
    parts.append(ckpt.stem)
    return safe_name("-".join(parts))


def _resolve_checkpoint(text: str, arch_text: str | None, config_text: str | None, ckpt_text: str,
                        opts: dict[str, str]) -> dict[str, Any]:
    ckpt = _checkpoint_path(ckpt_text, text)
    notes: list[str] = []
    params = _read_params_txt(ckpt)
    trained_arch = params.get("model")
    trained_qg = None
    if trained_arch:
        trained_qg = params.get("force_quick_gelu", "False") == "True"
        if _canonical_arch(trained_arch):
            trained_qg = trained_qg or _arch_quick_gelu(_canonical_arch(trained_arch))
        elif trained_arch.endswith(QUICKGELU_SUFFIX):
            trained_qg = True
    force_qg = _parse_bool(opts["quick_gelu"], "quick_gelu") if "quick_gelu" in opts else None

    if config_text is not None:
        cfg_path = Path(os.path.expanduser(config_text)).absolute()
        if not cfg_path.is_file():
            raise UsageError(f"model config {config_text!r} (from --model {text!r}) does not exist")
        model_cfg, _ = _load_config_json(cfg_path)
        model_qg = bool(model_cfg.get("quick_gelu", False))
        arch, prefix = None, cfg_path.stem
    else:
        if arch_text is None:
            if not trained_arch:
                raise UsageError(
                    f"checkpoint {ckpt_text!r} needs an architecture: write ARCH@{ckpt_text} (e.g. ViT-B-32@...), "
                    f"pass --arch ARCH, or keep open_clip_train's params.txt beside it")
            arch_text = trained_arch
            notes.append(f"architecture {trained_arch} read from {ckpt.parent.parent.name}/params.txt")
        arch = _canonical_arch(arch_text)
        if arch is None:
            raise UsageError(f"unknown open_clip architecture {arch_text!r}{_suggest(arch_text, _models())} "
                             f"(a custom one can be given as CONFIG.json@CHECKPOINT)")
        cfg_path, prefix = None, _base_arch(arch).lower()
        model_qg = _arch_quick_gelu(arch)

    if force_qg is False and model_qg:
        sib = _canonical_arch(_sibling_arch(arch)) if arch else None
        if sib is None:
            raise UsageError(f"quick_gelu=false conflicts with {arch or cfg_path}, which uses QuickGELU")
        arch, model_qg = sib, False
    wanted_qg = force_qg if force_qg is not None else trained_qg
    force = False
    if wanted_qg is not None and wanted_qg != model_qg:
        source = "quick_gelu option" if force_qg is not None else "open_clip_train params.txt"
        if arch and _canonical_arch(_sibling_arch(arch)) and _arch_quick_gelu(_canonical_arch(_sibling_arch(arch))) == wanted_qg:
            notes.append(f"{source} says the checkpoint was trained with {'QuickGELU' if wanted_qg else 'GELU'}; "
                         f"using {_sibling_arch(arch)} instead of {arch}")
            arch = _canonical_arch(_sibling_arch(arch))
        elif wanted_qg:
            force = True
            notes.append(f"{source} says the checkpoint was trained with QuickGELU; forcing QuickGELU")
        else:
            raise UsageError(f"the checkpoint was trained with GELU ({source}) but {arch or cfg_path} uses QuickGELU")
    return dict(kind="checkpoint", arch=arch, path=str(ckpt), config=str(cfg_path) if cfg_path else None,
                force_quick_gelu=force, notes=notes, default_name=_checkpoint_name(prefix, ckpt))


def _looks_like_path(head: str) -> bool:
    return (head.lower().endswith(CHECKPOINT_SUFFIXES) or head.lower().endswith(".json")
            or "/" in head and not head.startswith("hf-hub:") or Path(os.path.expanduser(head)).exists())


def parse_spec(text: str, *, arch: str | None = None, name: str | None = None) -> ModelSpec:
    """Resolve a `--model` string. `arch`/`name` come from --arch/--name (single-model runs).

    Raises UsageError with one clear line for anything that cannot be resolved.
    """
    if not text or not text.strip():
        raise UsageError("empty --model spec")
    head, opts = _split_options(text.strip())
    for key, value in (("arch", arch), ("name", name)):
        if value is not None:
            if key in opts and opts[key] != value:
                raise UsageError(f"--{key} {value!r} conflicts with {key}={opts[key]} in {text!r}")
            opts[key] = value
    notes: list[str] = []
    if head.lower() in ALIASES:
        notes.append(f"alias {head.lower()} = {ALIASES[head.lower()]}")
        head = ALIASES[head.lower()]
    preprocess = _preprocess_options(opts)
    fields: dict[str, Any]

    if head.startswith("hf-hub:"):
        hub_id = head[len("hf-hub:"):].strip().strip("/")
        if not re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", hub_id):
            raise UsageError(f"bad hub name {head!r}: expected hf-hub:ORG/REPO, e.g. hf-hub:apple/DFN2B-CLIP-ViT-L-14")
        force = known_hub_quick_gelu().get(hub_id, False)
        fields = dict(kind="hf_hub", hub_id=hub_id, force_quick_gelu=force, default_name=safe_name(hub_id.replace("/", "-")))
    elif head.startswith("local-dir:"):
        d = Path(os.path.expanduser(head[len("local-dir:"):])).absolute()
        if not (d / "open_clip_config.json").is_file():
            raise UsageError(f"{head!r}: {d} has no open_clip_config.json")
        fields = dict(kind="local_dir", path=str(d), default_name=safe_name(d.name))
        if "quick_gelu" in opts and _parse_bool(opts["quick_gelu"], "quick_gelu"):
            fields["force_quick_gelu"] = True
    elif "@" in head:
        left, _, right = head.partition("@")
        if not left or not right:
            raise UsageError(f"bad spec {head!r}: expected ARCH@CHECKPOINT or CONFIG.json@CHECKPOINT")
        if "arch" in opts and not left.lower().endswith(".json") and _canonical_arch(opts["arch"]) != _canonical_arch(left):
            raise UsageError(f"arch={opts['arch']} conflicts with {left}@ in {text!r}")
        if left.lower().endswith(".json"):
            fields = _resolve_checkpoint(text, None, left, right, opts)
        else:
            fields = _resolve_checkpoint(text, left, None, right, opts)
    elif ":" in head and _canonical_arch(head.partition(":")[0]) is not None:
        if "quick_gelu" in opts:
            raise UsageError("quick_gelu= applies to local checkpoints; ARCH:TAG weights are pinned from open_clip's table")
        a, _, tag = head.partition(":")
        arch_c, tag_c, force, tag_notes = _resolve_tag(a, tag)
        notes += tag_notes
        fields = dict(kind="open_clip", arch=arch_c, pretrained=tag_c, force_quick_gelu=force,
                      default_name=safe_name(f"{_base_arch(arch_c)}-{tag_c}"))
    elif _looks_like_path(head):
        if head.lower().endswith(".json"):
            raise UsageError(f"a model config needs weights: write {head}@CHECKPOINT "
                             f"(scoring with randomly initialised weights is meaningless)")
        fields = _resolve_checkpoint(text, opts.get("arch"), None, head, opts)
    elif ":" in head:
        _resolve_tag(*head.split(":", 1))  # raises: unknown architecture, with suggestions
        raise AssertionError("unreachable")
    elif _canonical_arch(head) is not None:
        a = _canonical_arch(head)
        tags = sorted(_pretrained_table().get(a, {}))
        hint = f"; tags: {', '.join(tags)}" if tags else ""
        raise UsageError(f"{a} needs weights: write {a}:TAG or {a}@CHECKPOINT{hint}")
    else:
        raise UsageError(
            f"cannot resolve --model {text!r}{_suggest(head, list(ALIASES) + _models())}: expected an alias "
            f"({', '.join(ALIASES)}), ARCH:TAG, hf-hub:ORG/REPO, local-dir:DIR, ARCH@CHECKPOINT or CONFIG.json@CHECKPOINT")

    notes += fields.pop("notes", [])
    default_name = fields.pop("default_name")
    final_name = validate_name(opts["name"]) if "name" in opts else default_name
    return ModelSpec(text=text, name=final_name, preprocess=preprocess, notes=tuple(notes),
                     default_name=default_name, **fields)


def parse_specs(texts: list[str], *, arch: str | None = None, name: str | None = None) -> list[ModelSpec]:
    """Several --model values; --arch/--name only make sense with one, and names must be unique."""
    if len(texts) > 1 and (arch or name):
        raise UsageError("--arch/--name apply to a single --model; with several, write ,arch=/,name= inside each spec")
    specs = [parse_spec(t, arch=arch, name=name) for t in texts]
    seen: dict[str, str] = {}
    for s in specs:
        if s.name in seen:
            raise UsageError(f"two --model specs resolve to the scorer name {s.name!r} ({seen[s.name]!r} and "
                             f"{s.text!r}); add ,name=OTHER to one of them")
        seen[s.name] = s.text
    return specs


def with_name(spec: ModelSpec, name: str) -> ModelSpec:
    return replace(spec, name=validate_name(name))
