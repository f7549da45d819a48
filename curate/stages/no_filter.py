"""`no_filter`: keep every sample (DataComp's "no filtering" baseline, and a neutral first stage)."""

from __future__ import annotations

from .base import Stage, StageInput, StageResult, decisions_frame, register_stage


@register_stage
class NoFilter(Stage):
    name = "no_filter"

    def needs_columns(self):
        return []

    def apply(self, inp: StageInput) -> StageResult:
        return StageResult(decisions_frame(inp.frame["uid"], True))
