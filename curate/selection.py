"""Which samples a run kept: the result of a prune run, or the state after any of its stages.

A prune run records one decision per sample per stage that saw it; stage k sees exactly what
stage k-1 kept. So the state after stage k is the set of uids with `keep` at stage k, and the
run's result is the state after its last stage.
"""

from __future__ import annotations

import polars as pl

from .errors import UsageError


def resolve_run(manifest, run_id: int | None) -> int:
    """The given prune run (checked), or the latest finished one."""
    if run_id is None:
        row = manifest.one(
            "SELECT run_id FROM runs WHERE command = 'prune' AND status = 'ok' ORDER BY run_id DESC LIMIT 1")
        if row is None:
            raise UsageError("no finished prune run in this workspace; run `curate prune` first or pass --run")
        return int(row[0])
    row = manifest.one("SELECT command, status FROM runs WHERE run_id = ?", [run_id])
    if row is None:
        raise UsageError(f"no run {run_id} in this workspace")
    if row[0] != "prune" or row[1] != "ok":
        raise UsageError(f"run {run_id} is a {row[0]} run with status {row[1]}; give a finished prune run")
    return int(run_id)


def stages_of(manifest, run_id: int) -> list[tuple[int, str]]:
    return [(int(i), s) for i, s in manifest.execute(
        "SELECT stage_idx, stage FROM stage_stats WHERE run_id = ? ORDER BY stage_idx", [run_id]).fetchall()]


def resolve_stage(manifest, run_id: int, stage: str | int | None) -> int:
    stages = stages_of(manifest, run_id)
    if not stages:
        raise UsageError(f"run {run_id} recorded no stages")
    if stage is None:
        return stages[-1][0]
    for idx, sid in stages:
        if str(stage) == sid or str(stage) == str(idx):
            return idx
    raise UsageError(f"run {run_id} has no stage {stage!r}; its stages: "
                     + ", ".join(f"{i}:{s}" for i, s in stages))


def kept_uids(manifest, run_id: int | None = None, stage: str | int | None = None) -> tuple[int, int, pl.DataFrame]:
    """(run_id, stage_idx, frame of kept `uid`s) for a run's result or the state after a stage."""
    run_id = resolve_run(manifest, run_id)
    idx = resolve_stage(manifest, run_id, stage)
    frame = manifest.frame("SELECT uid FROM decisions WHERE run_id = ? AND stage_idx = ? AND keep", [run_id, idx])
    return run_id, idx, frame
