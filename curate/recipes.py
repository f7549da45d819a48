"""Recipes: TOML files listing stages and their parameters (`pipelines/*.toml`).

    name = "datacomp_basic"
    description = "DataComp's basic filter"
    seed = 0

    [[stages]]
    stage = "basic"            # a registered stage name (curate.stages)
    # id = "basic"             # optional: how --set addresses it (default: the stage name)
    # apply_to = "pool"        # optional: decide over the whole pool, then intersect (DataComp)
    # ... parameters ...

`--set ID.PARAM=VALUE` overrides a parameter (VALUE is read as a TOML value, else as a
string; for a stage with exclusive parameters, e.g. clip_score's `threshold` and `fraction`,
setting one clears the others: `--set clip_score.threshold=0.28` turns a top-fraction recipe into
a threshold one); `--set '*.PARAM=VALUE'` sets it on every stage that takes that parameter (e.g.
`--set '*.scorer=dfn'`); `--set seed=3` sets the recipe's seed. A recipe is found by path, or by name in
./pipelines/ and then in the pipelines shipped with curate, or by one of DataComp's baseline names
(`basic_filter`, `clip_score`, ...: DATACOMP_ALIASES), which name shipped recipes.
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UsageError

SHIPPED = Path(__file__).resolve().parent.parent / "pipelines"


APPLY_TO = ("survivors", "pool")


@dataclass
class StageSpec:
    id: str
    stage: str
    params: dict
    # "survivors" (default): the stage sees what the previous stage kept. "pool": the stage
    # decides over the whole pool the run started from and its decisions are then applied to
    # the survivors; this is DataComp's intersection semantics (each baseline computed on the
    # whole pool, e.g. the top-30% CLIP threshold), independent of stage order.
    apply_to: str = "survivors"


@dataclass
class Recipe:
    name: str
    path: str
    description: str = ""
    seed: int = 0
    stages: list[StageSpec] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "description": self.description, "seed": self.seed,
                "stages": [{"id": s.id, "stage": s.stage, "apply_to": s.apply_to, "params": s.params}
                           for s in self.stages]}


# DataComp's baseline names (`baselines.py --name`, and the README's output file names) -> the
# shipped recipe that reproduces each one (docs/recipes.md). `clip_score` alone means DataComp's
# best CLIP-score setting, ViT-L/14 top 30%, the README's first clip_score example.
DATACOMP_ALIASES = {
    "no_filter": "datacomp_no_filter",
    "basic_filter": "datacomp_basic",
    "text_based": "datacomp_text_based",
    "image_based": "datacomp_image_based",
    "image_based_intersect_clip_score": "datacomp_image_clip",
    "clip_score": "datacomp_clip_l14_30",
    "laion2b": "datacomp_laion2b",
    "clip_score_l14_30_percent": "datacomp_clip_l14_30",
    "clip_score_b32_25_threshold": "datacomp_clip_b32_25",
    "image_based_intersect_clip_score_l14_30_percent": "datacomp_image_clip",
}


def find_recipe(ref: str) -> Path:
    """A recipe file: `ref` as a path, else `ref`(.toml) in ./pipelines/ and then in the shipped
    pipelines, else a DataComp baseline name (DATACOMP_ALIASES) -> its shipped recipe."""
    p = Path(ref)
    if p.exists():
        return p
    for base in (Path.cwd() / "pipelines", SHIPPED):
        for cand in (base / ref, base / f"{ref}.toml"):
            if cand.exists():
                return cand
    alias = DATACOMP_ALIASES.get(ref)
    if alias is not None and (SHIPPED / f"{alias}.toml").exists():
        return SHIPPED / f"{alias}.toml"
    shipped = sorted(x.stem for x in SHIPPED.glob("*.toml")) if SHIPPED.exists() else []
    aliases = ", ".join(f"{a} ({t})" for a, t in DATACOMP_ALIASES.items())
    raise UsageError(f"no recipe {ref!r}; give a path or one of: {', '.join(shipped) or 'none shipped'}; "
                     f"DataComp baseline names: {aliases}")


def parse_recipe(text: str, path: str = "<string>") -> Recipe:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"recipe {path}: {exc}") from None
    stages_raw = data.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise UsageError(f"recipe {path} has no [[stages]]")
    stages, seen = [], set()
    for i, st in enumerate(stages_raw):
        st = dict(st)
        name = st.pop("stage", None)
        if not name:
            raise UsageError(f"recipe {path}: stage #{i + 1} has no `stage = \"...\"`")
        sid = st.pop("id", name)
        if sid in seen:
            raise UsageError(f"recipe {path}: two stages with id {sid!r}; give one an `id`")
        seen.add(sid)
        apply_to = st.pop("apply_to", "survivors")
        if apply_to not in APPLY_TO:
            raise UsageError(f"recipe {path}: stage {sid!r} apply_to must be one of {APPLY_TO}")
        stages.append(StageSpec(sid, name, st, apply_to))
    unknown = set(data) - {"name", "description", "seed", "stages"}
    if unknown:
        raise UsageError(f"recipe {path}: unknown top-level keys {sorted(unknown)}")
    return Recipe(name=data.get("name", Path(path).stem), path=str(path), description=data.get("description", ""),
                  seed=int(data.get("seed", 0)), stages=stages)


def load_recipe(ref: str) -> Recipe:
    path = find_recipe(ref)
    return parse_recipe(path.read_text(), str(path))


def _parse_value(raw: str):
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _accepts(stage: str, param: str) -> bool:
    import inspect

    from .stages import get_stage

    return param in inspect.signature(get_stage(stage).__init__).parameters


def _set_param(spec: StageSpec, param: str, value) -> None:
    """Set a stage parameter; setting one of a group of exclusive parameters (clip_score's
    `threshold` / `fraction`) clears the others, so `--set` switches the stage's mode."""
    from .stages import get_stage

    for group in get_stage(spec.stage).exclusive_params:
        if param in group:
            for other in group:
                if other != param:
                    spec.params.pop(other, None)
    spec.params[param] = value


def apply_overrides(recipe: Recipe, sets: list[str]) -> Recipe:
    recipe = copy.deepcopy(recipe)
    by_id = {s.id: s for s in recipe.stages}
    for item in sets:
        if "=" not in item:
            raise UsageError(f"--set {item!r}: expected ID.PARAM=VALUE or seed=N")
        lhs, raw = item.split("=", 1)
        lhs = lhs.strip()
        if lhs == "seed":
            recipe.seed = int(_parse_value(raw))
            continue
        if "." not in lhs:
            raise UsageError(f"--set {item!r}: expected ID.PARAM=VALUE (stage ids: {', '.join(by_id)})")
        sid, param = lhs.split(".", 1)
        if sid == "*":
            targets = [spec for spec in recipe.stages if _accepts(spec.stage, param)]
            if not targets:
                raise UsageError(f"--set {item!r}: no stage of this recipe takes a {param!r} parameter")
            for spec in targets:
                _set_param(spec, param, _parse_value(raw.strip()))
            continue
        if sid not in by_id:
            raise UsageError(f"--set {item!r}: no stage with id {sid!r} (stage ids: {', '.join(by_id)})")
        value = _parse_value(raw.strip())
        if param == "apply_to":
            if value not in APPLY_TO:
                raise UsageError(f"--set {item!r}: apply_to must be one of {APPLY_TO}")
            by_id[sid].apply_to = value
        else:
            _set_param(by_id[sid], param, value)
    return recipe
